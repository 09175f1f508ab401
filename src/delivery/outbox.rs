//! One client's outbox: every byte the server sends to one socket enters
//! here, in one order, under one small lock.
//!
//! Whoever has bytes for a client (a deliverer with a chat message, the
//! client's reader with a pong or an error frame, the pinger, the thread
//! that decides to close the client) calls the outbox. If nothing is
//! queued, the caller sends at once with a send that never blocks
//! (`MSG_DONTWAIT`), still holding the lock; what the socket cannot take
//! stays queued, and a flusher thread finishes it when the socket becomes
//! writable ([`crate::delivery::flusher`]). So:
//!
//! - **Order holds by construction**: bytes reach the socket in the order
//!   their callers took the lock, and two frames never interleave, because
//!   every send happens under that lock and starts where the last one
//!   stopped. There is no hand-over of the socket between threads to get
//!   wrong.
//! - **The Close frame is the last frame** (RFC 6455 section 5.5.1): once a
//!   close begins, the outbox refuses everything, and the Close frame
//!   itself is queued past any limit, so it always goes out.
//! - **A slow consumer costs only itself**: the outbox holds at most
//!   `limit` bytes; the push that would pass it closes the client with
//!   1008 instead, and nobody ever waits on its socket.
//!
//! The lock is held for one non-blocking send: microseconds.
//!
//! A client that asked for the X-ray gets its message frames as
//! [`LateFrame`]s: each is made again right before a send may hand its
//! first byte to the socket, so that its "written" stamp is the moment it
//! left the outbox, after any wait in it. Everyone else's bytes are never
//! touched.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::{CloseReason, MessageId, WsBytes};
use crate::sync::{Mutex, lock};

/// Frames on their way to the clients of one room: one or more complete
/// WebSocket frames back to back in one buffer, shared by every receiver,
/// and where each begins, with its message id (none for a status frame),
/// so that an outbox can drop what history already sent.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub frames: Vec<(Option<MessageId>, usize)>,
}

impl Batch {
    pub fn push(&mut self, id: Option<MessageId>, frame: &[u8]) {
        self.frames.push((id, self.bytes.len()));
        self.bytes.extend_from_slice(frame);
    }

    /// A batch of one frame that is not a chat message.
    pub fn single(frame: &[u8]) -> Self {
        let mut batch = Batch::default();
        batch.push(None, frame);
        batch
    }

    /// The frames one by one: (id, bytes).
    pub fn frames(&self) -> impl Iterator<Item = (Option<MessageId>, &[u8])> {
        let ends = self
            .frames
            .iter()
            .skip(1)
            .map(|&(_, start)| start)
            .chain([self.bytes.len()]);
        self.frames
            .iter()
            .zip(ends)
            .map(|(&(id, start), end)| (id, &self.bytes[start..end]))
    }

    /// The last message id in it.
    pub fn last_id(&self) -> Option<MessageId> {
        self.frames.iter().rev().find_map(|&(id, _)| id)
    }
}

/// A frame whose bytes are made again each time a send may hand its first
/// byte to the socket, until one does: what lets the X-ray stamp the
/// moment a frame leaves the outbox (`sent_us`), however long it waited.
/// A WebSocket frame's bytes cannot change once its first byte is out, so
/// a frame the socket takes only part of keeps the stamp of that send,
/// and its rest goes later, unchanged.
pub trait LateFrame: Send + Sync + std::fmt::Debug {
    /// The message it carries (for history's seam).
    fn id(&self) -> MessageId;
    /// The complete frame, stamped now.
    fn render(&self) -> WsBytes;
}

/// Where an outbox's bytes go: a socket, and the flusher that waits on it.
/// A trait so that the model test can put a simulated socket behind the
/// real outbox.
pub trait Wire: Send + Sync {
    /// Sends as much of `parts` as the socket takes now, never blocking:
    /// `WouldBlock` when it takes nothing.
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize>;
    /// The socket is full: call [`Outbox::flush`] once it can take more.
    fn notify_when_writable(&self);
    /// The Close frame is out: send the FIN.
    fn shut_down_writing(&self);
    /// A close began: cut the connection if it is still open at the end
    /// of the close grace (the peer may never answer or read).
    fn close_started(&self);
    /// End the connection now, both ways.
    fn cut(&self);
}

