//! Shared test support: a private `redis-server` (or Redis Cluster, in
//! `cluster.rs`), real instances of the binary, and real WebSocket
//! clients. Every blocking call has a timeout, so a failure fails instead
//! of hanging CI.

#![allow(dead_code)]

pub mod cluster;
pub mod cluster_process;
pub mod fault_proxy;
pub mod nginx;
pub mod nginx_config;
pub mod process;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// Not every test file uses every helper.
#[allow(unused_imports)]
pub use process::{TempDir, free_port, refused_port, temp_dir, unique};

use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long any single wait in a test may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Polls `check` until it is true, or panics with `what` after [`TIMEOUT`].
pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of this test's own, on a free loopback port, killed
/// and reaped on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra_args: Vec<String>,
    /// The default user's password (`--requirepass`), if it has one.
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one on a given port (one an instance already points at).
    pub fn start_on(port: u16) -> Self {
        let mut server = RedisServer {
            port,
            child: None,
            dir: temp_dir("redis"),
            extra_args: Vec::new(),
            password: None,
        };
        server.spawn();
        server
    }

    /// Starts one whose default user needs `password` (`--requirepass`):
    /// its [`url`](Self::url) carries it (`redis://:PASSWORD@...`).
    pub fn start_with_password(password: &str) -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: temp_dir("redis"),
            extra_args: vec!["--requirepass".into(), password.into()],
            password: Some(password.into()),
        };
        server.spawn();
        server
    }

    /// Starts one with extra `redis-server` arguments (persistence, ...).
    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: temp_dir("redis"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            password: None,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT`, with `:PASSWORD@` when it has one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Adds a Redis ACL user `user` with `password` and every right
    /// (`ACL SETUSER user on >password ~* &* +@all`).
    pub fn add_acl_user(&self, user: &str, password: &str) {
        let mut conn = self
            .connection()
            .expect("cannot reach the test redis-server");
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query::<()>(&mut conn)
            .expect("ACL SETUSER failed");
    }

    fn spawn(&mut self) {
        let child = process::redis_server_command(self.port, &self.dir)
            .args(&self.extra_args)
            .spawn()
            .expect("redis-server is not installed: run ./scripts/test.sh, or apt-get install redis-server");
        self.child = Some(child);
        if !process::wait_redis(self.port, TIMEOUT) {
            let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
            panic!(
                "redis-server on port {} did not answer PING:\n{log}",
                self.port
            );
        }
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        Ok(conn)
    }

    /// The redis-server's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running")
            .id()
    }

    /// SIGKILLs the server: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `pubsub-chat` process, killed on drop. Its log is kept, and
/// printed when a test panics with it alive.
pub struct Instance {
    pub id: String,
    pub http: SocketAddr,
    pub ws: SocketAddr,
    /// The admin listener (`--admin-addr`): metrics, stats, detailed
    /// readiness, the fault panel.
    pub admin: Option<SocketAddr>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    /// Starts an instance joined to `redis`, with its keys under `prefix`.
    pub fn redis(id: &str, redis_url: &str, prefix: &str) -> Self {
        Self::redis_with(id, redis_url, prefix, &[])
    }

    /// Starts an instance joined to `redis` with extra options.
    pub fn redis_with(id: &str, redis_url: &str, prefix: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--broker",
            "redis",
            "--redis-url",
            redis_url,
            "--redis-prefix",
            prefix,
        ];
        args.extend_from_slice(extra);
        Self::start(id, &args)
    }

    /// Starts an instance with no Redis.
    pub fn local(id: &str) -> Self {
        Self::start(id, &["--broker", "local"])
    }

    /// Starts an instance on ephemeral ports with the given extra options,
    /// and waits for its "listening" line.
    pub fn start(id: &str, args: &[&str]) -> Self {
        Self::start_with_env(id, args, &[])
    }

    /// Starts one with extra environment variables (`CHAT_FAULTS`, ...).
    pub fn start_with_env(id: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        // The rate limit is out of the way (tests send far faster than a
        // person); the rate-limit tests set their own limits with flags,
        // which win over the environment.
        let mut child = process::instance_command(Path::new(env!("CARGO_BIN_EXE_pubsub-chat")), id)
            .args(["--redis-max-backoff-ms", "500"])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,pubsub_chat=debug")
            .spawn()
            .expect("cannot start pubsub-chat");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let addr_rx = process::watch_stderr(
            child.stderr.take().unwrap(),
            format!("stderr-{id}"),
            move |line| lines.lock().unwrap().push(line),
        );
        let Ok(process::Listening { http, ws, admin }) = addr_rx.recv_timeout(TIMEOUT) else {
            let _ = child.kill();
            panic!(
                "instance {id} did not start:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Instance {
            id: id.to_string(),
            http,
            ws,
            admin,
            child: Some(child),
            log,
        }
    }

    /// The process id (for tools that kill it themselves).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("instance stopped").id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `GET path` from the public port over plain HTTP/1.0: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
            .unwrap_or_else(|| panic!("{} logged no admin address", self.id))
    }

    /// `GET path` from the admin listener.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin(), path)
    }

    /// The fault panel's token, as the page gets it: from `/config.json`,
    /// asked from this machine, straight, on the admin listener.
    pub fn demo_token(&self) -> String {
        let (_, config) = self.admin_get("/config.json");
        let config: Value = serde_json::from_str(&config)
            .unwrap_or_else(|e| panic!("/config.json is not JSON ({e}): {config}"));
        config["demo_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no demo_token in {config}"))
            .to_string()
    }

    /// A fault panel request (`--demo-controls`) as the page makes it:
    /// with the token.
    pub fn demo_post(&self, path: &str) -> (u16, String) {
        let token = self.demo_token();
        http_post_with(self.admin(), path, &[("X-Demo-Token", &token)])
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&self) {
        wait_for(&format!("{} to be ready", self.id), || {
            self.get("/readyz").0 == 200
        });
    }

    /// One number from `/metrics` (on the admin listener).
    pub fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until a metric has the given value.
    pub fn wait_metric(&self, name: &str, value: f64) {
        wait_for(&format!("{name} == {value} on {}", self.id), || {
            self.metric(name) == value
        });
    }

    pub fn client(&self, name: &str, room: &str) -> Client {
        Client::connect(self.ws, &format!("name={name}&room={room}"))
    }

    /// Waits for the process to exit on its own; returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("instance already stopped");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "instance {} did not exit within {within:?}:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub fn terminate(&mut self) -> Duration {
        let mut child = self.child.take().expect("instance already stopped");
        let started = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = started + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "instance exited with {status}:\n{}",
                    self.log()
                );
                return started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "instance ignored SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- log of instance {} ----\n{}", self.id, self.log());
        }
        self.kill();
    }
}

/// Instances `a` and `b` joined by `redis` under `prefix`, both ready.
pub fn two_instances(redis: &RedisServer, prefix: &str) -> (Instance, Instance) {
    let a = Instance::redis("a", &redis.url(), prefix);
    let b = Instance::redis("b", &redis.url(), prefix);
    a.wait_ready();
    b.wait_ready();
    (a, b)
}

/// `GET path` over plain HTTP/1.0: (status, body); panics on failure.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    process::try_http_get(addr, path, TIMEOUT)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

/// `POST path` with an empty body: (status, body); panics on failure.
pub fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    http_post_with(addr, path, &[])
}

/// `POST path` with extra request headers.
pub fn http_post_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    process::try_http_with(addr, "POST", path, headers, TIMEOUT)
        .unwrap_or_else(|e| panic!("POST http://{addr}{path} failed: {e}"))
}

/// `GET path` with extra request headers.
pub fn http_get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    process::try_http_with(addr, "GET", path, headers, TIMEOUT)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

/// A real WebSocket client (tungstenite), with a read timeout.
pub struct Client {
    pub socket: WebSocket<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

impl Client {
    /// Connects with the given query string and reads the welcome frame.
    pub fn connect(ws: SocketAddr, query: &str) -> Self {
        let mut client = Self::connect_raw(ws, query);
        let welcome = client.recv();
        assert_eq!(
            welcome["type"], "welcome",
            "first frame is not a welcome: {welcome}"
        );
        client.welcome = welcome;
        client
    }

    /// Connects without reading anything.
    pub fn connect_raw(ws: SocketAddr, query: &str) -> Self {
        let stream = TcpStream::connect_timeout(&ws, TIMEOUT).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        let url = format!("ws://{ws}/ws?{query}");
        let (socket, _) = tungstenite::client(url, MaybeTlsStream::Plain(stream))
            .unwrap_or_else(|e| panic!("handshake with {ws} failed: {e}"));
        Client {
            socket,
            welcome: Value::Null,
        }
    }

    pub fn send(&mut self, text: &str, cid: &str) {
        let frame = serde_json::json!({"type": "message", "text": text, "cid": cid});
        self.socket.send(Message::text(frame.to_string())).unwrap();
    }

    pub fn send_raw(&mut self, message: Message) {
        self.socket.send(message).unwrap();
    }

    /// The next JSON frame, presence frames aside (tests/presence.rs reads
    /// those itself); panics on timeout or close.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"].as_str().is_some_and(is_presence) {
                        continue;
                    }
                    return frame;
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next `n` frames of type `message`, `status` frames aside;
    /// panics on anything else. A client that joins as its instance
    /// links to Redis may get an `up` it never needed (docs/PROTOCOL.md:
    /// "apply them as states"); tests of `status` read it with `recv`.
    pub fn recv_messages(&mut self, n: usize) -> Vec<Value> {
        let mut messages = Vec::with_capacity(n);
        while messages.len() < n {
            let frame = self.recv();
            if frame["type"] == "status" {
                continue;
            }
            assert_eq!(frame["type"], "message", "expected a message, got {frame}");
            messages.push(frame);
        }
        messages
    }

    /// Every `message` frame that arrives until the socket is quiet for
    /// `quiet` (history and live alike).
    pub fn drain_messages(&mut self, quiet: Duration) -> Vec<Value> {
        self.set_read_timeout(quiet);
        let mut messages = Vec::new();
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "message" {
                        messages.push(frame);
                    }
                }
                Ok(_) => {}
                Err(e) if timed_out(&e) => break,
                Err(e) => panic!("connection lost while draining: {e}"),
            }
        }
        self.set_read_timeout(TIMEOUT);
        messages
    }

    /// Asserts that nothing arrives within `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        // Presence frames (others joining or leaving) are not what a test
        // of silence is about, nor the server's pings to a quiet client
        // (every --ping-interval-ms, answered by tungstenite).
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.set_read_timeout(left);
            match self.socket.read() {
                Err(e) if timed_out(&e) => break,
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Text(text))
                    if serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|frame| frame["type"].as_str().map(is_presence))
                        == Some(true) => {}
                other => panic!("expected silence, got {other:?}"),
            }
        }
        self.set_read_timeout(TIMEOUT);
    }

    /// How long one read waits before it fails with a timeout (at least
    /// 1 ms: no timeout at all would wait for ever).
    pub fn set_read_timeout(&self, wait: Duration) {
        let MaybeTlsStream::Plain(stream) = self.socket.get_ref() else {
            unreachable!("the tests connect over plain TCP")
        };
        stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
    }
}

