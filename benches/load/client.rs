//! One worker's clients: the connection, the stamped texts a sender sends,
//! and what each receiver checks and measures of every delivery.
//!
//! Every text carries `<sender>:<seq>:<send time in ns>`. The time is
//! `CLOCK_MONOTONIC`, the same clock in every process of the machine, so a
//! receiver in one worker process measures the latency of a sender in
//! another.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::layout::Layout;

type Ws = WebSocketStream<tokio::net::TcpStream>;
type WsSink = Arc<AsyncMutex<SplitSink<Ws, Message>>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const TEXT_BYTES: usize = 100;

/// Nanoseconds of `CLOCK_MONOTONIC`: senders stamp it into the text,
/// receivers (in this process or another) subtract it from their own
/// reading.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one receiver saw of one sender's stream.
#[derive(Default)]
pub struct Track {
    pub seen_any: bool,
    /// The first seq this receiver is expected to get (0, or for a client
    /// that joined while sending was on, the first it saw).
    pub start: u64,
    /// One past the highest seq seen.
    next: u64,
    /// Seqs skipped over (below `next`) and not yet received.
    missing: HashSet<u64>,
    pub unique: u64,
}

pub struct ClientStats {
    pub inst: usize,
    pub connected: bool,
    /// Joined while the senders were already sending (max-clients).
    pub late: bool,
    pub join_ns: u64,
    /// Per sender: `None` for a sender of another room, whose messages this
    /// client must never get.
    pub tracks: Vec<Option<Track>>,
    pub dup: u64,
    pub ooo: u64,
    /// Unrecognised message frames (no stamp, or no such sender).
    pub foreign: u64,
    /// Messages of a sender of another room.
    pub misrouted: u64,
    pub errors: u64,
    pub lat_same: Vec<u32>,
    pub lat_cross: Vec<u32>,
    /// Why the connection ended before we closed it.
    pub ended: Option<String>,
    /// The room's members as this client knows them (presence-join).
    pub members: Option<MemberList>,
}

/// A client's member list: its `presence` snapshot, then every `join` and
/// `leave` it got, applied idempotently (a join of someone listed, a leave
/// of someone not listed change nothing). Our clients' names are a bit
/// each; any other name is a stranger, kept by name.
pub struct MemberList {
    bits: Vec<u64>,
    /// Clients listed (bits set).
    pub count: usize,
    /// Names listed that are no client's: a complete list has none.
    pub strangers: HashSet<String>,
    pub snapshots: u64,
    /// Snapshots that left members out (`more` > 0).
    pub cut_short: u64,
    pub joins: u64,
    pub leaves: u64,
    /// Leaves with reason `expired` (an entry its instance did not refresh
    /// in time).
    pub expired: u64,
    /// Events that changed nothing (overlap with the snapshot, or repeats).
    pub no_ops: u64,
}

impl MemberList {
    fn new(clients: usize) -> Self {
        MemberList {
            bits: vec![0; clients.div_ceil(64)],
            count: 0,
            strangers: HashSet::new(),
            snapshots: 0,
            cut_short: 0,
            joins: 0,
            leaves: 0,
            expired: 0,
            no_ops: 0,
        }
    }

    /// Adds (or removes) `name`; true when that changed the list.
    fn apply(&mut self, layout: &Layout, name: &str, present: bool) -> bool {
        let Some(k) = layout.client_of(name) else {
            return if present {
                self.strangers.insert(name.to_string())
            } else {
                self.strangers.remove(name)
            };
        };
        let (word, bit) = (k / 64, 1u64 << (k % 64));
        let was = self.bits[word] & bit != 0;
        if was == present {
            return false;
        }
        self.bits[word] ^= bit;
        if present {
            self.count += 1;
        } else {
            self.count -= 1;
        }
        true
    }

