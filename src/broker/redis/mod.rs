//! The Redis broker: Pub/Sub carries each message to every instance, and a
//! Stream per room keeps its history.
//!
//! Two connections, because a connection in subscribed mode can do nothing
//! but receive (Redis refuses every other command on it):
//! - the **publisher**, shared by this instance's reader threads, runs the
//!   accept script (id, history, publish: one atomic step) and reads history;
//! - the **subscriber**, owned by one thread that blocks on it for ever and
//!   emits each message to the fan-out. That thread is the only thing in
//!   the process allowed to wait on the subscription: done anywhere else,
//!   the blocking read would freeze whatever called it (the blocking-
//!   subscription pitfall). Other threads only write `SUBSCRIBE` and
//!   `UNSUBSCRIBE` on it, as rooms gain their first local client or lose
//!   their last ([`rooms`], [`subscription`]).
//!
//! [`publisher`] and [`subscriber`] own one connection each; this file has
//! what they share: the accept script, the key names, the settings.
//!
//! What goes into Redis (the README documents it for outside tools):
//! - channel `<prefix>:room:{<room>}`, one per room: one JSON message frame
//!   per message, exactly what clients receive (the braces are a Redis
//!   Cluster hash tag, so `PUBSUB CHANNELS` reads as a list of rooms);
//! - stream `<prefix>:history:<room>`: the same frame in field `m`, under
//!   the message's id, trimmed to about `--history-len` entries;
//! - string `<prefix>:last-id`: the last id handed out, so that ids
//!   increase across all rooms and all instances.

pub mod cluster;
pub mod explain;
pub mod presence;
pub mod publisher;
pub mod rooms;
pub mod subscriber;
pub mod subscription;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use redis::{Client, Connection, ConnectionInfo, RedisConnectionInfo, RedisError, Script};

use crate::backoff::Backoff;
use crate::broker::{
    Broker, BrokerEvent, EventSender, History, HistoryQuery, Presence, PresenceChange, Unavailable,
};
use crate::clock;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, Limits, MessageId, NewMessage, parse_channel_payload};
use crate::redis_url::RedisUrl;
use crate::stats::{InstanceReport, STALE_AFTER_MS};
use crate::supervisor::Supervisor;
use cluster::Topology;
use presence::PresenceStore;
use publisher::{Failure, Publisher};
use redis::cluster::ClusterClient;
use rooms::{Attached, RoomSubscriptions, ShardOf};
use subscriber::{Delivered, Node, Subscriber};

/// How long to wait for Redis to accept a connection before calling it
/// unreachable: loopback or LAN Redis answers in microseconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command on the publishing connection may take before the
/// link is declared broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two attempts of a publish whose outcome is unknown.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The accept script: gives the message the next id, appends it to the
/// room's history and publishes it, atomically (Redis runs a script as one
/// step), so that id order, history order and delivery order are one order.
///
/// Ids follow the Streams scheme `<ms>-<seq>` and come from the counter
/// `KEYS[2]`: with one Redis, one counter for every room, so that ids are
/// unique and increasing across the whole chat; in a Redis Cluster, one per
/// room, in the room's hash slot (a script may only touch one slot).
/// `ARGV[3]` is the message JSON without its opening brace; the script puts
/// `type`, `id` and `ts` in front. `ARGV[1]` is `PUBLISH`, or `SPUBLISH`
/// (sharded Pub/Sub) in a cluster, on the room's channel `KEYS[4]`.
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
redis.call(ARGV[1], KEYS[4], frame)
return id
"#;

/// Reads a room's history and the last id handed out (`KEYS[2]`) in one
/// atomic step, so that the seam computed from them is exact: the newest
/// `ARGV[2]` entries (`ARGV[1]` = `recent`), or the entries from `ARGV[2]`
/// on and the oldest entry (`after`).
const HISTORY_SCRIPT: &str = r#"
local latest = redis.call('GET', KEYS[2])
if ARGV[1] == 'recent' then
  return {latest, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])}
end
return {latest, redis.call('XRANGE', KEYS[1], ARGV[2], '+'), redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)}
"#;