/// What became of bytes handed to an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// All of them are on the socket.
    Sent,
    /// Queued behind earlier bytes, or the socket was full: a flusher
    /// sends them when it can.
    Queued,
    /// Nothing to send: the client is closing or gone, or history already
    /// sent these messages.
    Refused,
    /// This push would have passed the outbox's limit: the client is
    /// closed as a slow consumer (1008) instead.
    Overflowed,
}

/// What a close does with the bytes still queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Send them first (shutdown; the answer to a flooder).
    Send,
    /// Drop them (a slow consumer, a dead peer, a client that is leaving);
    /// a frame already begun is still finished, or the Close frame would
    /// land in the middle of it.
    Drop,
}

/// Where a connection is in its life, as the outbox sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Joined, but the welcome and history are not written yet:
    /// deliveries wait in the queue.
    Joining,
    Open,
    /// The Close frame is queued, last; everything else is refused.
    Closing,
    /// The Close frame is out, or the connection is gone.
    Closed,
}

/// Bytes queued for the socket: a shared batch, the outbox's own, or a
/// late frame with its bytes as last made.
#[derive(Debug)]
enum Chunk {
    Shared(Arc<Batch>),
    Own(Vec<u8>),
    Late(Box<dyn LateFrame>, WsBytes),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(batch) => &batch.bytes,
            Chunk::Own(bytes) => bytes,
            Chunk::Late(_, bytes) => bytes,
        }
    }

    /// A late frame, made now (to know its size; it is made again when
    /// it is sent).
    fn late(frame: Box<dyn LateFrame>) -> Self {
        let bytes = frame.render();
        Chunk::Late(frame, bytes)
    }
}

/// A chunk and how much of it is already on the socket.
#[derive(Debug)]
struct Pending {
    chunk: Chunk,
    sent: usize,
}

impl Pending {
    fn rest(&self) -> &[u8] {
        &self.chunk.bytes()[self.sent..]
    }
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Pending>,
    /// Bytes in `queue` not yet sent.
    queued_bytes: usize,
    phase: Phase,
    /// Messages up to this id were sent as history: live copies are
    /// dropped until the first newer one.
    seam: Option<MessageId>,
    /// A flusher was asked to call back when the socket is writable.
    armed: bool,
    /// Writing is held (the fault panel's stalled tab): bytes queue as if
    /// the socket were full, until released or a close begins.
    held: bool,
    /// Since when queued bytes have waited without the socket taking any:
    /// what `--send-timeout-ms` bounds.
    stuck_since: Option<Instant>,
}

/// Queue slots an emptied outbox keeps; past it, it gives them back.
const SHRINK_ABOVE: usize = 16;

/// Most queued chunks handed to one `sendmsg`.
const MAX_PARTS: usize = 64;

/// One client's outbox. See the module documentation.
pub struct Outbox<W: Wire = SocketWire> {
    wire: W,
    /// Bytes the outbox may hold before its client counts as a slow
    /// consumer (`--client-buffer-bytes`).
    limit: usize,
    state: Mutex<State>,
}

