//! The Redis broker: Pub/Sub carries each message to every instance, and a
//! Stream per room keeps its history.
//!
//! The path of a message through this module:
//! - **published** in [`publisher`]: the accept script gives the message
//!   its id, appends it to the room's history and `PUBLISH`es it, as one
//!   atomic step;
//! - **received** in [`subscriber`]: each instance's subscriber thread
//!   blocks on its subscribed connection and emits what arrives, in order,
//!   to the fan-out (`crate::delivery::fanout`), which hands it to the local clients.
//!
//! A connection in subscribed mode can do nothing but receive (Redis
//! refuses every other command on it), and reading it blocks until
//! something comes: the blocking-subscription pitfall. So the subscription
//! has a thread of its own, and every other kind of work has a connection
//! of its own, so that none waits for another:
//!
//! | connection (`CLIENT LIST`) | file | what |
//! | --- | --- | --- |
//! | `<prefix>:<instance>:pub` | [`publisher`] | the sessions' messages (the accept script) |
//! | `:sub` (`:sub<N>` per cluster shard) | [`subscriber`], [`subscription`] | every room this instance has clients in |
//! | `:catch-up` (`:catch-up<N>`) | [`catch_up`] | history a room missed while it had no subscription |
//! | `:history` | [`history`] | history and member lists for joining clients |
//! | `:presence` | [`presence`] | who is in each room |
//! | `:stats` | [`reports`] | `/stats` reports |
//!
//! Around them: [`rooms`] (which rooms are subscribed), [`health`] (which
//! links work, and what clients are told), [`watch`] (pings that find a
//! dead link), [`keys`] (every name in Redis), [`cluster`] (which master
//! serves which room), [`link`] (a command connection that reconnects),
//! [`connect`] (how each connection is opened: timeouts, keepalive, login),
//! [`check`] (`pubsub-chat check-redis`: does Redis answer?),
//! [`tls`] (TLS to Redis, `rediss://`), [`sentinel`] (where Redis
//! Sentinel says the primary is), [`switch_master`] (the sentinels' word
//! that it moved), [`explain`] (errors in words an
//! operator can act on).

pub mod catch_up;
pub mod check;
pub mod cluster;
pub mod connect;
pub mod explain;
pub mod gates;
pub mod health;
pub mod history;
pub mod keys;
pub mod link;
pub mod presence;
pub mod publisher;
pub mod reports;
pub mod rooms;
pub mod sentinel;
pub mod settings;
pub mod subscriber;
pub mod subscription;
mod switch_master;
pub mod tls;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::{debug, info};
use redis::cluster::ClusterClient;

use crate::broker::report::InstanceReport;
use crate::broker::{
    EventSender, History, HistoryQuery, InstanceReports, Messages, Presence, PresenceSnapshot,
    PublishError, Readiness, Unavailable,
};
use crate::clock;
use crate::metrics::Metrics;
use crate::protocol::{MessageId, NewMessage, ServerFrame};
use crate::supervisor::Supervisor;
use catch_up::ResumePoints;
use cluster::Topology;
use connect::{COMMAND_TIMEOUT, CONNECT_TIMEOUT};
use health::Health;
use history::HistoryReader;
use keys::RedisKeys;
use link::Links;
use presence::PresenceStore;
use publisher::Publisher;
use reports::Reports;
use rooms::{Attached, RoomSubscriptions, ShardOf};
pub use settings::RedisSettings;
use subscriber::Shards;

pub struct RedisBroker {
    publisher: Publisher,
    history: HistoryReader,
    presence: PresenceStore,
    reports: Reports,
    rooms: Arc<RoomSubscriptions>,
    health: Arc<Health>,
    shards: Arc<Shards>,
}

