//! Load generator and benchmark for pubsub-chat.
//!
//! ```sh
//! cargo bench --bench load -- <scenario> [--runs N] [--clients N] [--senders S]
//!     [--rate R|max] [--duration-s D] [--target-redis URL] [--concurrency C]
//!     [--window W] [--idle-s I] [--batch B] [--drain-s T] [--server-args "..."]
//! ```
//!
//! Scenarios: `latency`, `room`, `burst`, `idle`, `connect`, `max-clients`,
//! `smoke` (see `usage()`). Each run starts its own `redis-server` (unless
//! `--target-redis` names one) and two instances, `a` and `b`, of the real
//! binary; clients are spread round-robin over them, all in one fresh room.
//!
//! Every text carries `<sender>:<seq>:<send time in ns>`, so each receiver
//! measures end-to-end latency on the same process clock and checks each
//! sender's sequence for loss, duplicates and reordering.
//!
//! This is a test tool, not the server: it is async (tokio, at most two
//! worker threads) so that it holds thousands of connections on few
//! threads and leaves the machine's thread budget to the servers.
//!
//! Exit status: non-zero on any lost, duplicated or reordered delivery (and,
//! for `smoke`, on any failed or dropped client). Missing a latency or
//! throughput target is reported ("target met: no"), not a failure.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

type Ws = WebSocketStream<tokio::net::TcpStream>;
type WsSink = Arc<AsyncMutex<SplitSink<Ws, Message>>>;

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_pubsub-chat");
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const TEXT_BYTES: usize = 100;

// ---------------------------------------------------------------- clock

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide epoch: senders stamp it into the text,
/// receivers subtract it from their own reading of the same clock.
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Latency,
    Room,
    Burst,
    Idle,
    Connect,
    MaxClients,
    Smoke,
}

impl Scenario {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "latency" => Scenario::Latency,
            "room" => Scenario::Room,
            "burst" => Scenario::Burst,
            "idle" => Scenario::Idle,
            "connect" => Scenario::Connect,
            "max-clients" => Scenario::MaxClients,
            "smoke" => Scenario::Smoke,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Latency => "latency",
            Scenario::Room => "room",
            Scenario::Burst => "burst",
            Scenario::Idle => "idle",
            Scenario::Connect => "connect",
            Scenario::MaxClients => "max-clients",
            Scenario::Smoke => "smoke",
        }
    }
}

#[derive(Clone, Debug)]
struct Opts {
    scenario: Scenario,
    runs: usize,
    clients: usize,
    senders: usize,
    /// Messages per second over all senders; `None` is as fast as possible.
    rate: Option<f64>,
    duration: Duration,
    target_redis: Option<String>,
    /// Unconfirmed messages a sender may have in flight (as-fast-as-possible mode).
    window: usize,
    /// Handshakes in flight at once.
    concurrency: usize,
    /// Quiet window measured before sending starts (the `idle` scenario).
    idle: Duration,
    /// Clients added per step (`max-clients`).
    batch: usize,
    drain: Duration,
    server_args: Vec<String>,
}

impl Opts {
    fn defaults(scenario: Scenario) -> Self {
        let base = Opts {
            scenario,
            runs: 1,
            clients: 20,
            senders: 2,
            rate: Some(50.0),
            duration: Duration::from_secs(3),
            target_redis: None,
            window: 64,
            concurrency: 256,
            idle: Duration::ZERO,
            batch: 500,
            drain: Duration::from_secs(10),
            server_args: Vec::new(),
        };
        let secs = Duration::from_secs;
        match scenario {
            Scenario::Latency => Opts {
                runs: 3,
                clients: 100,
                senders: 1,
                rate: Some(50.0),
                duration: secs(10),
                ..base
            },
            Scenario::Room => Opts {
                runs: 3,
                clients: 1000,
                senders: 20,
                rate: Some(200.0),
                duration: secs(10),
                ..base
            },
            Scenario::Burst => Opts {
                runs: 3,
                clients: 200,
                senders: 10,
                rate: None,
                duration: secs(10),
                ..base
            },
            Scenario::Idle => Opts {
                clients: 5000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(10),
                idle: secs(10),
                ..base
            },
            Scenario::Connect => Opts {
                clients: 5000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(2),
                concurrency: 1000,
                ..base
            },
            Scenario::MaxClients => Opts {
                clients: 10_000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(3),
                ..base
            },
            Scenario::Smoke => base,
        }
    }
}

fn usage() -> &'static str {
    "usage: cargo bench --bench load -- <scenario> [options]

scenarios (defaults):
  latency      100 clients, 1 sender, 50 msg/s, 10 s, 3 runs   (target: cross-instance p50 < 1 ms, p99 < 2 ms)
  room         1000 clients, 20 senders, 200 msg/s, 10 s, 3 runs (target: nothing lost, p99 < 100 ms)
  burst        200 clients, 10 senders, as fast as possible, 10 s, 3 runs (target: >= 300,000 deliveries/s, nothing lost)
  idle         5000 clients, 10 s quiet window, then 1 sender at 10 msg/s for 10 s (target: <= 32 KiB RSS per client, idle CPU ~ 0)
  connect      5000 connections, 1000 handshakes in flight, then 1 sender at 10 msg/s for 2 s (target: no failure)
  max-clients  add clients in batches of 500 until the first failure or 10,000, 1 sender at 10 msg/s throughout
  smoke        20 clients, 2 senders, 50 msg/s, 3 s, 1 run (for CI)

options:
  --runs N            runs (the summary shows the median of each figure)
  --clients N         clients (max-clients: the upper bound)
  --senders S         sending clients (spread over both instances)
  --rate R|max        messages per second over all senders, or as fast as possible
  --duration-s D      seconds of sending (max-clients: after the last batch)
  --target-redis URL  use this Redis instead of starting a private redis-server
  --concurrency C     handshakes in flight at once
  --window W          unconfirmed messages per sender in as-fast-as-possible mode (64)
  --idle-s I          quiet seconds measured before sending starts
  --batch B           clients added per step (max-clients)
  --drain-s T         longest wait for outstanding deliveries after sending stops (10)
  --server-args \"..\" extra arguments for both instances

Exit status is non-zero on any lost, duplicated or reordered delivery (smoke: also on any
failed or dropped client); a missed latency or throughput target is only reported."
}

