//! A Toxiproxy-style fault proxy for the integration tests: a TCP proxy
//! between an instance and a real `redis-server` that, on request, delays,
//! stalls, throttles, resets or half-opens chosen connections, so a test
//! can make the network misbehave without root, `tc` or iptables.
//!
//! The instance is given [`FaultProxy::url`] as its Redis URL. Each of its
//! connections names itself with `CLIENT SETNAME`; the proxy learns that
//! name by reading the first bytes the client sends (it never alters or
//! delays them), and a [`Select`] picks connections by it: "the `:sub`
//! connection of instance `a`", "every connection but the publisher's".
//!
//! How faults meet:
//!
//! - Faults of different kinds compose: a chunk waits out the latency,
//!   then the bandwidth limit; a blackhole holds everything meanwhile.
//! - Of several faults of one kind on a connection, the most recently
//!   injected one wins (removing it brings back the one before).
//! - A fault counts from the moment it applies to the bytes that have not
//!   been sent yet: injecting latency also delays bytes already read,
//!   removing a fault releases held bytes within a few milliseconds.
//!
//! Names and scope:
//!
//! - A connection with no name yet matches [`Select::All`], [`Select::Id`],
//!   and a [`Select::Not`] of a name selector; never a name selector.
//! - [`Scope::OpenNow`] picks its connections once, when injected.
//!   [`Scope::AlsoNew`] applies to whatever matches, for as long as the
//!   fault lasts: connections opened later, and connections named later.
//! - The bytes a connection sends before its name is known (its `AUTH`,
//!   the `SETNAME` itself) are not subject to name-selected faults; every
//!   byte read from either side after that is, the reply to the `SETNAME`
//!   included. So a connection caught by a sticky name-selected blackhole
//!   reaches Redis with its name, and then hears nothing more, not even
//!   the `+OK`. A sticky fault that holds unnamed connections (`All`, or
//!   `Not` of a name selector) still lets the proxy read up to the first
//!   4 KiB from the client, holding them from Redis, so it can learn the
//!   name; if the name shows the fault does not apply, the bytes go.
//!
//! Each connection runs on four small threads (a reader and a writer per
//! direction) that share one lock; none sleeps more than [`WAKE_INTERVAL`]
//! without looking again, so removals, resets and the proxy's drop act at
//! once. Linux only (the tests run there): the RST of [`FaultProxy::reset`]
//! and the shut-down listener rely on Linux's behaviour.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

/// How many of the first bytes a client sends are searched for its
/// `CLIENT SETNAME`.
const SNIFF_WINDOW: usize = 4096;

/// The most one read takes from a socket.
const READ_CHUNK: usize = 16 * 1024;

/// How many bytes a direction may hold (delayed or throttled) before the
/// proxy stops reading that side, so a slow link pushes back on the sender
/// as TCP would rather than buffering without end.
const MAX_QUEUED: usize = 256 * 1024;

/// The longest any proxy thread waits before looking at its state again:
/// a safety net under the condvar notifications, and the bound on how long
/// a writer stuck on a peer that does not read takes to notice a reset.
const WAKE_INTERVAL: Duration = Duration::from_millis(20);

/// How long the proxy waits for Redis to accept a connection it forwards.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`FaultProxy::reset`] waits for a connection's threads to let
/// go of its sockets (the last close is what sends the RST).
const RESET_WAIT: Duration = Duration::from_secs(1);

/// The proxy's threads only copy bytes through heap buffers.
const THREAD_STACK: usize = 64 * 1024;

/// Connection ids are unique in the whole test process, so a thread's name
/// (`proxy-<id>-up-read`) says which connection it serves even with several
/// proxies running.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A proxy on a free loopback port that forwards every connection to one
/// upstream address, applying the faults it is told to. Dropping it closes
/// its port and every connection through it.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    /// A handle on the accept thread's listening socket, to shut it down.
    listener: TcpListener,
}

/// Which connections an operation acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every connection, named or not.
    All,
    /// The connection with this [`ConnectionInfo::id`].
    Id(u64),
    /// Connections whose name ends with this (`":sub"`).
    NameEndsWith(String),
    /// Connections whose name contains this (`":a:"`: instance `a`'s).
    NameContains(String),
    /// Connections the inner selector does not match (so a connection with
    /// no name yet matches `Not` of any name selector). `!select` builds one.
    Not(Box<Select>),
}

impl Select {
    /// Connections whose name ends with `suffix`.
    pub fn name_ends_with(suffix: &str) -> Select {
        Select::NameEndsWith(suffix.to_string())
    }

    /// Connections whose name contains `part`.
    pub fn name_contains(part: &str) -> Select {
        Select::NameContains(part.to_string())
    }

