//! One WebSocket client: one thread, its reader, from the handshake to the
//! last byte, and every way it ends.
//!
//! ```text
//!   socket ──read──> reader thread ──publish──> broker
//!                        │ pongs, error frames, its own Close
//!                        ▼
//!   socket <──send── outbox <── deliverers (chat messages, status), pinger
//!                      ▲
//!                      └── flusher (what the socket could not take at once)
//! ```
//!
//! Why one thread is enough: the reader blocks in `read` and never writes
//! to the socket. Everything bound for the client goes through its
//! [`Outbox`], which sends at once without blocking when it can, and
//! leaves the rest to a flusher thread. A read timeout would have turned
//! every idle client into a polling loop; a writer thread per client would
//! have doubled the threads and put a hand-over between two writers.
//!
//! Layout: [`handshake`](mod@handshake) (the deadline, the Origin check, the join query,
//! refusals), [`identify`](mod@identify) (who the client is: its chosen name, or its
//! token's), [`reader`] (frames in, messages published), [`stream`] (the socket as
//! tungstenite sees it: reads from the socket, writes into the outbox); the outbox
//! (bytes out, in order, the Close last) is in [`crate::delivery`]. This file starts sessions and
//! makes sure each one leaves no trace, even when it panics.

pub mod handshake;
pub mod identify;
pub mod reader;
pub mod stream;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use tungstenite::WebSocket;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::broker::{Broker, HistoryQuery};
use crate::clock::{self, LastSeen};
use crate::delivery::flusher::Flusher;
use crate::delivery::hub::{ClientId, Hub, Member};
use crate::delivery::outbox::{Outbox, Queued, SocketWire};
use crate::delivery::view::View;
use crate::delivery::xray;
use crate::drain::{Drain, Guard};
use crate::metrics::Metrics;
use crate::origin::OriginPolicy;
use crate::per_address::{AddressSlot, PerAddress, TrustedProxies};
use crate::presence::Tracker;
use crate::protocol::{CloseReason, ErrorCode, Limits, MessageId, Received, ServerFrame, Via};
use crate::rate_limit::RateLimit;
use crate::supervisor::Supervisor;
use handshake::{JoinRequest, close_unjoined, handshake, refuse_raw, set_socket_options};
use identify::{Who, identify};
use reader::read_until_closed;
use stream::SessionStream;

/// The WebSocket path (`docs/PROTOCOL.md`).
pub const WS_PATH: &str = "/ws";
/// Stack of a reader thread. It parses JSON and talks to Redis, which
/// touches a few tens of KiB at most; what is not touched costs address
/// space, not memory.
const READER_STACK: usize = 256 * 1024;
/// tungstenite's read buffer. Its 128 KiB default is touched on the first
/// read, for every client; chat frames are small, and a larger one simply
/// takes several reads.
const READ_BUFFER: usize = 512;

/// What every session of this instance shares.
pub struct SessionContext {
    pub instance: String,
    /// Every joined session holds a guard: shutdown waits for the last.
    pub drain: Arc<Drain>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<Tracker>,
    pub flusher: Arc<Flusher>,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
    pub supervisor: Arc<Supervisor>,
    next_client: AtomicU64,
    /// Sessions alive, handshakes included: what `--max-clients` bounds.
    sessions: AtomicUsize,
    /// The X-ray's places (`--max-traced-clients`).
    xray: xray::Slots,
    /// Clients per address: what `--max-clients-per-ip` bounds.
    per_address: Arc<PerAddress>,
    /// Tells this run of the instance from earlier ones in dedup keys, so
    /// that a restarted instance's client 1 is not taken for the old one's.
    run_nonce: String,
    /// Random, drawn at start: guests are `guest-<tag>-<n>`, so that the
    /// first guest of every instance and of every run is not one name
    /// (and one member) everywhere.
    guest_tag: String,
}

/// The per-client limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub content: Limits,
    pub rate: RateLimit,
    pub origins: OriginPolicy,
    pub max_clients: usize,
    pub max_traced_clients: usize,
    /// `--max-clients-per-ip` (0: no bound).
    pub max_clients_per_ip: usize,
    pub trusted_proxies: TrustedProxies,
    pub client_buffer_bytes: usize,
    pub max_frame_bytes: usize,
    pub history_replay: usize,
    pub history_replay_max: usize,
    pub handshake_timeout: Duration,
    pub close_grace: Duration,
    /// `--auth token`: the keys tokens are checked with; `None`: `off`.
    pub auth: Option<Arc<crate::auth::Verifier>>,
}