/// How long a gone instance's last report is kept before it is removed
/// (it is not shown after [`STALE_AFTER_MS`]).
const FORGET_AFTER_MS: u64 = 60_000;

/// How long Redis remembers that a message was accepted, for retries: far
/// longer than any publish deadline.
const DEDUP_TTL_SECS: u64 = 600;

/// The Redis names this instance uses, all under one prefix.
///
/// In a Redis Cluster every name of a room carries the room as its hash tag
/// (`{lobby}`), so that the accept script touches one slot, and the id
/// counter is per room.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
    cluster: bool,
}

impl RedisKeys {
    pub fn new(prefix: &str, cluster: bool) -> Self {
        RedisKeys {
            prefix: prefix.to_string(),
            cluster,
        }
    }

    /// A room's channel: `<prefix>:room:{<room>}`.
    pub fn room_channel(&self, room: &str) -> String {
        format!("{}:room:{{{room}}}", self.prefix)
    }

    /// The room a channel of [`room_channel`](Self::room_channel) names.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":room:{")?
            .strip_suffix('}')
    }

    /// A room's history stream.
    pub fn history(&self, room: &str) -> String {
        if self.cluster {
            format!("{}:history:{{{room}}}", self.prefix)
        } else {
            format!("{}:history:{room}", self.prefix)
        }
    }

    /// The counter ids of `room` come from: the chat's, or the room's.
    pub fn last_id(&self, room: &str) -> String {
        if self.cluster {
            format!("{}:last-id:{{{room}}}", self.prefix)
        } else {
            format!("{}:last-id", self.prefix)
        }
    }

    /// Where the id of an accepted message is remembered, for retries.
    pub fn accepted(&self, room: &str, dedup_key: &str) -> String {
        if self.cluster {
            format!("{}:accepted:{{{room}}}:{dedup_key}", self.prefix)
        } else {
            format!("{}:accepted:{dedup_key}", self.prefix)
        }
    }

    /// Who is in the room: name → connections by instance.
    pub fn presence(&self, room: &str) -> String {
        format!("{}:presence:{{{room}}}", self.prefix)
    }

    /// Every instance's last report (`/stats`): instance → JSON.
    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// The room's member names, in name order.
    pub fn presence_names(&self, room: &str) -> String {
        format!("{}:presence-names:{{{room}}}", self.prefix)
    }

    /// When each (instance, name) entry of the room's presence expires.
    pub fn presence_expiry(&self, room: &str) -> String {
        format!("{}:presence-exp:{{{room}}}", self.prefix)
    }

    /// The command that publishes on a room's channel.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }
}

/// How the broker reaches Redis, from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: RedisUrl,
    /// Seed nodes of a Redis Cluster; empty for a single Redis at `url`.
    pub cluster: Vec<RedisUrl>,
    pub prefix: String,
    pub history_len: usize,
    pub max_backoff: Duration,
    /// How long a publish whose outcome is unknown (the link broke while
    /// the command was in flight) is retried before the client is told.
    pub publish_deadline: Duration,
    /// How long a room stays subscribed after its last local client left.
    pub room_linger: Duration,
    /// How long a member stays listed after its instance stops refreshing it.
    pub presence_ttl: Duration,
    /// Most members a `presence` snapshot lists.
    pub presence_max_members: usize,
    /// What a valid payload on the channel or in history looks like.
    pub limits: Limits,
    /// The instance id, used to name this instance's Redis connections
    /// (`CLIENT LIST` shows `<prefix>:<instance>:pub` and `:sub`).
    pub instance: String,
}

impl RedisSettings {
    /// Where Redis is, for logs and probes: without a password.
    pub fn display_url(&self) -> String {
        if self.cluster.is_empty() {
            self.url.to_string()
        } else {
            let seeds: Vec<&str> = self.cluster.iter().map(RedisUrl::redacted).collect();
            format!("the redis cluster at {}", seeds.join(","))
        }
    }

    /// What the logs and `/readyz` say of a failure to connect.
    pub fn explain(&self, e: &RedisError) -> String {
        explain::explain(
            e,
            &self.display_url(),
            self.url.connection_info().redis_settings().db(),
        )
    }

