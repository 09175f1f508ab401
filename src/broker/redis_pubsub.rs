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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use redis::{Client, Connection, RedisError, Script};

use crate::backoff::Backoff;
use crate::broker::{Broker, HistoryQuery, Unavailable};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, MessageId, NewMessage, parse_channel_payload};

/// How long to wait for Redis to accept a connection before calling it
/// unreachable: loopback or LAN Redis answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command on the publishing connection may take. A client's
/// reader thread waits this long at most before answering `unavailable`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The accept script: gives the message the next id, appends it to the
/// room's history and publishes it, atomically (Redis runs a script as one
/// step), so that id order, history order and delivery order are one order.
///
/// Ids follow the Streams scheme `<ms>-<seq>` but come from one counter for
/// every room (`last-id`), so that they are unique and increasing across the
/// whole chat, not just within a room. `ARGV[3]` is the message JSON without
/// its opening brace; the script puts `type`, `id` and `ts` in front.
const ACCEPT_SCRIPT: &str = r#"
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
redis.call('PUBLISH', ARGV[1], frame)
return id
"#;

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
    url: String,
    keys: RedisKeys,
    history_len: usize,
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
        url: &str,
        prefix: &str,
        history_len: usize,
        max_backoff: Duration,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let client = Client::open(url).map_err(|e| format!("bad --redis-url {url:?}: {e}"))?;
        let broker = Arc::new(RedisBroker {
            client: client.clone(),
            url: url.to_string(),
            keys: RedisKeys::new(prefix),
            history_len,
            script: Script::new(ACCEPT_SCRIPT),
            publisher: Mutex::new(Publisher {
                connection: None,
                retry_at: Instant::now(),
                backoff: Backoff::new(max_backoff),
                last_error: None,
            }),
            subscribed: Arc::default(),
            metrics: metrics.clone(),
        });
        let _ = broker.with_publisher(|_| Ok(()));

        let (first_attempt_tx, first_attempt_rx) = crossbeam_channel::bounded(1);
        let subscriber = Subscriber {
            client,
            url: url.to_string(),
            channel: broker.keys.channel.clone(),
            hub,
            metrics,
            subscribed: broker.subscribed.clone(),
            backoff: Backoff::new(max_backoff),
        };
        thread::Builder::new()
            .name("redis-sub".into())
            .spawn(move || subscriber.run(first_attempt_tx))
            .map_err(|e| format!("cannot start the redis subscriber thread: {e}"))?;
        let _ = first_attempt_rx.recv_timeout(CONNECT_TIMEOUT * 3);
        Ok(broker)
    }

    /// Runs `command` on the publishing connection, (re)connecting first if
    /// needed. Any failure drops the connection, so the next call starts
    /// from a fresh one; between failures, calls fail fast until the
    /// backoff has passed, so a dead Redis costs clients no waiting.
    fn with_publisher<T>(
        &self,
        command: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, Unavailable> {
        let mut publisher = self.publisher.lock().expect("publisher lock poisoned");
        if publisher.connection.is_none() {
            if Instant::now() < publisher.retry_at {
                let reason = publisher.last_error.clone().unwrap_or_default();
                return Err(Unavailable(format!(
                    "redis is unreachable ({reason}); retrying"
                )));
            }
            match self.connect_publisher() {
                Ok(connection) => {
                    if publisher.last_error.take().is_some() {
                        info!("redis publisher reconnected to {}", self.url);
                        Metrics::inc(&self.metrics.redis_reconnects_total);
                    }
                    publisher.backoff.reset();
                    publisher.connection = Some(connection);
                    Metrics::set(&self.metrics.redis_publisher_up, 1);
                }
                Err(e) => return Err(self.publisher_failed(&mut publisher, e)),
            }
        }
        let connection = publisher.connection.as_mut().expect("connected above");
        command(connection).map_err(|e| self.publisher_failed(&mut publisher, e))
    }

    fn connect_publisher(&self) -> Result<Connection, RedisError> {
        let connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok(connection)
    }

    fn publisher_failed(&self, publisher: &mut Publisher, e: RedisError) -> Unavailable {
        let reason = e.to_string();
        if publisher.last_error.is_none() {
            error!(
                "redis publisher: {} unreachable: {reason}; messages are refused as unavailable until it is back \
                 (start Redis with `redis-server`, or run without it: --broker local)",
                self.url
            );
        }
        publisher.connection = None;
        publisher.retry_at = Instant::now() + publisher.backoff.next_delay();
        publisher.last_error = Some(reason.clone());
        Metrics::set(&self.metrics.redis_publisher_up, 0);
        Unavailable(format!("redis is unreachable ({reason})"))
    }
}