    fn matches(&self, id: u64, name: Option<&str>) -> bool {
        match self {
            Select::All => true,
            Select::Id(wanted) => *wanted == id,
            Select::NameEndsWith(suffix) => name.is_some_and(|n| n.ends_with(suffix.as_str())),
            Select::NameContains(part) => name.is_some_and(|n| n.contains(part.as_str())),
            Select::Not(inner) => !inner.matches(id, name),
        }
    }
}

impl std::ops::Not for Select {
    type Output = Select;

    /// `!Select::name_ends_with(":pub")`: every connection but those.
    fn not(self) -> Select {
        Select::Not(Box::new(self))
    }
}

/// Which connections a fault covers beyond those open when it is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the connections open and matching when it is injected.
    OpenNow,
    /// Also every connection that comes to match later (opened, or named,
    /// after it), until the fault is removed.
    AlsoNew,
}

/// What happens to the bytes of the connections a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every chunk is forwarded this long after it was read, in both
    /// directions, order kept. Chunks read in a stream each wait from their
    /// own arrival: the delay stays this, it does not add up.
    Latency(Duration),
    /// Nothing is forwarded in either direction, and nothing is lost: the
    /// proxy stops reading (so TCP buffers fill as in a real partition),
    /// and what it holds flows again, complete and in order, once the fault
    /// is removed, as after a partition heals. The connection stays open,
    /// and a side's FIN waits behind the bytes it sent before.
    Blackhole,
    /// At most this many bytes per second in each direction (a token
    /// bucket holding 50 ms of traffic; chunks may be split). `0` lets
    /// nothing through.
    Bandwidth(u64),
    /// On top of any [`Latency`](Fault::Latency), every chunk waits a
    /// random share of this (uniform, drawn when it is read), in both
    /// directions. Order is kept: a chunk never overtakes one read before
    /// it, so a long draw also holds the chunks behind it (as TCP's
    /// in-order delivery would).
    Jitter(Duration),
}

/// What [`FaultProxy::inject`] returns, to [`remove`](FaultProxy::remove)
/// that fault with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// Where a connection through the proxy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Both sides connected through the proxy (one may have sent its FIN).
    Open,
    /// [`FaultProxy::half_open`]: Redis's side closed, the client's open
    /// and silent.
    HalfOpen,
    /// Over: closed by both sides, reset, or ended with the proxy.
    Closed,
}

/// One connection the proxy has accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Unique in the test process; [`Select::Id`] picks it.
    pub id: u64,
    /// Its `CLIENT SETNAME` name, once the proxy has seen it.
    pub name: Option<String>,
    /// Where it stood when this was taken.
    pub state: ConnectionState,
}

