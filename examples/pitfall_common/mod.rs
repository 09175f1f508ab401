//! The harness shared by the `examples/pitfall_*.rs` programs: their
//! arguments, the working designs they check (the real server, and the
//! minimal example `examples/minimal_chat.rs`), a chat client, timed HTTP
//! requests, and the printing of results. Nothing in here is part of a
//! lesson: the mistakes, and the lines marked `// PITFALL:`, are in each
//! example.
//!
//! Every blocking call here has a timeout, so that a demo that goes wrong
//! fails instead of hanging `./scripts/pitfall.sh`.

// Each example uses a part of this module.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Where the demo's Redis and the real server are (`./scripts/pitfall.sh`
/// starts both and passes them).
#[derive(Debug, Parser)]
pub struct Args {
    /// The demo's Redis (a private one: some demos change its settings).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// HTTP address of a real pubsub-chat instance ("a") on that Redis, to
    /// run the working design next to the broken one.
    #[arg(long)]
    pub real_http: Option<SocketAddr>,
    /// WebSocket address of that instance.
    #[arg(long)]
    pub real_ws: Option<SocketAddr>,
    /// WebSocket address of a second real instance ("b") on that Redis.
    #[arg(long)]
    pub real_b_ws: Option<SocketAddr>,
    /// The `--instance-id` of that instance.
    #[arg(long, default_value = "a")]
    pub real_id: String,
    /// The `--redis-prefix` of the real instances.
    #[arg(long, default_value = "chat")]
    pub real_prefix: String,
    /// HTTP address of the minimal example (`examples/minimal_chat.rs`),
    /// instance "a", on that Redis: the same check runs against it.
    #[arg(long)]
    pub minimal_http: Option<SocketAddr>,
    /// WebSocket address of that instance.
    #[arg(long)]
    pub minimal_ws: Option<SocketAddr>,
    /// WebSocket address of a second instance of the minimal example.
    #[arg(long)]
    pub minimal_b_ws: Option<SocketAddr>,
    /// The `--channel` of the minimal example's instances.
    #[arg(long, default_value = "minimal:chat")]
    pub minimal_channel: String,
    /// The demo Redis's log file, to quote what it says.
    #[arg(long)]
    pub redis_log: Option<PathBuf>,
    /// Where to write the one-line verdict (for the script's summary).
    #[arg(long)]
    pub verdict: Option<PathBuf>,
    /// Where to write the minimal example's one-line verdict.
    #[arg(long)]
    pub minimal_verdict: Option<PathBuf>,
}

impl Args {
    /// The real server, when the script gave its addresses.
    pub fn real(&self) -> Result<Target, String> {
        match (self.real_http, self.real_ws) {
            (Some(http), Some(ws)) => Ok(Target {
                kind: Kind::Real,
                http,
                ws,
                b_ws: self.real_b_ws,
                channel: format!("{}:room:", self.real_prefix),
                names: format!("{}:{}:", self.real_prefix, self.real_id),
            }),
            _ => Err("no real server given (--real-http, --real-ws)".into()),
        }
    }

    /// The minimal example, when the script gave its addresses.
    pub fn minimal(&self) -> Option<Target> {
        Some(Target {
            kind: Kind::Minimal,
            http: self.minimal_http?,
            ws: self.minimal_ws?,
            b_ws: self.minimal_b_ws,
            channel: self.minimal_channel.clone(),
            names: format!("minimal:{}:", self.minimal_ws?.port()),
        })
    }
}

/// Which working design a check runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The real server (`src/`).
    Real,
    /// The minimal example (`examples/minimal_chat.rs`).
    Minimal,
}

/// A working design, running: where to reach it, and how it names things.
#[derive(Debug)]
pub struct Target {
    pub kind: Kind,
    pub http: SocketAddr,
    pub ws: SocketAddr,
    /// A second instance on the same Redis.
    pub b_ws: Option<SocketAddr>,
    /// The real server's room channels' prefix, or the minimal example's
    /// one channel.
    channel: String,
    /// What the names of its Redis connections start with.
    names: String,
}

