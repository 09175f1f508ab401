//! The Redis broker: Pub/Sub carries each message to every instance, and a
//! Stream per room keeps its history.
//!
//! Two connections, because a connection in subscribed mode can do nothing
//! but receive (Redis refuses every other command on it):
//! - the **publisher**, shared by this instance's reader threads, runs the
//!   accept script (id, history, publish: one atomic step) and reads history;
//! - the **subscriber**, owned by one thread that blocks on it for ever and
//!   hands each message to the hub. That thread is the only thing in the
//!   process allowed to wait on the subscription: done anywhere else, the
//!   blocking read would freeze whatever called it (the blocking-
//!   subscription pitfall).
//!
//! What goes into Redis (the README documents it for outside tools):
//! - channel `<prefix>:messages`: one JSON message frame per message, exactly
//!   what clients receive, for every room;
//! - stream `<prefix>:history:<room>`: the same frame in field `m`, under
//!   the message's id, trimmed to about `--history-len` entries;
//! - string `<prefix>:last-id`: the last id handed out, so that ids
//!   increase across all rooms and all instances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use redis::{Client, Connection, RedisError, Script};

use crate::backoff::Backoff;
use crate::broker::{Broker, History, HistoryQuery, Unavailable};
use crate::fanout;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{
    ChatMessage, Limits, MessageId, NewMessage, ServerFrame, parse_channel_payload,
};

/// How long to wait for Redis to accept a connection before calling it
/// unreachable: loopback or LAN Redis answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command on the publishing connection may take before the
/// link is declared broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two attempts of a publish whose outcome is unknown.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The accept script: gives the message the next id, appends it to the
/// room's history and publishes it, atomically (Redis runs a script as one
/// step), so that id order, history order and delivery order are one order.
///
/// Ids follow the Streams scheme `<ms>-<seq>` but come from one counter for
/// every room (`last-id`), so that they are unique and increasing across the
/// whole chat, not just within a room. `ARGV[3]` is the message JSON without
/// its opening brace; the script puts `type`, `id` and `ts` in front.
///
/// `KEYS[3]` makes it idempotent: it remembers, for `ARGV[4]` seconds, the
/// id given to this message, and a retry after a broken link gets that id
/// back instead of publishing the message twice.
const ACCEPT_SCRIPT: &str = r#"
local prior = redis.call('GET', KEYS[3])
if prior then
  return prior
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[2])
if last then
  local last_ms, last_seq = string.match(last, '^(%d+)-(%d+)$')
  last_ms = tonumber(last_ms)
  if last_ms >= ms then
    ms = last_ms
    seq = tonumber(last_seq) + 1
  end
end
local id = string.format('%d-%d', ms, seq)
local frame = '{"type":"message","id":"' .. id .. '","ts":' .. string.format('%d', ms) .. ',' .. ARGV[3]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'm', frame)
redis.call('SET', KEYS[2], id)
redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
redis.call('PUBLISH', ARGV[1], frame)
return id
"#;

/// How long Redis remembers that a message was accepted, for retries: far
/// longer than any publish deadline.
const DEDUP_TTL_SECS: u64 = 600;

/// The Redis names this instance uses, all under one prefix.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    pub channel: String,
    pub last_id: String,
    prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: &str) -> Self {
        RedisKeys {
            channel: format!("{prefix}:messages"),
            last_id: format!("{prefix}:last-id"),
            prefix: prefix.to_string(),
        }
    }

    pub fn history(&self, room: &str) -> String {
        format!("{}:history:{room}", self.prefix)
    }

    pub fn accepted(&self, dedup_key: &str) -> String {
        format!("{}:accepted:{dedup_key}", self.prefix)
    }
}

/// How the broker reaches Redis, from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub history_len: usize,
    pub max_backoff: Duration,
    /// How long a publish whose outcome is unknown (the link broke while
    /// the command was in flight) is retried before the client is told.
    pub publish_deadline: Duration,
    /// What a valid payload on the channel or in history looks like.
    pub limits: Limits,
    /// See `--fanout-window-ms`.
    pub fanout_window: Duration,
    /// The instance id, used to name this instance's Redis connections
    /// (`CLIENT LIST` shows `<prefix>:<instance>:pub` and `:sub`).
    pub instance: String,
}