impl ConnectionInfo {
    /// Whether both sides were still connected through the proxy.
    pub fn is_open(&self) -> bool {
        self.state == ConnectionState::Open
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:<free port>` and forwards every accepted
    /// connection to `upstream` (a client whose upstream connection fails
    /// is reset).
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::bind(([127, 0, 0, 1], 0).into(), upstream)
            .unwrap_or_else(|e| panic!("fault proxy: cannot listen on 127.0.0.1: {e}"))
    }

    /// Listens on `listen` (port 0: a free one) and forwards every
    /// accepted connection to `upstream`: what `examples/fault_proxy.rs`
    /// runs between two hosts.
    pub fn bind(listen: SocketAddr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen)?;
        let port = listener.local_addr()?.port();
        let control = listener.try_clone()?;
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        thread::Builder::new()
            .name("proxy-accept".into())
            .stack_size(THREAD_STACK)
            .spawn(move || accept_loop(&accepting, &listener, upstream))?;
        Ok(FaultProxy {
            port,
            shared,
            listener: control,
        })
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`: the Redis URL to give an instance.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://:<password>@127.0.0.1:<port>`, for an upstream that wants a
    /// password (`RedisServer::start_with_password`).
    pub fn url_with_password(&self, password: &str) -> String {
        format!("redis://:{password}@127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the connections `select` picks: those open now
    /// and, with [`Scope::AlsoNew`], those that come to match later, until
    /// it is removed. See the module documentation for how faults combine.
    pub fn inject(&self, select: Select, fault: Fault, scope: Scope) -> FaultId {
        let mut state = self.shared.lock();
        state.next_fault_id += 1;
        let id = FaultId(state.next_fault_id);
        let applies = match scope {
            Scope::OpenNow => Applies::Fixed(
                state
                    .links
                    .iter()
                    .filter(|(id, link)| {
                        link.state == ConnectionState::Open
                            && select.matches(**id, link.name.as_deref())
                    })
                    .map(|(id, _)| *id)
                    .collect(),
            ),
            Scope::AlsoNew => Applies::Matching(select),
        };
        state.faults.push(ActiveFault { id, fault, applies });
        state.wake_links();
        id
    }

    /// Removes one fault (a no-op if it is gone already); bytes it held
    /// flow again at once.
    pub fn remove(&self, id: FaultId) {
        let mut state = self.shared.lock();
        state.faults.retain(|fault| fault.id != id);
        state.wake_links();
    }

    /// Removes every fault; held bytes flow again at once.
    pub fn heal(&self) {
        let mut state = self.shared.lock();
        state.faults.clear();
        state.wake_links();
    }

    /// Resets the selected connections (open or half-open) on both sides at
    /// once: an RST (`SO_LINGER` 0) to the client and to Redis, whatever
    /// either was sending. Returns when the RSTs are out (or after a second
    /// at most), with how many connections it reset.
    pub fn reset(&self, select: Select) -> usize {
        let mut state = self.shared.lock();
        let reset: Vec<(u64, Arc<Link>)> = state
            .links
            .iter_mut()
            .filter(|(id, link)| {
                link.state != ConnectionState::Closed && select.matches(**id, link.name.as_deref())
            })
            .filter_map(|(id, link)| Some((*id, abort(link)?)))
            .collect();
        self.shared.changed.notify_all();
        // The RST goes out with the last close of each socket: wait until
        // the connections' threads have let go of theirs, then let go of
        // these.
        let deadline = Instant::now() + RESET_WAIT;
        while reset.iter().any(|(id, _)| {
            state
                .links
                .get(id)
                .is_some_and(|link| link.live_threads > 0)
        }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.wait_changed(state, left);
        }
        drop(state);
        reset.len()
    }

    /// Half-opens the selected open connections, as when a client's host
    /// vanishes: the Redis side is closed (a FIN, so Redis sees the client
    /// leave), while the client side stays open and silent: no FIN, no RST,
    /// no byte; whatever the client still sends is read and discarded.
    /// Bytes the proxy held for either side are dropped. Returns how many.
    pub fn half_open(&self, select: Select) -> usize {
        let mut state = self.shared.lock();
        let mut count = 0;
        for (id, link) in state.links.iter_mut() {
            if link.state != ConnectionState::Open || !select.matches(*id, link.name.as_deref()) {
                continue;
            }
            let Some(sockets) = &link.sockets else {
                continue;
            };
            link.state = ConnectionState::HalfOpen;
            link.up.clear();
            link.down.clear();
            sockets.half_open.store(true, Ordering::Relaxed);
            // Shutting down (unlike closing) acts at once, whichever
            // thread still holds the socket.
            let _ = sockets.upstream.shutdown(Shutdown::Both);
            sockets.wake.notify_all();
            count += 1;
        }
        self.shared.changed.notify_all();
        count
    }

    /// Every connection seen so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared.lock().infos()
    }

    /// Waits until an open connection that `select` matches exists, and
    /// returns it; panics, listing the connections seen, after `timeout`.
    pub fn wait_for(&self, select: &Select, timeout: Duration) -> ConnectionInfo {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some((id, link)) = state.links.iter().find(|(id, link)| {
                link.state == ConnectionState::Open && select.matches(**id, link.name.as_deref())
            }) {
                return link.info(*id);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let seen = state.infos();
                drop(state);
                panic!(
                    "fault proxy on port {}: no open connection matching {select:?} within \
                     {timeout:?}; connections seen: {seen:#?}",
                    self.port
                );
            }
            state = self.shared.wait_changed(state, left);
        }
    }
}

impl Drop for FaultProxy {
    /// Closes the port and every connection (a FIN to both sides). The
    /// threads end on their own within [`WAKE_INTERVAL`].
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.stopped = true;
        state.faults.clear();
        for link in state.links.values_mut() {
            if let Some(sockets) = link.sockets.take() {
                sockets.stop.store(true, Ordering::Relaxed);
                let _ = sockets.client.shutdown(Shutdown::Both);
                let _ = sockets.upstream.shutdown(Shutdown::Both);
                sockets.wake.notify_all();
            }
            link.state = ConnectionState::Closed;
            link.up.clear();
            link.down.clear();
        }
        // On Linux a listening socket shut down refuses connections at once
        // and fails the accept the accept thread is blocked in.
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Read);
        self.shared.changed.notify_all();
    }
}

/// What the proxy's threads share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified when a connection opens, is named, or changes state.
    changed: Condvar,
}

impl Shared {
    /// The state, even if a proxy thread panicked holding it (the state
    /// stays consistent between statements; the panic is reported anyway).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_changed<'a>(
        &self,
        state: MutexGuard<'a, State>,
        most: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(state, most.min(WAKE_INTERVAL)) {
            Ok((state, _)) => state,
            Err(e) => e.into_inner().0,
        }
    }
}

#[derive(Default)]
struct State {
    /// The proxy was dropped.
    stopped: bool,
    next_fault_id: u64,
    /// In the order injected: later ones win over earlier ones.
    faults: Vec<ActiveFault>,
    links: BTreeMap<u64, LinkState>,
}

