//! One WebSocket client: its handshake, its reader thread and its writer
//! thread, and every way they end.
//!
//! ```text
//!   socket ──read──> reader thread ──publish──> broker (Redis)
//!                        │ pong, close reply, error frames (Control::Raw)
//!                        v
//!   socket <──write── writer thread <── frames queue <── hub (subscriber thread)
//! ```
//!
//! Why two threads: a thread blocked in `read` cannot be woken to write, and
//! a read timeout would turn every idle client into a polling loop. Why only
//! one writer: frames from several writers would interleave on the wire. The
//! reader's tungstenite `WebSocket` therefore writes into a `SessionStream`
//! whose `Write` hands the bytes to the writer, and the writer is a byte pump
//! over the other handle of the same `TcpStream`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded, select_biased};
use log::{debug, info, warn};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::broker::{Broker, HistoryQuery};
use crate::direct::SocketOwner;
use crate::hub::{ClientId, CloseReason, Control, Delivery, DirectPath, Hub, Member};
use crate::liveness::LastSeen;
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;
use crate::protocol::{
    DEFAULT_ROOM, ErrorCode, FrameError, Limits, MessageId, NewMessage, ServerFrame, ValidMessage,
    parse_client_frame, validate_name, validate_room,
};
use crate::rate_limit::{RateLimit, TokenBucket, Verdict};

/// The WebSocket path (`PROTOCOL.md`).
pub const WS_PATH: &str = "/ws";
/// Stack of a reader thread. It parses JSON and talks to Redis, which
/// touches a few tens of KiB at most; what is not touched costs address
/// space, not memory.
const READER_STACK: usize = 256 * 1024;
/// Stack of a writer thread: a byte pump that touches about 12 KiB.
const WRITER_STACK: usize = 64 * 1024;
/// tungstenite's read buffer. Its 128 KiB default is touched on the first
/// read, for every client; chat frames are small, and a larger one simply
/// takes several reads.
const READ_BUFFER: usize = 512;
/// Control items (pongs, close replies, error frames) queued for a writer.
/// Only a client that sends much and reads nothing fills it, and is then
/// disconnected. A bounded crossbeam channel allocates every slot up front,
/// per client: keep it small.
const CONTROL_QUEUE: usize = 16;
/// Bytes a writer gathers from its queues before one `write`: under load
/// many small frames go out in one system call.
const WRITE_BATCH: usize = 64 * 1024;
/// Bytes of write buffer a writer keeps between writes.
const OUT_KEEP: usize = 4 * 1024;
/// How long, after sending a close frame, the server waits for the
/// client's close reply before dropping the connection.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// TCP keepalive: a peer that vanished without a FIN (power loss, a
/// sleeping laptop) is found after about 30 s idle + 3 probes 10 s apart.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// What every session of this instance shares.
pub struct SessionContext {
    pub instance: String,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
    pub stopping: Arc<AtomicBool>,
    next_client: AtomicU64,
    /// Sessions alive, handshakes included: what `--max-clients` bounds.
    sessions: AtomicUsize,
    /// Tells this run of the instance from earlier ones in dedup keys, so
    /// that a restarted instance's client 1 is not taken for the old one's.
    run_nonce: String,
}

/// The per-client limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub content: Limits,
    pub rate: RateLimit,
    pub origins: OriginPolicy,
    pub max_clients: usize,
    pub client_queue_len: usize,
    pub max_frame_bytes: usize,
    pub history_replay: usize,
    pub handshake_timeout: Duration,
    pub write_timeout: Duration,
}