/// Whether a read failed only because nothing came within the socket's
/// read timeout (the connection is fine).
pub fn timed_out(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

/// Whether a frame type is one of presence's (`presence`,
/// `presence_diff`, `typing`), which most tests pass over.
pub fn is_presence(kind: &str) -> bool {
    matches!(kind, "presence" | "presence_diff" | "typing")
}

/// The texts of a list of message frames.
pub fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

/// A message id as a comparable pair.
pub fn id_of(message: &Value) -> (u64, u64) {
    let id = message["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {message}"));
    let (millis, seq) = id.split_once('-').unwrap();
    (millis.parse().unwrap(), seq.parse().unwrap())
}

/// What happened to the messages one sender sent.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Texts whose own copy came back: accepted.
    pub accepted: Vec<String>,
    /// Texts answered with an `unavailable` error: not accepted.
    pub refused: Vec<String>,
    /// Every message frame this client received, in order.
    pub received: Vec<Value>,
}

impl Client {
    /// Sends `count` messages labelled `label-N`, one at a time, waiting for
    /// each one's outcome (its own copy, or an error naming its cid) and
    /// keeping every message received meanwhile.
    pub fn send_and_confirm(&mut self, label: &str, count: usize, pace: Duration) -> Outcomes {
        let mut outcomes = Outcomes::default();
        for n in 0..count {
            let text = format!("{label}-{n}");
            self.send(&text, &text);
            loop {
                let frame = self.recv();
                match frame["type"].as_str() {
                    Some("message") => {
                        let own = frame["cid"] == text.as_str();
                        outcomes.received.push(frame);
                        if own {
                            outcomes.accepted.push(text.clone());
                            break;
                        }
                    }
                    Some("error") if frame["cid"] == text.as_str() => {
                        assert_eq!(frame["code"], "unavailable", "unexpected refusal: {frame}");
                        outcomes.refused.push(text.clone());
                        break;
                    }
                    Some("status") => {}
                    _ => panic!("{label}: unexpected frame {frame}"),
                }
            }
            thread::sleep(pace);
        }
        outcomes
    }
}

