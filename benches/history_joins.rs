//! Whether other clients' large history reads slow down a sender on the
//! same instance.
//!
//! ```sh
//! cargo bench --bench history_joins [-- --runs N --phase-s S --joiners J]
//! PUBSUB_CHAT_BIN=/path/to/older/pubsub-chat cargo bench --bench history_joins
//! ```
//!
//! One private `redis-server` (no persistence) and two instances, `a` and
//! `b`, of the server binary (`PUBSUB_CHAT_BIN`, or this package's own)
//! joined to it. Room `big`'s history is filled straight into Redis with
//! 1,100 messages of 1,900 characters. A sender on instance `a`, in room
//! `small`, sends one message every 20 ms and times each round trip (sent
//! → its own copy back, matched by `cid`). Meanwhile joiner threads
//! connect to room `big` with `since=0-0`, read its 1,100 history
//! messages, close and connect again, in phases that alternate:
//!
//! - "joins on b": the joiners on the other instance (the baseline);
//! - "joins on a": the joiners on the sender's instance.
//!
//! Target: with the joins on its instance, the sender's median p50 round
//! trip stays within 3x of what it is with the joins on the other one. A
//! missed target is reported, not a failure: the exit status is non-zero
//! only when something breaks (an instance does not start, the history
//! cannot be read back, the sender's message does not come back within
//! 15 s).
//!
//! `cargo bench` passes `--bench`; without it (`cargo test --benches`, which
//! builds benches as tests) the binary only says how to run it.

#[path = "../tests/common/process.rs"]
mod process;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tungstenite::{Message, WebSocket};

/// Messages in room `big`'s history, and the characters of each text.
const HISTORY_MESSAGES: usize = 1_100;
const TEXT_CHARS: usize = 1_900;
/// The sender's pace: one message every 20 ms.
const SEND_EVERY: Duration = Duration::from_millis(20);
/// How long the sender waits for its own message before the run fails.
const SENDER_DEADLINE: Duration = Duration::from_secs(15);
/// How long a joiner waits for the whole history before giving up on it.
const JOIN_DEADLINE: Duration = Duration::from_secs(15);
/// A quiet second between phases, so that one's tail is not the next's.
const SETTLE: Duration = Duration::from_secs(1);
/// The sender alone before the first phase: connections warm, for the
/// reference line.
const WARM_UP: Duration = Duration::from_secs(2);
/// The target: (joins on a) / (joins on b) of the median p50.
const TARGET_RATIO: f64 = 3.0;

struct Opts {
    runs: usize,
    phase: Duration,
    joiners: usize,
}

fn usage() -> &'static str {
    "usage: cargo bench --bench history_joins [-- --runs N] [--phase-s S] [--joiners J]
  --runs N      rounds of (joins on b, joins on a) [default 3]
  --phase-s S   seconds of each phase [default 10]
  --joiners J   joiner threads, each connecting again and again [default 6]
PUBSUB_CHAT_BIN=/path/to/pubsub-chat measures another build of the server."
}

/// The options, or `None` when there is nothing to run (help, or test mode:
/// no `--bench`).
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>, String> {
    let mut opts = Opts {
        runs: 3,
        phase: Duration::from_secs(10),
        joiners: 6,
    };
    let mut bench = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => bench = true,
            "--nocapture" | "--quiet" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            "--runs" => {
                let v = value()?;
                opts.runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("--runs {v:?}: expected a whole number >= 1"))?;
            }
            "--phase-s" => {
                let v = value()?;
                let s: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 600.0)
                    .ok_or_else(|| format!("--phase-s {v:?}: expected seconds in (0, 600]"))?;
                opts.phase = Duration::from_secs_f64(s);
            }
            "--joiners" => {
                let v = value()?;
                opts.joiners = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("--joiners {v:?}: expected 1 to 64"))?;
            }
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if !bench {
        println!(
            "history_joins: not run without --bench (cargo test builds benches as tests); run it with `cargo bench --bench history_joins`"
        );
        return Ok(None);
    }
    Ok(Some(opts))
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("history_joins: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("history_joins: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The server binary under test: `PUBSUB_CHAT_BIN` when set, else this
/// package's own (cargo builds it in the bench's profile).
fn server_bin() -> PathBuf {
    match std::env::var_os("PUBSUB_CHAT_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_pubsub-chat")),
    }
}