impl SessionContext {
    pub fn new(
        instance: String,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        limits: SessionLimits,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        SessionContext {
            hub,
            broker,
            metrics,
            limits,
            stopping,
            next_client: AtomicU64::new(1),
            sessions: AtomicUsize::new(0),
            run_nonce: format!(
                "{instance}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ),
            instance,
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(self.limits.max_frame_bytes))
            .max_frame_size(Some(self.limits.max_frame_bytes))
    }
}

/// Starts a session for an accepted connection on its own reader thread.
/// At `--max-clients`, or if no thread can be had, the client gets an HTTP
/// 503 instead, and the server goes on.
pub fn spawn_session(mut stream: TcpStream, context: Arc<SessionContext>) {
    let client = context.next_client.fetch_add(1, Ordering::Relaxed);
    let sessions = context.sessions.fetch_add(1, Ordering::Relaxed);
    if sessions >= context.limits.max_clients {
        context.sessions.fetch_sub(1, Ordering::Relaxed);
        warn!(
            "client {client} refused: instance full ({} clients, --max-clients)",
            context.limits.max_clients
        );
        Metrics::inc(&context.metrics.capacity_refused_total);
        Metrics::inc(&context.metrics.connections_refused_total);
        refuse_raw(
            &mut stream,
            "503 Service Unavailable",
            "this instance is full; try another or later",
        );
        return;
    }
    let refused = stream.try_clone().ok();
    let spawned = thread::Builder::new()
        .name(format!("ws-read-{client}"))
        .stack_size(READER_STACK)
        .spawn({
            let context = context.clone();
            move || {
                run_session(client, stream, &context);
                context.sessions.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        context.sessions.fetch_sub(1, Ordering::Relaxed);
        warn!("client {client} refused: cannot start its reader thread: {e}");
        Metrics::inc(&context.metrics.connections_refused_total);
        if let Some(mut stream) = refused {
            refuse_raw(
                &mut stream,
                "503 Service Unavailable",
                "server is at its thread limit",
            );
        }
    }
}

/// Answers a raw HTTP error on a socket no thread could be found for.
fn refuse_raw(stream: &mut TcpStream, status: &str, reason: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}",
        reason.len()
    );
    let _ = stream.shutdown(Shutdown::Both);
}

/// What the client asked for in its handshake URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub name: Option<String>,
    pub room: String,
    pub since: Option<MessageId>,
}

/// Reads `name`, `room` and `since` from a handshake query string.
pub fn parse_join_query(query: &str, limits: &Limits) -> Result<JoinRequest, String> {
    let mut join = JoinRequest {
        name: None,
        room: DEFAULT_ROOM.to_string(),
        since: None,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "name" if !value.trim().is_empty() => {
                let name = value.trim();
                validate_name(name, limits)?;
                join.name = Some(name.to_string());
            }
            "room" if !value.is_empty() => {
                validate_room(&value, limits)?;
                join.room = value.into_owned();
            }
            "since" if !value.is_empty() => {
                join.since = Some(value.parse().map_err(|e| format!("since: {e}"))?);
            }
            _ => {}
        }
    }
    Ok(join)
}

fn refuse_handshake(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

/// Bounds the whole handshake, not each read: a client dripping one byte
/// every few seconds (slowloris) is cut off at the deadline all the same.
struct DeadlineStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Runs the WebSocket handshake; on success, what the client asked for,
/// or why its query is not acceptable (answered with an error frame, which
/// a browser can read, unlike an HTTP status).
// The callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
fn handshake(
    client: ClientId,
    stream: &TcpStream,
    context: &SessionContext,
) -> Option<Result<JoinRequest, String>> {
    let mut join = None;
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != WS_PATH {
            return Err(refuse_handshake(
                StatusCode::NOT_FOUND,
                format!("the WebSocket is at {WS_PATH}"),
            ));
        }
        let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
        let origin = header("origin");
        if !context.limits.origins.allows(origin, header("host")) {
            Metrics::inc(&context.metrics.origin_refused_total);
            warn!("client {client} refused: origin {origin:?} not allowed");
            return Err(refuse_handshake(
                StatusCode::FORBIDDEN,
                format!(
                    "origin {} may not open a WebSocket here",
                    origin.unwrap_or("")
                ),
            ));
        }
        join = Some(parse_join_query(
            request.uri().query().unwrap_or(""),
            &context.limits.content,
        ));
        Ok(response)
    };
    let deadline = Instant::now() + context.limits.handshake_timeout;
    let guarded = DeadlineStream { stream, deadline };
    match tungstenite::accept_hdr_with_config(guarded, callback, Some(context.ws_config())) {
        // The handshake refuses bytes after the request, so nothing read
        // ahead is lost when its WebSocket is dropped for ours.
        Ok(_) => join,
        Err(e) => {
            let timed_out = match &e {
                HandshakeError::Interrupted(_) => true,
                HandshakeError::Failure(tungstenite::Error::Io(e)) => {
                    matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    )
                }
                HandshakeError::Failure(_) => false,
            };
            if timed_out {
                debug!("client {client} refused: no handshake within the timeout");
                Metrics::inc(&context.metrics.handshake_timeouts_total);
            } else {
                debug!("client {client} refused: handshake failed: {e}");
            }
            None
        }
    }
}