impl RedisSettings {
    /// A `CLIENT SETNAME` name for one of this instance's connections:
    /// Redis allows no spaces or newlines in it.
    fn connection_name(&self, role: &str) -> String {
        format!("{}:{}:{role}", self.prefix, self.instance)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect()
    }
}

/// Opens a connection to Redis with timeouts and a name.
fn connect(client: &Client, name: &str) -> Result<Connection, RedisError> {
    let mut connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<()>(&mut connection)?;
    Ok(connection)
}

/// Why a command on the publishing connection failed.
#[derive(Debug)]
enum Failure {
    /// It certainly had no effect: Redis was not reached, or refused it.
    Refused(String),
    /// The link broke while it was in flight: it may have run.
    Unknown(String),
}

/// The publishing connection, opened lazily and reopened after a failure,
/// no sooner than the backoff allows.
struct Publisher {
    connection: Option<Connection>,
    retry_at: Instant,
    backoff: Backoff,
    last_error: Option<String>,
}

pub struct RedisBroker {
    client: Client,
    settings: RedisSettings,
    keys: RedisKeys,
    script: Script,
    publisher: Mutex<Publisher>,
    subscribed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl RedisBroker {
    /// Opens the publishing connection (if Redis answers) and starts the
    /// subscriber thread. Returns once the subscription is live or the
    /// first attempt failed: a missing Redis does not stop the instance.
    pub fn start(
        settings: RedisSettings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let url = &settings.url;
        let client =
            Client::open(url.as_str()).map_err(|e| format!("bad --redis-url {url:?}: {e}"))?;
        let keys = RedisKeys::new(&settings.prefix);
        let broker = Arc::new(RedisBroker {
            client: client.clone(),
            keys: keys.clone(),
            script: Script::new(ACCEPT_SCRIPT),
            publisher: Mutex::new(Publisher {
                connection: None,
                retry_at: Instant::now(),
                backoff: Backoff::new(settings.max_backoff),
                last_error: None,
            }),
            subscribed: Arc::default(),
            metrics: metrics.clone(),
            settings: settings.clone(),
        });
        let _ = broker.with_publisher(|_| Ok(()));

        let (first_attempt_tx, first_attempt_rx) = crossbeam_channel::bounded(1);
        let fanout_tx = fanout::spawn_fanout(hub.clone(), settings.fanout_window)
            .map_err(|e| format!("cannot start the fan-out thread: {e}"))?;
        let subscriber = Subscriber {
            fanout_tx,
            client,
            url: settings.url.clone(),
            name: settings.connection_name("sub"),
            limits: settings.limits,
            keys,
            hub,
            metrics,
            subscribed: broker.subscribed.clone(),
            backoff: Backoff::new(settings.max_backoff),
            last_delivered: HashMap::new(),
            baseline: None,
        };
        thread::Builder::new()
            .name("redis-sub".into())
            .spawn(move || subscriber.run(first_attempt_tx))
            .map_err(|e| format!("cannot start the redis subscriber thread: {e}"))?;
        let _ = first_attempt_rx.recv_timeout(CONNECT_TIMEOUT * 3);
        Ok(broker)
    }

    /// Runs `command` on the publishing connection, (re)connecting first if
    /// needed. A broken link drops the connection, so the next call starts
    /// from a fresh one; between failures, calls fail fast until the
    /// backoff has passed, so a dead Redis costs clients no waiting.
    fn with_publisher<T>(
        &self,
        command: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, Failure> {
        let mut publisher = self.publisher.lock().expect("publisher lock poisoned");
        if publisher.connection.is_none() {
            if Instant::now() < publisher.retry_at {
                let reason = publisher.last_error.clone().unwrap_or_default();
                return Err(Failure::Refused(format!(
                    "redis is unreachable ({reason}); retrying"
                )));
            }
            match self.connect_publisher() {
                Ok(connection) => {
                    if publisher.last_error.take().is_some() {
                        info!("redis publisher: reconnected to {}", self.settings.url);
                        Metrics::inc(&self.metrics.redis_reconnects_total);
                    }
                    publisher.backoff.reset();
                    publisher.connection = Some(connection);
                    Metrics::set(&self.metrics.redis_publisher_up, 1);
                }
                Err(e) => return Err(Failure::Refused(self.link_broken(&mut publisher, e))),
            }
        }
        let connection = publisher.connection.as_mut().expect("connected above");
        command(connection).map_err(|e| {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
            {
                Failure::Unknown(self.link_broken(&mut publisher, e))
            } else {
                Failure::Refused(format!("redis refused the command: {e}"))
            }
        })
    }

    fn connect_publisher(&self) -> Result<Connection, RedisError> {
        connect(&self.client, &self.settings.connection_name("pub"))
    }

    fn link_broken(&self, publisher: &mut Publisher, e: RedisError) -> String {
        let reason = e.to_string();
        if publisher.last_error.is_none() {
            error!(
                "redis publisher: {} unreachable: {reason}; messages are refused as unavailable until it is back \
                 (start Redis with `redis-server`, or run without it: --broker local)",
                self.settings.url
            );
        }
        publisher.connection = None;
        publisher.retry_at = Instant::now() + publisher.backoff.next_delay();
        publisher.last_error = Some(reason.clone());
        Metrics::set(&self.metrics.redis_publisher_up, 0);
        format!("redis is unreachable ({reason})")
    }
}

/// One entry of an `XRANGE` reply: its id and its field-value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads a stream reply (`XRANGE`, `XREVRANGE`) into messages, skipping
/// entries that are not valid message frames.
fn parse_stream_entries(entries: Vec<StreamEntry>, limits: &Limits) -> Vec<ChatMessage> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let frame = fields.into_iter().find(|(name, _)| name == "m")?.1;
            match parse_channel_payload(&frame, limits) {
                Ok(message) => Some(message),
                Err(e) => {
                    warn!("history entry {id} skipped: {e}");
                    None
                }
            }
        })
        .collect()
}

