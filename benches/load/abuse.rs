//! The `abuse` scenario's attacker: the attacks of issue 18, all at once,
//! while the ordinary clients chat; and a watch on what the instances and
//! Redis hold meanwhile.
//!
//! Each attack comes from a loopback address of its own (127.0.0.66 and
//! up: Linux routes all of 127/8 to loopback), none a trusted proxy, so
//! the per-address limits count them as the distinct attackers they would
//! be on the internet; the ordinary clients stay on 127.0.0.1. The
//! attacker is synchronous (one thread per attack, tungstenite and plain
//! sockets): what it costs shares the machine's cores with the servers,
//! as a real attacker's would not, which only makes the figures harsher.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use crate::procs::{self, RedisWatch};
use crate::report::RunReport;

/// Clients joining the filled room with `since=0-0` that never read (the
/// issue reproduced it with 10), each replaced after
/// [`REPLAYERS_REPLACED_AFTER`], once the server has closed it (its
/// `--send-timeout-ms`, 30 s by default) and an attacker would come back.
/// `ABUSE_REPLAYERS` and `ABUSE_FLOODERS` set a heavier mix.
const REPLAYERS: usize = 10;
const REPLAYERS_REPLACED_AFTER: Duration = Duration::from_secs(35);
/// Connections creating rooms at the rate limit (the issue: "one client
/// can create rooms without end").
const FLOODERS: usize = 5;

fn from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The text of a flooding message: as many control characters as the
/// server allows (2,000), each escaped to six bytes in JSON: the largest
/// message a client can make Redis keep.
fn heavy_text() -> String {
    "\u{1}".repeat(2000)
}

/// What one attack did, counted by outcome (`accepted`, `refused 429`, ...).
#[derive(Default, Debug)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn count(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }
}

/// One reading of the watch, every second.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Duration,
    rss_kib: [u64; 2],
    threads: [u64; 2],
    redis_used: u64,
}