fn parse_args() -> Result<Option<Opts>, String> {
    let mut args = std::env::args().skip(1).peekable();
    let mut scenario = None;
    let mut flags: Vec<(String, String)> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" | "--nocapture" | "--quiet" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            flag if flag.starts_with("--") => {
                let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                flags.push((flag.to_string(), value));
            }
            name => {
                if scenario.is_some() {
                    return Err(format!("unexpected argument {name:?}"));
                }
                scenario = Some(
                    Scenario::parse(name).ok_or_else(|| format!("unknown scenario {name:?}"))?,
                );
            }
        }
    }
    let Some(scenario) = scenario else {
        // `cargo bench` with no scenario (or `cargo test --benches`): do nothing.
        println!("{}", usage());
        return Ok(None);
    };
    let mut o = Opts::defaults(scenario);
    let num = |flag: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{flag}: {v:?} is not a number"))
    };
    for (flag, v) in flags {
        match flag.as_str() {
            "--runs" => o.runs = (num(&flag, &v)? as usize).max(1),
            "--clients" => o.clients = (num(&flag, &v)? as usize).max(1),
            "--senders" => o.senders = num(&flag, &v)? as usize,
            "--rate" => {
                o.rate = if v == "max" || v == "burst" {
                    None
                } else {
                    Some(num(&flag, &v)?).filter(|r| *r > 0.0)
                }
            }
            "--duration-s" => o.duration = Duration::from_secs_f64(num(&flag, &v)?),
            "--target-redis" => o.target_redis = Some(v),
            "--concurrency" => o.concurrency = (num(&flag, &v)? as usize).max(1),
            "--window" => o.window = (num(&flag, &v)? as usize).max(1),
            "--idle-s" => o.idle = Duration::from_secs_f64(num(&flag, &v)?),
            "--batch" => o.batch = (num(&flag, &v)? as usize).max(1),
            "--drain-s" => o.drain = Duration::from_secs_f64(num(&flag, &v)?),
            "--server-args" => o.server_args = v.split_whitespace().map(String::from).collect(),
            other => return Err(format!("unknown option {other}\n\n{}", usage())),
        }
    }
    o.senders = o.senders.min(o.clients);
    Ok(Some(o))
}

// ---------------------------------------------------------------- processes

/// Every child pid, so a signal can kill them all before exiting.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn install_signal_handler() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("load: signal {sig}: killing the servers and exiting");
                let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for pid in pids {
                    // SAFETY: kill(2) on a pid this process started.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
                std::process::exit(130);
            }
        });
}

/// A server process (an instance or redis-server), stopped on drop.
struct Proc {
    name: String,
    child: Child,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    http: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    tmpdir: Option<PathBuf>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(name: &str, cmd: &mut Command) -> Child {
        // SAFETY: prctl in the child between fork and exec only sets its
        // parent-death signal: if this process dies, however, so does the
        // server (no orphans). The servers are spawned from the main thread,
        // which lives until exit.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        child
    }

    fn stop(&mut self) {
        let pid = self.child.id();
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: SIGTERM to our own child, for a graceful shutdown.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
        if let Some(dir) = self.tmpdir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn log_tail(&self) -> Vec<String> {
        self.log_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

fn start_redis(tag: &str) -> (Proc, String) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pubsub-chat-load-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cannot create a temporary directory");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if which("redis-server").is_none() {
        panic!(
            "redis-server is not installed: `apt-get install redis-server`, or pass --target-redis redis://HOST:PORT"
        );
    }
    let child = Proc::spawn("redis-server", &mut cmd);
    let proc = Proc {
        name: "redis".into(),
        child,
        log_tail: Arc::default(),
        http: None,
        ws: None,
        tmpdir: Some(dir),
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.write_all(b"PING\r\n")?;
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf)?;
                Ok(buf[..n].starts_with(b"+PONG"))
            })
            .unwrap_or(false);
        if pong {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, format!("redis://127.0.0.1:{port}"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| p.is_file())
}

fn start_instance(id: &str, redis_url: &str, prefix: &str, opts: &Opts) -> Proc {
    // Big enough never to be the limit: max-clients looks for the machine's.
    let max_clients = if opts.scenario == Scenario::MaxClients {
        20_000
    } else {
        opts.clients.max(5000)
    }
    .to_string();
    let mut cmd = Command::new(SERVER_BIN);
    cmd.args(["--port", "0", "--instance-id", id])
        .args(["--redis-url", redis_url, "--redis-prefix", prefix])
        .args(["--max-clients", &max_clients])
        .args(&opts.server_args)
        // The listening line is logged at info by the server module.
        .env("RUST_LOG", "warn,pubsub_chat::server=info")
        .env("RATE_BURST", "1000000")
        .env("RATE_PER_SEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Proc::spawn(id, &mut cmd);
    let stderr = child.stderr.take().expect("piped stderr");
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let tail = tail.clone();
        std::thread::Builder::new()
            .name(format!("stderr-{id}"))
            .spawn(move || {
                // Drains the server's stderr for its whole life, so it never
                // blocks on a full pipe; keeps the last lines for the report.
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addrs) = parse_listening(&line) {
                        let _ = tx.send(addrs);
                    }
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() >= 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
            .expect("cannot start a stderr thread");
    }
    let mut proc = Proc {
        name: id.into(),
        child,
        log_tail: tail,
        http: None,
        ws: None,
        tmpdir: None,
    };
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok((http, ws)) => {
            proc.http = Some(http);
            proc.ws = Some(ws);
        }
        Err(_) => panic!(
            "instance {id} did not log its listening line:\n{}",
            proc.log_tail().join("\n")
        ),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(proc.http.unwrap(), "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "instance {id} is not ready:\n{}",
            proc.log_tail().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// `instance a listening: page http://127.0.0.1:H/ websocket ws://127.0.0.1:W/ws`
fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.split(" listening: page http://").nth(1)?;
    let (http, rest) = rest.split_once('/')?;
    let ws = rest.split(" websocket ws://").nth(1)?.split('/').next()?;
    Some((http.parse().ok()?, ws.parse().ok()?))
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// The numeric `chat_*` series of an instance's `/metrics`.
fn metrics(addr: SocketAddr) -> Vec<(String, f64)> {
    let Some((200, body)) = http_get(addr, "/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter(|l| l.starts_with("chat_"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[derive(Clone, Copy, Default, Debug)]
struct Sample {
    rss_kib: u64,
    threads: u64,
    cpu_ticks: u64,
    sys_ticks: u64,
}

/// VmRSS and Threads from /proc/PID/status, utime+stime from /proc/PID/stat.
fn sample(pid: u32) -> Sample {
    let mut s = Sample::default();
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let num = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                s.rss_kib = num(line);
            } else if line.starts_with("Threads:") {
                s.threads = num(line);
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the ")" closing the command name: state is field 3,
        // utime 14 and stime 15.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.cpu_ticks = get(11) + get(12);
            s.sys_ticks = get(12);
        }
    }
    s
}

/// CPU ticks and context switches of a process's threads, grouped by
/// thread name without its number (`ws-write-17` counts as `ws-write`).
#[derive(Clone, Default, Debug)]
struct Groups(HashMap<String, (u64, u64, u64)>);

fn sample_groups(pid: u32) -> Groups {
    let mut g = Groups::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return g;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let name = comm.trim_end_matches(|c: char| c.is_ascii_digit());
        let name = name.strip_suffix('-').unwrap_or(name).to_string();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cpu = get(11) + get(12);
        let mut switches = (0, 0);
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                let num = || {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches:") {
                    switches.0 = num();
                } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                    switches.1 = num();
                }
            }
        }
        let e = g.0.entry(name).or_default();
        e.0 += cpu;
        e.1 += switches.0;
        e.2 += switches.1;
    }
    g
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