/// One entry of an `XRANGE` reply: its id and its field-value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads a stream reply (`XRANGE`, `XREVRANGE`) into messages, skipping
/// entries that are not valid message frames.
fn parse_stream_entries(entries: Vec<StreamEntry>) -> Vec<ChatMessage> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let frame = fields.into_iter().find(|(name, _)| name == "m")?.1;
            match parse_channel_payload(&frame) {
                Ok(message) => Some(message),
                Err(e) => {
                    warn!("history entry {id} skipped: {e}");
                    None
                }
            }
        })
        .collect()
}

impl Broker for RedisBroker {
    fn publish(&self, message: NewMessage) -> Result<MessageId, Unavailable> {
        let body = serde_json::to_string(&message).expect("messages always serialize");
        let id: String = self.with_publisher(|connection| {
            self.script
                .key(self.keys.history(&message.room))
                .key(&self.keys.last_id)
                .arg(&self.keys.channel)
                .arg(self.history_len)
                .arg(&body[1..])
                .invoke(connection)
        })?;
        id.parse()
            .map_err(|e| Unavailable(format!("redis returned a bad id: {e}")))
    }

    fn history(&self, room: &str, query: HistoryQuery) -> Result<Vec<ChatMessage>, Unavailable> {
        let key = self.keys.history(room);
        let entries = self.with_publisher(|connection| match query {
            HistoryQuery::Recent(0) => Ok(Vec::new()),
            HistoryQuery::Recent(n) => redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(n)
                .query(connection)
                .map(|mut entries: Vec<_>| {
                    entries.reverse();
                    entries
                }),
            HistoryQuery::After(since) => redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("({since}"))
                .arg("+")
                .query(connection),
        })?;
        Ok(parse_stream_entries(entries))
    }

    fn readiness(&self) -> Result<(), String> {
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err(format!(
                "redis subscription to {} is down; reconnecting",
                self.url
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
                .map_err(|e| format!("redis publisher is down ({e}); reconnecting"))?;
        }
        Ok(())
    }
}

/// The subscriber thread's state.
struct Subscriber {
    client: Client,
    url: String,
    channel: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    subscribed: Arc<AtomicBool>,
    backoff: Backoff,
}

impl Subscriber {
    /// The subscriber thread: subscribe, deliver until the link breaks,
    /// wait, subscribe again; for the life of the process.
    fn run(mut self, first_attempt_tx: crossbeam_channel::Sender<()>) {
        let mut failures = 0u64;
        let mut was_subscribed = false;
        loop {
            let outcome = self.subscribe_and_deliver(&first_attempt_tx, was_subscribed);
            if self.subscribed.swap(false, Ordering::Relaxed) {
                was_subscribed = true;
                failures = 0;
                self.backoff.reset();
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
        let mut connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(&self.channel)?;
        self.subscribed.store(true, Ordering::Relaxed);
        Metrics::set(&self.metrics.redis_subscriber_up, 1);
        if reconnect {
            Metrics::inc(&self.metrics.redis_reconnects_total);
        }
        info!(
            "redis subscriber: subscribed to {} on {}",
            self.channel, self.url
        );
        let _ = first_attempt_tx.try_send(());
        loop {
            let message = pubsub.get_message()?;
            Metrics::inc(&self.metrics.broker_messages_total);
            match parse_channel_payload(message.get_payload_bytes()) {
                Ok(message) => {
                    self.hub.deliver(&message);
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.broker_payloads_invalid_total);
                    warn!("redis subscriber: payload on {} skipped: {e}", self.channel);
                }
            }
        }
    }
}