impl State {
    /// Has every connection look at the faults again.
    fn wake_links(&self) {
        for link in self.links.values() {
            if let Some(sockets) = &link.sockets {
                sockets.wake.notify_all();
            }
        }
    }

    fn infos(&self) -> Vec<ConnectionInfo> {
        self.links.iter().map(|(id, link)| link.info(*id)).collect()
    }

    /// What the faults do now to a chunk of connection `id`, whose name is
    /// `name` (`None`: not known yet). A chunk `read_before_name` is
    /// subject only to the sticky faults that matched the connection then,
    /// unnamed, and still match it now: a name selector never catches it,
    /// and `!Select::name_ends_with(":pub")` lets a `:pub` connection's
    /// `SETNAME` go once it is read.
    fn effect(&self, id: u64, name: Option<&str>, read_before_name: bool) -> Effect {
        let mut effect = Effect::default();
        for active in &self.faults {
            let applies = match &active.applies {
                Applies::Fixed(ids) => ids.contains(&id),
                Applies::Matching(select) => {
                    select.matches(id, name) && (!read_before_name || select.matches(id, None))
                }
            };
            if !applies {
                continue;
            }
            match active.fault {
                Fault::Blackhole => effect.blackhole = true,
                Fault::Latency(delay) => effect.latency = delay,
                Fault::Bandwidth(rate) => effect.bandwidth = Some(rate),
                Fault::Jitter(spread) => effect.jitter = spread,
            }
        }
        effect
    }
}

struct ActiveFault {
    id: FaultId,
    fault: Fault,
    applies: Applies,
}

enum Applies {
    /// [`Scope::OpenNow`]: the connections picked when it was injected.
    Fixed(HashSet<u64>),
    /// [`Scope::AlsoNew`]: whatever matches at the time.
    Matching(Select),
}

/// The faults on one chunk, combined.
#[derive(Default)]
struct Effect {
    blackhole: bool,
    latency: Duration,
    jitter: Duration,
    bandwidth: Option<u64>,
}

/// The two sockets of a connection, shared by its four threads (and by the
/// state, until the connection is over). They close when the last holder
/// lets go.
struct Link {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
    /// Notified on anything the connection's threads may wait for: bytes
    /// queued or sent, a fault changed, the connection reset.
    wake: Condvar,
    /// Reset, failed, or the proxy dropped: every thread ends, sending
    /// nothing more.
    stop: AtomicBool,
    /// [`FaultProxy::half_open`]: nothing more is sent either way.
    half_open: AtomicBool,
}

impl Link {
    fn source(&self, direction: Direction) -> &TcpStream {
        match direction {
            Direction::Up => &self.client,
            Direction::Down => &self.upstream,
        }
    }

    fn destination(&self, direction: Direction) -> &TcpStream {
        match direction {
            Direction::Up => &self.upstream,
            Direction::Down => &self.client,
        }
    }

    /// Waits for a notification, or `most` (never more than
    /// [`WAKE_INTERVAL`]).
    fn wait<'a>(&self, state: MutexGuard<'a, State>, most: Duration) -> MutexGuard<'a, State> {
        match self.wake.wait_timeout(state, most.min(WAKE_INTERVAL)) {
            Ok((state, _)) => state,
            Err(e) => e.into_inner().0,
        }
    }
}

/// The proxy's record of one connection.
struct LinkState {
    name: Option<String>,
    state: ConnectionState,
    sniffer: NameSniffer,
    /// Client to Redis.
    up: Flow,
    /// Redis to client.
    down: Flow,
    /// The connection's threads still running.
    live_threads: usize,
    /// Until the connection is over.
    sockets: Option<Arc<Link>>,
}