// ---------------------------------------------------------------- clients

/// What one receiver saw of one sender's stream.
#[derive(Default)]
struct Track {
    seen_any: bool,
    /// The first seq this receiver is expected to get (0, or for a client
    /// that joined while sending was on, the first it saw).
    start: u64,
    /// One past the highest seq seen.
    next: u64,
    /// Seqs skipped over (below `next`) and not yet received.
    missing: HashSet<u64>,
    unique: u64,
}

struct ClientStats {
    inst: usize,
    connected: bool,
    /// Joined while the senders were already sending (max-clients).
    late: bool,
    join_ns: u64,
    tracks: Vec<Track>,
    dup: u64,
    ooo: u64,
    foreign: u64,
    errors: u64,
    lat_same: Vec<u32>,
    lat_cross: Vec<u32>,
    /// Why the connection ended before we closed it.
    ended: Option<String>,
}

impl ClientStats {
    fn new(inst: usize, senders: usize) -> Self {
        ClientStats {
            inst,
            connected: false,
            late: false,
            join_ns: 0,
            tracks: (0..senders).map(|_| Track::default()).collect(),
            dup: 0,
            ooo: 0,
            foreign: 0,
            errors: 0,
            lat_same: Vec::new(),
            lat_cross: Vec::new(),
            ended: None,
        }
    }

    /// Records one delivery; true when it is new (not a duplicate).
    fn record(&mut self, sender: usize, seq: u64, sent_ns: u64, now: u64, same: bool) -> bool {
        let late = self.late;
        let Some(tr) = self.tracks.get_mut(sender) else {
            self.foreign += 1;
            return false;
        };
        if !tr.seen_any {
            tr.seen_any = true;
            tr.start = if late { seq } else { 0 };
            tr.next = tr.start;
        }
        let fresh = if seq >= tr.next {
            tr.missing.extend(tr.next..seq);
            tr.next = seq + 1;
            true
        } else if tr.missing.remove(&seq) {
            self.ooo += 1;
            true
        } else if seq < tr.start {
            // A late joiner got an older message after a newer one.
            tr.missing.extend(seq + 1..tr.start);
            tr.start = seq;
            self.ooo += 1;
            true
        } else {
            self.dup += 1;
            false
        };
        if fresh {
            tr.unique += 1;
        }
        // History replayed to a late joiner is not live latency.
        if sent_ns >= self.join_ns {
            let us = (now.saturating_sub(sent_ns) / 1000).min(u32::MAX as u64) as u32;
            if same {
                self.lat_same.push(us);
            } else {
                self.lat_cross.push(us);
            }
        }
        fresh
    }
}

struct Shared {
    ws: [SocketAddr; 2],
    room: String,
    conn_sem: Semaphore,
    conn_tx: mpsc::UnboundedSender<Result<u64, String>>,
    shutdown: watch::Receiver<bool>,
    start: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    /// Per-sender rate, or None for as fast as possible.
    rate_per_sender: Option<f64>,
    window: usize,
    n_senders: usize,
    sending: AtomicBool,
    sent: Vec<AtomicU64>,
    unique: AtomicU64,
    total: AtomicU64,
    send_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    live: AtomicUsize,
    active_senders: AtomicUsize,
    /// Per sender, per seq (the first `PER_MESSAGE` of each): when the first
    /// and the last receiver got it, to split latency into the path to the
    /// first receiver and the fan-out to the whole room.
    per_message: Vec<PerMessage>,
}

const PER_MESSAGE: usize = 1 << 16;

struct PerMessage {
    sent: Vec<AtomicU64>,
    first: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
}

impl PerMessage {
    fn new() -> Self {
        let v = |x: u64| (0..PER_MESSAGE).map(|_| AtomicU64::new(x)).collect();
        PerMessage {
            sent: v(0),
            first: v(u64::MAX),
            last: v(0),
        }
    }

    fn record(&self, seq: u64, sent_ns: u64, now: u64) {
        let i = seq as usize;
        if i < PER_MESSAGE {
            self.sent[i].store(sent_ns, Ordering::Relaxed);
            self.first[i].fetch_min(now, Ordering::Relaxed);
            self.last[i].fetch_max(now, Ordering::Relaxed);
        }
    }

    /// (first-receiver, last-receiver) latencies in µs of every message
    /// seen by at least one receiver.
    fn latencies(&self, sent: u64) -> (Vec<u32>, Vec<u32>) {
        let us = |a: u64, b: u64| (a.saturating_sub(b) / 1000).min(u32::MAX as u64) as u32;
        (0..(sent as usize).min(PER_MESSAGE))
            .filter(|&i| self.first[i].load(Ordering::Relaxed) != u64::MAX)
            .map(|i| {
                let s = self.sent[i].load(Ordering::Relaxed);
                (
                    us(self.first[i].load(Ordering::Relaxed), s),
                    us(self.last[i].load(Ordering::Relaxed), s),
                )
            })
            .unzip()
    }
}

impl Shared {
    fn note_error(&self, what: String) {
        let mut e = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(what);
        }
    }
}