/// Reads the chat's last id (`None` before the first message).
fn parse_last_id(raw: Option<String>) -> Option<MessageId> {
    raw.and_then(|raw| raw.parse().ok())
}

impl Broker for RedisBroker {
    /// Publishes with the accept script. If the link breaks while the
    /// script is in flight, the outcome is unknown: the same script, with
    /// the same dedup key, is retried after reconnecting until Redis says
    /// which id the message got, or the deadline passes.
    fn publish(&self, message: NewMessage, dedup_key: &str) -> Result<MessageId, Unavailable> {
        let body = serde_json::to_string(&message).expect("messages always serialize");
        let deadline = Instant::now() + self.settings.publish_deadline;
        let mut in_doubt = false;
        loop {
            let attempt = self.with_publisher(|connection| {
                self.script
                    .key(self.keys.history(&message.room))
                    .key(&self.keys.last_id)
                    .key(self.keys.accepted(dedup_key))
                    .arg(&self.keys.channel)
                    .arg(self.settings.history_len)
                    .arg(&body[1..])
                    .arg(DEDUP_TTL_SECS)
                    .invoke::<String>(connection)
            });
            let reason = match attempt {
                Ok(id) => {
                    if in_doubt {
                        info!(
                            "redis publisher: message {dedup_key} resolved after a broken link: {id}"
                        );
                    }
                    return id
                        .parse()
                        .map_err(|e| Unavailable(format!("redis returned a bad id: {e}")));
                }
                Err(Failure::Refused(reason)) if !in_doubt => {
                    return Err(Unavailable(reason));
                }
                Err(Failure::Refused(reason) | Failure::Unknown(reason)) => reason,
            };
            if !in_doubt {
                warn!(
                    "redis publisher: message {dedup_key} in doubt ({reason}); retrying until it is known"
                );
                in_doubt = true;
            }
            if Instant::now() >= deadline {
                error!(
                    "redis publisher: message {dedup_key} still in doubt at the deadline: {reason}"
                );
                return Err(Unavailable(format!(
                    "outcome unknown: redis did not answer within {} ms ({reason})",
                    self.settings.publish_deadline.as_millis()
                )));
            }
            thread::sleep(RETRY_PAUSE);
        }
    }