impl Target {
    /// Its name in sentences.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Real => "the real server",
            Kind::Minimal => "the minimal example",
        }
    }

    /// Its label in the output, beside `broken`.
    pub fn label(&self) -> &'static str {
        match self.kind {
            Kind::Real => "working",
            Kind::Minimal => "minimal",
        }
    }

    /// The frame after which a new client gets every message: the real
    /// server's `presence` (joined, subscribed, history read), the minimal
    /// example's `welcome` (it has neither rooms nor history).
    pub fn joined(&self) -> &'static str {
        match self.kind {
            Kind::Real => "presence",
            Kind::Minimal => "welcome",
        }
    }

    /// The Redis channel of `room`: the real server has one per room
    /// (`docs/PROTOCOL.md`), the minimal example one for everything.
    pub fn channel(&self, room: &str) -> String {
        match self.kind {
            Kind::Real => format!("{}{{{room}}}", self.channel),
            Kind::Minimal => self.channel.clone(),
        }
    }

    /// What the names of its Redis connections start with (`CLIENT LIST`).
    pub fn connection_names(&self) -> &str {
        &self.names
    }

    /// A client of its first instance, joined: it gets every message from
    /// now on.
    pub fn join(&self, query: &str, recv_buffer: Option<usize>) -> Result<Client, String> {
        Self::join_at(self.ws, self.joined(), query, recv_buffer)
    }

    /// A client of its second instance, joined.
    pub fn join_b(&self, query: &str) -> Result<Client, String> {
        let ws = self
            .b_ws
            .ok_or_else(|| format!("no second instance of {} given", self.name()))?;
        Self::join_at(ws, self.joined(), query, None)
    }

    fn join_at(
        ws: SocketAddr,
        joined: &str,
        query: &str,
        recv_buffer: Option<usize>,
    ) -> Result<Client, String> {
        let mut client = Client::connect(ws, query, recv_buffer)?;
        client.wait_for(joined)?;
        Ok(client)
    }
}

/// How long any single wait of the harness lasts at most.
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ output

/// Prints the variant's title and the file to read.
pub fn title(number: u32, text: &str, file: &str) {
    println!();
    println!("{number}. {text}");
    println!("   read: {file}");
}

/// Prints a first line under `label` (`broken`, `working`), and then any
/// further lines aligned under it.
pub fn say(label: &str, lines: &[String]) {
    for (i, line) in lines.iter().enumerate() {
        let label = if i == 0 { label } else { "" };
        println!("   {label:<8} {line}");
    }
}