impl<W: Wire> Outbox<W> {
    /// A joining client's outbox: deliveries queue until [`open`](Self::open).
    pub fn new(wire: W, limit: usize) -> Self {
        Outbox {
            wire,
            limit,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_bytes: 0,
                phase: Phase::Joining,
                seam: None,
                armed: false,
                held: false,
                stuck_since: None,
            }),
        }
    }

    /// Writes the first frames (welcome, history), then what was delivered
    /// meanwhile, less what history already held (ids up to `seam`).
    pub fn open(&self, first: Vec<u8>, seam: Option<MessageId>) {
        let mut state = lock(&self.state);
        if state.phase != Phase::Joining {
            return;
        }
        state.seam = seam;
        let waiting = std::mem::take(&mut state.queue);
        state.queued_bytes = 0;
        self.append(&mut state, Chunk::Own(first));
        for pending in waiting {
            let chunk = match pending.chunk {
                Chunk::Shared(batch) => match past_seam(&mut state.seam, &batch) {
                    Some(chunk) => chunk,
                    None => continue,
                },
                Chunk::Late(frame, bytes) if id_past_seam(&mut state.seam, frame.id()) => {
                    Chunk::Late(frame, bytes)
                }
                Chunk::Late(..) => continue,
                own => own,
            };
            self.append(&mut state, chunk);
        }
        state.phase = Phase::Open;
        self.write_out(&mut state);
    }

    /// Hands a batch of chat or status frames to the client.
    pub fn deliver(&self, batch: &Arc<Batch>) -> Pushed {
        let mut state = lock(&self.state);
        if state.phase == Phase::Joining {
            // Filtered against history's seam when the client opens.
            return self.push_one(&mut state, Chunk::Shared(Arc::clone(batch)));
        }
        match past_seam(&mut state.seam, batch) {
            Some(chunk) => self.push_one(&mut state, chunk),
            None => Pushed::Refused,
        }
    }

    /// Hands a client with the X-ray its frames of one delivery, each made
    /// again right before its first byte is sent ([`LateFrame`]). They
    /// count against the limit together, as one batch would.
    pub fn deliver_late(&self, frames: Vec<Box<dyn LateFrame>>) -> Pushed {
        let mut state = lock(&self.state);
        let joining = state.phase == Phase::Joining;
        let chunks: Vec<Chunk> = frames
            .into_iter()
            // While joining, filtered against history's seam at `open`.
            .filter(|frame| joining || id_past_seam(&mut state.seam, frame.id()))
            .map(Chunk::late)
            .collect();
        if chunks.is_empty() {
            return Pushed::Refused;
        }
        let len = chunks.iter().map(|chunk| chunk.bytes().len()).sum();
        self.push_locked(&mut state, chunks, len)
    }

    /// Hands the client frames of its own: a pong, an error, a ping.
    pub fn push(&self, bytes: Vec<u8>) -> Pushed {
        let mut state = lock(&self.state);
        self.push_one(&mut state, Chunk::Own(bytes))
    }

    /// Begins closing with `reason`: the Close frame goes last, and nothing
    /// is accepted after it. Returns false if a close had already begun.
    pub fn close(&self, reason: CloseReason, queued: Queued) -> bool {
        let mut state = lock(&self.state);
        if matches!(state.phase, Phase::Closing | Phase::Closed) {
            return false;
        }
        self.begin_close(&mut state, reason, queued);
        true
    }

    /// Whether a close has begun (or the connection is gone).
    pub fn is_closing(&self) -> bool {
        matches!(lock(&self.state).phase, Phase::Closing | Phase::Closed)
    }

    /// Flusher: the socket can take more; send what is queued.
    pub fn flush(&self) {
        let mut state = lock(&self.state);
        state.armed = false;
        if matches!(state.phase, Phase::Open | Phase::Closing) {
            self.write_out(&mut state);
        }
    }

    /// Ends the connection now: drops what is queued and cuts the socket.
    pub fn cut(&self) {
        let mut state = lock(&self.state);
        state.phase = Phase::Closed;
        state.queue.clear();
        state.queued_bytes = 0;
        self.wire.cut();
    }

    /// Stops writing to the socket, as if the client had stopped reading
    /// (`--demo-controls`): its bytes queue up to the limit, past which it
    /// is closed as a slow consumer, like any client that stops reading.
    pub fn hold(&self) {
        lock(&self.state).held = true;
    }

    /// Writes again what [`hold`](Self::hold) kept back.
    pub fn release(&self) {
        let mut state = lock(&self.state);
        state.held = false;
        if matches!(state.phase, Phase::Open | Phase::Closing) {
            self.write_out(&mut state);
        }
    }

    /// How long queued bytes have waited without the socket taking any
    /// (a client that does not read); `None` when nothing waits.
    pub fn stuck_for(&self) -> Option<std::time::Duration> {
        let state = lock(&self.state);
        match state.phase {
            Phase::Open => state.stuck_since.map(|since| since.elapsed()),
            _ => None,
        }
    }

    /// Bytes waiting for the socket (the tests' window on the limit).
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        lock(&self.state).queued_bytes
    }

    fn push_one(&self, state: &mut State, chunk: Chunk) -> Pushed {
        let len = chunk.bytes().len();
        self.push_locked(state, [chunk], len)
    }

    /// Queues `chunks` (`len` bytes in all), and sends them if nothing was
    /// queued before them.
    fn push_locked(
        &self,
        state: &mut State,
        chunks: impl IntoIterator<Item = Chunk>,
        len: usize,
    ) -> Pushed {
        if matches!(state.phase, Phase::Closing | Phase::Closed) {
            return Pushed::Refused;
        }
        // An empty outbox takes any one batch: the limit is about a client
        // falling behind, not about the size of what it is sent.
        if state.queued_bytes > 0 && state.queued_bytes + len > self.limit {
            self.begin_close(state, CloseReason::SLOW_CONSUMER, Queued::Drop);
            return Pushed::Overflowed;
        }
        let was_empty = state.queue.is_empty();
        for chunk in chunks {
            self.append(state, chunk);
        }
        if state.phase == Phase::Open && was_empty {
            self.write_out(state);
            if state.queue.is_empty() {
                return Pushed::Sent;
            }
        }
        Pushed::Queued
    }

    fn append(&self, state: &mut State, chunk: Chunk) {
        let len = chunk.bytes().len();
        if len > 0 {
            state.queued_bytes += len;
            state.queue.push_back(Pending { chunk, sent: 0 });
        }
    }

    fn begin_close(&self, state: &mut State, reason: CloseReason, queued: Queued) {
        if queued == Queued::Drop || state.phase == Phase::Joining {
            let begun = state.queue.pop_front().filter(|pending| pending.sent > 0);
            state.queue.clear();
            state.queued_bytes = begun.as_ref().map_or(0, |pending| pending.rest().len());
            state.queue.extend(begun);
        }
        self.append(state, Chunk::Own(reason.to_ws_bytes()));
        state.phase = Phase::Closing;
        // A held client is still told why it is closed.
        state.held = false;
        self.wire.close_started();
        self.write_out(state);
    }

    /// Sends what is queued until the socket is full; then asks a flusher
    /// for a call back. After the Close frame, shuts down writing.
    fn write_out(&self, state: &mut State) {
        if state.held {
            if !state.queue.is_empty() {
                state.stuck_since.get_or_insert_with(Instant::now);
            }
            return;
        }
        while !state.queue.is_empty() {
            restamp(state);
            let mut parts = [IoSlice::new(&[]); MAX_PARTS];
            let mut count = 0;
            for (part, pending) in parts.iter_mut().zip(&state.queue) {
                *part = IoSlice::new(pending.rest());
                count += 1;
            }
            match self.wire.send(&parts[..count]) {
                Ok(0) => return self.lost(state),
                Ok(n) => {
                    consume(state, n);
                    state.stuck_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    state.stuck_since.get_or_insert_with(Instant::now);
                    if !state.armed {
                        state.armed = true;
                        self.wire.notify_when_writable();
                    }
                    return;
                }
                // The peer is gone; its reader finds out on its own.
                Err(_) => return self.lost(state),
            }
        }
        // A burst (a join storm into a big room) may have grown the queue;
        // an idle client should not keep that memory.
        if state.queue.capacity() > SHRINK_ABOVE {
            state.queue = VecDeque::new();
        }
        if state.phase == Phase::Closing {
            state.phase = Phase::Closed;
            self.wire.shut_down_writing();
        }
    }

    fn lost(&self, state: &mut State) {
        state.phase = Phase::Closed;
        state.queue.clear();
        state.queued_bytes = 0;
    }
}