    fn on_frame(&mut self, layout: &Layout, frame: PresenceFrame<'_>) {
        match frame {
            PresenceFrame::Snapshot { names, more } => {
                // A snapshot is the whole list: it replaces what was known.
                self.bits.iter_mut().for_each(|w| *w = 0);
                self.count = 0;
                self.strangers.clear();
                for name in names {
                    self.apply(layout, &name, true);
                }
                self.snapshots += 1;
                if more > 0 {
                    self.cut_short += 1;
                }
            }
            PresenceFrame::Join(name) => {
                self.joins += 1;
                if !self.apply(layout, &name, true) {
                    self.no_ops += 1;
                }
            }
            PresenceFrame::Leave(name, expired) => {
                self.leaves += 1;
                self.expired += u64::from(expired);
                if !self.apply(layout, &name, false) {
                    self.no_ops += 1;
                }
            }
        }
    }

    /// Whether the list is exactly every client's name.
    pub fn complete(&self, clients: usize) -> bool {
        self.count == clients && self.strangers.is_empty()
    }
}

/// A frame that changes a member list.
enum PresenceFrame<'a> {
    Snapshot {
        names: Vec<Cow<'a, str>>,
        more: usize,
    },
    Join(Cow<'a, str>),
    /// The name, and whether the reason is `expired`.
    Leave(Cow<'a, str>, bool),
}

#[derive(Deserialize)]
struct SnapshotWire<'a> {
    #[serde(borrow)]
    members: Vec<MemberWire<'a>>,
    #[serde(default)]
    more: usize,
}

#[derive(Deserialize)]
struct MemberWire<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct EventWire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
}

/// A `presence`, `join` or `leave` frame; `None` for anything else. The
/// server writes `type` first; the events are parsed by hand (a join storm
/// of N clients is N²/2 of them), with JSON as the fallback for a name
/// with escapes or fields in another order.
fn parse_presence(frame: &str) -> Option<PresenceFrame<'_>> {
    if frame.starts_with("{\"type\":\"presence\"") {
        let wire: SnapshotWire = serde_json::from_str(frame).ok()?;
        return Some(PresenceFrame::Snapshot {
            names: wire.members.into_iter().map(|m| m.name).collect(),
            more: wire.more,
        });
    }
    let join = frame.starts_with("{\"type\":\"join\"");
    if join || frame.starts_with("{\"type\":\"leave\"") {
        let at = frame.find("\"name\":\"")? + 8;
        let len = frame[at..].find('"')?;
        let name = &frame[at..at + len];
        if !name.contains('\\') {
            let name = Cow::Borrowed(name);
            return Some(if join {
                PresenceFrame::Join(name)
            } else {
                PresenceFrame::Leave(name, frame.contains("\"reason\":\"expired\""))
            });
        }
    } else if !frame.contains("\"type\":\"join\"") && !frame.contains("\"type\":\"leave\"") {
        return None;
    }
    let wire: EventWire = serde_json::from_str(frame).ok()?;
    match wire.kind.as_ref() {
        "join" => Some(PresenceFrame::Join(wire.name)),
        "leave" => Some(PresenceFrame::Leave(
            wire.name,
            wire.reason.as_deref() == Some("expired"),
        )),
        _ => None,
    }
}

impl ClientStats {
    pub fn new(k: usize, layout: &Layout) -> Self {
        ClientStats {
            inst: layout.instance(k),
            connected: false,
            late: false,
            join_ns: 0,
            tracks: (0..layout.senders)
                .map(|j| layout.hears(k, j).then(Track::default))
                .collect(),
            dup: 0,
            ooo: 0,
            foreign: 0,
            misrouted: 0,
            errors: 0,
            lat_same: Vec::new(),
            lat_cross: Vec::new(),
            ended: None,
            members: layout.member_lists.then(|| MemberList::new(layout.clients)),
        }
    }

