//! Verifies, on the raw bytes of real sockets, how connections end: nothing
//! follows the server's Close frame (RFC 6455 5.5.1) while a stream flows,
//! a flooder always gets its `rate_limited` errors and then a Close 1008, a
//! refused handshake is ended at a deadline even if the peer drips bytes;
//! and that order and exactly-once delivery hold at every receiver while
//! some receivers stall now and then.
//!
//! Server frames are parsed by this file's own small frame parser (so that
//! every byte after a Close frame is seen, which tungstenite would hide);
//! client frames are masked by hand.

mod common;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Instance, RedisServer, TIMEOUT, assert_exactly_once_in_order, unique};
use serde_json::Value;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;

/// Options that let the test's senders stream faster than a person types.
/// (Today's server also has `--fanout-window-ms`; it is not needed to show
/// the defects, so it is not passed: the tests run against builds without
/// it.)
const STREAM_ARGS: &[&str] = &["--rate-per-sec", "1000", "--rate-burst", "1000"];

/// The documented defaults of the rate limit, spelled out: the test support
/// raises them through the environment for every instance, and flags win.
const DEFAULT_RATE_ARGS: &[&str] = &[
    "--rate-burst",
    "20",
    "--rate-per-sec",
    "10",
    "--rate-strikes",
    "20",
];

/// One frame as the server sent it.
#[derive(Debug)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    /// Text, binary or continuation: anything that is not a control frame.
    fn is_data(&self) -> bool {
        self.opcode < 0x8
    }

    fn is_close(&self) -> bool {
        self.opcode == OP_CLOSE
    }

    /// The code and reason of a Close frame (code 1005 when it has none).
    fn close_code(&self) -> (u16, String) {
        match self.payload.as_slice() {
            [hi, lo, reason @ ..] => (
                u16::from_be_bytes([*hi, *lo]),
                String::from_utf8_lossy(reason).into_owned(),
            ),
            _ => (1005, String::new()),
        }
    }

    /// The JSON of a text frame.
    fn json(&self) -> Option<Value> {
        (self.opcode == OP_TEXT)
            .then(|| serde_json::from_slice(&self.payload).expect("a text frame that is not JSON"))
    }

    fn describe(&self) -> String {
        match self.opcode {
            OP_CLOSE => format!("Close {:?}", self.close_code()),
            OP_TEXT => {
                let text = String::from_utf8_lossy(&self.payload);
                format!("text {}", text.chars().take(80).collect::<String>())
            }
            op => format!("opcode {op:#x}, {} bytes", self.payload.len()),
        }
    }
}

/// Parses one (unmasked) server frame from the front of `buf`: the frame and
/// how many bytes it took, or `None` while it is incomplete.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let [first, second, ..] = *buf else {
        return None;
    };
    assert_eq!(second & 0x80, 0, "a server frame must not be masked");
    let (len, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    let opcode = first & 0x0f;
    Some((Frame { opcode, payload }, header + len))
}

/// A whole masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// A masked Close frame with a code and no reason.
fn client_close(code: u16) -> Vec<u8> {
    client_frame(OP_CLOSE, &code.to_be_bytes())
}

/// A masked chat message.
fn client_message(text: &str) -> Vec<u8> {
    let json = serde_json::json!({"type": "message", "text": text}).to_string();
    client_frame(OP_TEXT, json.as_bytes())
}

/// How reading a connection ended.
#[derive(Debug)]
enum End {
    /// The server closed its side (FIN).
    Eof,
    /// The connection was reset, or another read error.
    Error(io::ErrorKind),
    /// Nothing within the deadline.
    TimedOut,
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Eof => "end of stream".into(),
            End::Error(kind) => format!("read error {kind:?}"),
            End::TimedOut => "no end within the deadline".into(),
        }
    }
}

/// A Close frame's code and reason, or its absence, for a failure message.
fn describe_close(close: &Option<(u16, String)>) -> String {
    match close {
        Some((code, reason)) => format!("Close {code} {reason:?}"),
        None => "no Close".into(),
    }
}