/// Makes again, stamped now, the late frames this send may begin: those
/// among the parts it hands the socket with none of their bytes sent yet.
/// One the socket does not reach is made again at the next send.
fn restamp(state: &mut State) {
    for pending in state.queue.iter_mut().take(MAX_PARTS) {
        if let (Chunk::Late(frame, bytes), 0) = (&mut pending.chunk, pending.sent) {
            let fresh = frame.render();
            state.queued_bytes = state.queued_bytes - bytes.len() + fresh.len();
            *bytes = fresh;
        }
    }
}

/// Takes `n` sent bytes off the front of the queue.
fn consume(state: &mut State, mut n: usize) {
    state.queued_bytes -= n;
    while n > 0 {
        let pending = state.queue.front_mut().expect("sent bytes were queued");
        let left = pending.rest().len();
        if n < left {
            pending.sent += n;
            return;
        }
        n -= left;
        state.queue.pop_front();
    }
}

/// The part of `batch` a client still needs, given history's seam; clears
/// the seam at the first message past it.
fn past_seam(seam: &mut Option<MessageId>, batch: &Arc<Batch>) -> Option<Chunk> {
    let Some(limit) = *seam else {
        return Some(Chunk::Shared(Arc::clone(batch)));
    };
    if batch.last_id().is_some_and(|last| last > limit) {
        *seam = None;
    }
    let seen = |id: Option<MessageId>| id.is_some_and(|id| id <= limit);
    if !batch.frames.iter().any(|&(id, _)| seen(id)) {
        return Some(Chunk::Shared(Arc::clone(batch)));
    }
    let rest: Vec<u8> = batch
        .frames()
        .filter(|&(id, _)| !seen(id))
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    (!rest.is_empty()).then_some(Chunk::Own(rest))
}