    /// A `CLIENT SETNAME` name for one of this instance's connections:
    /// Redis allows no spaces or newlines in it.
    pub fn connection_name(&self, role: &str) -> String {
        format!("{}:{}:{role}", self.prefix, self.instance)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect()
    }
}

/// Opens a connection to Redis with timeouts and a name.
///
/// It sends `AUTH` and `SELECT` itself rather than let redis-rs do it:
/// redis-rs replaces a refused `AUTH`'s answer with "Password
/// authentication failed", and the operator needs Redis's own words
/// (`WRONGPASS`, `ERR AUTH ... without any password configured`), which
/// [`explain::explain`] turns into advice.
pub fn connect(info: &ConnectionInfo, name: &str) -> Result<Connection, RedisError> {
    let settings = info.redis_settings();
    let bare = info
        .clone()
        .set_redis_settings(RedisConnectionInfo::default().set_skip_set_lib_name());
    let mut connection = Client::open(bare)?.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password).query::<()>(&mut connection)?;
    }
    if settings.db() != 0 {
        redis::cmd("SELECT")
            .arg(settings.db())
            .query::<()>(&mut connection)?;
    }
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<()>(&mut connection)?;
    Ok(connection)
}

pub struct RedisBroker {
    settings: RedisSettings,
    keys: RedisKeys,
    script: Script,
    history_script: Script,
    publisher: Publisher,
    rooms: Arc<RoomSubscriptions>,
    /// Per subscriber connection: is it subscribed now?
    subscribed: Vec<Arc<AtomicBool>>,
    /// Per subscriber connection: why it last failed, for `/readyz`.
    down_reasons: Vec<Arc<crate::sync::Mutex<Option<String>>>>,
    presence: PresenceStore,
    /// The presence refresh's own connection: under a storm of joins the
    /// sessions' queue for the shared one would make refreshes late, and
    /// live members expire.
    presence_publisher: Publisher,
    events_tx: EventSender,
    metrics: Arc<Metrics>,
    /// Wakes the `presence` thread when a subscriber is back after a failure.
    reconnected_rx: crossbeam_channel::Receiver<()>,
    /// The stats reporter's own connection: a report never queues behind
    /// the sessions.
    stats_publisher: Publisher,
    /// Until when (wall-clock ms) the subscribers stay away after
    /// `/demo/cut-subscription?seconds=N`.
    held_until_ms: Arc<AtomicU64>,
}