    /// Reads history and the chat's last id in one MULTI/EXEC, so that the
    /// seam computed from them is exact.
    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let key = self.keys.history(room);
        let last_id = &self.keys.last_id;
        let history = match query {
            HistoryQuery::Recent(n) => {
                let (latest, mut entries): (Option<String>, Vec<StreamEntry>) = self
                    .with_publisher(|connection| {
                        redis::pipe()
                            .atomic()
                            .get(last_id)
                            .cmd("XREVRANGE")
                            .arg(&key)
                            .arg("+")
                            .arg("-")
                            .arg("COUNT")
                            .arg(n)
                            .query(connection)
                    })
                    .map_err(Failure::into_unavailable)?;
                entries.reverse();
                History {
                    messages: parse_stream_entries(entries, &self.settings.limits),
                    truncated: false,
                    latest: parse_last_id(latest),
                }
            }
            HistoryQuery::After(since) => {
                let (latest, from_since, oldest): (
                    Option<String>,
                    Vec<StreamEntry>,
                    Vec<StreamEntry>,
                ) = self
                    .with_publisher(|connection| {
                        redis::pipe()
                            .atomic()
                            .get(last_id)
                            .cmd("XRANGE")
                            .arg(&key)
                            .arg(since.to_string())
                            .arg("+")
                            .cmd("XRANGE")
                            .arg(&key)
                            .arg("-")
                            .arg("+")
                            .arg("COUNT")
                            .arg(1)
                            .query(connection)
                    })
                    .map_err(Failure::into_unavailable)?;
                let oldest = oldest.first().and_then(|(id, _)| id.parse().ok());
                History::resume(
                    since,
                    parse_stream_entries(from_since, &self.settings.limits),
                    oldest,
                    parse_last_id(latest),
                )
            }
        };
        Ok(history)
    }

    fn readiness(&self) -> Result<(), String> {
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err(format!(
                "redis subscription to {} is down; reconnecting",
                self.settings.url
            ));
        }
        // The publisher reconnects lazily; a probe is a chance to do it, no
        // more often than its backoff allows.
        let publisher_down = self
            .publisher
            .lock()
            .expect("publisher lock poisoned")
            .connection
            .is_none();
        if publisher_down {
            self.with_publisher(|connection| redis::cmd("PING").query::<String>(connection))
                .map_err(|e| {
                    format!(
                        "redis publisher is down ({}); reconnecting",
                        e.into_unavailable()
                    )
                })?;
        }
        Ok(())
    }
}

impl Failure {
    fn into_unavailable(self) -> Unavailable {
        match self {
            Failure::Refused(reason) | Failure::Unknown(reason) => Unavailable(reason),
        }
    }
}

/// The subscriber thread's state.
struct Subscriber {
    /// Where received messages go, in order, to be handed to the hub.
    fanout_tx: crossbeam_channel::Sender<ChatMessage>,
    client: Client,
    url: String,
    name: String,
    limits: Limits,
    keys: RedisKeys,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    subscribed: Arc<AtomicBool>,
    backoff: Backoff,
    /// The last id delivered in each room: where catch-up resumes.
    last_delivered: HashMap<String, MessageId>,
    /// The chat's last id when the previous subscription began: where
    /// catch-up resumes for rooms that had no message since.
    baseline: Option<MessageId>,
}

/// How far ahead of this machine's clock a message id may be and still
/// count as made by the accept script (clocks of Redis and of instances
/// differ a little).
const PLAUSIBLE_CLOCK_SKEW_MS: u64 = 60_000;

fn wall_clock_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Live messages to skip after a catch-up, per room: those up to the id
/// the catch-up already delivered. A room's entry goes at its first newer
/// message, so the check costs nothing in steady state.
type CatchUpSeams = HashMap<String, MessageId>;

impl Subscriber {
    /// The subscriber thread: subscribe, catch up on what was missed,
    /// deliver until the link breaks, wait, and again; for the life of the
    /// process.
    fn run(mut self, first_attempt_tx: crossbeam_channel::Sender<()>) {
        let mut failures = 0u64;
        let mut was_subscribed = false;
        loop {
            let outcome = self.subscribe_and_deliver(&first_attempt_tx, was_subscribed);
            if self.subscribed.swap(false, Ordering::Relaxed) {
                was_subscribed = true;
                failures = 0;
                self.backoff.reset();
                self.hub.broadcast(&ServerFrame::Status {
                    delivery: "down",
                    message: "the server lost its link to Redis: sending is paused while it reconnects",
                });
            }
            Metrics::set(&self.metrics.redis_subscriber_up, 0);
            let _ = first_attempt_tx.try_send(());
            let e = outcome.expect_err("delivery only ends on an error");
            failures += 1;
            if failures == 1 {
                error!(
                    "redis subscriber: {} unreachable: {e}; cross-instance delivery is down, retrying \
                     (start Redis with `redis-server`, or run without it: --broker local)",
                    self.url
                );
            } else {
                debug!("redis subscriber: attempt {failures} failed: {e}");
            }
            thread::sleep(self.backoff.next_delay());
        }
    }