fn set_socket_options(stream: &TcpStream, write_timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(write_timeout))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// The reader thread's body: handshake, join, start the writer, then read
/// and publish until the connection ends; then clean up every trace.
fn run_session(client: ClientId, stream: TcpStream, context: &SessionContext) {
    Metrics::up(&context.metrics.session_threads);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let joined = set_socket_options(&stream, context.limits.write_timeout)
        .map_err(|e| debug!("client {client} refused: socket options: {e}"))
        .ok()
        .and_then(|()| handshake(client, &stream, context));
    match joined {
        Some(Ok(join)) if !context.stopping.load(Ordering::Relaxed) => {
            let _ = stream.set_read_timeout(None);
            Metrics::inc(&context.metrics.connections_total);
            Metrics::up(&context.metrics.clients_connected);
            run_joined(client, Arc::new(stream), join, &peer, context);
            Metrics::down(&context.metrics.clients_connected);
        }
        Some(Err(reason)) => {
            debug!("client {client} refused: {reason}");
            Metrics::inc(&context.metrics.connections_refused_total);
            refuse_joined(&stream, &reason);
        }
        _ => {
            Metrics::inc(&context.metrics.connections_refused_total);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    Metrics::down(&context.metrics.session_threads);
}

/// Tells a client whose handshake query was bad why, in an error frame,
/// and closes with 1008 (policy violation).
fn refuse_joined(mut stream: &TcpStream, reason: &str) {
    let frame = ServerFrame::Error {
        code: ErrorCode::BadRequest,
        message: reason,
        cid: None,
    };
    let mut bytes = frame.to_ws_bytes().to_vec();
    let close = Frame::close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "bad request".into(),
    }));
    if close.format(&mut bytes).is_ok() {
        let _ = stream.write_all(&bytes);
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Give the client a moment to read the frames and answer the close,
    // so that closing the socket does not reset them away.
    let _ = stream.set_read_timeout(Some(CLOSE_GRACE));
    let mut sink = [0u8; 512];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn run_joined(
    client: ClientId,
    socket: Arc<TcpStream>,
    join: JoinRequest,
    peer: &str,
    context: &SessionContext,
) {
    let name = join.name.unwrap_or_else(|| format!("guest-{client}"));
    let room = join.room;
    let (frames_tx, frames_rx) = bounded::<Delivery>(context.limits.client_queue_len);
    let (control_tx, control_rx) = bounded::<Control>(CONTROL_QUEUE);
    let closing = Arc::new(OnceLock::new());

    // Join before reading history: a message accepted meanwhile is then
    // either in history or in the queue (or both, and the writer drops the
    // copy), never in neither.
    let last_seen = Arc::new(LastSeen::new());
    let owner = Arc::new(SocketOwner::default());
    context.hub.join(Member {
        id: client,
        room: room.as_str().into(),
        last_seen: last_seen.clone(),
        direct: Some(DirectPath {
            socket: socket.clone(),
            owner: owner.clone(),
        }),
        frames_tx,
        control_tx: control_tx.clone(),
        closing: closing.clone(),
    });
    info!("client {client} joined room {room} as {name:?} from {peer}");

    let (first_bytes, seam) = first_frames(client, &name, &room, join.since, context);

    let writer = Writer {
        client,
        owner,
        socket: socket.clone(),
        frames_rx,
        control_rx,
        closing,
        seam,
        out: first_bytes,
    };
    let spawned = thread::Builder::new()
        .name(format!("ws-write-{client}"))
        .stack_size(WRITER_STACK)
        .spawn({
            let metrics = context.metrics.clone();
            move || {
                Metrics::up(&metrics.session_threads);
                writer.run();
                Metrics::down(&metrics.session_threads);
            }
        });
    let writer = match spawned {
        Ok(handle) => handle,
        Err(e) => {
            warn!("client {client} dropped: cannot start its writer thread: {e}");
            context.hub.leave(&room, client);
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
    };

    let stream = SessionStream {
        socket: socket.clone(),
        control_tx,
    };
    let mut websocket = WebSocket::from_raw_socket(stream, Role::Server, Some(context.ws_config()));
    // The handshake and the history read were the deepest this thread goes.
    crate::stack::release_unused();
    let ended = read_until_closed(client, &mut websocket, &name, &room, &last_seen, context);
    info!("client {client} left room {room}: {ended}");

    context.hub.leave(&room, client);
    // Dropping the WebSocket drops the reader's control sender; with the
    // hub's gone too, the writer sends what is left (a close reply) and ends.
    drop(websocket);
    if writer.join().is_err() {
        warn!("client {client}: writer thread panicked");
    }
    let _ = socket.shutdown(Shutdown::Both);
}

/// What a client gets before live messages: the welcome, the room's history
/// (or a notice that it is truncated or unavailable) and, while Redis is
/// unreachable, a `status` frame; all as one buffer. Also returns the seam:
/// live copies up to that id were sent as history.
fn first_frames(
    client: ClientId,
    name: &str,
    room: &str,
    since: Option<MessageId>,
    context: &SessionContext,
) -> (Vec<u8>, Option<MessageId>) {
    let client_label = format!("c{client}");
    let welcome = ServerFrame::Welcome {
        instance: &context.instance,
        client: &client_label,
        name,
        room,
    };
    let mut first_bytes = welcome.to_ws_bytes().to_vec();
    let query = match since {
        Some(since) => HistoryQuery::After(since),
        None => HistoryQuery::Recent(context.limits.history_replay),
    };
    let mut seam = since;
    match context.broker.history(room, query) {
        Ok(history) => {
            Metrics::add(
                &context.metrics.history_replayed_total,
                history.messages.len() as u64,
            );
            if history.truncated {
                let notice = format!(
                    "messages after {} are no longer in history; showing the oldest it still holds",
                    since.unwrap_or_default()
                );
                let frame = ServerFrame::Notice {
                    code: "history_truncated",
                    message: &notice,
                };
                first_bytes.extend_from_slice(&frame.to_ws_bytes());
            }
            for message in &history.messages {
                first_bytes.extend_from_slice(&ServerFrame::Message(message).to_ws_bytes());
            }
            seam = history.seam(since);
        }
        Err(e) => {
            warn!("client {client}: history of room {room} unavailable: {e}");
            let notice = format!("history is unavailable: {e}");
            let frame = ServerFrame::Error {
                code: ErrorCode::Unavailable,
                message: &notice,
                cid: None,
            };
            first_bytes.extend_from_slice(&frame.to_ws_bytes());
        }
    }
    if let Err(reason) = context.broker.readiness() {
        let frame = ServerFrame::Status {
            delivery: "down",
            message: &reason,
        };
        first_bytes.extend_from_slice(&frame.to_ws_bytes());
    }
    (first_bytes, seam)
}

/// Reads frames and publishes messages until the connection ends; returns
/// how it ended, for the log.
fn read_until_closed(
    client: ClientId,
    websocket: &mut WebSocket<SessionStream>,
    name: &str,
    room: &str,
    last_seen: &LastSeen,
    context: &SessionContext,
) -> String {
    use tungstenite::error::{CapacityError, Error};
    let mut sent = 0u64;
    let mut bucket = TokenBucket::new(context.limits.rate);
    loop {
        let read = websocket.read();
        last_seen.touch();
        let message = match read {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => message,
            // Pings are answered by tungstenite (the pong goes out at the
            // start of the next read); a close is answered the same way,
            // and the next read reports the end. Pongs only prove life.
            Ok(_) => continue,
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => return "closed".into(),
            Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                close_now(websocket, CloseCode::Size, "message too large");
                return format!("frame of {size} bytes over the {max_size} byte limit");
            }
            Err(Error::Utf8(_)) => {
                close_now(
                    websocket,
                    CloseCode::Invalid,
                    "text frame is not valid UTF-8",
                );
                return "invalid UTF-8 in a text frame".into();
            }
            Err(Error::Protocol(e)) => {
                close_now(websocket, CloseCode::Protocol, "protocol error");
                return format!("protocol error: {e}");
            }
            Err(Error::Io(e)) => return format!("connection lost: {e}"),
            Err(e) => return format!("error: {e}"),
        };
        Metrics::inc(&context.metrics.messages_received_total);
        let parsed = match &message {
            Message::Text(text) => parse_client_frame(text, &context.limits.content),
            _ => Err(FrameError::bad_request(
                "binary frames are not supported: send JSON text",
            )),
        };
        let reply = match bucket.check() {
            Verdict::Allow => match parsed {
                Ok(message) => match publish(client, &mut sent, message, name, room, context) {
                    None => continue,
                    Some(refusal) => refusal,
                },
                Err(refused) => {
                    Metrics::inc(&context.metrics.messages_rejected_total);
                    debug!("client {client}: frame refused: {}", refused.message);
                    Message::text(refused.to_frame().to_json())
                }
            },
            Verdict::Refuse => {
                Metrics::inc(&context.metrics.rate_limited_total);
                let cid = match &parsed {
                    Ok(message) => message.cid.as_deref(),
                    Err(refused) => refused.cid.as_deref(),
                };
                let limit = context.limits.rate;
                let reason = format!(
                    "slow down: at most {} messages a second, {} in a burst",
                    limit.per_second, limit.burst
                );
                reply_error(ErrorCode::RateLimited, &reason, cid)
            }
            Verdict::Disconnect => {
                Metrics::inc(&context.metrics.rate_limited_total);
                Metrics::inc(&context.metrics.flooding_clients_dropped_total);
                warn!("client {client} dropped: {}", CloseReason::FLOODING.reason);
                close_now(websocket, CloseCode::Policy, CloseReason::FLOODING.reason);
                return CloseReason::FLOODING.reason.into();
            }
        };
        if let Err(e) = websocket.send(reply) {
            return format!("cannot reply: {e}");
        }
    }
}

/// Publishes a valid message; `None` once it is accepted (the sender's own
/// copy, coming back through the broker like everyone else's, is its
/// receipt), or the `unavailable` error to send back.
fn publish(
    client: ClientId,
    sent: &mut u64,
    message: ValidMessage,
    name: &str,
    room: &str,
    context: &SessionContext,
) -> Option<Message> {
    let cid = message.cid.clone();
    let new = NewMessage {
        room: room.to_string(),
        from: name.to_string(),
        text: message.text,
        instance: context.instance.clone(),
        cid: message.cid,
    };
    *sent += 1;
    let dedup_key = format!("{}-{client}-{sent}", context.run_nonce);
    match context.broker.publish(new, &dedup_key) {
        Ok(_) => {
            Metrics::inc(&context.metrics.messages_published_total);
            None
        }
        Err(e) => {
            Metrics::inc(&context.metrics.messages_unavailable_total);
            debug!("client {client}: message not accepted: {e}");
            Some(reply_error(
                ErrorCode::Unavailable,
                &format!("message not sent: {e}"),
                cid.as_deref(),
            ))
        }
    }
}

fn reply_error(code: ErrorCode, message: &str, cid: Option<&str>) -> Message {
    Message::text(ServerFrame::Error { code, message, cid }.to_json())
}

/// Sends a close frame for a client that broke the protocol, then ends.
fn close_now(websocket: &mut WebSocket<SessionStream>, code: CloseCode, reason: &'static str) {
    let _ = websocket.close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = websocket.flush();
}

/// The reader's side of the socket: reads come from the socket, writes go
/// to the writer thread, which alone writes to the socket.
///
/// Bytes are handed over on `write`, not on `flush`: after a client's close
/// tungstenite writes the reply and reports the end before it flushes.
struct SessionStream {
    socket: Arc<TcpStream>,
    control_tx: Sender<Control>,
}

impl Read for SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.socket).read(buf)
    }
}