impl RedisBroker {
    /// Opens the publishing connection (if Redis answers) and starts the
    /// subscriber thread. Returns once the subscription is live or the
    /// first attempt failed: a missing Redis does not stop the instance.
    pub fn start(
        settings: RedisSettings,
        events_tx: EventSender,
        metrics: Arc<Metrics>,
        supervisor: &Arc<Supervisor>,
    ) -> Result<Arc<Self>, String> {
        let cluster = !settings.cluster.is_empty();
        let keys = RedisKeys::new(&settings.prefix, cluster);
        let (publisher, nodes, shard_of): (Publisher, Vec<Node>, ShardOf) = if cluster {
            let topology = Arc::new(Topology::discover(&settings.cluster, CONNECT_TIMEOUT)?);
            let seeds = settings
                .cluster
                .iter()
                .map(|url| url.connection_info().clone());
            let client = ClusterClient::builder(seeds)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(COMMAND_TIMEOUT)
                // The accept script's own retries (same dedup key, until
                // --publish-deadline-ms) decide how long to insist.
                .retries(2)
                // TRYAGAIN while a slot moves lasts milliseconds: redis-rs
                // waits up to 1.28 s by default, holding every publish.
                .min_retry_wait(10)
                .max_retry_wait(100)
                .build()
                .map_err(|e| format!("bad --redis-cluster nodes: {e}"))?;
            let nodes = (0..topology.shards())
                .map(|_| Node::Shard(topology.clone()))
                .collect();
            let (shards_topology, shard_keys) = (topology.clone(), keys.clone());
            let shard_of: ShardOf =
                Box::new(move |room| shards_topology.shard_of_key(&shard_keys.room_channel(room)));
            info!(
                "redis cluster: {} shards, found through {}",
                topology.shards(),
                settings.display_url()
            );
            (
                Publisher::cluster(client, settings.clone(), metrics.clone()),
                nodes,
                shard_of,
            )
        } else {
            let info = settings.url.connection_info().clone();
            let node = Node::Single(info.clone());
            (
                Publisher::single(info, settings.clone(), metrics.clone()),
                vec![node],
                Box::new(|_| 0),
            )
        };
        let rooms = Arc::new(RoomSubscriptions::new(
            keys.clone(),
            settings.room_linger,
            metrics.clone(),
            nodes.len(),
            shard_of,
        ));
        let linger = rooms.clone();
        supervisor
            .spawn("room-linger", move || linger.run_linger())
            .map_err(|e| format!("cannot start the room-linger thread: {e}"))?;
        let (reconnected_tx, reconnected_rx) = crossbeam_channel::bounded(1);
        let broker = Arc::new(RedisBroker {
            reconnected_rx,
            rooms: rooms.clone(),
            keys: keys.clone(),
            script: Script::new(ACCEPT_SCRIPT),
            history_script: Script::new(HISTORY_SCRIPT),
            presence_publisher: publisher.sibling("presence"),
            stats_publisher: publisher.sibling("stats"),
            held_until_ms: Arc::default(),
            publisher,
            subscribed: (0..nodes.len()).map(|_| Arc::default()).collect(),
            down_reasons: (0..nodes.len()).map(|_| Arc::default()).collect(),
            presence: PresenceStore::new(
                keys.clone(),
                settings.instance.clone(),
                settings.presence_ttl,
            ),
            events_tx: events_tx.clone(),
            metrics: metrics.clone(),
            settings: settings.clone(),
        });
        let _ = broker.publisher.run(|_| Ok(()));

        let delivered = Delivered::default();
        let mut first_attempts = Vec::new();
        for (shard, node) in nodes.into_iter().enumerate() {
            let (first_attempt_tx, first_attempt_rx) = crossbeam_channel::bounded(1);
            let subscriber = Subscriber {
                shard,
                node,
                events_tx: events_tx.clone(),
                url: settings.display_url(),
                db: settings.url.connection_info().redis_settings().db(),
                down_reason: broker.down_reasons[shard].clone(),
                name: if cluster {
                    settings.connection_name(&format!("sub{shard}"))
                } else {
                    settings.connection_name("sub")
                },
                limits: settings.limits,
                keys: keys.clone(),
                rooms: rooms.clone(),
                metrics: metrics.clone(),
                subscribed: broker.subscribed[shard].clone(),
                reconnected_tx: reconnected_tx.clone(),
                link_breaks: broker.publisher.link_breaks(),
                backoff: Backoff::new(settings.max_backoff),
                delivered: delivered.clone(),
                held_until_ms: broker.held_until_ms.clone(),
            };
            let name = if cluster {
                format!("redis-sub-{shard}")
            } else {
                "redis-sub".to_string()
            };
            supervisor
                .spawn(&name, move || subscriber.run(first_attempt_tx))
                .map_err(|e| format!("cannot start the redis subscriber thread: {e}"))?;
            first_attempts.push(first_attempt_rx);
        }
        for first_attempt_rx in first_attempts {
            let _ = first_attempt_rx.recv_timeout(CONNECT_TIMEOUT * 3);
        }
        let refresher = broker.clone();
        supervisor
            .spawn("presence", move || refresher.run_presence())
            .map_err(|e| format!("cannot start the presence thread: {e}"))?;
        Ok(broker)
    }
}

