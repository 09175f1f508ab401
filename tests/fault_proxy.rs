//! The tests' fault proxy (`common::fault_proxy`) against a real
//! redis-server: bytes pass unchanged, each connection's `CLIENT SETNAME`
//! name is learnt, and each fault (latency, jitter, blackhole, bandwidth,
//! reset, half-open) does what it says to the connections it selects, and only
//! to them.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::RedisServer;
use common::fault_proxy::{ConnectionState, Fault, FaultProxy, Scope, Select};

/// How long a connection may take to show up at the proxy, to leave
/// Redis's client list, or to answer when nothing stands in the way.
const SOON: Duration = Duration::from_secs(1);

fn proxy_for(redis: &RedisServer) -> FaultProxy {
    FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)))
}

/// A redis-rs connection to `url`, with a read timeout.
fn redis_connection(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("bad Redis URL {url}: {e}"));
    let conn = client
        .get_connection_with_timeout(SOON)
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("cannot set a read timeout on {url}: {e}"));
    conn
}

/// A command as RESP: an array of bulk strings.
fn command(args: &[&str]) -> Vec<u8> {
    let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        bytes.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    bytes
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A bare RESP connection through the proxy: commands go out as written,
/// replies are read line by line. Unlike redis-rs it never retries, skips a
/// late reply or reconnects, so what the proxy does is what a test sees.
struct Raw {
    stream: TcpStream,
    /// Read, not yet returned as a line.
    pending: Vec<u8>,
}

impl Raw {
    fn connect(proxy: &FaultProxy) -> Raw {
        let addr = SocketAddr::from(([127, 0, 0, 1], proxy.port()));
        let stream = TcpStream::connect_timeout(&addr, SOON)
            .unwrap_or_else(|e| panic!("cannot connect to the proxy at {addr}: {e}"));
        stream
            .set_nodelay(true)
            .unwrap_or_else(|e| panic!("TCP_NODELAY: {e}"));
        stream
            .set_write_timeout(Some(SOON))
            .unwrap_or_else(|e| panic!("cannot set a write timeout: {e}"));
        Raw {
            stream,
            pending: Vec::new(),
        }
    }

    /// Connects and names the connection `name`.
    fn named(proxy: &FaultProxy, name: &str) -> Raw {
        let mut raw = Raw::connect(proxy);
        raw.send(&["CLIENT", "SETNAME", name]);
        raw.expect_line("+OK", SOON);
        raw
    }

    fn send(&mut self, args: &[&str]) {
        self.send_bytes(&command(args));
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("cannot write to the proxy: {e}"));
    }

    /// The next reply line (`+PONG`), waiting at most `within` for it.
    fn line(&mut self, within: Duration) -> io::Result<String> {
        let deadline = Instant::now() + within;
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.windows(2).position(|pair| pair == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..end + 2).take(end).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buffer)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                count => self.pending.extend_from_slice(&buffer[..count]),
            }
        }
    }

    fn expect_line(&mut self, expected: &str, within: Duration) {
        match self.line(within) {
            Ok(line) => assert_eq!(line, expected, "unexpected reply"),
            Err(e) => panic!("expected {expected:?} within {within:?}, got {e}"),
        }
    }

    /// Asserts that nothing at all (no byte, no EOF, no reset) arrives
    /// within `wait`.
    fn expect_silence(&mut self, wait: Duration) {
        match self.line(wait) {
            Err(e) if is_timeout(&e) => {}
            other => panic!("expected silence for {wait:?}, got {other:?}"),
        }
    }
}

/// Whether Redis lists a client named `name`.
fn redis_lists(redis: &RedisServer, name: &str) -> bool {
    let mut conn = redis
        .connection()
        .unwrap_or_else(|e| panic!("cannot reach redis-server directly: {e}"));
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("CLIENT LIST failed: {e}"));
    list.lines()
        .any(|line| line.contains(&format!(" name={name} ")))
}

