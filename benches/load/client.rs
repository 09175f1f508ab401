//! One worker's clients: the connection, the stamped texts a sender sends,
//! what each receiver checks and measures of every delivery, and its
//! presence frames (counted, and applied to its view of the room: see
//! `members.rs`). A connection's life is `session`, which a churner
//! (`churn.rs`) lives again and again.
//!
//! Every text carries `<sender>:<seq>:<send time in ns>`. The time is
//! `CLOCK_MONOTONIC`, the same clock in every process of the machine, so a
//! receiver in one worker process measures the latency of a sender in
//! another.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use pubsub_chat::auth::{Claims, SigningKey, mint};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::churn;
use crate::layout::Layout;
use crate::members::{Kind, View};

pub type Ws = WebSocketStream<tokio::net::TcpStream>;
type WsSink = Arc<AsyncMutex<SplitSink<Ws, Message>>>;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client's token lasts: past any run.
const TOKEN_TTL_S: u64 = 3600;
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
    /// A connection is open now (a churner's comes and goes).
    pub online: bool,
    /// Presence frames received (`presence`, `presence_diff`, and a server
    /// from before's `join` and `leave`), and their bytes, over the
    /// client's connections.
    pub presence_frames: u64,
    pub presence_bytes: u64,
    /// `presence_frames` and `presence_bytes` at the last mark.
    pub mark: (u64, u64),
    /// Since when its count has been the target's (ns), if it is.
    pub right_since: Option<u64>,
    /// Latencies of messages sent before the churn and during it
    /// (presence-churn).
    pub lat_quiet: Vec<u32>,
    pub lat_churn: Vec<u32>,
    /// The room's members as this client knows them (the scenarios with
    /// member lists).
    pub view: Option<View>,
    /// `status` `down` frames received, and whether the last `status`
    /// said `down` (a client starts out `up`).
    pub status_down: u64,
    pub down_now: bool,
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
            online: false,
            presence_frames: 0,
            presence_bytes: 0,
            mark: (0, 0),
            right_since: None,
            lat_quiet: Vec::new(),
            lat_churn: Vec::new(),
            view: layout.member_lists.then(|| View::new(layout)),
            status_down: 0,
            down_now: false,
        }
    }

    /// Takes a presence frame: counts it and, with a view, applies it;
    /// then notes whether the count is `target`'s (`u64::MAX`: none).
    fn on_presence(&mut self, layout: &Layout, kind: Kind, frame: &str, target: u64) {
        self.presence_frames += 1;
        self.presence_bytes += frame.len() as u64;
        let Some(view) = self.view.as_mut() else {
            return;
        };
        view.apply(layout, kind, frame);
        let right = target != u64::MAX && view.count() == Some(target as usize);
        if !right {
            self.right_since = None;
        } else if self.right_since.is_none() {
            self.right_since = Some(now_ns());
        }
    }

    /// Records one delivery; true when it is new (not a duplicate).
    /// `split_ns`: messages sent before it are the quiet phase's, after it
    /// the churn's (`u64::MAX`: no phases).
    fn record(
        &mut self,
        sender: usize,
        seq: u64,
        sent_ns: u64,
        now: u64,
        same: bool,
        split_ns: u64,
    ) -> bool {
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
            if split_ns != u64::MAX {
                if sent_ns < split_ns {
                    self.lat_quiet.push(us);
                } else {
                    self.lat_churn.push(us);
                }
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
    /// Per sender, its messages answered so far: its own copy back (the
    /// receipt), or an `error` naming its `cid`. The senders stop only
    /// once each is answered (or a deadline passed).
    pub answered: Vec<AtomicU64>,
    /// Per sender, sends refused `unavailable` (certainly never sent, so
    /// no receiver is owed them) and answered `outcome_unknown`.
    pub refused: Vec<AtomicU64>,
    pub in_doubt: Vec<AtomicU64>,
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
    /// The count every view should reach (`u64::MAX`: none yet).
    pub target: AtomicU64,
    /// When the churn started (ns; `u64::MAX`: not yet): latencies of
    /// messages sent before are the quiet phase's.
    pub split_ns: AtomicU64,
    /// The churn's phase, and what the churners did (presence-churn).
    pub churn: watch::Receiver<churn::Phase>,
    pub churned: churn::Counters,
    /// What each client's token is signed with (`--auth hs256|es256`;
    /// `None`: no token).
    pub signing: Option<SigningKey>,
    /// Time spent minting first tokens (ns), and how many, since the last
    /// batch took them (outside the handshake times).
    pub mint_ns: AtomicU64,
    pub minted: AtomicU64,
}

impl Shared {
    pub fn note_error(&self, what: String) {
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

/// Client `k`'s token, with `--auth hs256|es256` (else `None`): sub
/// `u<k>`, one user per client, its name from the layout, and an hour to
/// live. `pubsub_chat::auth::mint` reads the key file each time, as a
/// backend that signs for many users would not: the time is kept out of
/// the handshake's.
pub fn token(shared: &Shared, k: usize) -> Result<Option<String>, String> {
    let Some(signing) = &shared.signing else {
        return Ok(None);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock: {e}"))?;
    let claims = Claims {
        sub: format!("u{k}"),
        name: Some(shared.layout.name(k)),
        exp: now.as_secs() + TOKEN_TTL_S,
        nbf: None,
        rooms: None,
    };
    mint(&claims, signing, true)
        .map(Some)
        .map_err(|e| format!("cannot mint a token: {e}"))
}

/// Opens client `k`'s WebSocket, sends its `token` (if any) as the first
/// frame, and waits for its `welcome`.
pub async fn connect(shared: &Shared, k: usize, token: Option<&str>) -> Result<Ws, String> {
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
    if let Some(token) = token {
        // A JWT is base64url and dots: nothing in it to escape.
        ws.send(Message::text(format!(
            "{{\"type\":\"auth\",\"token\":\"{token}\"}}"
        )))
        .await
        .map_err(|e| format!("auth frame: {e}"))?;
    }
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

/// How the server answered a send it did not deliver.
enum Refusal {
    /// `unavailable`: never sent (Redis unreachable, or its link down).
    Unavailable,
    /// `outcome_unknown`: may or may not have been accepted.
    InDoubt,
}

/// An `error` frame answering a send with `unavailable` or
/// `outcome_unknown` (only a send is answered so); any other error is not
/// a refusal but a fault of the run.
fn refusal_of(frame: &str) -> Option<Refusal> {
    let frame: serde_json::Value = serde_json::from_str(frame).ok()?;
    match frame["code"].as_str()? {
        "unavailable" => Some(Refusal::Unavailable),
        "outcome_unknown" => Some(Refusal::InDoubt),
        _ => None,
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
    let Some(ws) = first_connect(k, &shared, &stats).await else {
        return;
    };
    let sends = shared.layout.is_sender(k);
    if let Some(why) = session(k, ws, &shared, &stats, sends, std::future::pending()).await {
        lost(k, &shared, &stats, why);
    }
    shared.live.fetch_sub(1, Ordering::SeqCst);
}

/// Client `k`'s first connection, at most `--concurrency` handshakes in
/// flight over the workers: reports the handshake time (or the failure) on
/// `conn_tx`; the client is then live (until its task ends) and
/// connected. A sender counts as active before it is reported, so that
/// `Stop` waits for it. With `--auth hs256|es256` it mints its token once
/// it has its turn, before its handshake is timed: what is measured is
/// the server's cost, not the signer's (`mint_ns` keeps that).
pub async fn first_connect(
    k: usize,
    shared: &Arc<Shared>,
    stats: &Arc<Mutex<ClientStats>>,
) -> Option<Ws> {
    let permit = shared.conn_sem.acquire().await.expect("semaphore open");
    let token = if shared.signing.is_some() {
        let minting = Instant::now();
        let token = token(shared, k);
        let took = minting.elapsed().as_nanos() as u64;
        shared.mint_ns.fetch_add(took, Ordering::Relaxed);
        shared.minted.fetch_add(1, Ordering::Relaxed);
        match token {
            Ok(token) => token,
            Err(e) => {
                let _ = shared.conn_tx.send(Err(e));
                return None;
            }
        }
    } else {
        None
    };
    let t0 = Instant::now();
    let connecting = connect(shared, k, token.as_deref());
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let _ = shared.conn_tx.send(Err(e));
            return None;
        }
        Err(_) => {
            let _ = shared.conn_tx.send(Err("timed out (30 s)".into()));
            return None;
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
    if shared.layout.is_sender(k) {
        shared.active_senders.fetch_add(1, Ordering::SeqCst);
    }
    let _ = shared.conn_tx.send(Ok(took.as_micros() as u64));
    Some(ws)
}

impl Shared {
    /// This worker's sends not yet answered (neither their own copy back
    /// nor a refusal).
    pub fn unanswered(&self) -> u64 {
        self.sent
            .iter()
            .zip(&self.answered)
            .map(|(sent, answered)| {
                sent.load(Ordering::SeqCst)
                    .saturating_sub(answered.load(Ordering::SeqCst))
            })
            .sum()
    }
}

/// Notes why client `k`'s connection ended before we closed it.
pub fn lost(k: usize, shared: &Shared, stats: &Mutex<ClientStats>, why: String) {
    shared.note_error(format!(
        "client c{k} (instance {}) {why}",
        ["a", "b"][shared.layout.instance(k)]
    ));
    stats.lock().unwrap().ended = Some(why);
}

/// One connection of client `k`, after its `welcome`: starts its sender
/// (`sends`), checks every frame, until shutdown or `until` (then it
/// closes politely: `None`) or until the server ends it (`Some(why)`).
pub async fn session(
    k: usize,
    ws: Ws,
    shared: &Arc<Shared>,
    stats: &Arc<Mutex<ClientStats>>,
    sends: bool,
    until: impl Future<Output = ()>,
) -> Option<String> {
    stats.lock().unwrap().online = true;
    let (sink, mut stream) = ws.split();
    let sink: WsSink = Arc::new(AsyncMutex::new(sink));
    let window = Arc::new(Semaphore::new(shared.window));
    let me = sends.then_some(k);
    if let Some(j) = me {
        tokio::spawn(sender(j, sink.clone(), window.clone(), shared.clone()));
    }
    // A churner comes and goes, and gets history again each time: its
    // deliveries are not checked.
    let checks_messages = shared.layout.churner(k).is_none();
    let layout = &shared.layout;
    let mut shutdown = shared.shutdown.clone();
    tokio::pin!(until);
    let ended: Option<String> = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|v| *v) => break None,
            _ = &mut until => break None,
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_str();
                    match Kind::of(t) {
                        Kind::Message if checks_messages => {
                            let Some((j, seq, sent_ns)) = parse_stamp(t) else {
                                stats.lock().unwrap().foreign += 1;
                                continue;
                            };
                            let now = now_ns();
                            let split = shared.split_ns.load(Ordering::Relaxed);
                            let fresh = {
                                let mut st = stats.lock().unwrap();
                                let same = layout.instance(j) == st.inst;
                                st.record(j, seq, sent_ns, now, same, split)
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
                                shared.answered[j].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Kind::Error => match (me, refusal_of(t)) {
                            (Some(j), Some(refusal)) => {
                                let counter = match refusal {
                                    Refusal::Unavailable => &shared.refused[j],
                                    Refusal::InDoubt => &shared.in_doubt[j],
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                shared.answered[j].fetch_add(1, Ordering::Relaxed);
                                window.add_permits(1);
                            }
                            _ => {
                                stats.lock().unwrap().errors += 1;
                                shared.note_error(format!("client c{k} got {t}"));
                            }
                        },
                        Kind::Status => {
                            let down = t.contains("\"delivery\":\"down\"");
                            let mut st = stats.lock().unwrap();
                            st.status_down += u64::from(down);
                            st.down_now = down;
                        }
                        kind if kind.is_presence() => {
                            let target = shared.target.load(Ordering::Relaxed);
                            stats.lock().unwrap().on_presence(layout, kind, t, target);
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(f))) => break Some(format!("closed by server: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(format!("read error: {e}")),
                None => break Some("eof".into()),
            },
        }
    };
    if ended.is_none() {
        // Close politely and wait (briefly) for the server's close reply.
        let closing = async {
            let _ = sink.lock().await.send(Message::Close(None)).await;
            while let Some(Ok(_)) = stream.next().await {}
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), closing).await;
    }
    stats.lock().unwrap().online = false;
    ended
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