impl RedisBroker {
    /// The `presence` thread: refreshes this instance's members every
    /// third of the TTL, all rooms in one pass, and when a subscriber is
    /// back after a failure, at once, then sends every local room a fresh
    /// snapshot.
    fn run_presence(&self) {
        loop {
            let reconnected = self
                .reconnected_rx
                .recv_timeout(self.presence.refresh_interval())
                .is_ok();
            // Just back, the publishing connection may still be waiting
            // out its backoff: insist until it answers, or the next tick.
            let insist_until = Instant::now() + self.presence.refresh_interval();
            let refreshed = loop {
                match self.presence.refresh(&self.presence_publisher) {
                    Ok(expired) => {
                        Metrics::inc(&self.metrics.presence_refreshes_total);
                        Metrics::add(&self.metrics.presence_expired_total, expired);
                        if expired > 0 {
                            info!("presence: {expired} members of stopped instances expired");
                        }
                        break true;
                    }
                    Err(e) if reconnected && Instant::now() < insist_until => {
                        debug!("presence: refresh failed, again: {}", e.into_unavailable());
                        thread::sleep(RETRY_PAUSE * 2);
                    }
                    Err(e) => {
                        debug!("presence: refresh failed: {}", e.into_unavailable());
                        break false;
                    }
                }
            };
            if reconnected && refreshed {
                // Presence was as stale as the outage: re-registered by the
                // refresh above, now told afresh.
                for room in self.presence.rooms() {
                    let limit = self.settings.presence_max_members;
                    if let Ok(presence) =
                        self.presence
                            .snapshot(&self.presence_publisher, &room, limit)
                    {
                        let snapshot = PresenceChange::Snapshot { room, presence };
                        let _ = self.events_tx.send(BrokerEvent::Presence(snapshot));
                    }
                }
            }
        }
    }
}