impl LinkState {
    fn info(&self, id: u64) -> ConnectionInfo {
        ConnectionInfo {
            id,
            name: self.name.clone(),
            state: self.state,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to Redis.
    Up,
    /// Redis to client.
    Down,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// The bytes of one direction read and not yet sent.
#[derive(Default)]
struct Flow {
    queue: VecDeque<Chunk>,
    queued_bytes: usize,
    /// When the source's FIN was read, and whether before the name was
    /// known (it comes after the queued bytes, and waits out the faults
    /// like them).
    eof: Option<(Instant, bool)>,
    /// The FIN has been passed on.
    done: bool,
    bucket: Option<Bucket>,
}

impl Flow {
    fn clear(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
    }

    /// Takes the next bytes to send from the head chunk: all of it, or as
    /// much as `bandwidth` allows now; or says how long to wait for more
    /// tokens.
    fn take(&mut self, bandwidth: Option<u64>, now: Instant) -> Result<Vec<u8>, Duration> {
        let Some(head) = self.queue.front_mut() else {
            return Err(WAKE_INTERVAL);
        };
        let count = match bandwidth {
            None => {
                self.bucket = None;
                head.bytes.len()
            }
            Some(rate) => {
                if self.bucket.as_ref().is_some_and(|b| b.rate != rate) {
                    self.bucket = None;
                }
                let bucket = self.bucket.get_or_insert_with(|| Bucket::new(rate, now));
                bucket.allow(head.bytes.len(), now)?
            }
        };
        let bytes = if count >= head.bytes.len() {
            std::mem::take(&mut head.bytes)
        } else {
            let rest = head.bytes.split_off(count);
            std::mem::replace(&mut head.bytes, rest)
        };
        if head.bytes.is_empty() {
            self.queue.pop_front();
        }
        self.queued_bytes -= bytes.len();
        Ok(bytes)
    }
}

/// What one read gave.
struct Chunk {
    bytes: Vec<u8>,
    /// Latency counts from here.
    read_at: Instant,
    /// Read before the connection's name was known: see [`State::effect`].
    before_name: bool,
    /// The share of [`Fault::Jitter`] it waits, in `[0, 1)`.
    draw: f64,
}

/// A uniform draw in `[0, 1)` for [`Fault::Jitter`]: splitmix64 over a
/// counter seeded from the clock (no random crate needed, none wanted:
/// the spread matters, not its quality).
fn jitter_draw() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if seed == 0 {
        seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        STATE.store(seed, Ordering::Relaxed);
    }
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A token bucket for [`Fault::Bandwidth`].
struct Bucket {
    /// Bytes per second.
    rate: u64,
    tokens: f64,
    refilled_at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let mut bucket = Bucket {
            rate,
            tokens: 0.0,
            refilled_at: now,
        };
        if rate > 0 {
            bucket.tokens = bucket.capacity();
        }
        bucket
    }

    /// 50 ms of traffic: enough for writes of a useful size, small enough
    /// for a steady rate.
    fn capacity(&self) -> f64 {
        (self.rate as f64 / 20.0).max(1.0)
    }

    /// How many of `wanted` bytes may go now, or how long until a
    /// worthwhile share (a full chunk, or a full bucket) may.
    fn allow(&mut self, wanted: usize, now: Instant) -> Result<usize, Duration> {
        let rate = self.rate as f64;
        let capacity = self.capacity();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.refilled_at = now;
        let worthwhile = (wanted as f64).min(capacity);
        if self.tokens < worthwhile {
            if self.rate == 0 {
                return Err(WAKE_INTERVAL);
            }
            let wait = Duration::from_secs_f64((worthwhile - self.tokens) / rate);
            return Err(wait.max(Duration::from_millis(1)));
        }
        let count = (self.tokens.floor() as usize).clamp(1, wanted);
        self.tokens -= count as f64;
        Ok(count)
    }
}

/// Accepts connections until the proxy is dropped.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener, upstream: SocketAddr) {
    loop {
        let accepted = listener.accept();
        if shared.lock().stopped {
            return;
        }
        match accepted {
            Ok((client, _)) => open_link(shared, client, upstream),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of file descriptors and the like: try again shortly.
            Err(_) => thread::sleep(WAKE_INTERVAL),
        }
    }
}

/// Connects `client` to `upstream` and starts the connection's threads.
fn open_link(shared: &Arc<Shared>, client: TcpStream, upstream: SocketAddr) {
    let upstream = match TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT)
        .and_then(|upstream| prepare(&client).and(prepare(&upstream)).map(|()| upstream))
    {
        Ok(upstream) => upstream,
        Err(_) => {
            // Redis is down: a reset is as near as a proxy gets to the
            // refused connection the client would have had.
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    let link = Arc::new(Link {
        id,
        client,
        upstream,
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        half_open: AtomicBool::new(false),
    });
    let threads = [
        (Direction::Up, Role::Read),
        (Direction::Up, Role::Write),
        (Direction::Down, Role::Read),
        (Direction::Down, Role::Write),
    ];
    {
        let mut state = shared.lock();
        if state.stopped {
            return;
        }
        state.links.insert(
            id,
            LinkState {
                name: None,
                state: ConnectionState::Open,
                sniffer: NameSniffer::default(),
                up: Flow::default(),
                down: Flow::default(),
                live_threads: threads.len(),
                sockets: Some(link.clone()),
            },
        );
        shared.changed.notify_all();
    }
    for (direction, role) in threads {
        if let Err(e) = spawn_link_thread(shared, &link, direction, role) {
            eprintln!("fault proxy: cannot start a thread for connection {id}: {e}");
            if let Some(state) = shared.lock().links.get_mut(&id) {
                abort(state);
            }
            return;
        }
    }
}

/// No Nagle delay of the proxy's own; and writes that give up after
/// [`WAKE_INTERVAL`], so a writer stuck on a peer that does not read still
/// notices a reset.
fn prepare(socket: &TcpStream) -> io::Result<()> {
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(WAKE_INTERVAL))
}

/// Ends a connection with RSTs: `SO_LINGER` 0 on both sockets, whose last
/// close then resets; wakes its threads (a read-side shutdown sends nothing
/// on Linux) so they let go at once. Returns the state's hold on the
/// sockets, for the caller to drop when it likes.
fn abort(link: &mut LinkState) -> Option<Arc<Link>> {
    link.state = ConnectionState::Closed;
    link.up.clear();
    link.down.clear();
    let sockets = link.sockets.take()?;
    sockets.stop.store(true, Ordering::Relaxed);
    for socket in [&sockets.client, &sockets.upstream] {
        let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
        let _ = socket.shutdown(Shutdown::Read);
    }
    sockets.wake.notify_all();
    Some(sockets)
}

#[derive(Clone, Copy)]
enum Role {
    Read,
    Write,
}

/// One of a connection's threads: on its end, however it ends, it lets go
/// of the sockets and then counts itself out.
struct LinkThread {
    shared: Arc<Shared>,
    link: Option<Arc<Link>>,
}

impl Drop for LinkThread {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        let id = link.id;
        drop(link);
        let mut state = self.shared.lock();
        if let Some(record) = state.links.get_mut(&id) {
            record.live_threads = record.live_threads.saturating_sub(1);
            if record.live_threads == 0 {
                record.state = ConnectionState::Closed;
                record.sockets = None;
            }
        }
        self.shared.changed.notify_all();
    }
}