/// The attacks under way.
pub struct Attack {
    broker: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
    attacks: Vec<(&'static str, JoinHandle<Tally>)>,
    watch: JoinHandle<Vec<Reading>>,
}

/// Where the attacks go.
pub struct Targets {
    pub ws: [SocketAddr; 2],
    /// The public HTTP ports.
    pub http: [SocketAddr; 2],
    /// The room the ordinary clients chat in.
    pub room: String,
    pub pids: [u32; 2],
    pub broker: Vec<String>,
    /// The instances' `--redis-prefix`.
    pub prefix: String,
}

fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A TCP connection to `to` from `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    connect_with(from, to, None)
}

/// A TCP connection to `to` from `from`, with a receive buffer of
/// `receive_buffer` bytes if given: a client that never reads then leaves
/// what it is sent in the server's memory, not in its own kernel's.
fn connect_with(
    from: IpAddr,
    to: SocketAddr,
    receive_buffer: Option<usize>,
) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

/// A WebSocket handshake from `from`; the refusal's status as `Err`.
fn ws_from(from: IpAddr, to: SocketAddr, query: &str) -> Result<WebSocket<TcpStream>, String> {
    ws_with(from, to, query, None)
}

/// [`ws_from`], with [`connect_with`]'s receive buffer.
fn ws_with(
    from: IpAddr,
    to: SocketAddr,
    query: &str,
    receive_buffer: Option<usize>,
) -> Result<WebSocket<TcpStream>, String> {
    let stream =
        connect_with(from, to, receive_buffer).map_err(|e| format!("connect: {}", e.kind()))?;
    match tungstenite::client(format!("ws://{to}/ws?{query}"), stream) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(format!("refused {}", response.status().as_u16()))
        }
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// Sends a chat message; `false` once the connection is gone.
fn send_text(socket: &mut WebSocket<TcpStream>, text: &str) -> bool {
    let frame = serde_json::json!({"type": "message", "text": text}).to_string();
    socket.send(Message::text(frame)).is_ok()
}

/// Starts every attack and the watch.
pub fn start(targets: &Targets) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let mut attacks = Vec::new();
    // `ABUSE_ATTACKS=replay,rooms` runs only those: to see which costs what.
    let chosen = std::env::var("ABUSE_ATTACKS").ok();
    let mut spawn = |name: &'static str, body: Box<dyn FnOnce(&AtomicBool) -> Tally + Send>| {
        if chosen
            .as_deref()
            .is_some_and(|chosen| !chosen.split(',').any(|c| c == name))
        {
            return;
        }
        let stop = stop.clone();
        let handle = thread::Builder::new()
            .name(format!("attack-{name}"))
            .spawn(move || body(&stop))
            .expect("cannot start an attack thread");
        attacks.push((name, handle));
    };
    let ws = targets.ws;
    let http = targets.http;
    let room = targets.room.clone();
    spawn("hold", Box::new(move |stop| hold(stop, ws)));
    spawn("replay", Box::new(move |stop| replay(stop, ws)));
    spawn("rooms", Box::new(move |stop| rooms(stop, ws)));
    let typing_room = room.clone();
    spawn(
        "typing",
        Box::new(move |stop| typing(stop, ws, &typing_room)),
    );
    spawn("trace", Box::new(move |stop| trace(stop, ws, &room)));
    spawn("http", Box::new(move |stop| http_heads(stop, http)));
    spawn("probes", Box::new(move |stop| probes(stop, ws, http)));
    let watch = {
        let stop = stop.clone();
        let pids = targets.pids;
        let broker = targets.broker.clone();
        thread::spawn(move || watch(&stop, pids, &broker))
    };
    Attack {
        broker: targets.broker.clone(),
        prefix: targets.prefix.clone(),
        stop,
        attacks,
        watch,
    }
}

impl Attack {
    /// Stops every attack and reports what each did, and what the
    /// instances and Redis held over time.
    pub fn finish(self, rep: &mut RunReport) {
        // What the worst rooms cost Redis, read while the attackers are
        // still in them: the room filled with the heaviest messages, and
        // the members of the room held by 200 connections.
        if let Ok(mut redis) = RedisWatch::open(&self.broker) {
            let history = format!("{}:history:abuse-history", self.prefix);
            let presence = format!("{}:presence:{{abuse-hold}}", self.prefix);
            let (history_bytes, messages) = redis.memory_usage(&history);
            let (presence_bytes, members) = redis.memory_usage(&presence);
            rep.add(
                "redis: the filled room's history (KiB)",
                history_bytes as f64 / 1024.0,
                0,
            );
            rep.add("redis: the filled room's messages", messages as f64, 0);
            rep.add(
                "redis: presence bytes per member",
                presence_bytes as f64 / members.max(1) as f64,
                0,
            );
            rep.add(
                "redis: keys evicted (maxmemory)",
                redis.info_field("stats", "evicted_keys") as f64,
                0,
            );
        }
        self.stop.store(true, Ordering::Relaxed);
        for (name, handle) in self.attacks {
            let tally = handle.join().unwrap_or_default();
            let outcomes: Vec<String> = tally.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
            rep.notes
                .push(format!("attack {name}: {}", outcomes.join(", ")));
            for (outcome, n) in tally.0 {
                rep.add(format!("attack {name}: {outcome}"), n as f64, 0);
            }
        }
        let readings = self.watch.join().unwrap_or_default();
        report_memory(&readings, rep);
    }
}

/// Holds as many idle connections as the per-address limit lets one
/// address have (and tries for half as many more), on both instances.
fn hold(stop: &AtomicBool, ws: [SocketAddr; 2]) -> Tally {
    let mut tally = Tally::default();
    let mut held = Vec::new();
    for n in 0..300 {
        match ws_from(
            attacker(66),
            ws[n % 2],
            &format!("name=hold{n}&room=abuse-hold"),
        ) {
            Ok(socket) => {
                tally.count("accepted");
                held.push(socket);
            }
            Err(e) => tally.count(e),
        }
    }
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
    }
    tally
}

/// Fills a room's history with the heaviest messages (50 connections, 20
/// each: the rate limit's burst, each waiting for its 20 to be accepted),
/// then keeps [`REPLAYERS`] clients joining it with `since=0-0` and never
/// reading (with a 4 KiB receive buffer), replaced as they are closed.
fn replay(stop: &AtomicBool, ws: [SocketAddr; 2]) -> Tally {
    let mut tally = Tally::default();
    let room = "abuse-history";
    let text = heavy_text();
    for n in 0..50 {
        match ws_from(
            attacker(67),
            ws[n % 2],
            &format!("name=fill{n}&room={room}"),
        ) {
            Ok(mut socket) => {
                for k in 0..20 {
                    let frame = serde_json::json!({"type": "message", "text": text, "cid": format!("fill{n}-{k}")});
                    let _ = socket.send(Message::text(frame.to_string()));
                }
                // Closed before its messages are read, the connection
                // would be reset and lose them: wait for their echoes (the
                // room's history comes first, without our cids).
                let ours = format!(r#""cid":"fill{n}-"#);
                let mut accepted = 0;
                while accepted < 20 {
                    match socket.read() {
                        Ok(Message::Text(frame))
                            if frame.contains(&ours) && frame.contains(r#""type":"message""#) =>
                        {
                            accepted += 1;
                        }
                        Ok(Message::Text(frame)) if frame.contains(r#""type":"error""#) => {
                            tally.count("filling message refused");
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                for _ in 0..accepted {
                    tally.count("filling message accepted");
                }
                let _ = socket.close(None);
            }
            Err(e) => tally.count(format!("filler {e}")),
        }
    }
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut readers = Vec::new();
        for n in 0..from_env("ABUSE_REPLAYERS", REPLAYERS) {
            let query = format!("name=replay{round}x{n}&room={room}&since=0-0");
            match ws_with(attacker(67), ws[n % 2], &query, Some(4096)) {
                Ok(socket) => {
                    tally.count("replay joined");
                    readers.push(socket);
                }
                Err(e) => tally.count(format!("replay {e}")),
            }
        }
        sleep_unless_stopped(stop, REPLAYERS_REPLACED_AFTER);
        round += 1;
    }
    tally
}

/// [`FLOODERS`] connections at the rate limit, each moving to a new room after
/// every 20 messages: rooms created without end, each holding the
/// heaviest messages.
fn rooms(stop: &AtomicBool, ws: [SocketAddr; 2]) -> Tally {
    let mut tally = Tally::default();
    let text = heavy_text();
    let mut next_room = 0usize;
    let open = |tally: &mut Tally, next_room: &mut usize| {
        *next_room += 1;
        let query = format!("name=flood{next_room}&room=abuse-room-{next_room}");
        match ws_from(attacker(68), ws[*next_room % 2], &query) {
            Ok(socket) => Some((socket, 0u32)),
            Err(e) => {
                tally.count(e);
                None
            }
        }
    };
    let mut flooders: Vec<Option<(WebSocket<TcpStream>, u32)>> =
        (0..from_env("ABUSE_FLOODERS", FLOODERS))
            .map(|_| open(&mut tally, &mut next_room))
            .collect();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        for slot in flooders.iter_mut() {
            let done = match slot {
                Some((socket, sent)) => {
                    if send_text(socket, &text) {
                        tally.count("message sent");
                        *sent += 1;
                    } else {
                        tally.count("connection lost");
                    }
                    // Read what came back, so that the answers do not
                    // pile up: rate_limited errors, the echo.
                    socket.get_mut().set_nonblocking(true).ok();
                    while let Ok(message) = socket.read() {
                        if let Message::Text(text) = message
                            && text.contains("rate_limited")
                        {
                            tally.count("rate_limited");
                        }
                    }
                    socket.get_mut().set_nonblocking(false).ok();
                    *sent >= 20
                }
                None => true,
            };
            if done {
                if let Some((mut socket, _)) = slot.take() {
                    let _ = socket.close(None);
                }
                *slot = open(&mut tally, &mut next_room);
                tally.count("room created");
            }
        }
        // Each connection at the rate limit's pace: 10 a second.
        if let Some(rest) = Duration::from_millis(100).checked_sub(round.elapsed()) {
            thread::sleep(rest);
        }
    }
    tally
}

/// Ten connections in the ordinary room that send `typing` as fast as
/// they can (half of them padded with a 16,000-byte unknown field), and
/// reconnect when closed.
fn typing(stop: &AtomicBool, ws: [SocketAddr; 2], room: &str) -> Tally {
    let mut tally = Tally::default();
    let padded = serde_json::json!({"type": "typing", "pad": "x".repeat(16_000)}).to_string();
    let plain = r#"{"type":"typing"}"#.to_string();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let query = format!("name=typist{n}&room={room}");
        let mut socket = match ws_from(attacker(69), ws[n % 2], &query) {
            Ok(socket) => socket,
            Err(e) => {
                tally.count(e);
                sleep_unless_stopped(stop, Duration::from_millis(100));
                continue;
            }
        };
        let frame = if n.is_multiple_of(2) { &padded } else { &plain };
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(5) {
            if socket.send(Message::text(frame.clone())).is_err() {
                tally.count("closed by the server");
                break;
            }
            tally.count("typing sent");
            thread::sleep(Duration::from_millis(5));
        }
    }
    tally
}

/// Forty clients in the ordinary room that ask for the X-ray (20 on each
/// instance, past `--max-traced-clients` 16), and read
/// everything they are sent.
fn trace(stop: &AtomicBool, ws: [SocketAddr; 2], room: &str) -> Tally {
    let mut tally = Tally::default();
    let mut readers = Vec::new();
    for n in 0..40 {
        let query = format!("name=tracer{n}&room={room}&trace=1");
        match ws_from(attacker(70), ws[n % 2], &query) {
            Ok(mut socket) => {
                let mut refused = false;
                for _ in 0..4 {
                    match socket.read() {
                        Ok(Message::Text(text)) if text.contains("trace_refused") => {
                            refused = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                tally.count(if refused { "trace refused" } else { "traced" });
                socket.get_mut().set_nonblocking(true).ok();
                readers.push(socket);
            }
            Err(e) => tally.count(e),
        }
    }
    while !stop.load(Ordering::Relaxed) {
        for socket in readers.iter_mut() {
            while socket.read().is_ok() {}
        }
        thread::sleep(Duration::from_millis(20));
    }
    tally
}

/// Request heads that never end, 150 at a time on each instance's HTTP
/// port, topped up once a second as the server closes or refuses them.
fn http_heads(stop: &AtomicBool, http: [SocketAddr; 2]) -> Tally {
    let mut tally = Tally::default();
    let mut open: Vec<(TcpStream, Instant)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while open.len() < 300 {
            let to = http[open.len() % 2];
            match connect_from(attacker(71), to) {
                Ok(mut stream) => {
                    if stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").is_ok() {
                        stream.set_nonblocking(true).ok();
                        open.push((stream, Instant::now()));
                        tally.count("head started");
                    }
                }
                Err(e) => {
                    tally.count(format!("connect {}", e.kind()));
                    break;
                }
            }
        }
        // A connection the server answered (429, 503) or closed is gone.
        open.retain_mut(|(stream, since)| {
            let mut buf = [0u8; 512];
            match stream.read(&mut buf) {
                Ok(0) => {
                    tally.count(format!("closed after {} s", since.elapsed().as_secs()));
                    false
                }
                Ok(n) => {
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let status = head.split_whitespace().nth(1).unwrap_or("?").to_string();
                    tally.count(format!("answered {status}"));
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => {
                    tally.count("reset");
                    false
                }
            }
        });
        sleep_unless_stopped(stop, Duration::from_secs(1));
    }
    tally
}

/// Every 100 ms: a name with a bidi override, a handshake asking for a
/// room with a 16,000-byte name, and the fault panel from another site on
/// the public port.
fn probes(stop: &AtomicBool, ws: [SocketAddr; 2], http: [SocketAddr; 2]) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let to = ws[n % 2];
        tally.count(format!(
            "bidi name {}",
            first_answer(ws_from(attacker(72), to, "name=ali%E2%80%AEce&room=lobby"))
        ));
        let long_room = "r".repeat(16_000);
        tally.count(format!(
            "long room {}",
            first_answer(ws_from(
                attacker(72),
                to,
                &format!("name=x&room={long_room}")
            ))
        ));
        if let Ok(mut stream) = connect_from(attacker(72), http[n % 2]) {
            let request = "POST /demo/cut-subscription HTTP/1.1\r\nHost: x\r\n\
                           Origin: https://evil.example\r\nContent-Length: 0\r\n\
                           Connection: close\r\n\r\n";
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_string(&mut answer);
            }
            let status = answer.split_whitespace().nth(1).unwrap_or("?").to_string();
            tally.count(format!("fault panel answered {status}"));
        }
        sleep_unless_stopped(stop, Duration::from_millis(100));
    }
    tally
}

/// How a handshake was answered: refused with an HTTP status, or
/// upgraded and then refused with an `error` frame (its code), or
/// welcomed.
fn first_answer(handshake: Result<WebSocket<TcpStream>, String>) -> String {
    let mut socket = match handshake {
        Ok(socket) => socket,
        Err(e) => return e,
    };
    match socket.read() {
        Ok(Message::Text(text)) => {
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            match frame["type"].as_str() {
                Some("error") => format!("refused: error {}", frame["code"]),
                Some(kind) => format!("accepted: {kind}"),
                None => "accepted: no type".into(),
            }
        }
        Ok(Message::Close(frame)) => format!(
            "refused: close {}",
            frame.map_or(0, |frame| u16::from(frame.code))
        ),
        Ok(_) => "answered: not text".into(),
        Err(e) => format!("refused: {e}"),
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every second: each instance's RSS and threads, and Redis's
/// `used_memory`.
fn watch(stop: &AtomicBool, pids: [u32; 2], broker: &[String]) -> Vec<Reading> {
    let mut redis = RedisWatch::open(broker).ok();
    let started = Instant::now();
    let mut readings = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let samples = pids.map(procs::sample);
        readings.push(Reading {
            at: started.elapsed(),
            rss_kib: samples.map(|s| s.rss_kib),
            threads: samples.map(|s| s.threads),
            redis_used: redis.as_mut().map_or(0, RedisWatch::used_memory),
        });
        sleep_unless_stopped(stop, Duration::from_secs(1));
    }
    readings
}

/// The watch's figures: each instance's RSS and Redis's memory at a
/// quarter, half and the end of the attack, and how far the second half's
/// peak rose above the first half's: flat once the limits bite means no
/// new high (a capped Redis saws below its cap as it evicts).
fn report_memory(readings: &[Reading], rep: &mut RunReport) {
    let Some(last) = readings.last() else {
        return;
    };
    let at = |fraction: f64| {
        let when = last.at.mul_f64(fraction);
        readings
            .iter()
            .find(|r| r.at >= when)
            .copied()
            .unwrap_or(*last)
    };
    let (quarter, half) = (at(0.25), at(0.5));
    let (first_half, second_half) = readings.split_at(
        readings
            .iter()
            .position(|r| r.at >= half.at)
            .unwrap_or(readings.len()),
    );
    let peak_growth = |value: &dyn Fn(&Reading) -> u64| {
        let peak = |part: &[Reading]| part.iter().map(value).max().unwrap_or(0);
        percent(peak(first_half), peak(second_half))
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let peak = readings.iter().map(|r| r.rss_kib[i]).max().unwrap_or(0);
        rep.add(
            format!("{name} RSS at 1/4 (MiB)"),
            mib(quarter.rss_kib[i]),
            1,
        );
        rep.add(format!("{name} RSS at 1/2 (MiB)"), mib(half.rss_kib[i]), 1);
        rep.add(format!("{name} RSS at end (MiB)"), mib(last.rss_kib[i]), 1);
        rep.add(format!("{name} RSS peak (MiB)"), mib(peak), 1);
        rep.add(
            format!("{name} RSS peak growth, 2nd half (%)"),
            peak_growth(&|r| r.rss_kib[i]),
            1,
        );
        rep.add(
            format!("{name} threads peak"),
            readings.iter().map(|r| r.threads[i]).max().unwrap_or(0) as f64,
            0,
        );
    }
    let redis_mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let redis_peak = readings.iter().map(|r| r.redis_used).max().unwrap_or(0);
    rep.add(
        "redis used_memory at 1/4 (MiB)",
        redis_mib(quarter.redis_used),
        1,
    );
    rep.add(
        "redis used_memory at 1/2 (MiB)",
        redis_mib(half.redis_used),
        1,
    );
    rep.add(
        "redis used_memory at end (MiB)",
        redis_mib(last.redis_used),
        1,
    );
    rep.add("redis used_memory peak (MiB)", redis_mib(redis_peak), 1);
    rep.add(
        "redis used_memory peak growth, 2nd half (%)",
        peak_growth(&|r| r.redis_used),
        1,
    );
}

fn percent(from: u64, to: u64) -> f64 {
    if from == 0 {
        return f64::NAN;
    }
    (to as f64 - from as f64) * 100.0 / from as f64
}