/// Waits up to [`SOON`] until Redis lists (or, `listed` false, no longer
/// lists) a client named `name`.
fn wait_redis_lists(redis: &RedisServer, name: &str, listed: bool) {
    let deadline = Instant::now() + SOON;
    while redis_lists(redis, name) != listed {
        assert!(
            Instant::now() < deadline,
            "Redis still {} {name} after {SOON:?}",
            if listed { "does not list" } else { "lists" }
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn state_of(proxy: &FaultProxy, name: &str) -> ConnectionState {
    let connections = proxy.connections();
    connections
        .iter()
        .find(|c| c.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no connection named {name} in {connections:#?}"))
        .state
}

#[test]
fn bytes_pass_unchanged_and_the_name_is_learnt() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut conn = redis_connection(&proxy.url());
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("fp:plain")
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("CLIENT SETNAME through the proxy failed: {e}"));
    let info = proxy.wait_for(&Select::name_ends_with(":plain"), SOON);
    assert_eq!(info.name.as_deref(), Some("fp:plain"));
    assert!(info.is_open());

    // Every byte value, over more than one read and more than the proxy
    // holds at once: each comes back as it went.
    let value: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    redis::cmd("SET")
        .arg("fp:bytes")
        .arg(&value)
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("SET through the proxy failed: {e}"));
    let back: Vec<u8> = redis::cmd("GET")
        .arg("fp:bytes")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("GET through the proxy failed: {e}"));
    assert!(
        back == value,
        "{} bytes came back for {}, first difference at {:?}",
        back.len(),
        value.len(),
        back.iter().zip(&value).position(|(a, b)| a != b)
    );
}

#[test]
fn names_are_learnt_after_auth_and_across_reads() {
    let redis = RedisServer::start_with_password("fp-secret");
    let proxy = proxy_for(&redis);

    // redis-rs sends AUTH (and CLIENT SETINFO) before the test's SETNAME.
    let mut conn = redis_connection(&proxy.url_with_password("fp-secret"));
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("fp:after-auth")
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("CLIENT SETNAME after AUTH failed: {e}"));
    proxy.wait_for(&Select::name_ends_with(":after-auth"), SOON);

    // AUTH, SELECT and a lowercase SETNAME in one write.
    let mut one_write = Raw::connect(&proxy);
    one_write.send_bytes(
        &[
            command(&["AUTH", "fp-secret"]),
            command(&["SELECT", "0"]),
            command(&["client", "setname", "fp:one-write"]),
        ]
        .concat(),
    );
    for _ in 0..3 {
        one_write.expect_line("+OK", SOON);
    }
    proxy.wait_for(&Select::name_ends_with(":one-write"), SOON);

    // After a SET whose value looks like a SETNAME (it must not be taken
    // for one), a SETNAME arriving in five reads.
    let mut split = Raw::connect(&proxy);
    split.send(&["AUTH", "fp-secret"]);
    split.expect_line("+OK", SOON);
    let decoy = String::from_utf8(command(&["CLIENT", "SETNAME", "fp:decoy"]))
        .unwrap_or_else(|e| panic!("RESP of ASCII is ASCII: {e}"));
    split.send(&["SET", "fp:decoy", &decoy]);
    split.expect_line("+OK", SOON);
    for piece in command(&["CLIENT", "SETNAME", "fp:split"]).chunks(9) {
        split.send_bytes(piece);
        thread::sleep(Duration::from_millis(30));
    }
    split.expect_line("+OK", SOON);
    let info = proxy.wait_for(&Select::name_ends_with(":split"), SOON);
    assert_eq!(info.name.as_deref(), Some("fp:split"));
    assert!(
        proxy
            .connections()
            .iter()
            .all(|c| c.name.as_deref() != Some("fp:decoy")),
        "a SET's value was taken for a name: {:#?}",
        proxy.connections()
    );
}

#[test]
fn latency_delays_each_chunk_once_without_adding_up() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut raw = Raw::connect(&proxy);
    raw.send(&["PING"]);
    raw.expect_line("+PONG", SOON);

    let latency = proxy.inject(
        Select::All,
        Fault::Latency(Duration::from_millis(200)),
        Scope::OpenNow,
    );
    let started = Instant::now();
    raw.send(&["PING"]);
    raw.expect_line("+PONG", Duration::from_secs(3));
    let round_trip = started.elapsed();
    assert!(
        round_trip >= Duration::from_millis(390) && round_trip < Duration::from_secs(2),
        "a PING through 200 ms each way took {round_trip:?}"
    );

    // Twenty PINGs in twenty writes: each chunk waits 200 ms from its own
    // arrival, so the burst takes one round trip, not twenty.
    let started = Instant::now();
    for _ in 0..20 {
        raw.send(&["PING"]);
    }
    for _ in 0..20 {
        raw.expect_line("+PONG", Duration::from_secs(3));
    }
    let burst = started.elapsed();
    assert!(
        burst >= Duration::from_millis(390) && burst < Duration::from_millis(1500),
        "20 pipelined PINGs through 200 ms each way took {burst:?}"
    );

    proxy.remove(latency);
    let started = Instant::now();
    raw.send(&["PING"]);
    raw.expect_line("+PONG", SOON);
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "a PING took {:?} with the latency removed",
        started.elapsed()
    );
}