/// `1.234 s` or `0.8 ms`, whichever reads better.
pub fn took(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

/// 12,345.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The minimal example's side of a check: `None` when it was not run,
/// `Ok(what it did)` when it showed no symptom, `Err(the symptom)`.
pub type MinimalVerdict = Option<Result<String, String>>;

/// Ends the example: writes the verdicts for the script (or prints them),
/// and exits 0 when the lesson was shown (the broken design showed its
/// symptom and the real server did not) and the minimal example, when run,
/// showed no symptom either; 1 otherwise. Run by hand without the real
/// server (`broken`: whether the broken design showed its symptom), the
/// broken side is the whole lesson, and the verdict says so.
pub fn finish(
    args: &Args,
    broken: bool,
    shown: bool,
    verdict: &str,
    minimal: MinimalVerdict,
) -> ExitCode {
    if args.real().is_err() && minimal.is_none() {
        let verdict = if broken {
            "BROKEN as expected (above); the real server was not given (--real-http, \
             --real-ws): ./scripts/pitfall.sh runs it alongside"
        } else {
            "NOT SHOWN — the broken design did not show its symptom (above)"
        };
        write_verdict(args.verdict.as_ref(), "verdict", verdict);
        return if broken {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let verdict = if shown {
        format!("BROKEN as expected — {verdict}")
    } else {
        format!("NOT SHOWN — {verdict}")
    };
    write_verdict(args.verdict.as_ref(), "verdict", &verdict);
    let clean = match minimal {
        None => true,
        Some(Ok(what)) => {
            write_verdict(
                args.minimal_verdict.as_ref(),
                "minimal",
                &format!("no symptom — {what}"),
            );
            true
        }
        Some(Err(symptom)) => {
            write_verdict(
                args.minimal_verdict.as_ref(),
                "minimal",
                &format!("SYMPTOM — {symptom}"),
            );
            false
        }
    };
    if shown && clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes a verdict line to `path` for the script, or prints it.
fn write_verdict(path: Option<&PathBuf>, label: &str, verdict: &str) {
    match path {
        Some(path) => {
            if let Err(e) = std::fs::write(path, format!("{verdict}\n")) {
                eprintln!("cannot write the verdict to {}: {e}", path.display());
            }
        }
        None => println!("   {label:<8} {verdict}"),
    }
}

// -------------------------------------------------------------------- redis

/// A connection to the demo's Redis, with timeouts on every read and write.
pub fn redis_connection(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let connection = client.get_connection_with_timeout(TIMEOUT)?;
    connection.set_read_timeout(Some(TIMEOUT))?;
    connection.set_write_timeout(Some(TIMEOUT))?;
    Ok(connection)
}

/// How many connections are subscribed to `channel` (`PUBSUB NUMSUB`).
pub fn subscribers(con: &mut redis::Connection, channel: &str) -> redis::RedisResult<usize> {
    let (_, n): (String, usize) = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query(con)?;
    Ok(n)
}

/// Waits until `channel` has `n` subscribers: readiness is checked, never
/// slept on.
pub fn wait_subscribers(
    con: &mut redis::Connection,
    channel: &str,
    n: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = subscribers(con, channel).map_err(|e| e.to_string())?;
        if now == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{channel} has {now} subscribers, not {n}, after {TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One field of `INFO stats`, as a number (0 when absent).
pub fn info_stat(con: &mut redis::Connection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(con)
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A chat message as the real server's channel carries it (see
/// docs/PROTOCOL.md, "Injecting a message from outside"): each needs an id
/// of its own.
pub fn channel_payload(room: &str, seq: usize, text: &str) -> String {
    json!({
        "type": "message", "id": format!("1-{seq}"), "ts": 1, "room": room,
        "from": "pitfall", "text": text, "instance": "pitfall-demo",
    })
    .to_string()
}

// --------------------------------------------------------------------- http

/// `GET path` on `addr`, given up after `timeout`: the status and how long
/// the answer took, or how long it waited before giving up.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Duration), Duration> {
    let start = Instant::now();
    let attempt = || -> std::io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        let status = std::str::from_utf8(&head[9..12])
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        Ok(status)
    };
    match attempt() {
        Ok(status) => Ok((status, start.elapsed())),
        Err(_) => Err(start.elapsed()),
    }
}

// --------------------------------------------------------------- websocket

/// A WebSocket client.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

/// What a client's next read gave.
pub enum Frame {
    /// A JSON text frame.
    Json(Value),
    /// The server's Close frame.
    Close(Option<(CloseCode, String)>),
    /// Nothing within the read timeout.
    Quiet,
    /// The connection broke.
    Gone(String),
}

impl Client {
    /// Connects to `ws://ADDR/ws?QUERY`. `recv_buffer` sets a small receive
    /// buffer (a client on a bad link), so that a server writing to it
    /// fills it up quickly once it stops reading.
    pub fn connect(
        addr: SocketAddr,
        query: &str,
        recv_buffer: Option<usize>,
    ) -> Result<Self, String> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        if let Some(bytes) = recv_buffer {
            socket
                .set_recv_buffer_size(bytes)
                .map_err(|e| e.to_string())?;
        }
        socket
            .connect_timeout(&addr.into(), TIMEOUT)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client(format!("ws://{addr}/ws?{query}"), stream)
            .map_err(|e| format!("WebSocket handshake with {addr}: {e}"))?;
        Ok(Self { ws })
    }

    /// Sets how long a read waits before it says [`Frame::Quiet`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        let _ = self.ws.get_ref().set_read_timeout(Some(timeout));
    }

    /// The next frame that matters (pings and pongs are skipped).
    pub fn next(&mut self) -> Frame {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => match serde_json::from_str(text.as_str()) {
                    Ok(value) => return Frame::Json(value),
                    Err(_) => return Frame::Json(Value::String(text.to_string())),
                },
                Ok(Message::Close(close)) => {
                    return Frame::Close(close.map(|c| (c.code, c.reason.to_string())));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Frame::Quiet;
                }
                Err(e) => return Frame::Gone(e.to_string()),
            }
        }
    }

    /// Reads until the first frame of `type` (the real server's first
    /// frames are welcome, presence, history), or fails after the timeout.
    pub fn wait_for(&mut self, kind: &str) -> Result<Value, String> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.next() {
                Frame::Json(v) if v["type"] == kind => return Ok(v),
                Frame::Json(_) | Frame::Quiet => {}
                Frame::Close(c) => return Err(format!("closed while waiting for {kind}: {c:?}")),
                Frame::Gone(e) => {
                    return Err(format!("connection lost while waiting for {kind}: {e}"));
                }
            }
        }
        Err(format!("no {kind} frame within {TIMEOUT:?}"))
    }

    /// Sends one chat message.
    pub fn send_text(&mut self, text: &str, cid: &str) -> Result<(), String> {
        let frame = json!({"type": "message", "text": text, "cid": cid}).to_string();
        self.ws
            .send(Message::text(frame))
            .map_err(|e| e.to_string())
    }
}

/// Counts `message` frames until `quiet` passes with none, or `until`
/// arrive; the count and the last frame that was not a message (a Close).
pub fn count_messages(client: &mut Client, until: usize, quiet: Duration) -> (usize, Frame) {
    client.set_timeout(quiet);
    let mut n = 0;
    while n < until {
        match client.next() {
            Frame::Json(v) if v["type"] == "message" => n += 1,
            Frame::Json(_) => {}
            other => return (n, other),
        }
    }
    (n, Frame::Quiet)
}