fn sender_instance(sender: usize) -> usize {
    // Sender j is client j, on instance j % 2.
    sender % 2
}

async fn connect(shared: &Shared, k: usize) -> Result<Ws, String> {
    let addr = shared.ws[k % 2];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{addr}/ws?name=c{k}&room={}", shared.room);
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) = client_async_with_config(url, tcp, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"welcome\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"error\"") => {
                return Err(format!("server error before welcome: {t}"));
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed before welcome: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read before welcome: {e}")),
            None => return Err("eof before welcome".into()),
        }
    }
}

/// Parses `"text":"<sender>:<seq>:<ns>:` out of a message frame.
fn parse_stamp(frame: &str) -> Option<(usize, u64, u64)> {
    let at = frame.find("\"text\":\"")? + 8;
    let mut parts = frame[at..].splitn(4, ':');
    let sender = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let ns = parts.next()?.parse().ok()?;
    Some((sender, seq, ns))
}

async fn client(k: usize, shared: Arc<Shared>, stats: Arc<Mutex<ClientStats>>, is_sender: bool) {
    let permit = shared.conn_sem.acquire().await.expect("semaphore open");
    let t0 = Instant::now();
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&shared, k)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let _ = shared.conn_tx.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = shared.conn_tx.send(Err("timed out (30 s)".into()));
            return;
        }
    };
    let took = t0.elapsed();
    drop(permit);
    {
        let mut st = stats.lock().unwrap();
        st.connected = true;
        st.late = shared.sending.load(Ordering::SeqCst);
        st.join_ns = now_ns();
    }
    shared.live.fetch_add(1, Ordering::SeqCst);
    let (sink, mut stream) = ws.split();
    let sink: WsSink = Arc::new(AsyncMutex::new(sink));
    let window = Arc::new(Semaphore::new(shared.window));
    let me = is_sender.then_some(k);
    if let Some(j) = me {
        shared.active_senders.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(sender(j, sink.clone(), window.clone(), shared.clone()));
    }
    let _ = shared.conn_tx.send(Ok(took.as_micros() as u64));

    let mut shutdown = shared.shutdown.clone();
    let ended: Option<String> = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|v| *v) => break None,
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_str();
                    if t.starts_with("{\"type\":\"message\"") {
                        let Some((j, seq, sent_ns)) = parse_stamp(t) else {
                            stats.lock().unwrap().foreign += 1;
                            continue;
                        };
                        let now = now_ns();
                        let fresh = {
                            let mut st = stats.lock().unwrap();
                            let same = sender_instance(j) == st.inst;
                            st.record(j, seq, sent_ns, now, same)
                        };
                        shared.total.fetch_add(1, Ordering::Relaxed);
                        if fresh {
                            shared.unique.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(pm) = shared.per_message.get(j) {
                            pm.record(seq, sent_ns, now);
                        }
                        if me == Some(j) {
                            window.add_permits(1);
                        }
                    } else if t.starts_with("{\"type\":\"error\"") {
                        stats.lock().unwrap().errors += 1;
                        shared.note_error(format!("client c{k} got {t}"));
                    }
                }
                Some(Ok(Message::Close(f))) => break Some(format!("closed by server: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(format!("read error: {e}")),
                None => break Some("eof".into()),
            },
        }
    };
    match ended {
        Some(why) => {
            shared.note_error(format!(
                "client c{k} (instance {}) {why}",
                ["a", "b"][k % 2]
            ));
            stats.lock().unwrap().ended = Some(why);
        }
        None => {
            // Close politely and wait (briefly) for the server's close reply.
            let closing = async {
                let _ = sink.lock().await.send(Message::Close(None)).await;
                while let Some(Ok(_)) = stream.next().await {}
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), closing).await;
        }
    }
    shared.live.fetch_sub(1, Ordering::SeqCst);
}