fn spawn_link_thread(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    direction: Direction,
    role: Role,
) -> io::Result<()> {
    let name = match role {
        Role::Read => format!("proxy-{}-{}-read", link.id, direction.label()),
        Role::Write => format!("proxy-{}-{}-write", link.id, direction.label()),
    };
    // If the spawn fails, the closure, and with it the guard, is dropped:
    // the thread counts itself out all the same.
    let guard = LinkThread {
        shared: shared.clone(),
        link: Some(link.clone()),
    };
    thread::Builder::new()
        .name(name)
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let guard = guard;
            if let Some(link) = &guard.link {
                match role {
                    Role::Read => read_side(&guard.shared, link, direction),
                    Role::Write => write_side(&guard.shared, link, direction),
                }
            }
        })
        .map(drop)
}

/// Reads one direction's source into its queue (and, client to Redis,
/// past the name sniffer) until the source closes or the connection ends.
fn read_side(shared: &Shared, link: &Link, direction: Direction) {
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        let Some(limit) = wait_to_read(shared, link, direction) else {
            return;
        };
        let mut source = link.source(direction);
        let result = source.read(&mut buffer[..limit]);
        let read_at = Instant::now();
        let mut state = shared.lock();
        if link.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(record) = state.links.get_mut(&link.id) else {
            return;
        };
        let half_open = record.state == ConnectionState::HalfOpen;
        match result {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The client of a half-open connection is heard out, unanswered.
            Ok(count) if count > 0 && half_open && direction == Direction::Up => {}
            Ok(count) if count > 0 && record.state == ConnectionState::Open => {
                let bytes = &buffer[..count];
                let before_name = record.name.is_none();
                if direction == Direction::Up
                    && let Some(name) = record.sniffer.feed(bytes)
                {
                    record.name = Some(name);
                    shared.changed.notify_all();
                }
                let flow = match direction {
                    Direction::Up => &mut record.up,
                    Direction::Down => &mut record.down,
                };
                flow.queue.push_back(Chunk {
                    bytes: bytes.to_vec(),
                    read_at,
                    before_name,
                    draw: jitter_draw(),
                });
                flow.queued_bytes += count;
                link.wake.notify_all();
            }
            // Redis's side of a half-open connection, shut down: done.
            _ if half_open && direction == Direction::Down => return,
            Ok(0) if record.state == ConnectionState::Open => {
                // A FIN: the writer passes it on after the bytes before it.
                let eof = Some((read_at, record.name.is_none()));
                match direction {
                    Direction::Up => record.up.eof = eof,
                    Direction::Down => record.down.eof = eof,
                }
                link.wake.notify_all();
                return;
            }
            _ if half_open => {
                // The client of a half-open connection left at last.
                record.state = ConnectionState::Closed;
                record.sockets = None;
                shared.changed.notify_all();
                return;
            }
            // A reset (or another failure) of one side resets the other.
            Err(_) if record.state == ConnectionState::Open => {
                drop(abort(record));
                shared.changed.notify_all();
                return;
            }
            _ => return,
        }
    }
}