#[test]
fn jitter_adds_up_to_its_spread_and_keeps_the_order() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut raw = Raw::connect(&proxy);
    raw.send(&["PING"]);
    raw.expect_line("+PONG", SOON);

    proxy.inject(
        Select::All,
        Fault::Latency(Duration::from_millis(50)),
        Scope::OpenNow,
    );
    proxy.inject(
        Select::All,
        Fault::Jitter(Duration::from_millis(100)),
        Scope::OpenNow,
    );
    // Each round trip is two chunks, each held 50 ms and a random share of
    // 100 ms: between 100 and 300 ms, and not always the same.
    let mut trips = Vec::new();
    for i in 0..10 {
        let started = Instant::now();
        let key = format!("k{i}");
        raw.send(&["ECHO", &key]);
        raw.expect_line(&format!("${}", key.len()), Duration::from_secs(3));
        raw.expect_line(&key, Duration::from_secs(3));
        trips.push(started.elapsed());
    }
    for trip in &trips {
        assert!(
            *trip >= Duration::from_millis(95) && *trip < Duration::from_millis(1000),
            "a round trip through 50 ms + up to 100 ms of jitter each way took {trip:?}: {trips:?}"
        );
    }
    let (least, most) = (trips.iter().min().unwrap(), trips.iter().max().unwrap());
    assert!(
        *most - *least >= Duration::from_millis(10),
        "ten round trips with 100 ms of jitter each way all took about the same: {trips:?}"
    );

    // Pipelined: the replies come back in the order sent, whatever each
    // chunk drew.
    for i in 0..20 {
        raw.send(&["ECHO", &format!("p{i}")]);
    }
    for i in 0..20 {
        let key = format!("p{i}");
        raw.expect_line(&format!("${}", key.len()), Duration::from_secs(5));
        raw.expect_line(&key, Duration::from_secs(5));
    }
}

#[test]
fn a_blackhole_holds_the_bytes_until_healed() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut held = Raw::named(&proxy, "fp:held");
    proxy.inject(Select::All, Fault::Blackhole, Scope::OpenNow);
    held.send(&["PING"]);
    held.expect_silence(Duration::from_millis(500));
    assert_eq!(state_of(&proxy, "fp:held"), ConnectionState::Open);

    // Scope::OpenNow: a connection opened since is not caught.
    let mut later = Raw::connect(&proxy);
    later.send(&["PING"]);
    later.expect_line("+PONG", SOON);

    let healed = Instant::now();
    proxy.heal();
    held.expect_line("+PONG", SOON);
    assert!(
        healed.elapsed() < Duration::from_millis(200),
        "the held PONG took {:?} after heal()",
        healed.elapsed()
    );
    held.send(&["PING"]);
    held.expect_line("+PONG", SOON);
}

#[test]
fn a_sticky_blackhole_catches_a_connection_when_it_names_itself() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    proxy.inject(
        Select::name_ends_with(":sub"),
        Fault::Blackhole,
        Scope::AlsoNew,
    );

    let mut sub = Raw::connect(&proxy);
    sub.send(&["CLIENT", "SETNAME", "fp:sticky:sub"]);
    // The SETNAME reaches Redis; from then on nothing passes, its +OK
    // included.
    sub.expect_silence(Duration::from_millis(500));
    wait_redis_lists(&redis, "fp:sticky:sub", true);
    sub.send(&["PING"]);

    let mut publisher = Raw::named(&proxy, "fp:sticky:pub");
    publisher.send(&["PING"]);
    publisher.expect_line("+PONG", SOON);
    sub.expect_silence(Duration::from_millis(100));

    proxy.heal();
    sub.expect_line("+OK", SOON);
    sub.expect_line("+PONG", SOON);
}