async fn sender(j: usize, sink: WsSink, window: Arc<Semaphore>, shared: Arc<Shared>) {
    let mut start = shared.start.clone();
    let mut stop = shared.stop.clone();
    let mut seq = 0u64;
    tokio::select! {
        _ = start.wait_for(|v| *v) => {}
        _ = stop.wait_for(|v| *v) => {}
    }
    let mut ticker = shared.rate_per_sender.map(|rate| {
        let period = Duration::from_secs_f64(1.0 / rate);
        // Spread the senders evenly over one period.
        let offset = period.mul_f64(j as f64 / shared.n_senders.max(1) as f64);
        tokio::time::interval_at(tokio::time::Instant::now() + offset, period)
    });
    while !*stop.borrow() {
        if let Some(ticker) = ticker.as_mut() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|v| *v) => break,
                _ = ticker.tick() => {}
            }
        } else {
            tokio::select! {
                biased;
                _ = stop.wait_for(|v| *v) => break,
                permit = window.acquire() => permit.expect("window open").forget(),
            }
        }
        let mut text = format!("{j}:{seq}:{}:", now_ns());
        if text.len() < TEXT_BYTES {
            text.extend(std::iter::repeat_n('x', TEXT_BYTES - text.len()));
        }
        let frame = format!("{{\"type\":\"message\",\"text\":\"{text}\"}}");
        if let Err(e) = sink.lock().await.send(Message::text(frame)).await {
            shared.send_errors.fetch_add(1, Ordering::Relaxed);
            shared.note_error(format!("sender {j}: send failed: {e}"));
            break;
        }
        shared.sent[j].fetch_add(1, Ordering::SeqCst);
        seq += 1;
    }
    shared.active_senders.fetch_sub(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------- one run

/// One figure of a run: a name (with its unit) and a value.
#[derive(Clone, Debug)]
struct Figure {
    name: String,
    value: f64,
    decimals: usize,
}

#[derive(Default)]
struct RunReport {
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl RunReport {
    fn add(&mut self, name: impl Into<String>, value: f64, decimals: usize) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            decimals,
        });
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

#[derive(Default)]
struct Batch {
    ok: usize,
    failed: usize,
    times_us: Vec<u32>,
    errors: HashMap<String, usize>,
    wall: Duration,
}

struct Driver {
    shared: Arc<Shared>,
    stats: Vec<Arc<Mutex<ClientStats>>>,
    conn_rx: mpsc::UnboundedReceiver<Result<u64, String>>,
    senders: usize,
}

impl Driver {
    async fn connect_range(&mut self, from: usize, to: usize) -> Batch {
        let t0 = Instant::now();
        for k in from..to {
            tokio::spawn(client(
                k,
                self.shared.clone(),
                self.stats[k].clone(),
                k < self.senders,
            ));
        }
        let mut b = Batch::default();
        for _ in from..to {
            match self.conn_rx.recv().await.expect("clients report") {
                Ok(us) => {
                    b.ok += 1;
                    b.times_us.push(us.min(u32::MAX as u64) as u32);
                }
                Err(e) => {
                    b.failed += 1;
                    // Group errors by their text without numbers (ports, ids).
                    let key: String = e
                        .chars()
                        .filter(|c| !c.is_ascii_digit())
                        .take(160)
                        .collect();
                    *b.errors.entry(key).or_default() += 1;
                }
            }
        }
        b.wall = t0.elapsed();
        b
    }
}

struct Procs {
    /// (name, pid, is an instance)
    list: Vec<(String, u32, bool)>,
}

impl Procs {
    fn sample(&self) -> Vec<Sample> {
        self.list.iter().map(|(_, pid, _)| sample(*pid)).collect()
    }

    /// Thread groups of the two instances.
    fn groups(&self) -> Vec<Groups> {
        self.list
            .iter()
            .filter(|p| p.2)
            .map(|(_, pid, _)| sample_groups(*pid))
            .collect()
    }
}

async fn drive(
    opts: &Opts,
    ws: [SocketAddr; 2],
    http: [SocketAddr; 2],
    procs: &Procs,
) -> RunReport {
    let mut rep = RunReport::default();
    let tck = clk_tck();
    let base = procs.sample();
    let n = opts.clients;
    let senders = opts.senders.min(n);
    let room = format!(
        "load{}x{}",
        std::process::id(),
        now_ns() % 1_000_000_000_000
    );
    let (conn_tx, conn_rx) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        ws,
        room,
        conn_sem: Semaphore::new(opts.concurrency),
        conn_tx,
        shutdown: shutdown_rx,
        start: start_rx,
        stop: stop_rx,
        rate_per_sender: opts.rate.map(|r| r / senders.max(1) as f64),
        window: opts.window,
        n_senders: senders,
        sending: AtomicBool::new(false),
        sent: (0..senders).map(|_| AtomicU64::new(0)).collect(),
        unique: AtomicU64::new(0),
        total: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        live: AtomicUsize::new(0),
        active_senders: AtomicUsize::new(0),
        per_message: (0..senders).map(|_| PerMessage::new()).collect(),
    });
    let stats: Vec<_> = (0..n)
        .map(|k| Arc::new(Mutex::new(ClientStats::new(k % 2, senders))))
        .collect();
    let mut d = Driver {
        shared: shared.clone(),
        stats,
        conn_rx,
        senders,
    };

    // ---- connect (and, for max-clients, keep adding while sending)
    let mut all = Batch::default();
    let merge = |all: &mut Batch, b: Batch| {
        all.ok += b.ok;
        all.failed += b.failed;
        all.times_us.extend(b.times_us);
        for (e, c) in b.errors {
            *all.errors.entry(e).or_default() += c;
        }
        all.wall += b.wall;
    };
    let mut idle: Option<(Duration, Vec<Sample>, Vec<Sample>)> = None;
    let (send_start, window_base, groups_base);
    if opts.scenario == Scenario::MaxClients {
        println!(
            "  {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
            "clients",
            "failed",
            "batch s",
            "p50 ms",
            "p99 ms",
            "a RSS MiB",
            "b RSS MiB",
            "a thr",
            "b thr"
        );
        let mut next = 0;
        let mut started = None;
        let mut wb = None;
        while next < n {
            let to = (next + opts.batch).min(n);
            let mut b = d.connect_range(next, to).await;
            next = to;
            let failed = b.failed;
            b.times_us.sort_unstable();
            let s = procs.sample();
            println!(
                "  {:>7} {:>7} {:>9.2} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>9} {:>9}",
                all.ok + b.ok,
                all.failed + b.failed,
                b.wall.as_secs_f64(),
                pct(&b.times_us, 0.5) / 1000.0,
                pct(&b.times_us, 0.99) / 1000.0,
                s[0].rss_kib as f64 / 1024.0,
                s[1].rss_kib as f64 / 1024.0,
                s[0].threads,
                s[1].threads
            );
            for (e, c) in &b.errors {
                println!("          {c} x {e}");
            }
            merge(&mut all, b);
            if started.is_none() {
                wb = Some((procs.sample(), procs.groups()));
                shared.sending.store(true, Ordering::SeqCst);
                started = Some(Instant::now());
                let _ = start_tx.send(true);
            }
            if failed > 0 {
                rep.notes.push(format!(
                    "stopped adding clients at the first failure ({} connected)",
                    all.ok
                ));
                break;
            }
        }
        send_start = started.expect("one batch at least");
        (window_base, groups_base) = wb.expect("one batch at least");
        tokio::time::sleep(opts.duration).await;
    } else {
        let b = d.connect_range(0, n).await;
        merge(&mut all, b);
        if !opts.idle.is_zero() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = procs.sample();
            tokio::time::sleep(opts.idle).await;
            idle = Some((opts.idle, before, procs.sample()));
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (window_base, groups_base) = (procs.sample(), procs.groups());
        shared.sending.store(true, Ordering::SeqCst);
        send_start = Instant::now();
        let _ = start_tx.send(true);
        tokio::time::sleep(opts.duration).await;
    }
    let _ = stop_tx.send(true);
    let send_end = Instant::now();
    while shared.active_senders.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sent: Vec<u64> = shared
        .sent
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .collect();
    let sent_total: u64 = sent.iter().sum();

    // ---- drain: wait for every expected delivery (or the drain timeout)
    let expected_of = |st: &ClientStats| -> u64 {
        if !st.connected {
            return 0;
        }
        st.tracks
            .iter()
            .zip(&sent)
            .map(|(tr, &s)| {
                if tr.seen_any {
                    s.saturating_sub(tr.start)
                } else if st.late {
                    0
                } else {
                    s
                }
            })
            .sum()
    };
    let expected: u64 = d
        .stats
        .iter()
        .map(|s| expected_of(&s.lock().unwrap()))
        .sum();
    // Wait while deliveries still arrive: what has not arrived after
    // `--drain-s` without progress (or after 120 s) is lost.
    let hard_deadline = Instant::now() + Duration::from_secs(120);
    let mut last_progress = (Instant::now(), shared.unique.load(Ordering::Relaxed));
    loop {
        let got = shared.unique.load(Ordering::Relaxed);
        if got >= expected || Instant::now() >= hard_deadline {
            break;
        }
        if got != last_progress.1 {
            last_progress = (Instant::now(), got);
        } else if last_progress.0.elapsed() >= opts.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let window_end = Instant::now();
    let drained = shared.unique.load(Ordering::Relaxed) >= expected;
    let window_samples = procs.sample();
    let groups_end = procs.groups();
    let counters: Vec<Vec<(String, f64)>> = http.iter().map(|h| metrics(*h)).collect();

    // ---- close every client
    let _ = shutdown_tx.send(true);
    let close_deadline = Instant::now() + Duration::from_secs(15);
    while shared.live.load(Ordering::SeqCst) > 0 && Instant::now() < close_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unclosed = shared.live.load(Ordering::SeqCst);
    if unclosed > 0 {
        rep.notes
            .push(format!("{unclosed} clients did not close within 15 s"));
    }

    // ---- figures
    let mut lost = 0u64;
    let mut unique = 0u64;
    let mut dup = 0u64;
    let mut ooo = 0u64;
    let mut errors = 0u64;
    let mut foreign = 0u64;
    let mut dropped = 0usize;
    let mut per_inst = [0usize; 2];
    let mut silent = 0usize;
    let mut lat_same = Vec::new();
    let mut lat_cross = Vec::new();
    let mut expected_final = 0u64;
    let mut ended_reasons: HashMap<String, usize> = HashMap::new();
    for s in &d.stats {
        let mut st = s.lock().unwrap();
        if !st.connected {
            continue;
        }
        let exp = expected_of(&st);
        expected_final += exp;
        let u: u64 = st.tracks.iter().map(|t| t.unique).sum();
        lost += exp.saturating_sub(u);
        unique += u;
        dup += st.dup;
        ooo += st.ooo;
        errors += st.errors;
        foreign += st.foreign;
        if senders > 0 && st.tracks.iter().all(|t| !t.seen_any) {
            silent += 1;
        }
        if let Some(why) = &st.ended {
            dropped += 1;
            let key: String = why
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(160)
                .collect();
            *ended_reasons.entry(key).or_default() += 1;
        } else {
            per_inst[st.inst] += 1;
        }
        lat_same.append(&mut st.lat_same);
        lat_cross.append(&mut st.lat_cross);
    }
    let mut lat_all: Vec<u32> = lat_same.iter().chain(&lat_cross).copied().collect();
    lat_all.sort_unstable();
    lat_same.sort_unstable();
    lat_cross.sort_unstable();
    all.times_us.sort_unstable();

    let ms = |us: f64| us / 1000.0;
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", all.ok as f64, 0);
    rep.add("clients failed", all.failed as f64, 0);
    rep.add("clients dropped during run", dropped as f64, 0);
    rep.add("clients on a at end", per_inst[0] as f64, 0);
    rep.add("clients on b at end", per_inst[1] as f64, 0);
    rep.add("connect wall time (s)", all.wall.as_secs_f64(), 2);
    rep.add(
        "connects/s",
        all.ok as f64 / all.wall.as_secs_f64().max(1e-9),
        0,
    );
    rep.add("connect p50 (ms)", ms(pct(&all.times_us, 0.5)), 2);
    rep.add("connect p99 (ms)", ms(pct(&all.times_us, 0.99)), 2);
    rep.add(
        "connect max (ms)",
        ms(all.times_us.last().copied().unwrap_or(0) as f64),
        2,
    );
    if let Some((dur, before, after)) = &idle {
        rep.add("idle window (s)", dur.as_secs_f64(), 1);
        for (i, (name, _, _)) in procs.list.iter().enumerate() {
            let cpu = after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / tck;
            rep.add(format!("{name}: CPU during idle (s)"), cpu, 2);
            rep.add(
                format!("{name}: CPU during idle (%)"),
                100.0 * cpu / dur.as_secs_f64(),
                2,
            );
        }
    }
    let window = window_end - send_start;
    rep.add("senders", senders as f64, 0);
    rep.add("sending time (s)", (send_end - send_start).as_secs_f64(), 2);
    rep.add("messages sent", sent_total as f64, 0);
    rep.add(
        "send rate (msg/s)",
        sent_total as f64 / (send_end - send_start).as_secs_f64(),
        0,
    );
    rep.add("deliveries expected", expected_final as f64, 0);
    rep.add("deliveries received", (unique + dup) as f64, 0);
    rep.add("lost", lost as f64, 0);
    rep.add("duplicated", dup as f64, 0);
    rep.add("out of order", ooo as f64, 0);
    rep.add("error frames", errors as f64, 0);
    rep.add(
        "send errors",
        shared.send_errors.load(Ordering::SeqCst) as f64,
        0,
    );
    if foreign > 0 {
        rep.add("unrecognised messages", foreign as f64, 0);
    }
    if silent > 0 && opts.scenario == Scenario::MaxClients {
        rep.add("clients that received nothing", silent as f64, 0);
    }
    rep.add("drain time (s)", (window_end - send_end).as_secs_f64(), 3);
    rep.add("measured window (s)", window.as_secs_f64(), 2);
    rep.add(
        "deliveries/s",
        (unique + dup) as f64 / window.as_secs_f64(),
        0,
    );
    rep.add("latency p50 (ms)", ms(pct(&lat_all, 0.5)), 3);
    rep.add("latency p90 (ms)", ms(pct(&lat_all, 0.9)), 3);
    rep.add("latency p99 (ms)", ms(pct(&lat_all, 0.99)), 3);
    rep.add("latency max (ms)", ms(pct(&lat_all, 1.0)), 3);
    rep.add("cross-instance p50 (ms)", ms(pct(&lat_cross, 0.5)), 3);
    rep.add("cross-instance p99 (ms)", ms(pct(&lat_cross, 0.99)), 3);
    rep.add("same-instance p50 (ms)", ms(pct(&lat_same, 0.5)), 3);
    rep.add("same-instance p99 (ms)", ms(pct(&lat_same, 0.99)), 3);
    let (mut first, mut last): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    for (pm, &s) in shared.per_message.iter().zip(&sent) {
        let (f, l) = pm.latencies(s);
        first.extend(f);
        last.extend(l);
    }
    first.sort_unstable();
    last.sort_unstable();
    rep.add("first receiver p50 (ms)", ms(pct(&first, 0.5)), 3);
    rep.add("first receiver p99 (ms)", ms(pct(&first, 0.99)), 3);
    rep.add("whole room has it p50 (ms)", ms(pct(&last, 0.5)), 3);
    rep.add("whole room has it p99 (ms)", ms(pct(&last, 0.99)), 3);
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        let (b0, w0, w1) = (base[i], window_base[i], window_samples[i]);
        rep.add(
            format!("{name}: RSS before clients (MiB)"),
            b0.rss_kib as f64 / 1024.0,
            1,
        );
        rep.add(
            format!("{name}: RSS at end (MiB)"),
            w1.rss_kib as f64 / 1024.0,
            1,
        );
        rep.add(
            format!("{name}: threads before clients"),
            b0.threads as f64,
            0,
        );
        rep.add(format!("{name}: threads at end"), w1.threads as f64, 0);
        if *is_instance {
            let clients = per_inst[i].max(1) as f64;
            rep.add(
                format!("{name}: RSS per client (KiB)"),
                w1.rss_kib.saturating_sub(b0.rss_kib) as f64 / clients,
                1,
            );
        }
        let cpu = w1.cpu_ticks.saturating_sub(w0.cpu_ticks) as f64 / tck;
        let sys = w1.sys_ticks.saturating_sub(w0.sys_ticks) as f64 / tck;
        rep.add(format!("{name}: CPU in window (s)"), cpu, 2);
        rep.add(
            format!("{name}: CPU in window (%)"),
            100.0 * cpu / window.as_secs_f64(),
            1,
        );
        rep.add(
            format!("{name}: kernel share of CPU (%)"),
            100.0 * sys / cpu.max(1e-9),
            0,
        );
    }
    for (i, (g0, g1)) in groups_base.iter().zip(&groups_end).enumerate() {
        let inst = ["a", "b"][i];
        let mut switches = 0;
        let mut names: Vec<&String> = g1.0.keys().collect();
        names.sort();
        for name in names {
            let (c1, v1, n1) = g1.0[name];
            let (c0, v0, n0) = g0.0.get(name).copied().unwrap_or_default();
            switches += (v1 + n1).saturating_sub(v0 + n0);
            // Per-thread times are only tick-accurate, so thousands of
            // client threads with a few ms each add up to nothing: only the
            // one subscriber thread is shown, the rest is "other threads".
            if name == "redis-sub" {
                let sub = c1.saturating_sub(c0) as f64 / tck;
                let total = window_samples[i]
                    .cpu_ticks
                    .saturating_sub(window_base[i].cpu_ticks) as f64
                    / tck;
                rep.add(format!("{inst}: CPU of the redis-sub thread (s)"), sub, 2);
                rep.add(
                    format!("{inst}: CPU of all other threads (s)"),
                    (total - sub).max(0.0),
                    2,
                );
            }
        }
        rep.add(
            format!("{inst}: context switches/s"),
            switches as f64 / window.as_secs_f64(),
            0,
        );
    }
    for (i, c) in counters.iter().enumerate() {
        let inst = ["a", "b"][i];
        for key in [
            "chat_messages_received_total",
            "chat_messages_published_total",
            "chat_messages_delivered_total",
            "chat_slow_clients_dropped_total",
            "chat_rate_limited_total",
            "chat_idle_clients_dropped_total",
            "chat_redis_reconnects_total",
        ] {
            if let Some((_, v)) = c.iter().find(|(k, _)| k == key) {
                rep.add(format!("{inst}: {key}"), *v, 0);
            }
        }
    }
    if !drained {
        rep.notes.push(format!(
            "drain gave up ({:.1} s without progress, or 120 s) with {} of {} expected deliveries",
            opts.drain.as_secs_f64(),
            shared.unique.load(Ordering::Relaxed),
            expected
        ));
    }
    let mut errs: Vec<_> = all.errors.into_iter().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(e.1));
    for (e, c) in errs.into_iter().take(5) {
        rep.notes.push(format!("connect failure x{c}: {e}"));
    }
    for (e, c) in ended_reasons {
        rep.notes.push(format!("client ended x{c}: {e}"));
    }
    if let Some(e) = shared.first_error.lock().unwrap().clone() {
        rep.notes.push(format!("first error: {e}"));
    }
    rep
}