/// Waits until the reader of `direction` may read; returns how many bytes
/// it may take, or `None` when it is to end.
fn wait_to_read(shared: &Shared, link: &Link, direction: Direction) -> Option<usize> {
    let mut state = shared.lock();
    loop {
        if state.stopped || link.stop.load(Ordering::Relaxed) {
            return None;
        }
        let record = state.links.get(&link.id)?;
        match (record.state, direction) {
            (ConnectionState::Open, _) => {}
            (ConnectionState::HalfOpen, Direction::Up) => return Some(READ_CHUNK),
            _ => return None,
        }
        let flow = match direction {
            Direction::Up => &record.up,
            Direction::Down => &record.down,
        };
        if flow.queued_bytes < MAX_QUEUED {
            let next_read_before_name = record.name.is_none();
            let effect = state.effect(link.id, record.name.as_deref(), next_read_before_name);
            if !effect.blackhole {
                return Some(READ_CHUNK);
            }
            // Blackholed: read nothing, so the sender's buffers fill as in
            // a partition; except what may still name an unnamed
            // connection, which is read (and held) so a sticky
            // name-selected fault can find it.
            let sniffable = match direction {
                Direction::Up if record.name.is_none() => record.sniffer.window_left(),
                _ => 0,
            };
            if sniffable > 0 {
                return Some(sniffable.min(READ_CHUNK));
            }
        }
        state = link.wait(state, WAKE_INTERVAL);
    }
}

/// Sends one direction's queue to its destination as the faults allow,
/// then passes its FIN on.
fn write_side(shared: &Shared, link: &Link, direction: Direction) {
    while let Some(bytes) = next_to_send(shared, link, direction) {
        if send_all(link, link.destination(direction), &bytes).is_err() {
            let mut state = shared.lock();
            if let Some(record) = state.links.get_mut(&link.id)
                && record.state == ConnectionState::Open
                && !link.stop.load(Ordering::Relaxed)
            {
                // A side that refuses bytes (reset, gone) resets the other.
                drop(abort(record));
                shared.changed.notify_all();
            }
            return;
        }
    }
}

/// Waits until the head of the queue may go (faults permitting) and takes
/// it; or passes the FIN on and returns `None` when the source has closed
/// and everything before has gone; `None` too when the connection ends.
fn next_to_send(shared: &Shared, link: &Link, direction: Direction) -> Option<Vec<u8>> {
    let mut state = shared.lock();
    loop {
        if state.stopped || link.stop.load(Ordering::Relaxed) {
            return None;
        }
        let record = state.links.get(&link.id)?;
        if record.state != ConnectionState::Open {
            return None;
        }
        let flow = match direction {
            Direction::Up => &record.up,
            Direction::Down => &record.down,
        };
        // The next thing to send: the head chunk, or else the FIN.
        let (read_at, before_name, draw) = match (flow.queue.front(), flow.eof) {
            (Some(head), _) => (head.read_at, head.before_name, head.draw),
            (None, Some((read_at, before_name))) => (read_at, before_name, 0.0),
            (None, None) => {
                state = link.wait(state, WAKE_INTERVAL);
                continue;
            }
        };
        let fin_next = flow.queue.is_empty();
        let effect = state.effect(link.id, record.name.as_deref(), before_name);
        let now = Instant::now();
        let due = read_at + effect.latency + effect.jitter.mul_f64(draw);
        let wait = if effect.blackhole {
            // Held: the fault's removal wakes this thread.
            WAKE_INTERVAL
        } else if now < due {
            due - now
        } else if fin_next {
            pass_fin_on(shared, &mut state, link, direction);
            return None;
        } else {
            let record = state.links.get_mut(&link.id)?;
            let flow = match direction {
                Direction::Up => &mut record.up,
                Direction::Down => &mut record.down,
            };
            match flow.take(effect.bandwidth, now) {
                Ok(bytes) => {
                    // The reader may be waiting for room.
                    link.wake.notify_all();
                    return Some(bytes);
                }
                Err(until_tokens) => until_tokens,
            }
        };
        state = link.wait(state, wait);
    }
}

/// Shuts down the write side of `direction`'s destination (its source
/// closed, and every byte before has gone); the connection is over once
/// both directions have.
fn pass_fin_on(shared: &Shared, state: &mut State, link: &Link, direction: Direction) {
    let _ = link.destination(direction).shutdown(Shutdown::Write);
    let Some(record) = state.links.get_mut(&link.id) else {
        return;
    };
    match direction {
        Direction::Up => record.up.done = true,
        Direction::Down => record.down.done = true,
    }
    if record.up.done && record.down.done {
        record.state = ConnectionState::Closed;
        record.sockets = None;
        shared.changed.notify_all();
    }
}