/// How many frames followed a Close, and the first of them.
fn describe_after(after_close: &[String]) -> String {
    match after_close.first() {
        Some(first) => format!("{} frames after it, the first: {first}", after_close.len()),
        None => "nothing after it".into(),
    }
}

/// A WebSocket client on a raw socket: the handshake done by hand, then
/// every byte the server sends parsed by [`parse_frame`].
struct RawClient {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and completes the handshake (HTTP 101); reads no frame.
    fn connect(ws: SocketAddr, query: &str) -> Self {
        Self::connect_with(ws, query, None)
    }

    /// Connects with a receive buffer of about `recv_buffer` bytes, if
    /// given, and completes the handshake.
    fn connect_with(ws: SocketAddr, query: &str, recv_buffer: Option<usize>) -> Self {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.connect_timeout(&ws.into(), TIMEOUT).unwrap();
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        write!(
            stream,
            "GET /ws?{query} HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = stream
                .read(&mut chunk)
                .unwrap_or_else(|e| panic!("no handshake answer from {ws}: {e}"));
            assert!(n > 0, "{ws} hung up during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused: {head}"
        );
        // The accept value for the key above (RFC 6455 1.3).
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        buf.drain(..end);
        RawClient { stream, buf }
    }

    /// Connects and reads the welcome frame.
    fn join(ws: SocketAddr, query: &str) -> Self {
        Self::join_with(ws, query, None)
    }

    /// Connects with a receive buffer of about `recv_buffer` bytes, if
    /// given, and reads the welcome frame.
    fn join_with(ws: SocketAddr, query: &str, recv_buffer: Option<usize>) -> Self {
        let mut client = Self::connect_with(ws, query, recv_buffer);
        let welcome = client
            .next_frame(Instant::now() + TIMEOUT)
            .unwrap_or_else(|end| panic!("no welcome: {end:?}"));
        let json = welcome.json().unwrap_or_else(|| panic!("{welcome:?}"));
        assert_eq!(json["type"], "welcome", "{json}");
        client
    }

    /// The next frame, reading as needed until `deadline`.
    fn next_frame(&mut self, deadline: Instant) -> Result<Frame, End> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(End::TimedOut);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(End::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Error(e.kind())),
            }
        }
    }

    /// Every frame until the connection ends (or `deadline`), and how it
    /// ended.
    fn frames_until_end(&mut self, deadline: Instant) -> (Vec<Frame>, End) {
        let mut frames = Vec::new();
        loop {
            match self.next_frame(deadline) {
                Ok(frame) => frames.push(frame),
                Err(end) => return (frames, end),
            }
        }
    }
}

/// A deterministic spread of numbers, for hold and stall times.
fn spread(seed: u64, low: u64, high: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    low + x % (high - low + 1)
}