fn run_once(opts: &Opts, run: usize, rt: &tokio::runtime::Runtime) -> RunReport {
    let tag = format!("{run}-{}", now_ns());
    let (redis, url) = match &opts.target_redis {
        Some(url) => (None, url.clone()),
        None => {
            let (p, url) = start_redis(&tag);
            (Some(p), url)
        }
    };
    let prefix = format!("load-{}-{tag}", std::process::id());
    let a = start_instance("a", &url, &prefix, opts);
    let b = start_instance("b", &url, &prefix, opts);
    std::thread::sleep(Duration::from_millis(300));
    let mut list = vec![
        ("a".to_string(), a.pid(), true),
        ("b".to_string(), b.pid(), true),
    ];
    if let Some(r) = &redis {
        list.push(("redis".to_string(), r.pid(), false));
    }
    list.push(("loadgen".to_string(), std::process::id(), false));
    let procs = Procs { list };
    let ws = [a.ws.unwrap(), b.ws.unwrap()];
    let http = [a.http.unwrap(), b.http.unwrap()];
    let mut rep = rt.block_on(drive(opts, ws, http, &procs));
    for p in [&a, &b] {
        let tail = p.log_tail();
        let warnings: Vec<_> = tail
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        for l in warnings.iter().rev().take(3).rev() {
            rep.notes.push(format!("{} log: {l}", p.name));
        }
    }
    drop(a);
    drop(b);
    drop(redis);
    rep
}