#[test]
fn a_sticky_blackhole_on_unnamed_connections_still_learns_their_names() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    // Every connection but the publisher's: one with no name yet is held
    // until its name shows whether it is the publisher's.
    proxy.inject(
        !Select::name_ends_with(":pub"),
        Fault::Blackhole,
        Scope::AlsoNew,
    );

    let mut publisher = Raw::named(&proxy, "fp:unnamed:pub");
    publisher.send(&["PING"]);
    publisher.expect_line("+PONG", SOON);

    let mut sub = Raw::connect(&proxy);
    sub.send(&["CLIENT", "SETNAME", "fp:unnamed:sub"]);
    // The proxy has read the name, and holds the SETNAME from Redis.
    let info = proxy.wait_for(&Select::name_ends_with(":unnamed:sub"), SOON);
    assert_eq!(info.name.as_deref(), Some("fp:unnamed:sub"));
    sub.expect_silence(Duration::from_millis(300));
    assert!(
        !redis_lists(&redis, "fp:unnamed:sub"),
        "the held SETNAME reached Redis"
    );

    proxy.heal();
    sub.expect_line("+OK", SOON);
    wait_redis_lists(&redis, "fp:unnamed:sub", true);
}

#[test]
fn reset_sends_a_reset_both_ways() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut victim = Raw::named(&proxy, "fp:victim");
    let mut bystander = Raw::named(&proxy, "fp:bystander");
    wait_redis_lists(&redis, "fp:victim", true);

    assert_eq!(proxy.reset(Select::name_ends_with(":victim")), 1);
    match victim.line(SOON) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("expected a connection reset, got {other:?}"),
    }
    wait_redis_lists(&redis, "fp:victim", false);
    assert_eq!(state_of(&proxy, "fp:victim"), ConnectionState::Closed);

    bystander.send(&["PING"]);
    bystander.expect_line("+PONG", SOON);
}

#[test]
fn half_open_closes_redis_side_and_leaves_the_client_silent() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut client = Raw::named(&proxy, "fp:half");
    wait_redis_lists(&redis, "fp:half", true);

    assert_eq!(proxy.half_open(Select::name_ends_with(":half")), 1);
    wait_redis_lists(&redis, "fp:half", false);
    assert_eq!(state_of(&proxy, "fp:half"), ConnectionState::HalfOpen);
    // Nothing reaches the client: no reply, no FIN (an EOF), no RST; and
    // its writes still go out, into the void.
    client.expect_silence(SOON);
    client.send(&["PING"]);
    client.expect_silence(Duration::from_millis(300));
}

#[test]
fn bandwidth_limits_the_bytes_per_second() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut conn = redis_connection(&proxy.url());
    proxy.inject(Select::All, Fault::Bandwidth(100_000), Scope::OpenNow);

    let value = vec![b'x'; 200_000];
    let started = Instant::now();
    redis::cmd("SET")
        .arg("fp:big")
        .arg(&value)
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("SET through the bandwidth limit failed: {e}"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "200 KB through 100 KB/s took {took:?}"
    );

    proxy.heal();
    let back: Vec<u8> = redis::cmd("GET")
        .arg("fp:big")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("GET after heal() failed: {e}"));
    assert!(back == value, "the value came back as {} bytes", back.len());
}

#[test]
fn dropping_the_proxy_closes_its_port_and_connections() {
    let redis = RedisServer::start();
    let proxy = proxy_for(&redis);
    let mut client = Raw::named(&proxy, "fp:dropped");
    let id = proxy.wait_for(&Select::name_ends_with(":dropped"), SOON).id;
    let addr = SocketAddr::from(([127, 0, 0, 1], proxy.port()));
    drop(proxy);

    match client.line(SOON) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        other => panic!("expected an EOF once the proxy is dropped, got {other:?}"),
    }
    wait_redis_lists(&redis, "fp:dropped", false);
    match TcpStream::connect_timeout(&addr, SOON) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected the proxy's port refused once dropped, got {other:?}"),
    }

    // The connection's threads end (their names start `proxy-<id>-`).
    let prefix = format!("proxy-{id}-");
    let deadline = Instant::now() + SOON;
    loop {
        let threads = thread_names();
        let left: Vec<_> = threads.iter().filter(|n| n.starts_with(&prefix)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads still running {SOON:?} after the drop: {left:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The names of this process's threads (Linux: `/proc/self/task`).
fn thread_names() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .unwrap_or_else(|e| panic!("cannot list /proc/self/task: {e}"));
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}