    /// Records one delivery; true when it is new (not a duplicate).
    fn record(&mut self, sender: usize, seq: u64, sent_ns: u64, now: u64, same: bool) -> bool {
        let late = self.late;
        let tr = match self.tracks.get_mut(sender) {
            Some(Some(tr)) => tr,
            Some(None) => {
                self.misrouted += 1;
                return false;
            }
            None => {
                self.foreign += 1;
                return false;
            }
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

    /// Deliveries this client should have had, given how many messages each
    /// sender sent.
    pub fn expected(&self, sent: &[u64]) -> u64 {
        if !self.connected {
            return 0;
        }
        self.tracks
            .iter()
            .zip(sent)
            .map(|(tr, &s)| match tr {
                None => 0,
                Some(tr) if tr.seen_any => s.saturating_sub(tr.start),
                Some(_) if self.late => 0,
                Some(_) => s,
            })
            .sum()
    }

    pub fn unique(&self) -> u64 {
        self.tracks.iter().flatten().map(|t| t.unique).sum()
    }

    /// Whether it is meant to hear some sender but heard none.
    pub fn silent(&self) -> bool {
        let mut mine = self.tracks.iter().flatten().peekable();
        mine.peek().is_some() && mine.all(|t| !t.seen_any)
    }
}

/// Everything one worker's client tasks share.
pub struct Shared {
    pub ws: [SocketAddr; 2],
    /// The name of every room, by room number.
    pub rooms: Vec<String>,
    pub layout: Layout,
    pub conn_sem: Semaphore,
    pub conn_tx: mpsc::UnboundedSender<Result<u64, String>>,
    pub shutdown: watch::Receiver<bool>,
    pub start: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
    /// Per-sender rate, or None for as fast as possible.
    pub rate_per_sender: Option<f64>,
    pub window: usize,
    pub sending: AtomicBool,
    /// Per sender, what it sent (only this worker's senders count up).
    pub sent: Vec<AtomicU64>,
    pub unique: AtomicU64,
    pub total: AtomicU64,
    pub send_errors: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub live: AtomicUsize,
    pub active_senders: AtomicUsize,
    /// Per sender, per seq (the first `PER_MESSAGE` of each): when the first
    /// and the last receiver got it, to split latency into the path to the
    /// first receiver and the fan-out to the whole room.
    pub per_message: Vec<PerMessage>,
}

impl Shared {
    fn note_error(&self, what: String) {
        let mut e = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(what);
        }
    }
}

pub const PER_MESSAGE: usize = 1 << 16;

pub struct PerMessage {
    sent: Vec<AtomicU64>,
    first: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
}

impl PerMessage {
    pub fn new() -> Self {
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

    /// (seq, sent, first receiver, last receiver) of every message among
    /// the first `sent` seen by at least one receiver of this worker.
    pub fn seen(&self, sent: u64) -> Vec<(u64, u64, u64, u64)> {
        (0..(sent as usize).min(PER_MESSAGE))
            .filter(|&i| self.first[i].load(Ordering::Relaxed) != u64::MAX)
            .map(|i| {
                (
                    i as u64,
                    self.sent[i].load(Ordering::Relaxed),
                    self.first[i].load(Ordering::Relaxed),
                    self.last[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

async fn connect(shared: &Shared, k: usize) -> Result<Ws, String> {
    let addr = shared.ws[shared.layout.instance(k)];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let room = &shared.rooms[shared.layout.room(k)];
    let url = format!("ws://{addr}/ws?name={}&room={room}", shared.layout.name(k));
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

/// Client `k`: connects (reporting the handshake time, or the failure, on
/// `conn_tx`), starts its sender if it is one, and checks every delivery
/// until shutdown.
pub async fn client(k: usize, shared: Arc<Shared>, stats: Arc<Mutex<ClientStats>>) {
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
    let me = shared.layout.is_sender(k).then_some(k);
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
                            let same = shared.layout.instance(j) == st.inst;
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
                    } else if shared.layout.member_lists
                        && let Some(frame) = parse_presence(t)
                    {
                        let mut st = stats.lock().unwrap();
                        if let Some(list) = st.members.as_mut() {
                            list.on_frame(&shared.layout, frame);
                        }
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
                ["a", "b"][shared.layout.instance(k)]
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

/// Sender `j`: from `start` to `stop`, stamped texts at its share of the
/// rate (spread evenly over one period with the other senders), or as
/// fast as its window of unconfirmed messages allows.
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
        let offset = period.mul_f64(j as f64 / shared.layout.senders.max(1) as f64);
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