// ---------------------------------------------------------------------------
// Child processes

/// Every process this run started, and its temporary directory: killed,
/// reaped and removed on drop (the end of the run, an error or a panic).
#[derive(Default)]
struct Children {
    procs: Vec<(String, Child)>,
    /// Removed when dropped, after the children are killed.
    dirs: Vec<process::TempDir>,
}

impl Children {
    /// Starts `cmd` as `name`; the child also dies with this process
    /// (parent-death signal), should it be killed before the drop runs.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<&mut Child, String> {
        process::die_with_parent(cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.procs.push((name.to_string(), child));
        Ok(&mut self.procs.last_mut().expect("just pushed").1)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dirs.clear();
    }
}

/// An instance's addresses and what it logged.
struct Instance {
    id: &'static str,
    http: SocketAddr,
    ws: SocketAddr,
    log: Arc<Mutex<Log>>,
}

/// An instance's log: its last lines (shown when it does not start), and
/// its warnings and errors (counted, the last ones shown at the end).
#[derive(Default)]
struct Log {
    tail: VecDeque<String>,
    warnings: usize,
    warning_tail: VecDeque<String>,
}

fn push_bounded(queue: &mut VecDeque<String>, line: String) {
    if queue.len() >= 10 {
        queue.pop_front();
    }
    queue.push_back(line);
}

impl Instance {
    fn log_report(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = format!(
            "instance {}: {} warning(s) or error(s) logged{}",
            self.id,
            log.warnings,
            if log.warnings > 0 {
                "; the last ones:"
            } else {
                ""
            }
        );
        for line in &log.warning_tail {
            out += &format!("\n    {line}");
        }
        out
    }
}

fn start_redis(children: &mut Children) -> Result<u16, String> {
    if process::find_program("redis-server").is_none() {
        return Err("redis-server is not installed (`apt-get install redis-server`)".into());
    }
    let port = process::free_port();
    let dir = process::temp_dir("history-joins-redis");
    let mut cmd = process::redis_server_command(port, &dir);
    children.dirs.push(dir);
    cmd.args(["--appendonly", "no"]);
    children.spawn("redis-server", &mut cmd)?;
    if !process::wait_redis(port, Duration::from_secs(10)) {
        return Err(format!("redis-server on port {port} did not answer PING"));
    }
    Ok(port)
}