impl RedisBroker {
    /// Opens the publishing connection (if Redis answers) and starts the
    /// subscriber threads. Returns once each subscription is live or its
    /// first attempt failed: a missing Redis does not stop the instance.
    pub fn start(
        settings: RedisSettings,
        events_tx: EventSender,
        metrics: Arc<Metrics>,
        supervisor: &Arc<Supervisor>,
    ) -> Result<Arc<Self>, String> {
        let cluster = settings.is_cluster();
        let keys = RedisKeys::new(&settings.prefix, cluster);
        let (links, topology, shard_of) = connections(&settings, &keys, &metrics)?;
        let shards_at_start = topology.as_ref().map_or(1, |topology| topology.shards());
        let rooms = Arc::new(RoomSubscriptions::new(
            keys.clone(),
            settings.room_linger,
            metrics.clone(),
            shards_at_start,
            shard_of,
        ));
        let linger = rooms.clone();
        supervisor
            .spawn("room-linger", move || linger.run_linger())
            .map_err(|e| format!("cannot start the room-linger thread: {e}"))?;
        let health = Arc::new(Health::new(
            shards_at_start,
            cluster,
            events_tx.clone(),
            metrics.clone(),
            rooms.clone(),
        ));
        let (reconnected_tx, reconnected_rx) = crossbeam_channel::bounded(1);
        let (presence, presence_thread) = PresenceStore::new(
            keys.clone(),
            settings.instance.clone(),
            settings.presence_ttl,
            links.link("presence"),
            reconnected_rx,
            events_tx.clone(),
            metrics.clone(),
        );
        supervisor
            .spawn("presence", move || presence_thread.run())
            .map_err(|e| format!("cannot start the presence thread: {e}"))?;
        let shards = Arc::new(Shards {
            settings: settings.clone(),
            keys: keys.clone(),
            rooms: rooms.clone(),
            health: health.clone(),
            resume_points: Arc::new(ResumePoints::default()),
            topology,
            events_tx,
            metrics: metrics.clone(),
            supervisor: supervisor.clone(),
            reconnected_tx,
            held_until_ms: Arc::default(),
            links: links.clone(),
            started: Default::default(),
        });
        let broker = Arc::new(RedisBroker {
            publisher: Publisher::new(
                links.link("pub").watched_by(health.clone()),
                keys.clone(),
                settings.history_len,
                settings.history_ttl,
                settings.publish_deadline,
                settings.min_replicas,
                settings.replicas_timeout,
            ),
            history: HistoryReader::new(
                links.link("history"),
                keys.clone(),
                settings.limits,
                settings.history_read_bytes,
            ),
            reports: Reports::new(links.link("stats"), keys),
            presence,
            rooms: rooms.clone(),
            health,
            shards: shards.clone(),
        });
        let _ = broker.publisher.link().run(|_| Ok(()));
        let first_attempts = shards.start_new()?;
        for first_attempt_rx in first_attempts {
            let _ = first_attempt_rx.recv_timeout(CONNECT_TIMEOUT * 3);
        }
        let interval = settings.ping_interval;
        if let Some(sentinels) = settings.sentinel.clone() {
            let (moved_links, moved_rooms) = (links.clone(), rooms.clone());
            let on_switch = move |switch: &switch_master::Switch| {
                moved_links.distrust();
                for (_, subscription) in moved_rooms.subscriptions() {
                    if !subscription.peer().is_some_and(|peer| switch.is_at(peer)) {
                        subscription.shutdown();
                    }
                }
            };
            supervisor
                .spawn("redis-sentinel-watch", move || {
                    switch_master::follow(&sentinels, interval, on_switch)
                })
                .map_err(|e| format!("cannot start the redis-sentinel-watch thread: {e}"))?;
        }
        let watched = rooms;
        let watch_metrics = metrics;
        supervisor
            .spawn("redis-watch", move || {
                watch::watch_subscriptions(&watched, interval, &watch_metrics)
            })
            .map_err(|e| format!("cannot start the redis-watch thread: {e}"))?;
        let kept_alive = [
            broker.publisher.link().clone(),
            broker.history.link().clone(),
            broker.reports.link().clone(),
        ];
        supervisor
            .spawn("redis-keepalive", move || {
                watch::keep_alive(&kept_alive, interval)
            })
            .map_err(|e| format!("cannot start the redis-keepalive thread: {e}"))?;
        Ok(broker)
    }
}