// ---------------------------------------------------------------- report

fn fmt_value(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        return "-".into();
    }
    if decimals == 0 {
        // Thousands separators for counts.
        let n = v.round() as i64;
        let s = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else {
        format!("{v:.decimals$}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn print_run(run: usize, runs: usize, rep: &RunReport) {
    let width = rep.figures.iter().map(|f| f.name.len()).max().unwrap_or(10);
    println!("\n  run {run}/{runs}");
    println!("  {:-<w$}", "", w = width + 18);
    for f in &rep.figures {
        println!(
            "  {:<width$}  {:>14}",
            f.name,
            fmt_value(f.value, f.decimals)
        );
    }
    for n in &rep.notes {
        println!("  note: {n}");
    }
}

/// Each target: (description, met).
fn targets(s: Scenario, get: &dyn Fn(&str) -> f64) -> Vec<(String, bool)> {
    let lost = get("lost");
    match s {
        Scenario::Latency => vec![
            (
                format!(
                    "cross-instance p50 < 1 ms (is {:.3} ms)",
                    get("cross-instance p50 (ms)")
                ),
                get("cross-instance p50 (ms)") < 1.0,
            ),
            (
                format!(
                    "cross-instance p99 < 2 ms (is {:.3} ms)",
                    get("cross-instance p99 (ms)")
                ),
                get("cross-instance p99 (ms)") < 2.0,
            ),
        ],
        Scenario::Room => vec![
            (format!("every delivery arrives (lost {lost})"), lost == 0.0),
            (
                format!("p99 < 100 ms (is {:.3} ms)", get("latency p99 (ms)")),
                get("latency p99 (ms)") < 100.0,
            ),
        ],
        Scenario::Burst => vec![
            (
                format!(
                    ">= 300,000 deliveries/s (is {})",
                    fmt_value(get("deliveries/s"), 0)
                ),
                get("deliveries/s") >= 300_000.0,
            ),
            (format!("nothing lost (lost {lost})"), lost == 0.0),
        ],
        Scenario::Idle => {
            let mut t = Vec::new();
            for i in ["a", "b"] {
                let v = get(&format!("{i}: RSS per client (KiB)"));
                t.push((
                    format!("{i}: <= 32 KiB RSS per client (is {v:.1} KiB)"),
                    v <= 32.0,
                ));
            }
            let idle_cpu = get("a: CPU during idle (%)") + get("b: CPU during idle (%)");
            t.push((
                format!("idle CPU ~ 0: a+b < 2% of a core while idle (is {idle_cpu:.2}%)"),
                idle_cpu < 2.0,
            ));
            t
        }
        Scenario::Connect => vec![(
            format!(
                "every connection accepted (failed {})",
                get("clients failed")
            ),
            get("clients failed") == 0.0,
        )],
        Scenario::MaxClients => vec![
            (
                format!(
                    "10,000 clients held (held {})",
                    fmt_value(get("clients on a at end") + get("clients on b at end"), 0)
                ),
                get("clients on a at end") + get("clients on b at end") >= 10_000.0,
            ),
            (
                format!("every delivery of the stream arrives (lost {lost})"),
                lost == 0.0,
            ),
        ],
        Scenario::Smoke => vec![],
    }
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    EPOCH.get_or_init(Instant::now);
    install_signal_handler();
    // Each client is a socket; the servers inherit the raised limit too.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    println!(
        "pubsub-chat load: scenario {} | runs {} | clients {} | senders {} | rate {} | duration {:.1} s{}{}",
        opts.scenario.name(),
        opts.runs,
        opts.clients,
        opts.senders,
        opts.rate
            .map_or("as fast as possible".to_string(), |r| format!("{r} msg/s")),
        opts.duration.as_secs_f64(),
        opts.target_redis
            .as_ref()
            .map_or(String::new(), |u| format!(" | redis {u}")),
        if opts.server_args.is_empty() {
            String::new()
        } else {
            format!(" | server args {:?}", opts.server_args)
        }
    );
    println!("server binary: {SERVER_BIN}");

    let mut reports = Vec::new();
    for run in 1..=opts.runs {
        let rep = run_once(&opts, run, &rt);
        print_run(run, opts.runs, &rep);
        reports.push(rep);
    }
    rt.shutdown_timeout(Duration::from_secs(2));

    // ---- summary: the median of every figure over the runs
    let names: Vec<(String, usize)> = reports[0]
        .figures
        .iter()
        .map(|f| (f.name.clone(), f.decimals))
        .collect();
    let medians: HashMap<String, f64> = names
        .iter()
        .map(|(n, _)| {
            let vals = reports.iter().filter_map(|r| r.get(n)).collect();
            (n.clone(), median(vals))
        })
        .collect();
    let width = names.iter().map(|(n, _)| n.len()).max().unwrap_or(10);
    println!(
        "\n== summary: {} ({} run{}; median of each figure) ==",
        opts.scenario.name(),
        opts.runs,
        if opts.runs == 1 { "" } else { "s" }
    );
    let mut header = format!("  {:<width$}", "figure");
    for i in 1..=reports.len() {
        header += &format!("  {:>12}", format!("run {i}"));
    }
    header += &format!("  {:>12}", "median");
    println!("{header}");
    println!("  {:-<w$}", "", w = header.len() - 2);
    for (n, dec) in &names {
        let mut line = format!("  {n:<width$}");
        for r in &reports {
            line += &format!("  {:>12}", fmt_value(r.get(n).unwrap_or(f64::NAN), *dec));
        }
        line += &format!("  {:>12}", fmt_value(medians[n], *dec));
        println!("{line}");
    }
    let get = |n: &str| medians.get(n).copied().unwrap_or(f64::NAN);
    let t = targets(opts.scenario, &get);
    if !t.is_empty() {
        println!("\n  targets (on the medians):");
        for (desc, met) in &t {
            println!(
                "    target met: {:<3}  {desc}",
                if *met { "yes" } else { "no" }
            );
        }
    }

    // ---- verdict: loss, duplicates and reordering fail every scenario
    let mut failures = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let g = |n: &str| r.get(n).unwrap_or(0.0);
        for what in ["lost", "duplicated", "out of order"] {
            if g(what) > 0.0 {
                failures.push(format!("run {}: {} {what}", i + 1, fmt_value(g(what), 0)));
            }
        }
        if opts.scenario == Scenario::Smoke {
            for what in [
                "clients failed",
                "clients dropped during run",
                "error frames",
                "send errors",
            ] {
                if g(what) > 0.0 {
                    failures.push(format!("run {}: {} {what}", i + 1, fmt_value(g(what), 0)));
                }
            }
            if g("messages sent") == 0.0 {
                failures.push(format!("run {}: nothing was sent", i + 1));
            }
        }
    }
    if failures.is_empty() {
        println!("\nRESULT: PASS (no delivery lost, duplicated or reordered)");
        ExitCode::SUCCESS
    } else {
        println!("\nRESULT: FAIL");
        for f in &failures {
            println!("  {f}");
        }
        ExitCode::FAILURE
    }
}