/// One entry of an `XRANGE` reply: its id and its field-value pairs.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Reads a stream reply (`XRANGE`, `XREVRANGE`) into messages, skipping
/// entries that are not valid message frames.
pub fn parse_stream_entries(entries: Vec<StreamEntry>, limits: &Limits) -> Vec<ChatMessage> {
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
pub fn parse_last_id(raw: Option<String>) -> Option<MessageId> {
    raw.and_then(|raw| raw.parse().ok())
}

impl Broker for RedisBroker {
    /// Publishes with the accept script. If the link breaks while the
    /// script is in flight, the outcome is unknown: the same script, with
    /// the same dedup key, is retried after reconnecting until Redis says
    /// which id the message got, or the deadline passes.
    fn publish(
        &self,
        message: NewMessage,
        dedup_key: &str,
    ) -> Result<MessageId, super::PublishError> {
        let body = serde_json::to_string(&message).expect("messages always serialize");
        let deadline = Instant::now() + self.settings.publish_deadline;
        let mut in_doubt = false;
        loop {
            let attempt = self.publisher.run(|connection| {
                self.script
                    .key(self.keys.history(&message.room))
                    .key(self.keys.last_id(&message.room))
                    .key(self.keys.accepted(&message.room, dedup_key))
                    .key(self.keys.room_channel(&message.room))
                    .arg(self.keys.publish_command())
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
                        .map_err(|e| Unavailable(format!("redis returned a bad id: {e}")).into());
                }
                Err(Failure::Refused(reason)) if !in_doubt => {
                    return Err(Unavailable(reason).into());
                }
                Err(Failure::Redirected(reason)) => {
                    // It did not run: try again, without doubt, while the
                    // deadline allows.
                    if Instant::now() >= deadline {
                        return Err(Unavailable(reason).into());
                    }
                    debug!("redis publisher: message {dedup_key} redirected ({reason}); again");
                    thread::sleep(RETRY_PAUSE);
                    continue;
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
                return Err(super::PublishError::OutcomeUnknown(format!(
                    "redis did not answer within {} ms ({reason})",
                    self.settings.publish_deadline.as_millis()
                )));
            }
            thread::sleep(RETRY_PAUSE);
        }
    }

    /// Reads history and the last id in one atomic step (a script), so
    /// that the seam computed from them is exact.
    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let invocation = |mode: &str, arg: String| {
            let mut invocation = self.history_script.key(self.keys.history(room));
            invocation.key(self.keys.last_id(room)).arg(mode).arg(arg);
            invocation
        };
        let history = match query {
            HistoryQuery::Recent(n) => {
                let (latest, mut entries): (Option<String>, Vec<StreamEntry>) = self
                    .publisher
                    .run(|connection| invocation("recent", n.to_string()).invoke(connection))
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
                    .publisher
                    .run(|connection| invocation("after", since.to_string()).invoke(connection))
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

    /// Subscribes to the room's channel if this instance was not yet, and
    /// waits for Redis to confirm, so that history read after this returns
    /// meets the live messages with no gap.
    fn attach(&self, room: &str) {
        if self.rooms.attach(room) == Attached::NotLive {
            debug!("room {room}: not subscribed yet; caught up from history once the link is back");
        }
    }

    fn detach(&self, room: &str) {
        self.rooms.detach(room);
    }

    fn present(&self, room: &str, name: &str) {
        self.presence.join(&self.publisher, room, name);
    }

    fn absent(&self, room: &str, name: &str) {
        self.presence.leave(&self.publisher, room, name);
    }

    fn presence(&self, room: &str, limit: usize) -> Result<Presence, Unavailable> {
        self.presence
            .snapshot(&self.publisher, room, limit)
            .map_err(Failure::into_unavailable)
    }

    fn typing(&self, room: &str, name: &str) {
        self.presence.typing(&self.publisher, room, name);
    }

    fn readiness(&self) -> Result<(), String> {
        if let Some(shard) = self
            .subscribed
            .iter()
            .position(|up| !up.load(Ordering::Relaxed))
        {
            let which = if self.subscribed.len() > 1 {
                format!(" (cluster shard {shard})")
            } else {
                String::new()
            };
            return Err(
                match crate::sync::lock(&self.down_reasons[shard]).as_deref() {
                    Some(reason) => {
                        format!("redis subscription{which} is down: {reason}; reconnecting")
                    }
                    None => format!(
                        "redis subscription to {}{which} is down; reconnecting",
                        self.settings.display_url()
                    ),
                },
            );
        }
        // The publisher reconnects lazily; a probe is a chance to do it, no
        // more often than its backoff allows.
        if self.publisher.is_down() {
            self.publisher
                .run(|connection| redis::cmd("PING").query::<String>(connection))
                .map_err(|e| {
                    format!(
                        "redis publisher is down ({}); reconnecting",
                        e.into_unavailable()
                    )
                })?;
        }
        Ok(())
    }

    fn report(&self, report: &InstanceReport) {
        let Ok(json) = serde_json::to_string(report) else {
            return;
        };
        let key = self.keys.instances();
        let reported = self.stats_publisher.run(|connection| {
            redis::cmd("HSET")
                .arg(&key)
                .arg(&report.instance)
                .arg(json)
                .query::<()>(connection)
        });
        if let Err(e) = reported {
            debug!("stats: report not stored: {}", e.into_unavailable());
        }
    }

    fn instances(&self) -> Result<Vec<InstanceReport>, Unavailable> {
        let key = self.keys.instances();
        let stored: HashMap<String, String> = self
            .stats_publisher
            .run(|connection| redis::cmd("HGETALL").arg(&key).query(connection))
            .map_err(Failure::into_unavailable)?;
        let now = clock::wall_millis();
        let mut up = Vec::new();
        let mut gone = Vec::new();
        for (instance, json) in stored {
            match serde_json::from_str::<InstanceReport>(&json) {
                Ok(report) if now.saturating_sub(report.seen_ms) <= STALE_AFTER_MS => {
                    up.push(report)
                }
                Ok(report) if now.saturating_sub(report.seen_ms) <= FORGET_AFTER_MS => {}
                _ => gone.push(instance),
            }
        }
        if !gone.is_empty() {
            let _ = self.stats_publisher.run(|connection| {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&gone)
                    .query::<()>(connection)
            });
        }
        up.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(up)
    }

    fn cut_subscription(&self, hold: Duration) -> Result<String, String> {
        // The hold is set before the cut, so that the subscriber finds it
        // when its read fails.
        let until = clock::wall_millis() + hold.as_millis() as u64;
        self.held_until_ms.store(until, Ordering::Relaxed);
        let after = if hold.is_zero() {
            "at once".to_string()
        } else {
            format!("after {} s", hold.as_secs())
        };
        match self.rooms.cut() {
            0 => {
                self.held_until_ms.store(0, Ordering::Relaxed);
                Err("the Redis subscription is already down; it is reconnecting".into())
            }
            1 => Ok(format!(
                "the Redis subscription was cut; the subscriber reconnects {after} and catches up"
            )),
            n => Ok(format!(
                "{n} Redis subscriptions (one per cluster shard) were cut; each reconnects {after} and catches up"
            )),
        }
    }
}