    fn subscribe_and_deliver(
        &mut self,
        first_attempt_tx: &crossbeam_channel::Sender<()>,
        reconnect: bool,
    ) -> Result<(), RedisError> {
        let mut connection = connect(&self.client, &self.name)?;
        // Subscribed, the connection waits for messages for ever: no timeout.
        connection.set_read_timeout(None)?;
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(&self.keys.channel)?;
        // Subscribed first, read history second: a message accepted in
        // between is in both, and the seams drop the second copy.
        let mut seams = self.catch_up(reconnect)?;
        self.subscribed.store(true, Ordering::Relaxed);
        Metrics::set(&self.metrics.redis_subscriber_up, 1);
        if reconnect {
            Metrics::inc(&self.metrics.redis_reconnects_total);
            self.hub.broadcast(&ServerFrame::Status {
                delivery: "up",
                message: "the server is linked to Redis again",
            });
        }
        info!(
            "redis subscriber: subscribed to {} on {}",
            self.keys.channel, self.url
        );
        let _ = first_attempt_tx.try_send(());
        loop {
            let message = pubsub.get_message()?;
            Metrics::inc(&self.metrics.broker_messages_total);
            match parse_channel_payload(message.get_payload_bytes(), &self.limits) {
                Ok(message) => {
                    if let Some(seam) = seams.get(&message.room) {
                        if message.id <= *seam {
                            continue;
                        }
                        seams.remove(&message.room);
                    }
                    self.deliver(message);
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.broker_payloads_invalid_total);
                    warn!(
                        "redis subscriber: payload on {} skipped: {e}",
                        self.keys.channel
                    );
                }
            }
        }
    }

    fn deliver(&mut self, message: ChatMessage) {
        let id = message.id;
        let room = message.room.clone();
        // The fan-out thread only ends with the process.
        let _ = self.fanout_tx.send(message);
        self.record_delivered(room, id);
    }

    fn record_delivered(&mut self, room: String, id: MessageId) {
        // Anyone can publish on the channel: an id from the future (say,
        // 9999999999999-0 typed into redis-cli) must not move the point
        // catch-up resumes from, or real messages after an outage would be
        // skipped. Ids the accept script makes are never ahead of the clock.
        if id.millis > wall_clock_millis() + PLAUSIBLE_CLOCK_SKEW_MS {
            return;
        }
        let last = self.last_delivered.entry(room).or_insert(id);
        *last = (*last).max(id);
    }

    /// After a reconnection, delivers from history, in order, what every
    /// room with local clients missed while the subscription was down.
    /// Returns the seams that keep live copies of those from going out
    /// twice. On the first subscription, only records the baseline.
    fn catch_up(&mut self, reconnect: bool) -> Result<CatchUpSeams, RedisError> {
        let mut reader = connect(&self.client, &format!("{}-catch-up", self.name))?;
        let latest: Option<String> = redis::cmd("GET")
            .arg(&self.keys.last_id)
            .query(&mut reader)?;
        let latest = parse_last_id(latest);
        let mut seams = CatchUpSeams::new();
        if reconnect {
            let mut missed = 0;
            for room in self.hub.rooms() {
                let from = self.last_delivered.get(&room).copied().max(self.baseline);
                let start = from.map_or_else(|| "-".to_string(), |id| format!("({id}"));
                let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
                    .arg(self.keys.history(&room))
                    .arg(start)
                    .arg("+")
                    .query(&mut reader)?;
                for message in parse_stream_entries(entries, &self.limits) {
                    seams.insert(room.clone(), message.id);
                    self.deliver(message);
                    missed += 1;
                }
            }
            if missed > 0 {
                info!(
                    "redis subscriber: caught up on {missed} messages published while it was away"
                );
            }
        }
        self.baseline = latest.max(self.baseline);
        Ok(seams)
    }
}