/// What one read from a client gave.
pub enum Received {
    /// A chat message.
    Message(Value),
    /// A `notice` (a client resuming with `since` may get one).
    Notice(Value),
    /// Nothing worth keeping: a `status` frame, a ping, or no frame within
    /// the socket's read timeout.
    Nothing,
    /// The connection is gone.
    Lost(tungstenite::Error),
}

impl Client {
    /// Reads one frame, sorting chat messages from the frames a follower
    /// ignores; panics on any other frame (an `error`, a `welcome` late).
    pub fn read_message(&mut self, name: &str) -> Received {
        match self.socket.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("message") => Received::Message(frame),
                    Some("notice") => Received::Notice(frame),
                    Some("status") => Received::Nothing,
                    Some(kind) if is_presence(kind) => Received::Nothing,
                    _ => panic!("{name}: unexpected frame {frame}"),
                }
            }
            Ok(_) => Received::Nothing,
            Err(e) if timed_out(&e) => Received::Nothing,
            Err(e) => Received::Lost(e),
        }
    }
}

/// A client read on its own thread until it has received a number of
/// messages known only later (see [`Listener::finish`]).
pub struct Listener {
    expected: Arc<AtomicU64>,
    handle: thread::JoinHandle<Vec<Value>>,
}

impl Listener {
    pub fn spawn(client: Client, name: String) -> Self {
        Self::spawn_for(client, name, Duration::from_secs(120))
    }