fn start_instance(
    children: &mut Children,
    id: &'static str,
    redis_url: &str,
    prefix: &str,
) -> Result<Instance, String> {
    let mut cmd = process::instance_command(&server_bin(), id);
    cmd.args(["--broker", "redis", "--redis-url", redis_url])
        .args(["--redis-prefix", prefix])
        // The listening line is logged at info by the server module.
        .env("RUST_LOG", "warn,pubsub_chat::server=info");
    let child = children.spawn(&format!("instance {id}"), &mut cmd)?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = Arc::new(Mutex::new(Log::default()));
    let sink = log.clone();
    let addrs = process::watch_stderr(stderr, format!("stderr-{id}"), move |line| {
        let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            log.warnings += 1;
            push_bounded(&mut log.warning_tail, line.clone());
        }
        push_bounded(&mut log.tail, line);
    });
    let tail = |log: &Arc<Mutex<Log>>| {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    };
    let process::Listening { http, ws, .. } =
        addrs.recv_timeout(Duration::from_secs(20)).map_err(|_| {
            format!(
                "instance {id} did not log its listening line:\n{}",
                tail(&log)
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = process::try_http_get(http, "/readyz", Duration::from_secs(2)).map(|r| r.0);
        if let Ok(200) = status {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "instance {id}: /readyz did not answer 200 within 20 s (last: {status:?}):\n{}",
                tail(&log)
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(Instance { id, http, ws, log })
}

/// Room `big`'s history: `HISTORY_MESSAGES` messages of `TEXT_CHARS`
/// characters, ids `1-0`.., in one pipeline. Returns the stream's length.
fn fill_history(redis_url: &str, prefix: &str) -> Result<usize, String> {
    let fail = |e: redis::RedisError| format!("filling the history: {e}");
    let client = redis::Client::open(redis_url).map_err(fail)?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(fail)?;
    let key = format!("{prefix}:history:big");
    let text = "x".repeat(TEXT_CHARS);
    let mut pipe = redis::pipe();
    for n in 1..=HISTORY_MESSAGES {
        let frame = format!(
            r#"{{"type":"message","id":"{n}-0","ts":{n},"room":"big","from":"filler","text":"{text}","instance":"filler"}}"#
        );
        pipe.cmd("XADD")
            .arg(&key)
            .arg(format!("{n}-0"))
            .arg("m")
            .arg(frame)
            .ignore();
    }
    pipe.query::<()>(&mut conn).map_err(fail)?;
    redis::cmd("XLEN").arg(&key).query(&mut conn).map_err(fail)
}

// ---------------------------------------------------------------------------
// WebSocket clients

type Socket = WebSocket<TcpStream>;

/// The fields of a server frame this benchmark looks at.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    cid: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn connect(ws: SocketAddr, query: &str, read_timeout: Duration) -> Result<Socket, String> {
    let stream = TcpStream::connect_timeout(&ws, Duration::from_secs(5))
        .map_err(|e| format!("connect to {ws}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(read_timeout))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| format!("socket options: {e}"))?;
    let (socket, _) = tungstenite::client(format!("ws://{ws}/ws?{query}"), stream)
        .map_err(|e| format!("handshake with {ws}: {e}"))?;
    Ok(socket)
}

fn timed_out(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

/// The next text frame, or `None` when the read timed out. With `cheap`,
/// a `message` frame is known by its first bytes and not parsed (a
/// joiner reads 2 MB of them per join, on the machine the servers share):
/// only its type is filled in.
fn next_frame(socket: &mut Socket, cheap: bool) -> Result<Option<Frame>, String> {
    loop {
        match socket.read() {
            Ok(Message::Text(text)) => {
                if cheap && text.as_str().starts_with(r#"{"type":"message","#) {
                    return Ok(Some(Frame {
                        kind: "message".into(),
                        cid: None,
                        code: None,
                        message: None,
                    }));
                }
                return serde_json::from_str(text.as_str())
                    .map(Some)
                    .map_err(|e| format!("a frame that is not JSON ({e}): {}", text.as_str()));
            }
            Ok(Message::Close(close)) => return Err(format!("closed by the server: {close:?}")),
            Ok(_) => continue,
            Err(e) if timed_out(&e) => return Ok(None),
            Err(e) => return Err(format!("connection lost: {e}")),
        }
    }
}

fn close(mut socket: Socket) {
    let _ = socket.close(None);
    let _ = socket.flush();
}

/// What a full read of room `big`'s history through one connection gave.
enum Join {
    /// Every history message, after this long (connect to the last one).
    Done(Duration),
    /// Fewer messages than history holds within `JOIN_DEADLINE`.
    TimedOut(usize),
    /// The phase ended first.
    Cut,
    Failed(String),
}

fn join_once(ws: SocketAddr, name: &str, until: Instant) -> Join {
    let started = Instant::now();
    let deadline = started + JOIN_DEADLINE;
    let query = format!("name={name}&room=big&since=0-0");
    let mut socket = match connect(ws, &query, Duration::from_millis(200)) {
        Ok(socket) => socket,
        Err(e) => return Join::Failed(e),
    };
    let mut messages = 0;
    let mut first = true;
    let outcome = loop {
        let now = Instant::now();
        if now >= until {
            break Join::Cut;
        }
        if now >= deadline {
            break Join::TimedOut(messages);
        }
        match next_frame(&mut socket, true) {
            Ok(Some(frame)) => {
                if first && frame.kind != "welcome" {
                    break Join::Failed(format!("first frame is a {}, not a welcome", frame.kind));
                }
                first = false;
                match frame.kind.as_str() {
                    "message" => {
                        messages += 1;
                        if messages == HISTORY_MESSAGES {
                            break Join::Done(started.elapsed());
                        }
                    }
                    "error" => {
                        break Join::Failed(format!(
                            "error {}: {}",
                            frame.code.unwrap_or_default(),
                            frame.message.unwrap_or_default()
                        ));
                    }
                    _ => {}
                }
            }
            Ok(None) => {}
            Err(e) => break Join::Failed(e),
        }
    };
    close(socket);
    outcome
}

/// What one joiner thread did in a phase.
#[derive(Default)]
struct JoinTally {
    done: Vec<Duration>,
    timed_out: usize,
    failed: usize,
    first_failure: Option<String>,
}

impl JoinTally {
    fn merge(&mut self, other: JoinTally) {
        self.done.extend(other.done);
        self.timed_out += other.timed_out;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

fn spawn_joiner(ws: SocketAddr, index: usize, until: Instant) -> JoinHandle<JoinTally> {
    thread::Builder::new()
        .name(format!("joiner-{index}"))
        .spawn(move || {
            let mut tally = JoinTally::default();
            let mut k = 0;
            while Instant::now() < until {
                k += 1;
                match join_once(ws, &format!("joiner-{index}-{k}"), until) {
                    Join::Done(took) => tally.done.push(took),
                    Join::TimedOut(_) => tally.timed_out += 1,
                    Join::Cut => {}
                    Join::Failed(e) => {
                        tally.failed += 1;
                        tally.first_failure.get_or_insert(e);
                        // Not in a tight loop against a refusing server.
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            tally
        })
        .expect("cannot start a joiner thread")
}

/// The sender's round trips: (when sent, how long until its copy came
/// back), and why it stopped if it broke.
#[derive(Default)]
struct SenderLog {
    samples: Vec<(Instant, Duration)>,
    error: Option<String>,
}

fn spawn_sender(
    ws: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<SenderLog>>,
) -> Result<JoinHandle<()>, String> {
    let mut socket = connect(ws, "name=sender&room=small", Duration::from_millis(200))?;
    // Its first frames: welcome, presence (and no history: the room is new).
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        if let Some(frame) = next_frame(&mut socket, false).map_err(|e| format!("sender: {e}"))? {
            break frame;
        }
        if Instant::now() >= deadline {
            return Err("sender: no welcome within 5 s".into());
        }
    };
    if first.kind != "welcome" {
        return Err(format!(
            "sender: first frame is a {}, not a welcome",
            first.kind
        ));
    }
    let handle = thread::Builder::new()
        .name("sender".into())
        .spawn(move || {
            let result = send_loop(&mut socket, &stop, &log);
            if let Err(e) = result {
                log.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e);
            }
            close(socket);
        })
        .map_err(|e| format!("cannot start the sender thread: {e}"))?;
    Ok(handle)
}

fn send_loop(socket: &mut Socket, stop: &AtomicBool, log: &Mutex<SenderLog>) -> Result<(), String> {
    let mut next = Instant::now();
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        // One tick every 20 ms; a slow round trip delays the next send
        // rather than causing a burst to catch up.
        next = (next + SEND_EVERY).max(Instant::now());
        seq += 1;
        let cid = format!("s{seq}");
        let frame =
            serde_json::json!({"type": "message", "text": format!("ping {seq}"), "cid": cid});
        let sent = Instant::now();
        socket
            .send(Message::text(frame.to_string()))
            .map_err(|e| format!("sender: send failed: {e}"))?;
        loop {
            if sent.elapsed() >= SENDER_DEADLINE {
                return Err(format!(
                    "sender: message {cid} did not come back within {} s",
                    SENDER_DEADLINE.as_secs()
                ));
            }
            let Some(frame) = next_frame(socket, false).map_err(|e| format!("sender: {e}"))? else {
                continue;
            };
            if frame.cid.as_deref() != Some(cid.as_str()) {
                continue;
            }
            match frame.kind.as_str() {
                "message" => break,
                _ => {
                    return Err(format!(
                        "sender: message {cid} refused: {} {}: {}",
                        frame.kind,
                        frame.code.unwrap_or_default(),
                        frame.message.unwrap_or_default()
                    ));
                }
            }
        }
        let rtt = sent.elapsed();
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .samples
            .push((sent, rtt));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Figures

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The sender's round-trip figures over one window.
struct Rtt {
    count: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn rtt_between(log: &Mutex<SenderLog>, start: Instant, end: Instant) -> Rtt {
    let mut rtts: Vec<Duration> = log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .samples
        .iter()
        .filter(|(sent, _)| *sent >= start && *sent < end)
        .map(|(_, rtt)| *rtt)
        .collect();
    rtts.sort();
    Rtt {
        count: rtts.len(),
        p50: percentile(&rtts, 50.0),
        p90: percentile(&rtts, 90.0),
        p99: percentile(&rtts, 99.0),
        max: rtts.last().copied().unwrap_or_default(),
    }
}

impl Rtt {
    fn line(&self) -> String {
        format!(
            "rtt n={:>4} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            self.count,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}

fn sender_error(log: &Mutex<SenderLog>) -> Option<String> {
    log.lock().unwrap_or_else(|e| e.into_inner()).error.clone()
}

// ---------------------------------------------------------------------------
// The run

fn run(opts: &Opts) -> Result<(), String> {
    let bin = server_bin();
    if !bin.is_file() {
        return Err(format!("no server binary at {}", bin.display()));
    }
    println!(
        "history_joins: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "server {} | runs {} | phase {:.1} s | joiners {} | room big: {} messages of {} chars, joined with since=0-0 | sender in room small on a, one message every {} ms",
        bin.display(),
        opts.runs,
        opts.phase.as_secs_f64(),
        opts.joiners,
        HISTORY_MESSAGES,
        TEXT_CHARS,
        SEND_EVERY.as_millis()
    );

    let mut children = Children::default();
    let redis_port = start_redis(&mut children)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let prefix = process::unique("hj");
    let a = start_instance(&mut children, "a", &redis_url, &prefix)?;
    let b = start_instance(&mut children, "b", &redis_url, &prefix)?;
    println!(
        "redis {redis_url} prefix {prefix} | instance a ws://{}/ws (http {}) | instance b ws://{}/ws (http {})",
        a.ws, a.http, b.ws, b.http
    );

    let filled_at = Instant::now();
    let len = fill_history(&redis_url, &prefix)?;
    if len != HISTORY_MESSAGES {
        return Err(format!(
            "room big's history holds {len} entries, not {HISTORY_MESSAGES}"
        ));
    }
    println!(
        "filled: room big's history holds {len} entries ({:.0} ms)",
        ms(filled_at.elapsed())
    );
    // One join on each instance: the history must come back whole (the
    // server skips entries it cannot read as messages).
    for instance in [&a, &b] {
        let far = Instant::now() + JOIN_DEADLINE + Duration::from_secs(1);
        match join_once(instance.ws, "probe", far) {
            Join::Done(took) => println!(
                "probe: a join on {} read {HISTORY_MESSAGES} history messages in {:.1} ms",
                instance.id,
                ms(took)
            ),
            Join::TimedOut(n) => {
                return Err(format!(
                    "probe join on {}: {n} of {HISTORY_MESSAGES} history messages within {} s\n{}",
                    instance.id,
                    JOIN_DEADLINE.as_secs(),
                    instance.log_report()
                ));
            }
            Join::Cut => unreachable!("the probe has no phase end"),
            Join::Failed(e) => {
                return Err(format!(
                    "probe join on {}: {e}\n{}",
                    instance.id,
                    instance.log_report()
                ));
            }
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(SenderLog::default()));
    let sender = spawn_sender(a.ws, stop.clone(), log.clone())?;
    let outcome = phases(opts, &a, &b, &log);
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let results = outcome?;
    if let Some(e) = sender_error(&log) {
        return Err(e);
    }
    summary(&results);
    println!("{}", a.log_report());
    println!("{}", b.log_report());
    drop(children);
    Ok(())
}

/// One phase's figures: where the joins were, the sender's round trips,
/// the joins.
struct PhaseResult {
    on: &'static str,
    rtt: Rtt,
}

fn phases(
    opts: &Opts,
    a: &Instance,
    b: &Instance,
    log: &Mutex<SenderLog>,
) -> Result<Vec<PhaseResult>, String> {
    let warm_start = Instant::now();
    thread::sleep(WARM_UP);
    if let Some(e) = sender_error(log) {
        return Err(e);
    }
    println!(
        "warm-up          no joins   {} | {:.1} s",
        rtt_between(log, warm_start, Instant::now()).line(),
        WARM_UP.as_secs_f64()
    );
    let mut results = Vec::new();
    for round in 1..=opts.runs {
        for instance in [b, a] {
            let start = Instant::now();
            let until = start + opts.phase;
            let joiners: Vec<_> = (0..opts.joiners)
                .map(|i| spawn_joiner(instance.ws, i, until))
                .collect();
            let mut tally = JoinTally::default();
            for joiner in joiners {
                tally.merge(
                    joiner
                        .join()
                        .map_err(|_| "a joiner thread panicked".to_string())?,
                );
            }
            let end = until;
            if let Some(e) = sender_error(log) {
                return Err(e);
            }
            let rtt = rtt_between(log, start, end);
            tally.done.sort();
            let seconds = (end - start).as_secs_f64();
            println!(
                "round {round}/{} joins on {}  {} | joins {:>4} ({:.1}/s, each p50 {:.1} ms) timed out {} failed {}",
                opts.runs,
                instance.id,
                rtt.line(),
                tally.done.len(),
                tally.done.len() as f64 / seconds,
                ms(percentile(&tally.done, 50.0)),
                tally.timed_out,
                tally.failed,
            );
            if let Some(e) = &tally.first_failure {
                println!("    first failed join: {e}");
            }
            results.push(PhaseResult {
                on: instance.id,
                rtt,
            });
            thread::sleep(SETTLE);
        }
    }
    Ok(results)
}

fn summary(results: &[PhaseResult]) {
    let medians = |on: &str| {
        let p50: Vec<f64> = results
            .iter()
            .filter(|r| r.on == on)
            .map(|r| ms(r.rtt.p50))
            .collect();
        let p99: Vec<f64> = results
            .iter()
            .filter(|r| r.on == on)
            .map(|r| ms(r.rtt.p99))
            .collect();
        (median(&p50), median(&p99), p50.len())
    };
    let (b50, b99, rounds) = medians("b");
    let (a50, a99, _) = medians("a");
    println!(
        "joins on b (other instance):  median over {rounds} rounds: p50 {b50:.2} ms, p99 {b99:.2} ms"
    );
    println!(
        "joins on a (sender's instance): median over {rounds} rounds: p50 {a50:.2} ms, p99 {a99:.2} ms"
    );
    let (r50, r99) = (a50 / b50, a99 / b99);
    println!("ratio (joins on a) / (joins on b): p50 {r50:.2}, p99 {r99:.2}");
    println!(
        "ratio p50 {r50:.2} (target <= {TARGET_RATIO}): {}",
        if r50 <= TARGET_RATIO {
            "met"
        } else {
            "not met"
        }
    );
}