impl Write for SessionStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.control_tx
            .try_send(Control::Raw(buf.to_vec()))
            .map_err(|_| io::Error::other("writer queue full or gone"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread's state.
struct Writer {
    client: ClientId,
    /// Who may write to the socket: this thread, or a deliverer while it
    /// is idle.
    owner: Arc<SocketOwner>,
    socket: Arc<TcpStream>,
    frames_rx: Receiver<Delivery>,
    control_rx: Receiver<Control>,
    closing: Arc<OnceLock<CloseReason>>,
    /// Messages up to this id were sent as history: live copies are skipped.
    seam: Option<MessageId>,
    /// Bytes gathered for the next write.
    out: Vec<u8>,
}

/// What woke the writer.
enum Item {
    Control(Control),
    Delivery(Delivery),
    /// A queue was closed: the session is ending.
    Finished,
}

/// What the writer does after a batch.
enum Next {
    Continue,
    Close(CloseReason),
    Finished,
}

impl Writer {
    fn run(mut self) {
        let outcome = self.pump();
        // A frame a deliverer began must be finished before a close frame.
        let carry_over = self.owner.close();
        let outcome =
            outcome.and_then(|close| (&*self.socket).write_all(&carry_over).map(|()| close));
        match outcome {
            Ok(Some(reason)) => {
                debug!("client {}: closing ({})", self.client, reason.reason);
                let close = Frame::close(Some(CloseFrame {
                    code: CloseCode::from(reason.code),
                    reason: reason.reason.into(),
                }));
                let mut bytes = Vec::new();
                if close.format(&mut bytes).is_ok() && (&*self.socket).write_all(&bytes).is_ok() {
                    // The client answers the close and hangs up, which ends
                    // the reader; a dead peer never does, so after the grace
                    // period the socket is shut down under the reader's feet.
                    let _ = self.socket.shutdown(Shutdown::Write);
                    self.wait_for_reader(CLOSE_GRACE);
                }
            }
            Ok(None) => {}
            Err(e) => debug!("client {}: write failed: {e}", self.client),
        }
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Waits, up to `grace`, for the reader to end (its control sender, and
    /// the hub's, are then gone), discarding what it still queues.
    fn wait_for_reader(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.control_rx.recv_timeout(left) {
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    }

    /// Writes until the session ends; `Some(reason)` if the server closes it.
    fn pump(&mut self) -> io::Result<Option<CloseReason>> {
        loop {
            if !self.out.is_empty() {
                (&*self.socket).write_all(&self.out)?;
                self.out.clear();
                // A burst may have grown the buffer to a whole batch; an
                // idle client should not keep that memory.
                self.out.shrink_to(OUT_KEEP);
            }
            if let Some(reason) = self.closing.get() {
                return Ok(Some(*reason));
            }
            // Nothing to write: deliverers may write directly until this
            // thread wakes, unless history's seam still needs filtering here.
            if self.seam.is_none() {
                self.owner.release();
            }
            let item = select_biased! {
                recv(self.control_rx) -> control => control.map(Item::Control).unwrap_or(Item::Finished),
                recv(self.frames_rx) -> delivery => delivery.map(Item::Delivery).unwrap_or(Item::Finished),
            };
            let carry_over = self.owner.acquire();
            (&*self.socket).write_all(&carry_over)?;
            let next = match item {
                Item::Control(control) => self.take_control(control),
                Item::Delivery(delivery) => {
                    self.take_delivery(delivery);
                    Next::Continue
                }
                // The hub let go of this client (it is leaving): send what
                // the reader still queued (a close reply), then end.
                Item::Finished => Next::Finished,
            };
            match self.gather(next) {
                Next::Continue => {}
                Next::Close(reason) => return Ok(Some(reason)),
                Next::Finished => {
                    self.out.extend(
                        self.control_rx
                            .try_iter()
                            .filter_map(|control| match control {
                                Control::Raw(bytes) => Some(bytes),
                                Control::Close(_) => None,
                            })
                            .flatten(),
                    );
                    (&*self.socket).write_all(&self.out)?;
                    return Ok(None);
                }
            }
        }
    }

    /// Takes whatever else is already queued, up to one batch, so that a
    /// busy client costs one `write` per batch rather than one per frame.
    fn gather(&mut self, mut next: Next) -> Next {
        while matches!(next, Next::Continue) && self.out.len() < WRITE_BATCH {
            next = match self.control_rx.try_recv() {
                Ok(control) => self.take_control(control),
                Err(TryRecvError::Disconnected) => Next::Finished,
                Err(TryRecvError::Empty) => match self.frames_rx.try_recv() {
                    Ok(delivery) => {
                        self.take_delivery(delivery);
                        Next::Continue
                    }
                    Err(_) => break,
                },
            };
        }
        next
    }

    fn take_control(&mut self, control: Control) -> Next {
        match control {
            Control::Raw(bytes) => {
                self.out.extend_from_slice(&bytes);
                Next::Continue
            }
            Control::Close(reason) => {
                // What was queued is dropped: the client is going.
                self.out.clear();
                Next::Close(reason)
            }
        }
    }

    fn take_delivery(&mut self, delivery: Delivery) {
        let Some(seam) = self.seam else {
            self.out.extend_from_slice(&delivery.bytes);
            return;
        };
        for (id, frame) in delivery.frames() {
            match id {
                Some(id) if id <= seam => {}
                _ => self.out.extend_from_slice(frame),
            }
        }
        if delivery.last_id().is_some_and(|last| last > seam) {
            self.seam = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_query_defaults_and_decoding() {
        let join = parse_join_query("", &Limits::default()).unwrap();
        assert_eq!(join.room, "lobby");
        assert_eq!(join.name, None);
        let join = parse_join_query(
            "name=Ann%C3%A9e+B&room=team-1&since=17-3",
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(join.name.as_deref(), Some("Année B"));
        assert_eq!(join.room, "team-1");
        assert_eq!(join.since, Some(MessageId { millis: 17, seq: 3 }));
    }

    #[test]
    fn bad_join_queries_are_refused_with_a_reason() {
        assert!(
            parse_join_query("room=has%20space", &Limits::default())
                .unwrap_err()
                .contains("room")
        );
        assert!(
            parse_join_query("since=yesterday", &Limits::default())
                .unwrap_err()
                .contains("since")
        );
        assert!(parse_join_query(&format!("name={}", "x".repeat(40)), &Limits::default()).is_err());
        assert!(parse_join_query("name=a%0Ab", &Limits::default()).is_err());
    }
}