    /// Like [`Listener::spawn`], giving up (panicking) `limit` after it
    /// starts.
    pub fn spawn_for(mut client: Client, name: String, limit: Duration) -> Self {
        let expected = Arc::new(AtomicU64::new(u64::MAX));
        let target = expected.clone();
        let handle = thread::spawn(move || {
            client.set_read_timeout(Duration::from_millis(100));
            let deadline = Instant::now() + limit;
            let mut messages = Vec::new();
            while (messages.len() as u64) < target.load(Ordering::Relaxed) {
                assert!(
                    Instant::now() < deadline,
                    "{name}: gave up with {} messages",
                    messages.len()
                );
                match client.read_message(&name) {
                    Received::Message(frame) => messages.push(frame),
                    Received::Nothing => {}
                    Received::Notice(frame) => panic!("{name}: unexpected frame {frame}"),
                    Received::Lost(e) => panic!("{name}: connection lost: {e}"),
                }
            }
            client.expect_silence(Duration::from_millis(300));
            messages
        });
        Listener { expected, handle }
    }

    /// Tells the listener how many messages to expect and returns them.
    pub fn finish(self, expected: usize) -> Vec<Value> {
        self.expected.store(expected as u64, Ordering::Relaxed);
        self.handle.join().expect("listener failed")
    }
}

/// Asserts that `messages` are exactly the `accepted` texts, each once, in
/// increasing id order.
pub fn assert_exactly_once_in_order(
    who: &str,
    messages: &[Value],
    accepted: &std::collections::HashSet<String>,
) {
    let got = texts(messages);
    let distinct: std::collections::HashSet<String> = got.iter().cloned().collect();
    if distinct.len() != got.len() {
        let mut seen = std::collections::HashSet::new();
        let dups: Vec<String> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| !seen.insert(m["text"].as_str().unwrap_or_default().to_string()))
            .map(|(i, m)| {
                let text = m["text"].as_str().unwrap_or_default();
                let first = messages.iter().position(|x| x["text"] == text).unwrap();
                let around = |at: usize| {
                    messages[at.saturating_sub(3)..(at + 3).min(messages.len())]
                        .iter()
                        .map(|x| format!("{}={}", x["text"], x["id"]))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                format!(
                    "#{first} and #{i} {text}: [{}] ... [{}]",
                    around(first),
                    around(i)
                )
            })
            .collect();
        panic!("{who}: duplicates: {dups:?}");
    }
    let missing: Vec<_> = accepted.difference(&distinct).collect();
    let extra: Vec<_> = distinct.difference(accepted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{who}: missing {missing:?}, not accepted yet delivered {extra:?}"
    );
    assert!(
        messages
            .windows(2)
            .all(|pair| id_of(&pair[0]) < id_of(&pair[1])),
        "{who}: ids out of order"
    );
}

/// Runs the binary as instance `id` with `args` and waits for it to exit
/// on its own (a start it refuses): (exit status, all it wrote on stderr).
/// Panics, with that output, if it is still running after `within`.
pub fn run_to_exit(
    id: &str,
    args: &[&str],
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let mut child = process::instance_command(Path::new(env!("CARGO_BIN_EXE_pubsub-chat")), id)
        .args(args)
        .env("RUST_LOG", "info")
        .spawn()
        .expect("cannot start pubsub-chat");
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pubsub-chat {args:?} still ran after {within:?}; it wrote:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap_or_default())
}