/// Writes all of `bytes`, unless the connection is reset or half-opened
/// meanwhile (then the rest is dropped).
fn send_all(link: &Link, mut destination: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        if link.stop.load(Ordering::Relaxed) || link.half_open.load(Ordering::Relaxed) {
            return Ok(());
        }
        match destination.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            // The write timeout: the peer is not reading; look again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the first [`SNIFF_WINDOW`] bytes a client sends as RESP commands,
/// looking for `CLIENT SETNAME <name>` (or `HELLO ... SETNAME <name>`),
/// whatever commands come before it (`AUTH`, `SELECT`, `CLIENT SETINFO`)
/// and however the bytes are split between reads.
#[derive(Default)]
struct NameSniffer {
    bytes: Vec<u8>,
    /// Where the next command starts in `bytes`.
    parsed: usize,
    /// Found a name, gave up, or read the whole window.
    done: bool,
}

impl NameSniffer {
    /// How many more bytes it would look at.
    fn window_left(&self) -> usize {
        if self.done {
            0
        } else {
            SNIFF_WINDOW - self.bytes.len()
        }
    }

    /// Takes the next bytes the client sent; returns the name once a whole
    /// naming command has arrived.
    fn feed(&mut self, chunk: &[u8]) -> Option<String> {
        let take = chunk.len().min(self.window_left());
        if take == 0 {
            return None;
        }
        self.bytes.extend_from_slice(&chunk[..take]);
        loop {
            match parse_command(&self.bytes[self.parsed..]) {
                Parsed::Command { args, length } => {
                    self.parsed += length;
                    if let Some(name) = name_set_by(&args) {
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.finish();
                        return Some(name);
                    }
                }
                Parsed::Incomplete => {
                    if self.bytes.len() >= SNIFF_WINDOW {
                        self.finish();
                    }
                    return None;
                }
                Parsed::NotResp => {
                    self.finish();
                    return None;
                }
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.bytes = Vec::new();
        self.parsed = 0;
    }
}

/// The name a command gives its connection, if it is `CLIENT SETNAME
/// <name>` or `HELLO ... SETNAME <name>` with a non-empty name.
fn name_set_by<'a>(args: &[&'a [u8]]) -> Option<&'a [u8]> {
    let name = match args {
        [client, setname, name]
            if client.eq_ignore_ascii_case(b"CLIENT")
                && setname.eq_ignore_ascii_case(b"SETNAME") =>
        {
            *name
        }
        [hello, rest @ ..] if hello.eq_ignore_ascii_case(b"HELLO") => rest
            .windows(2)
            .find(|pair| pair[0].eq_ignore_ascii_case(b"SETNAME"))
            .map(|pair| pair[1])?,
        _ => return None,
    };
    (!name.is_empty()).then_some(name)
}

enum Parsed<'a> {
    /// A whole command: its arguments, and how many bytes it took.
    Command { args: Vec<&'a [u8]>, length: usize },
    /// The start of a command; the rest has not arrived yet.
    Incomplete,
    /// Not RESP a client would send: stop looking.
    NotResp,
}

/// One command from the start of `bytes`: an array of bulk strings
/// (`*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n`), or an inline command (`PING\r\n`),
/// passed over whole.
fn parse_command(bytes: &[u8]) -> Parsed<'_> {
    match bytes.first() {
        None => return Parsed::Incomplete,
        Some(b'*') => {}
        Some(_) => {
            return match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => Parsed::Command {
                    args: Vec::new(),
                    length: end + 1,
                },
                None => Parsed::Incomplete,
            };
        }
    }
    let mut at = 0;
    let count = match read_length(bytes, &mut at, b'*') {
        Ok(count) => count,
        Err(parsed) => return parsed,
    };
    let mut args = Vec::with_capacity(count.min(8));
    for _ in 0..count {
        let length = match read_length(bytes, &mut at, b'$') {
            Ok(length) => length,
            Err(parsed) => return parsed,
        };
        let end = at + length;
        match bytes.get(end..end + 2) {
            None => return Parsed::Incomplete,
            Some(b"\r\n") => {}
            Some(_) => return Parsed::NotResp,
        }
        args.push(&bytes[at..end]);
        at = end + 2;
    }
    Parsed::Command { args, length: at }
}

/// Reads `<marker><digits>\r\n` at `*at` and moves past it. A length too
/// big to fit the sniffing window is as good as not RESP.
fn read_length(bytes: &[u8], at: &mut usize, marker: u8) -> Result<usize, Parsed<'static>> {
    let rest = &bytes[*at..];
    match rest.first() {
        None => return Err(Parsed::Incomplete),
        Some(&first) if first == marker => {}
        Some(_) => return Err(Parsed::NotResp),
    }
    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
        return Err(if rest.len() < 8 {
            Parsed::Incomplete
        } else {
            Parsed::NotResp
        });
    };
    let length = std::str::from_utf8(&rest[1..end])
        .ok()
        .and_then(|digits| digits.parse::<usize>().ok())
        .filter(|&length| length <= SNIFF_WINDOW)
        .ok_or(Parsed::NotResp)?;
    *at += end + 2;
    Ok(length)
}