/// Whether a client still needs message `id`, given history's seam;
/// clears the seam at the first message past it.
fn id_past_seam(seam: &mut Option<MessageId>, id: MessageId) -> bool {
    match *seam {
        Some(limit) if id <= limit => false,
        Some(_) => {
            *seam = None;
            true
        }
        None => true,
    }
}

/// Asks for a call back when a socket is writable, and for a cut at a
/// deadline: what the flusher pool does for [`SocketWire`].
pub trait Watcher: Send + Sync {
    fn watch_writable(&self, key: usize, socket: &TcpStream);
    fn cut_at(&self, key: usize, deadline: Instant);
}

/// The real wire: a TCP socket, sent to without blocking.
pub struct SocketWire {
    pub socket: Arc<TcpStream>,
    /// The client's key with its flusher.
    pub key: usize,
    pub watcher: Arc<dyn Watcher>,
    /// How long a close may take before the connection is cut.
    pub close_grace: std::time::Duration,
}

impl Wire for SocketWire {
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(&*self.socket)
            .send_vectored_with_flags(parts, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    fn notify_when_writable(&self) {
        self.watcher.watch_writable(self.key, &self.socket);
    }

    fn shut_down_writing(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
    }

    fn close_started(&self) {
        self.watcher
            .cut_at(self.key, Instant::now() + self.close_grace);
    }

    fn cut(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket that takes `room` bytes, then blocks until told it drained.
    #[derive(Default)]
    struct TestWire {
        sent: std::sync::Mutex<Vec<u8>>,
        room: AtomicUsize,
        armed: AtomicUsize,
        shut: AtomicUsize,
    }

    impl TestWire {
        fn with_room(room: usize) -> Self {
            let wire = TestWire::default();
            wire.room.store(room, Ordering::SeqCst);
            wire
        }
    }

    impl Wire for TestWire {
        fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut sent = self.sent.lock().unwrap();
            let mut n = 0;
            for part in parts {
                let take = part.len().min(room - n);
                sent.extend_from_slice(&part[..take]);
                n += take;
            }
            self.room.store(room - n, Ordering::SeqCst);
            Ok(n)
        }
        fn notify_when_writable(&self) {
            self.armed.fetch_add(1, Ordering::SeqCst);
        }
        fn shut_down_writing(&self) {
            self.shut.fetch_add(1, Ordering::SeqCst);
        }
        fn close_started(&self) {}
        fn cut(&self) {}
    }

    fn batch(ids: &[u64]) -> Arc<Batch> {
        let mut batch = Batch::default();
        for &seq in ids {
            batch.push(Some(MessageId { millis: 1, seq }), &[seq as u8; 3]);
        }
        Arc::new(batch)
    }

    #[test]
    fn a_held_outbox_queues_until_released_and_still_sends_its_close() {
        let outbox = Outbox::new(TestWire::with_room(1000), 8);
        outbox.open(b"W".to_vec(), None);
        outbox.hold();
        assert_eq!(outbox.deliver(&batch(&[1])), Pushed::Queued);
        assert_eq!(
            *outbox.wire.sent.lock().unwrap(),
            b"W",
            "held: nothing written"
        );
        outbox.release();
        assert_eq!(*outbox.wire.sent.lock().unwrap(), b"W\x01\x01\x01");

        outbox.hold();
        assert_eq!(outbox.deliver(&batch(&[2])), Pushed::Queued);
        assert_eq!(outbox.deliver(&batch(&[3])), Pushed::Queued);
        assert_eq!(
            outbox.deliver(&batch(&[4])),
            Pushed::Overflowed,
            "a held client passes its limit like one that does not read"
        );
        let sent = outbox.wire.sent.lock().unwrap().clone();
        let close = CloseReason::SLOW_CONSUMER.to_ws_bytes();
        assert!(
            sent.ends_with(&close),
            "the Close frame goes out even while held: {sent:?}"
        );
    }

    #[test]
    fn deliveries_wait_for_the_first_frames_and_skip_what_history_sent() {
        let outbox = Outbox::new(TestWire::with_room(1000), 1000);
        assert_eq!(outbox.deliver(&batch(&[1, 2])), Pushed::Queued);
        assert!(
            outbox.wire.sent.lock().unwrap().is_empty(),
            "nothing before the welcome"
        );
        outbox.open(b"W".to_vec(), Some(MessageId { millis: 1, seq: 2 }));
        assert_eq!(
            *outbox.wire.sent.lock().unwrap(),
            b"W",
            "1 and 2 came as history"
        );
        assert_eq!(outbox.deliver(&batch(&[2])), Pushed::Refused);
        assert_eq!(outbox.deliver(&batch(&[2, 3])), Pushed::Sent);
        assert_eq!(*outbox.wire.sent.lock().unwrap(), b"W\x03\x03\x03");
        assert_eq!(
            outbox.deliver(&batch(&[1])),
            Pushed::Sent,
            "past the seam, all go"
        );
    }

    #[test]
    fn a_full_socket_queues_in_order_and_the_flusher_finishes() {
        let outbox = Outbox::new(TestWire::with_room(4), 1000);
        outbox.open(Vec::new(), None);
        assert_eq!(outbox.push(b"abcdef".to_vec()), Pushed::Queued);
        assert_eq!(outbox.push(b"gh".to_vec()), Pushed::Queued);
        assert_eq!(outbox.wire.armed.load(Ordering::SeqCst), 1, "armed once");
        outbox.wire.room.store(100, Ordering::SeqCst);
        outbox.flush();
        assert_eq!(*outbox.wire.sent.lock().unwrap(), b"abcdefgh");
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn the_close_frame_is_last_and_refuses_what_follows() {
        let outbox = Outbox::new(TestWire::with_room(2), 1000);
        outbox.open(Vec::new(), None);
        outbox.push(b"abcd".to_vec());
        outbox.push(b"efgh".to_vec());
        assert!(outbox.close(CloseReason::SHUTDOWN, Queued::Drop));
        assert!(!outbox.close(CloseReason::IDLE, Queued::Drop), "one close");
        assert_eq!(outbox.push(b"late".to_vec()), Pushed::Refused);
        outbox.wire.room.store(1000, Ordering::SeqCst);
        outbox.flush();
        let sent = outbox.wire.sent.lock().unwrap().clone();
        let close = CloseReason::SHUTDOWN.to_ws_bytes();
        assert_eq!(&sent[..4], b"abcd", "the frame begun is finished");
        assert_eq!(&sent[4..], &close[..], "queued frames dropped, Close last");
        assert_eq!(outbox.wire.shut.load(Ordering::SeqCst), 1, "then the FIN");
    }

    /// A late frame whose bytes are the time on `clock` when it was made,
    /// as many times: its length changes with it.
    #[derive(Debug)]
    struct Stamped {
        seq: u64,
        clock: Arc<AtomicUsize>,
    }

    impl LateFrame for Stamped {
        fn id(&self) -> MessageId {
            MessageId {
                millis: 1,
                seq: self.seq,
            }
        }
        fn render(&self) -> WsBytes {
            let now = self.clock.load(Ordering::SeqCst);
            vec![now as u8; now].into()
        }
    }

    fn late(clock: &Arc<AtomicUsize>, ids: &[u64]) -> Vec<Box<dyn LateFrame>> {
        ids.iter()
            .map(|&seq| {
                let clock = Arc::clone(clock);
                Box::new(Stamped { seq, clock }) as Box<dyn LateFrame>
            })
            .collect()
    }

    #[test]
    fn a_late_frame_is_made_when_its_first_byte_goes_and_never_after() {
        // Full socket: queued, made (at 1) only to be counted.
        let clock = Arc::new(AtomicUsize::new(1));
        let outbox = Outbox::new(TestWire::with_room(0), 1000);
        outbox.open(Vec::new(), None);
        assert_eq!(outbox.deliver_late(late(&clock, &[1, 2])), Pushed::Queued);
        assert_eq!(outbox.queued_bytes(), 2);

        // The flusher sends at 2: both made again; the socket takes the
        // first and one byte of the second.
        clock.store(2, Ordering::SeqCst);
        outbox.wire.room.store(3, Ordering::SeqCst);
        outbox.flush();
        assert_eq!(*outbox.wire.sent.lock().unwrap(), [2, 2, 2]);
        assert_eq!(outbox.queued_bytes(), 1, "the rest of the second");

        // Queued behind it at 3; sent at 4: the begun frame keeps its
        // bytes, the new one is made again.
        clock.store(3, Ordering::SeqCst);
        assert_eq!(outbox.deliver_late(late(&clock, &[3])), Pushed::Queued);
        assert_eq!(outbox.queued_bytes(), 1 + 3);
        clock.store(4, Ordering::SeqCst);
        outbox.wire.room.store(100, Ordering::SeqCst);
        outbox.flush();
        assert_eq!(*outbox.wire.sent.lock().unwrap(), [2, 2, 2, 2, 4, 4, 4, 4]);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn late_frames_skip_what_history_sent_like_shared_ones() {
        let clock = Arc::new(AtomicUsize::new(1));
        let outbox = Outbox::new(TestWire::with_room(1000), 1000);
        assert_eq!(outbox.deliver_late(late(&clock, &[1, 2])), Pushed::Queued);
        outbox.open(b"W".to_vec(), Some(MessageId { millis: 1, seq: 2 }));
        assert_eq!(
            *outbox.wire.sent.lock().unwrap(),
            b"W",
            "1 and 2 were history"
        );
        assert_eq!(outbox.deliver_late(late(&clock, &[2])), Pushed::Refused);
        assert_eq!(outbox.deliver_late(late(&clock, &[2, 3])), Pushed::Sent);
        assert_eq!(*outbox.wire.sent.lock().unwrap(), b"W\x01");
        assert_eq!(
            outbox.deliver_late(late(&clock, &[1])),
            Pushed::Sent,
            "past the seam"
        );
    }

    #[test]
    fn passing_the_limit_closes_as_slow_consumer_but_the_close_gets_through() {
        let outbox = Outbox::new(TestWire::with_room(0), 10);
        outbox.open(Vec::new(), None);
        assert_eq!(outbox.push(vec![1; 8]), Pushed::Queued);
        assert_eq!(outbox.push(vec![2; 8]), Pushed::Overflowed);
        assert!(outbox.is_closing());
        outbox.wire.room.store(1000, Ordering::SeqCst);
        outbox.flush();
        let sent = outbox.wire.sent.lock().unwrap().clone();
        assert_eq!(sent, CloseReason::SLOW_CONSUMER.to_ws_bytes());
    }
}

/// The model test: every interleaving of deliverers, the reader, a closer
/// and the flusher, explored by loom over the real outbox, with a traced
/// client's late frame among the deliveries (never made again once begun).
/// Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};

    /// A socket that takes at most `ROOM` bytes until the peer drains it.
    struct ModelWire {
        peer: loom::sync::Mutex<(Vec<u8>, usize)>,
        writable_wanted: AtomicBool,
    }

    /// Past the first text frame (4 bytes), the socket takes the header and
    /// one byte of the next: a late frame begun is cut past its length.
    const ROOM: usize = 7;

    impl Wire for ModelWire {
        fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut peer = self.peer.lock().unwrap();
            let (received, room) = &mut *peer;
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for part in parts {
                let take = part.len().min(*room - n);
                received.extend_from_slice(&part[..take]);
                n += take;
            }
            *room -= n;
            Ok(n)
        }
        fn notify_when_writable(&self) {
            self.writable_wanted.store(true, Ordering::SeqCst);
        }
        fn shut_down_writing(&self) {}
        fn close_started(&self) {}
        fn cut(&self) {}
    }

    /// Splits what the peer received into frames: (opcode, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            assert!(bytes.len() >= 2, "a frame cut short: {bytes:?}");
            let opcode = bytes[0] & 0x0f;
            let len = usize::from(bytes[1] & 0x7f);
            assert!(
                bytes.len() >= 2 + len && [0x1, 0x8].contains(&opcode),
                "frames cut short or mixed with others: {bytes:?}"
            );
            frames.push((opcode, bytes[2..2 + len].to_vec()));
            bytes = &bytes[2 + len..];
        }
        frames
    }

    fn text(seq: u64) -> Arc<Batch> {
        let frame = crate::protocol::ws_text_frame(format!("m{seq}"));
        let mut batch = Batch::default();
        batch.push(Some(MessageId { millis: 1, seq }), &frame);
        Arc::new(batch)
    }

    /// A late frame (a traced client's) whose length changes each time it
    /// is made: `m2`, `m2.`, `m2..`... If a begun frame were made again,
    /// the peer would read the length of one and the bytes of another.
    #[derive(Debug, Default)]
    struct Remade(std::sync::atomic::AtomicUsize);

    impl LateFrame for Remade {
        fn id(&self) -> MessageId {
            MessageId { millis: 1, seq: 2 }
        }
        fn render(&self) -> WsBytes {
            let made = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::protocol::ws_text_frame(format!("m2{}", ".".repeat(made % 100)))
        }
    }

    #[test]
    fn loom_order_holds_and_the_close_frame_is_last() {
        loom::model(|| {
            let outbox = Arc::new(Outbox::new(
                ModelWire {
                    peer: loom::sync::Mutex::new((Vec::new(), ROOM)),
                    writable_wanted: AtomicBool::new(false),
                },
                1 << 20,
            ));
            outbox.open(Vec::new(), None);
            let deliverer = {
                let outbox = outbox.clone();
                loom::thread::spawn(move || {
                    outbox.deliver(&text(1));
                    outbox.deliver_late(vec![Box::new(Remade::default())]);
                })
            };
            let closer = {
                let outbox = outbox.clone();
                loom::thread::spawn(move || {
                    outbox.close(CloseReason::SHUTDOWN, Queued::Send);
                })
            };
            // The flusher: the peer reads everything, then the socket is
            // writable again.
            let flusher = {
                let outbox = outbox.clone();
                loom::thread::spawn(move || {
                    for _ in 0..2 {
                        outbox.wire.peer.lock().unwrap().1 = 64;
                        if outbox.wire.writable_wanted.swap(false, Ordering::SeqCst) {
                            outbox.flush();
                        }
                    }
                })
            };
            deliverer.join().unwrap();
            closer.join().unwrap();
            flusher.join().unwrap();
            outbox.wire.peer.lock().unwrap().1 = 1024;
            outbox.flush();

            let received = outbox.wire.peer.lock().unwrap().0.clone();
            let frames = frames(&received);
            let close_at = frames.iter().position(|(opcode, _)| *opcode == 0x8);
            assert_eq!(
                close_at,
                Some(frames.len() - 1),
                "one Close, last: {frames:?}"
            );
            // The late frame, whichever time it was made, reads as `m2`.
            let texts: Vec<_> = frames[..frames.len() - 1]
                .iter()
                .map(|(_, payload)| match payload.strip_prefix(b"m2") {
                    Some(dots) if dots.iter().all(|&b| b == b'.') => b"m2".to_vec(),
                    _ => payload.clone(),
                })
                .collect();
            let allowed: [&[&[u8]]; 3] = [&[], &[b"m1"], &[b"m1", b"m2"]];
            assert!(
                allowed
                    .iter()
                    .any(|order| texts == order.iter().map(|t| t.to_vec()).collect::<Vec<_>>()),
                "in order, each once: {texts:?}"
            );
        });
    }
}