/// What sessions talk to besides their socket.
pub struct SessionServices {
    pub drain: Arc<Drain>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<Tracker>,
    pub flusher: Arc<Flusher>,
    pub metrics: Arc<Metrics>,
}

impl SessionContext {
    pub fn new(
        instance: String,
        services: SessionServices,
        limits: SessionLimits,
        supervisor: Arc<Supervisor>,
    ) -> Self {
        let SessionServices {
            drain,
            hub,
            broker,
            presence,
            flusher,
            metrics,
        } = services;
        SessionContext {
            per_address: PerAddress::new(limits.max_clients_per_ip),
            xray: xray::Slots::new(limits.max_traced_clients),
            drain,
            hub,
            broker,
            presence,
            flusher,
            metrics,
            limits,
            supervisor,
            next_client: AtomicU64::new(1),
            sessions: AtomicUsize::new(0),
            run_nonce: format!("{instance}-{}", clock::wall_nanos()),
            guest_tag: crate::random::random_base36(5),
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

/// A place in `--max-clients`, given back when dropped, however the
/// session ends.
struct Slot(Arc<SessionContext>);

impl Slot {
    fn take(context: &Arc<SessionContext>) -> Option<Slot> {
        let taken = context.sessions.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(Arc::clone(context));
        (taken < context.limits.max_clients).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A gauge up while this lives.
struct Raised<'a>(&'a std::sync::atomic::AtomicI64);

impl<'a> Raised<'a> {
    fn new(gauge: &'a std::sync::atomic::AtomicI64) -> Self {
        Metrics::up(gauge);
        Raised(gauge)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        Metrics::down(self.0);
    }
}

/// Starts a session for an accepted connection on its own reader thread.
/// At `--max-clients`, or if no thread can be had, the client gets an HTTP
/// 503 instead, and the server goes on.
pub fn spawn_session(mut stream: TcpStream, context: Arc<SessionContext>) {
    let client = context.next_client.fetch_add(1, Ordering::Relaxed);
    let Some(slot) = Slot::take(&context) else {
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
    };
    // A peer that is not a trusted proxy is the client: counted now. A
    // proxy's client is known from the handshake's headers.
    let peer = stream.peer_addr().map(|addr| addr.ip()).ok();
    let address_slot = match peer {
        Some(peer) if !context.limits.trusted_proxies.contains(peer) => {
            match context.per_address.take(peer) {
                Some(taken) => Some(taken),
                None => {
                    Metrics::inc(&context.metrics.connections_refused_total);
                    let reason = crowded_address(client, peer, &context);
                    refuse_raw(&mut stream, "429 Too Many Requests", &reason);
                    return;
                }
            }
        }
        _ => None,
    };
    let refused = stream.try_clone().ok();
    let spawned = thread::Builder::new()
        .name(format!("ws-read-{client}"))
        .stack_size(READER_STACK)
        .spawn(move || {
            let context = Arc::clone(&slot.0);
            run_session(client, stream, address_slot, &context);
            drop(slot);
        });
    if let Err(e) = spawned {
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

/// Logs the refusal of a client whose address already has
/// `--max-clients-per-ip`, at accept or at the handshake (behind a trusted
/// proxy), and returns the reason the client is given with its 429.
pub(crate) fn crowded_address(
    client: ClientId,
    address: std::net::IpAddr,
    context: &SessionContext,
) -> String {
    let max = context.limits.max_clients_per_ip;
    warn!("client {client} refused: {address} already has {max} clients (--max-clients-per-ip)");
    format!("your address already has {max} connections to this instance")
}

/// The reader thread's body: handshake, join, then read and publish until
/// the connection ends. `address_slot`: the client's place under
/// `--max-clients-per-ip`, if it was counted at accept (else the
/// handshake counts it, by the address a trusted proxy forwards).
fn run_session(
    client: ClientId,
    stream: TcpStream,
    mut address_slot: Option<AddressSlot>,
    context: &SessionContext,
) {
    let _thread = Raised::new(&context.metrics.session_threads);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    // One deadline for the handshake and, with `--auth token`, the token.
    let deadline = Instant::now() + context.limits.handshake_timeout;
    let joined = set_socket_options(&stream, context.limits.handshake_timeout)
        .map_err(|e| debug!("client {client} refused: socket options: {e}"))
        .ok()
        .and_then(|()| handshake(client, &stream, deadline, &mut address_slot, context));
    let grace = context.limits.close_grace;
    match joined {
        Some(Ok(_)) if context.supervisor.is_stopping() => {
            Metrics::inc(&context.metrics.connections_refused_total);
            close_unjoined(&stream, None, CloseReason::SHUTDOWN, grace);
        }
        Some(Ok(join)) => {
            let mut connection = Connection::new(client, Arc::new(stream), deadline, context);
            match identify(client, &join, &mut connection.websocket, context) {
                Ok(who) => {
                    connection.websocket.get_mut().deadline = None;
                    let _ = connection.socket.set_read_timeout(None);
                    Metrics::inc(&context.metrics.connections_total);
                    run_joined(client, connection, join, who, &peer, context);
                }
                Err(refused) => {
                    Metrics::inc(&context.metrics.connections_refused_total);
                    let error = Some((refused.code, refused.message.as_str()));
                    close_unjoined(&connection.socket, error, refused.close, grace);
                }
            }
        }
        Some(Err(reason)) => {
            debug!("client {client} refused: {reason}");
            Metrics::inc(&context.metrics.connections_refused_total);
            let error = Some((ErrorCode::BadRequest, reason.as_str()));
            close_unjoined(&stream, error, CloseReason::BAD_REQUEST, grace);
        }
        None => {
            Metrics::inc(&context.metrics.connections_refused_total);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// A client past its handshake: its socket, its outbox (closed until it
/// joins: what comes meanwhile waits), and the WebSocket its reader reads.
/// Made before the client says who it is, so that whatever it sends right
/// behind its `auth` frame stays in this WebSocket's buffer for the reader.
struct Connection {
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    websocket: WebSocket<SessionStream>,
}

impl Connection {
    fn new(
        client: ClientId,
        socket: Arc<TcpStream>,
        deadline: Instant,
        context: &SessionContext,
    ) -> Self {
        let key = client as usize;
        let outbox = Arc::new(Outbox::new(
            SocketWire {
                socket: Arc::clone(&socket),
                key,
                watcher: context.flusher.watcher(key),
                close_grace: context.limits.close_grace,
            },
            context.limits.client_buffer_bytes,
        ));
        let stream = SessionStream {
            socket: Arc::clone(&socket),
            outbox: Arc::clone(&outbox),
            deadline: Some(deadline),
        };
        let websocket = WebSocket::from_raw_socket(stream, Role::Server, Some(context.ws_config()));
        Connection {
            socket,
            outbox,
            websocket,
        }
    }
}

/// A joined client's registrations, undone on drop however the session
/// ends, a panic included: the hub entry, the flusher's watch, the gauge,
/// and the connection itself.
struct Joined<'a> {
    client: ClientId,
    room: &'a str,
    /// Its presence key ([`Who::presence_key`]).
    key: Arc<str>,
    socket: &'a Arc<TcpStream>,
    outbox: Arc<Outbox>,
    context: &'a SessionContext,
    /// The number of its join in the room's presence (`None` with
    /// presence off, or if it could not be written).
    present: Option<u64>,
    _connected: Raised<'a>,
    /// Dropped last, once the client has left everything: shutdown is
    /// over when every session's is.
    _drain: Option<Guard>,
}

impl<'a> Joined<'a> {
    fn enter(
        member: Member,
        room: &'a str,
        socket: &'a Arc<TcpStream>,
        context: &'a SessionContext,
    ) -> std::io::Result<Self> {
        let client = member.id;
        context
            .flusher
            .register(client as usize, socket, &member.outbox)?;
        let mut joined = Joined {
            client,
            room,
            key: member.key.clone(),
            socket,
            outbox: member.outbox.clone(),
            context,
            present: None,
            _connected: Raised::new(&context.metrics.clients_connected),
            _drain: context.drain.guard(),
        };
        let key = member.key.clone();
        context.hub.join(room, member);
        // In the hub first, then subscribed: every message Redis sends
        // after confirming the room's subscription finds this client.
        context.broker.attach(room);
        if context.presence.settings().enabled {
            joined.present = context.broker.present(room, &key);
        }
        Ok(joined)
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let context = self.context;
        context.hub.leave(self.room, self.client);
        if context.presence.settings().enabled {
            context.broker.absent(self.room, &self.key);
        }
        context.broker.detach(self.room);
        if thread::panicking() {
            error!(
                "client {}: its session panicked; closing it with 1011",
                self.client
            );
            if self.outbox.close(CloseReason::INTERNAL_ERROR, Queued::Drop) {
                linger(self.socket, Instant::now() + context.limits.close_grace);
            }
        }
        self.outbox.cut();
        context.flusher.forget(self.client as usize, self.socket);
    }
}

fn run_joined(
    client: ClientId,
    connection: Connection,
    join: JoinRequest,
    who: Who,
    peer: &str,
    context: &SessionContext,
) {
    let Connection {
        socket,
        outbox,
        mut websocket,
    } = connection;
    let room = join.room;
    // Held as long as the session: the X-ray's place is given back when
    // the client leaves.
    let trace_slot = if join.trace {
        context.xray.take()
    } else {
        None
    };
    let trace = trace_slot.is_some();
    let trace_refused = join.trace && !trace;
    if trace_refused {
        info!(
            "client {client}: X-ray refused, {} clients have it (--max-traced-clients)",
            context.xray.max()
        );
    }
    let last_seen = Arc::new(LastSeen::default());
    let view = Arc::new(context.presence.new_view());
    let token_expires = Arc::new(AtomicU64::new(who.expires.unwrap_or(0)));
    let key = who.presence_key();
    // Join (and have the room's subscription confirmed) before reading
    // history: a message accepted meanwhile is then either in history or
    // in the outbox (or both, and the outbox drops the copy), never in
    // neither.
    let member = Member {
        id: client,
        key: key.as_str().into(),
        outbox: Arc::clone(&outbox),
        last_seen: last_seen.clone(),
        token_expires: token_expires.clone(),
        trace,
        view: view.clone(),
    };
    let _joined = match Joined::enter(member, &room, &socket, context) {
        Ok(joined) => joined,
        Err(e) => {
            warn!("client {client} dropped: cannot watch its socket: {e}");
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
    };
    match &who.user {
        Some(user) => info!(
            "client {client} joined room {room} as {:?} (user {user:?}) from {peer}",
            who.name
        ),
        None => info!(
            "client {client} joined room {room} as {:?} from {peer}",
            who.name
        ),
    }

    let client_side = FirstFrames {
        client,
        who: &who,
        room: &room,
        since: join.since,
        trace,
        trace_refused,
        view: &view,
        present: _joined.present,
    };
    let (first, seam) = first_frames(&client_side, context);
    outbox.open(first, seam);

    // The handshake and the history read were the deepest this thread goes.
    crate::stack::release_unused();
    let sender = reader::Sender {
        client,
        who: &who,
        key: &key,
        room: &room,
        view: &view,
        token_expires: &token_expires,
    };
    let ended = read_until_closed(&sender, &mut websocket, &last_seen, context);
    // Whoever closed, the Close frame is queued or sent: read and discard
    // until the client hangs up, so that unread input cannot turn the
    // close into a reset.
    linger(&socket, Instant::now() + context.limits.close_grace);
    info!("client {client} left room {room}: {ended}");
}

/// A lingering close: reads and discards what the peer still sends until it
/// hangs up or `deadline` passes, one deadline for the whole wait (a peer
/// dripping a byte a second does not extend it).
pub fn linger(socket: &TcpStream, deadline: Instant) {
    let mut sink = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*socket).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Room left in the first frames' budget for the frames after history
/// (the `history_more` notice, a `status`).
const RESERVED_FOR_NOTICES: usize = 512;

/// How many of `frames` (oldest first) to leave out so that the rest, the
/// most recent, fit in `budget` bytes.
pub fn fitting_from(frames: &[Vec<u8>], budget: usize) -> usize {
    let mut size = 0;
    for (at, frame) in frames.iter().enumerate().rev() {
        size += frame.len();
        if size > budget {
            return at + 1;
        }
    }
    0
}

/// Who a joining client is, for its first frames.
struct FirstFrames<'a> {
    client: ClientId,
    who: &'a Who,
    room: &'a str,
    since: Option<MessageId>,
    trace: bool,
    /// It asked for the X-ray and `--max-traced-clients` have it.
    trace_refused: bool,
    view: &'a View,
    /// The number of its own join in the room's presence.
    present: Option<u64>,
}

/// What a client gets before live messages: the welcome, who is in the
/// room, the room's history (or a notice that it is truncated or
/// unavailable) and, while Redis is unreachable, a `status` frame; all as
/// one buffer. Also returns the seam: live copies up to that id were sent
/// as history.
fn first_frames(
    joiner: &FirstFrames<'_>,
    context: &SessionContext,
) -> (Vec<u8>, Option<MessageId>) {
    let FirstFrames {
        client,
        who,
        room,
        since,
        trace,
        trace_refused,
        view,
        present,
    } = *joiner;
    let client_label = format!("c{client}");
    let welcome = ServerFrame::Welcome {
        instance: &context.instance,
        client: &client_label,
        name: &who.name,
        room,
        user: who.user.as_deref(),
        expires: who.expires,
    };
    let mut first_bytes = welcome.to_ws_bytes().to_vec();
    if trace_refused {
        let refusal = format!(
            "no X-ray for this connection: {} clients of this instance have it already \
             (--max-traced-clients); messages come without their path",
            context.limits.max_traced_clients
        );
        let frame = ServerFrame::Error {
            code: ErrorCode::TraceRefused,
            message: &refusal,
            cid: None,
        };
        first_bytes.extend_from_slice(&frame.to_ws_bytes());
    }
    // Who is here (this client included), before history; what changes
    // later comes coalesced, from the presence tracker.
    if let Some(frame) = context.presence.first_frame(room, view, present) {
        first_bytes.extend_from_slice(&frame);
    }
    let query = match since {
        Some(since) => HistoryQuery::After(since, context.limits.history_replay_max),
        None => HistoryQuery::Recent(context.limits.history_replay),
    };
    let mut seam = since;
    match context.broker.history(room, query) {
        Ok(history) => {
            if history.truncated {
                let notice = format!(
                    "messages after {} are no longer in history; showing the oldest it still holds",
                    since.unwrap_or_default()
                );
                let frame = ServerFrame::Notice {
                    code: "history_truncated",
                    message: &notice,
                    before: None,
                };
                first_bytes.extend_from_slice(&frame.to_ws_bytes());
            }
            let received = Received::now(Via::History);
            let frames: Vec<Vec<u8>> = history
                .messages
                .iter()
                .map(|message| xray::history_frame(message, received, &context.instance, trace))
                .collect();
            // The first frames fit the client's buffer like everything
            // else: the most recent messages that fit, the rest paged.
            let budget = context
                .limits
                .client_buffer_bytes
                .saturating_sub(first_bytes.len() + RESERVED_FOR_NOTICES);
            let skipped = fitting_from(&frames, budget);
            if history.more || skipped > 0 {
                let before = history
                    .messages
                    .get(skipped)
                    .map(|m| m.id)
                    .or_else(|| history.messages.last().map(|m| m.id.next()));
                let notice = format!(
                    "older messages remain in history: ask for them with \
                     {{\"type\":\"history\",\"before\":\"{}\"}}",
                    before.unwrap_or_default()
                );
                let frame = ServerFrame::Notice {
                    code: "history_more",
                    message: &notice,
                    before,
                };
                first_bytes.extend_from_slice(&frame.to_ws_bytes());
            }
            Metrics::add(
                &context.metrics.history_replayed_total,
                (frames.len() - skipped) as u64,
            );
            for frame in &frames[skipped..] {
                first_bytes.extend_from_slice(frame);
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
    if let Err(reason) = context.broker.link_status(room) {
        let frame = ServerFrame::Status {
            delivery: "down",
            message: &reason,
        };
        first_bytes.extend_from_slice(&frame.to_ws_bytes());
    }
    (first_bytes, seam)
}