/// This instance's command connections, and, in a cluster, its map of
/// the masters and which shard serves a room.
fn connections(
    settings: &RedisSettings,
    keys: &RedisKeys,
    metrics: &Arc<Metrics>,
) -> Result<(Links, Option<Arc<Topology>>, ShardOf), String> {
    if let Some(sentinels) = &settings.sentinel {
        // Asked once now, so that a wrong name or no sentinel at all
        // stops the start with its reason; a primary that does not answer
        // yet is waited for, as a single Redis is.
        match sentinels.resolve() {
            Ok(info) => info!(
                "redis sentinel: the primary of {:?} is {}",
                sentinels.master,
                info.addr()
            ),
            Err(e) if sentinel::Sentinels::is_unknown_master(&e) || is_no_sentinel(&e) => {
                return Err(format!("redis sentinel: {e}"));
            }
            Err(e) => log::warn!("redis sentinel: {e}; retrying"),
        }
        let links = Links::sentinel(sentinels.clone(), settings, metrics);
        return Ok((links, None, Box::new(|_| Some(0))));
    }
    if !settings.is_cluster() {
        let links = Links::single(settings.url_info(), settings, metrics);
        return Ok((links, None, Box::new(|_| Some(0))));
    }
    let topology = Topology::discover(settings.seed_infos(), CONNECT_TIMEOUT).map_err(|e| {
        format!(
            "cannot read the cluster's slots from any --redis-cluster node: {}",
            settings.explain(&e)
        )
    })?;
    let topology = Arc::new(topology);
    let mut builder = ClusterClient::builder(settings.seed_infos());
    if let Some(tls) = &settings.tls {
        builder = tls.cluster(builder);
    }
    let client = builder
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
        .tcp_settings(connect::tcp_settings())
        // The accept script's own retries (same dedup key, until
        // --publish-deadline-ms) decide how long to insist.
        .retries(2)
        // TRYAGAIN while a slot moves lasts milliseconds: redis-rs
        // waits up to 1.28 s by default, holding every publish.
        .min_retry_wait(10)
        .max_retry_wait(100)
        .build()
        .map_err(|e| format!("bad --redis-cluster nodes: {e}"))?;
    info!(
        "redis cluster: {} shards, found through {}",
        topology.shards(),
        settings.display_url()
    );
    let (by_slot, keys) = (topology.clone(), keys.clone());
    let shard_of: ShardOf = Box::new(move |room| by_slot.shard_of_key(&keys.room_channel(room)));
    Ok((
        Links::cluster(client, settings, metrics),
        Some(topology),
        shard_of,
    ))
}

/// Whether a resolve failed because no sentinel answered at all.
fn is_no_sentinel(e: &redis::RedisError) -> bool {
    e.to_string().contains("no sentinel answered")
}

impl Messages for RedisBroker {
    fn publish(&self, message: NewMessage, dedup_key: &str) -> Result<MessageId, PublishError> {
        let room = message.room.clone();
        let shard_is_up = || self.health.check(self.rooms.shard_of(&room)).is_ok();
        self.publisher.publish(message, dedup_key, &shard_is_up)
    }

    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        self.history.read(room, query)
    }

    /// Subscribes to the room's channel if this instance was not yet, and
    /// waits for Redis to confirm, so that history read after this returns
    /// meets the live messages with no gap.
    fn attach(&self, room: &str) {
        match self.rooms.attach(room) {
            Attached::Live => {}
            Attached::NotLive => {
                debug!("room {room}: not subscribed yet; caught up from history once it is");
            }
            Attached::Unplaced => {
                // A master this instance has not met: read the map again.
                self.shards.refresh_topology();
                self.rooms.place();
            }
        }
    }

    fn detach(&self, room: &str) {
        self.rooms.detach(room);
    }
}

impl Presence for RedisBroker {
    fn present(&self, room: &str, name: &str) -> Option<u64> {
        self.presence.join(room, name)
    }

    fn absent(&self, room: &str, name: &str) {
        self.presence.leave(room, name);
    }

    fn presence_snapshot(&self, room: &str) -> Result<PresenceSnapshot, Unavailable> {
        self.presence
            .snapshot(self.history.link(), room)
            .map_err(link::Failure::into_unavailable)
    }

    fn typing(&self, room: &str, name: &str) {
        let frame = ServerFrame::typing(room, name).to_json();
        self.publisher.publish_ephemeral(room, &frame);
    }
}

impl Readiness for RedisBroker {
    fn readiness(&self) -> Result<(), String> {
        self.health.readiness()
    }

    fn link_status(&self, room: &str) -> Result<(), String> {
        self.health.check(self.rooms.shard_of(room))
    }

    fn cut_subscription(&self, hold: Duration) -> Result<String, String> {
        // The hold is set before the cut, so that the subscriber finds it
        // when its read fails.
        let held_until_ms = &self.shards.held_until_ms;
        held_until_ms.store(
            clock::wall_millis() + hold.as_millis() as u64,
            Ordering::Relaxed,
        );
        let after = if hold.is_zero() {
            "at once".to_string()
        } else {
            format!("after {} s", hold.as_secs())
        };
        match self.rooms.cut() {
            0 => {
                held_until_ms.store(0, Ordering::Relaxed);
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

impl InstanceReports for RedisBroker {
    fn report(&self, report: &InstanceReport) {
        self.reports.store(report);
    }

    fn instances(&self) -> Result<Vec<InstanceReport>, Unavailable> {
        self.reports.read()
    }
}