/// A client that sends `per_sec` messages a second, paced, until `stop`,
/// while a second thread reads (and discards) what it receives so that it is
/// never a slow consumer. Returns how many it sent.
fn spawn_streamer(
    ws: SocketAddr,
    room: &str,
    name: String,
    per_sec: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    let client = RawClient::join(ws, &format!("name={name}&room={room}"));
    let mut reader = client.stream.try_clone().unwrap();
    reader.set_read_timeout(Some(TIMEOUT)).unwrap();
    let drain = thread::spawn(move || {
        let mut sink = vec![0u8; 64 * 1024];
        // Ends when the writer shuts the socket down, or the server does.
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    thread::spawn(move || {
        let mut stream = client.stream;
        let interval = Duration::from_secs(1) / per_sec;
        let mut next = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            stream
                .write_all(&client_message(&format!("{name}-{sent}")))
                .unwrap_or_else(|e| panic!("{name}: write failed after {sent} messages: {e}"));
            sent += 1;
            next += interval;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let _ = stream.shutdown(Shutdown::Both);
        drain.join().unwrap();
        sent
    })
}

/// What one receiver saw around its close handshake.
#[derive(Debug)]
struct CloseOutcome {
    who: String,
    /// Data frames before the server's Close frame.
    data_before: usize,
    /// The server's Close frame, if any.
    close: Option<(u16, String)>,
    /// Every frame after the server's Close frame.
    after_close: Vec<String>,
    end: End,
}

impl CloseOutcome {
    fn describe(&self) -> String {
        format!(
            "{}: {} data frames, then {}, {}; {}",
            self.who,
            self.data_before,
            describe_close(&self.close),
            describe_after(&self.after_close),
            self.end.describe()
        )
    }
}

/// Joins, reads for `hold`, sends a Close 1000, then reads every byte until
/// the server ends the connection.
fn receive_then_close(ws: SocketAddr, room: &str, who: String, hold: Duration) -> CloseOutcome {
    let mut client = RawClient::join(ws, &format!("name={who}&room={room}"));
    let (mut frames, end) = client.frames_until_end(Instant::now() + hold);
    assert!(
        matches!(end, End::TimedOut),
        "{who}: the connection ended before the client closed: {end:?}"
    );
    let _ = client.stream.write_all(&client_close(1000));
    let (rest, end) = client.frames_until_end(Instant::now() + Duration::from_secs(5));
    frames.extend(rest);
    let close_at = frames.iter().position(Frame::is_close);
    let before = &frames[..close_at.unwrap_or(frames.len())];
    CloseOutcome {
        data_before: before.iter().filter(|f| f.is_data()).count(),
        close: close_at.map(|at| frames[at].close_code()),
        after_close: close_at
            .map(|at| frames[at + 1..].iter().map(Frame::describe).collect())
            .unwrap_or_default(),
        who,
        end,
    }
}

#[test]
fn server_close_frame_is_the_last_frame_while_a_stream_flows() {
    const SENDERS: usize = 3;
    const MESSAGES_PER_SEC: u32 = 900;
    const RECEIVERS: usize = 12;
    const ROUNDS: u64 = 40;
    const BUDGET: Duration = Duration::from_secs(20);
    let redis = RedisServer::start();
    let prefix = unique("closelast");
    let room = unique("stream");
    let a = Instance::redis_with("a", &redis.url(), &prefix, STREAM_ARGS);
    let b = Instance::redis_with("b", &redis.url(), &prefix, STREAM_ARGS);
    a.wait_ready();
    b.wait_ready();
    let instances = [a.ws, b.ws];

    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..SENDERS)
        .map(|n| {
            spawn_streamer(
                instances[n % 2],
                &room,
                format!("s{n}"),
                MESSAGES_PER_SEC / SENDERS as u32,
                stop.clone(),
            )
        })
        .collect();

    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut rounds = 0;
    while rounds < ROUNDS && started.elapsed() < BUDGET {
        let receivers: Vec<_> = (0..RECEIVERS)
            .map(|n| {
                let ws = instances[n % 2];
                let room = room.clone();
                let who = format!("r{rounds}-{n}");
                let hold = Duration::from_millis(spread(rounds * 100 + n as u64, 20, 300));
                thread::spawn(move || receive_then_close(ws, &room, who, hold))
            })
            .collect();
        outcomes.extend(receivers.into_iter().map(|r| r.join().unwrap()));
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|s| s.join().unwrap()).sum();

    let followed: Vec<&CloseOutcome> = outcomes
        .iter()
        .filter(|o| !o.after_close.is_empty())
        .collect();
    let unanswered: Vec<&CloseOutcome> = outcomes.iter().filter(|o| o.close.is_none()).collect();
    let never_ended: Vec<&CloseOutcome> = outcomes
        .iter()
        .filter(|o| matches!(o.end, End::TimedOut))
        .collect();
    let frames_after: usize = followed.iter().map(|o| o.after_close.len()).sum();
    let data_before: usize = outcomes.iter().map(|o| o.data_before).sum();
    eprintln!(
        "{rounds} rounds, {} closes, {sent} messages sent, {data_before} data frames \
         received before a Close; {} closes followed by {frames_after} frames; \
         {} without a Close; {} never ended",
        outcomes.len(),
        followed.len(),
        unanswered.len(),
        never_ended.len()
    );
    assert!(
        data_before > outcomes.len() * 2,
        "the stream did not flow to the receivers ({data_before} data frames)"
    );
    assert!(
        followed.is_empty() && unanswered.is_empty() && never_ended.is_empty(),
        "{} of {} closes were followed by frames ({frames_after} frames after the server's \
         Close), {} got no Close in answer, {} were never ended by the server; first ones:\n{}",
        followed.len(),
        outcomes.len(),
        unanswered.len(),
        never_ended.len(),
        followed
            .iter()
            .chain(&unanswered)
            .chain(&never_ended)
            .take(5)
            .map(|o| o.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// What one flooder saw.
#[derive(Debug)]
struct FloodOutcome {
    who: String,
    written: usize,
    write_error: Option<io::ErrorKind>,
    rate_limited: usize,
    close: Option<(u16, String)>,
    after_close: Vec<String>,
    end: End,
}

impl FloodOutcome {
    fn describe(&self) -> String {
        let stopped = match self.write_error {
            Some(kind) => format!(" (then a write failed: {kind:?})"),
            None => String::new(),
        };
        format!(
            "{}: wrote {} frames{stopped}, got {} rate_limited errors, then {}, {}; {}",
            self.who,
            self.written,
            self.rate_limited,
            describe_close(&self.close),
            describe_after(&self.after_close),
            self.end.describe()
        )
    }

    fn is_right(&self) -> bool {
        self.rate_limited > 0
            && self.after_close.is_empty()
            && matches!(&self.close, Some((1008, reason)) if reason.contains("rate limit"))
    }
}

/// Joins, writes `count` messages back to back without reading (stopping at
/// the first failed write: the server may have hung up), then reads
/// everything the server sent until it ends the connection.
fn flood_then_read(ws: SocketAddr, room: &str, who: String, count: usize) -> FloodOutcome {
    let mut client = RawClient::join(ws, &format!("name={who}&room={room}"));
    let frame = client_frame(OP_TEXT, br#"{"type":"message","text":"x"}"#);
    let mut written = 0;
    let mut write_error = None;
    while written < count {
        match client.stream.write_all(&frame) {
            Ok(()) => written += 1,
            Err(e) => {
                write_error = Some(e.kind());
                break;
            }
        }
    }
    let (frames, end) = client.frames_until_end(Instant::now() + TIMEOUT);
    let close_at = frames.iter().position(Frame::is_close);
    let rate_limited = frames[..close_at.unwrap_or(frames.len())]
        .iter()
        .filter_map(Frame::json)
        .filter(|json| json["type"] == "error" && json["code"] == "rate_limited")
        .count();
    FloodOutcome {
        who,
        written,
        write_error,
        rate_limited,
        close: close_at.map(|at| frames[at].close_code()),
        after_close: close_at
            .map(|at| frames[at + 1..].iter().map(Frame::describe).collect())
            .unwrap_or_default(),
        end,
    }
}

#[test]
fn a_flooder_always_gets_its_rate_limited_errors_and_a_1008_close() {
    const FLOODERS: usize = 5;
    const FRAMES: usize = 2_000;
    const ROUNDS: usize = 6;
    const BUDGET: Duration = Duration::from_secs(15);
    let redis = RedisServer::start();
    let prefix = unique("flood");
    let a = Instance::redis_with("flood", &redis.url(), &prefix, DEFAULT_RATE_ARGS);
    a.wait_ready();

    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut rounds = 0;
    while rounds < ROUNDS && started.elapsed() < BUDGET {
        let flooders: Vec<_> = (0..FLOODERS)
            .map(|n| {
                let who = format!("f{rounds}-{n}");
                let room = unique("flood");
                thread::spawn(move || flood_then_read(a.ws, &room, who, FRAMES))
            })
            .collect();
        outcomes.extend(flooders.into_iter().map(|f| f.join().unwrap()));
        rounds += 1;
    }
    let wrong: Vec<&FloodOutcome> = outcomes.iter().filter(|o| !o.is_right()).collect();
    eprintln!(
        "{rounds} rounds, {} flooders: {} without a 1008 Close, {} with frames after \
         the Close, {} without a rate_limited error",
        outcomes.len(),
        outcomes.iter().filter(|o| o.close.is_none()).count(),
        outcomes
            .iter()
            .filter(|o| !o.after_close.is_empty())
            .count(),
        outcomes.iter().filter(|o| o.rate_limited == 0).count(),
    );
    assert!(
        wrong.is_empty(),
        "{} of {} flooders did not get rate_limited errors then a Close 1008 and nothing \
         after it; first ones:\n{}",
        wrong.len(),
        outcomes.len(),
        wrong
            .iter()
            .take(5)
            .map(|o| o.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Waits up to `wait` for the socket to be reset or fully closed (`POLLERR`
/// or `POLLHUP`; a FIN alone, a half-close, is not enough).
fn wait_for_hangup(stream: &TcpStream, wait: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket this function borrows.
    let ready = unsafe { libc::poll(&mut poll, 1, wait.as_millis() as libc::c_int) };
    ready > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

#[test]
fn a_refused_handshake_is_closed_at_a_deadline_even_if_the_peer_drips_bytes() {
    /// What the test allows the server (its grace is 1 s today).
    const DEADLINE: Duration = Duration::from_secs(5);
    /// How long the test drips before it gives up.
    const GIVE_UP: Duration = Duration::from_secs(8);
    const DRIP: Duration = Duration::from_millis(300);
    let redis = RedisServer::start();
    let a = Instance::redis("refuse", &redis.url(), &unique("refuse"));
    a.wait_ready();

    let mut client = RawClient::connect(a.ws, "room=has%20space");
    let deadline = Instant::now() + TIMEOUT;
    let error = client
        .next_frame(deadline)
        .unwrap_or_else(|end| panic!("no error frame: {end:?}"));
    let error = error.json().unwrap_or_else(|| panic!("{error:?}"));
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{error}"
    );
    let close = client
        .next_frame(deadline)
        .unwrap_or_else(|end| panic!("no Close frame: {end:?}"));
    assert!(
        close.is_close(),
        "expected a Close, got {}",
        close.describe()
    );
    assert_eq!(close.close_code().0, 1008);
    let closed_at = Instant::now();

    // The client never answers the Close: it drips, one byte at a time, a
    // masked text frame that would take far longer than the test to finish
    // (125 bytes of payload), so the server cannot end for any reason but
    // its own deadline.
    let mut drip = client_frame(OP_TEXT, &[b'x'; 125]).into_iter();
    let mut dripped = 0;
    let ended = loop {
        let byte = drip.next().expect("the drip outlasted the test");
        if client.stream.write_all(&[byte]).is_err() {
            break true;
        }
        dripped += 1;
        if wait_for_hangup(&client.stream, DRIP) {
            break true;
        }
        if closed_at.elapsed() > GIVE_UP {
            break false;
        }
    };
    let open_for = closed_at.elapsed();
    assert!(
        ended,
        "the server kept the refused connection open for {open_for:?} after its Close \
         while the client dripped {dripped} bytes"
    );
    assert!(
        open_for <= DEADLINE + DRIP * 2,
        "the server ended the refused connection only after {open_for:?}"
    );
}

#[test]
fn order_holds_at_every_receiver_while_some_stall_now_and_then() {
    const SENDERS: usize = 4;
    const MESSAGES: usize = 500;
    const RECEIVERS: usize = 8;
    /// Between two sends of one sender: four senders make about 700
    /// messages a second in all, for about three seconds.
    const PACE: Duration = Duration::from_millis(5);
    /// How long a stalling receiver reads between two stalls.
    const READ_BETWEEN_STALLS: Duration = Duration::from_millis(300);
    /// A small receive buffer, so that a stall backs up into the server
    /// rather than vanishing into the kernel's buffers.
    const STALLER_RECV_BUFFER: usize = 4096;
    let redis = RedisServer::start();
    let prefix = unique("stall");
    let room = unique("stall");
    let a = Instance::redis_with("a", &redis.url(), &prefix, STREAM_ARGS);
    let b = Instance::redis_with("b", &redis.url(), &prefix, STREAM_ARGS);
    a.wait_ready();
    b.wait_ready();
    let instances = [a.ws, b.ws];
    let total = SENDERS * MESSAGES;

    // Everyone joins (the welcome says so) before anyone sends. Senders
    // are receivers too; every other plain receiver stalls now and then.
    let mut readers: Vec<(String, RawClient, bool)> = (0..SENDERS)
        .map(|n| {
            let client = RawClient::join(instances[n % 2], &format!("name=s{n}&room={room}"));
            (format!("s{n}"), client, false)
        })
        .collect();
    readers.extend((0..RECEIVERS).map(|n| {
        let stalls = n % 2 == 1;
        let client = RawClient::join_with(
            instances[n % 2],
            &format!("name=r{n}&room={room}"),
            stalls.then_some(STALLER_RECV_BUFFER),
        );
        (format!("r{n}"), client, stalls)
    }));

    let writers: Vec<_> = readers[..SENDERS]
        .iter()
        .enumerate()
        .map(|(n, (_, sender, _))| {
            let mut stream = sender.stream.try_clone().unwrap();
            thread::spawn(move || {
                for k in 0..MESSAGES {
                    stream
                        .write_all(&client_message(&format!("s{n}-{k}")))
                        .unwrap_or_else(|e| panic!("s{n}: write {k} failed: {e}"));
                    thread::sleep(PACE);
                }
            })
        })
        .collect();
    let readers: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(seed, (who, mut client, stalls))| {
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut messages = Vec::new();
                let mut stalled = 0;
                let mut next_stall = Instant::now() + READ_BETWEEN_STALLS;
                while messages.len() < total {
                    let frame = client.next_frame(deadline).unwrap_or_else(|end| {
                        panic!(
                            "{who}: {} after {} messages",
                            end.describe(),
                            messages.len()
                        )
                    });
                    let json = frame
                        .json()
                        .unwrap_or_else(|| panic!("{who}: unexpected {}", frame.describe()));
                    if json["type"].as_str().is_some_and(common::is_presence) {
                        continue;
                    }
                    assert_eq!(json["type"], "message", "{who}: unexpected frame {json}");
                    messages.push(json);
                    if stalls && Instant::now() >= next_stall {
                        // The behaviour under test: stop reading a while.
                        stalled += 1;
                        let stall = spread(seed as u64 * 1000 + stalled, 100, 300);
                        thread::sleep(Duration::from_millis(stall));
                        next_stall = Instant::now() + READ_BETWEEN_STALLS;
                    }
                }
                (who, messages, stalled)
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let accepted: HashSet<String> = (0..SENDERS)
        .flat_map(|n| (0..MESSAGES).map(move |k| format!("s{n}-{k}")))
        .collect();
    for reader in readers {
        let (who, messages, stalled) = reader.join().unwrap();
        assert_exactly_once_in_order(&who, &messages, &accepted);
        eprintln!("{who}: all {total} messages once, in order, after {stalled} stalls");
    }
    for instance in [&a, &b] {
        assert_eq!(
            instance.metric("chat_slow_clients_dropped_total"),
            0.0,
            "nobody was to be a slow consumer"
        );
    }
}
