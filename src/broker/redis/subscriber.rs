//! Where messages are received from Redis: the subscriber threads, each
//! reading one subscribed connection, blocked on it. One with a single
//! Redis; one per shard of a Redis Cluster.
//!
//! A connection that has sent `SUBSCRIBE` can do nothing but receive, and
//! reading from it blocks until a message comes, which may be never: the
//! blocking-subscription pitfall. So this thread does nothing else. It
//! reads pushes, checks each payload, and emits events in order into the
//! fan-out's channel; it knows nothing of clients, and never waits on one,
//! or Redis would cut it off at `client-output-buffer-limit pubsub`. It
//! never waits on Redis for anything either: subscription requests are
//! written by the connection's writer thread (`subscription.rs`), and a
//! room that must be caught up from history is caught up by its shard's
//! catch-up thread (`catch_up.rs`) while its messages wait at a gate.
//!
//! [`Shards`] starts each shard's threads, at start-up and when a Redis
//! Cluster gains a master.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use redis::{ConnectionInfo, RedisError, ServerErrorKind};

use super::catch_up::{CatchUp, CatchUpThread, ResumePoints};
use super::cluster::Topology;
use super::connect::CONNECT_TIMEOUT;
use super::health::Health;
use super::keys::RedisKeys;
use super::link::Links;
use super::rooms::{Confirmed, RoomSubscriptions};
use super::settings::RedisSettings;
use super::subscription::{self, Push, Subscription};
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, EventSender, PresenceChange};
use crate::clock;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{BadPayload, ChannelEvent, Received, Via, parse_channel_event};
use crate::supervisor::Supervisor;
use crate::sync::{Mutex, lock};

/// Everything a shard's threads share with the rest of the broker, and
/// what it takes to start them.
pub struct Shards {
    pub settings: RedisSettings,
    pub keys: RedisKeys,
    pub rooms: Arc<RoomSubscriptions>,
    pub health: Arc<Health>,
    pub resume_points: Arc<ResumePoints>,
    /// The cluster's map; `None` with a single Redis.
    pub topology: Option<Arc<Topology>>,
    pub events_tx: EventSender,
    pub metrics: Arc<Metrics>,
    pub supervisor: Arc<Supervisor>,
    /// Wakes the presence thread when a subscription is caught up.
    pub reconnected_tx: Sender<()>,
    /// Until when (wall-clock ms) the subscribers stay away after
    /// `/demo/cut-subscription?seconds=N`.
    pub held_until_ms: Arc<AtomicU64>,
    /// Makes the catch-up connections; told when a subscription breaks.
    pub links: Links,
    /// Shards whose threads run (guards against two starts of one).
    pub started: Mutex<usize>,
}

impl Shards {
    /// Starts the threads of every shard that has none yet. Returns, for
    /// each, a channel told when its first connection attempt is over.
    pub fn start_new(self: &Arc<Self>) -> Result<Vec<Receiver<()>>, String> {
        let wanted = self
            .topology
            .as_ref()
            .map_or(1, |topology| topology.shards());
        let mut started = lock(&self.started);
        let mut first_attempts = Vec::new();
        while *started < wanted {
            let shard = *started;
            self.rooms.ensure_shard(shard);
            self.health.ensure_shard(shard);
            first_attempts.push(self.start(shard)?);
            *started += 1;
        }
        Ok(first_attempts)
    }

    /// Starts one shard's two threads: its catch-up thread (history a room
    /// missed) and its subscriber thread, which owns the subscribed
    /// connection. Returns what says when the subscriber's first attempt
    /// is over.
    fn start(self: &Arc<Self>, shard: usize) -> Result<Receiver<()>, String> {
        let catch_up = self.spawn_catch_up(shard)?;
        self.spawn_subscriber(shard, catch_up)
    }

    /// The thread name of a role in this shard: `redis-sub`, or
    /// `redis-sub-N` in a cluster.
    fn thread_name(&self, role: &str, shard: usize) -> String {
        match &self.topology {
            Some(_) => format!("redis-{role}-{shard}"),
            None => format!("redis-{role}"),
        }
    }

    /// The name of a role's Redis connection in this shard: `sub`, or
    /// `subN` in a cluster.
    fn role_name(&self, role: &str, shard: usize) -> String {
        match &self.topology {
            Some(_) => format!("{role}{shard}"),
            None => role.to_string(),
        }
    }

    /// The catch-up thread of `shard`, on a command link of its own.
    fn spawn_catch_up(self: &Arc<Self>, shard: usize) -> Result<Arc<CatchUp>, String> {
        let (catch_up, jobs_rx) = CatchUp::new(
            shard,
            self.events_tx.clone(),
            self.resume_points.clone(),
            self.health.clone(),
            self.reconnected_tx.clone(),
            self.metrics.clone(),
        );
        let link = match &self.topology {
            Some(topology) => {
                self.links
                    .to_shard(topology.clone(), shard, &self.role_name("catch-up", shard))
            }
            None => self.links.link("catch-up"),
        };
        let refresher = self.clone();
        let catch_up_thread = CatchUpThread {
            catch_up: catch_up.clone(),
            jobs_rx,
            link,
            keys: self.keys.clone(),
            limits: self.settings.limits,
            rooms: self.rooms.clone(),
            refresh_topology: Box::new(move || refresher.refresh_topology()),
            backoff: Backoff::new(self.settings.max_backoff),
        };
        self.supervisor
            .spawn(&self.thread_name("catch-up", shard), move || {
                catch_up_thread.run()
            })
            .map_err(|e| format!("cannot start a redis catch-up thread: {e}"))?;
        Ok(catch_up)
    }

    /// The subscriber thread of `shard`: the subscribed connection's own
    /// thread, which blocks on it and does nothing else (the blocking-
    /// subscription pitfall). It runs [`Subscriber::subscribe_and_receive`]
    /// again after each failure.
    fn spawn_subscriber(
        self: &Arc<Self>,
        shard: usize,
        catch_up: Arc<CatchUp>,
    ) -> Result<Receiver<()>, String> {
        let subscriber = Subscriber {
            shard,
            name: self.settings.connection_name(&self.role_name("sub", shard)),
            writer_thread: format!("{}-write", self.thread_name("sub", shard)),
            shards: self.clone(),
            catch_up,
            backoff: Backoff::new(self.settings.max_backoff),
        };
        let (first_attempt_tx, first_attempt_rx) = crossbeam_channel::bounded(1);
        self.supervisor
            .spawn(&self.thread_name("sub", shard), move || {
                subscriber.run(&first_attempt_tx)
            })
            .map_err(|e| format!("cannot start the redis subscriber thread: {e}"))?;
        Ok(first_attempt_rx)
    }

    /// Reads the cluster's slots again, and starts the threads of any
    /// master the cluster gained.
    pub fn refresh_topology(self: &Arc<Self>) {
        let Some(topology) = &self.topology else {
            return;
        };
        match topology.refresh() {
            Ok(shards) if shards > *lock(&self.started) => {
                info!(
                    "redis cluster: a master this instance did not know; starting its subscriber"
                );
            }
            Ok(_) => {}
            Err(e) => {
                warn!("redis cluster: slots not read: {e}");
                return;
            }
        }
        if let Err(e) = self.start_new() {
            error!("redis cluster: {e}");
        }
    }

    /// The node shard `shard`'s subscription connects to now.
    fn node_of(&self, shard: usize) -> Result<ConnectionInfo, RedisError> {
        if let Some(sentinels) = &self.settings.sentinel {
            return sentinels.resolve();
        }
        match &self.topology {
            None => Ok(self.settings.url_info()),
            Some(topology) => topology.master_of_shard(shard).ok_or_else(|| {
                std::io::Error::other(format!("cluster shard {shard} has no master")).into()
            }),
        }
    }
}

/// One subscriber thread's state.
pub(crate) struct Subscriber {
    /// Which subscribed connection this is (0 with a single Redis).
    shard: usize,
    /// Its connection's name (`CLIENT LIST` shows it).
    name: String,
    /// The name of its connection's writer thread.
    writer_thread: String,
    shards: Arc<Shards>,
    catch_up: Arc<CatchUp>,
    backoff: Backoff,
}

impl Subscriber {
    /// The subscriber thread: connect, subscribe, deliver until the link
    /// breaks, wait, and again; for the life of the process.
    fn run(mut self, first_attempt_tx: &Sender<()>) {
        let mut failures = 0u64;
        let mut attempts = 0u64;
        loop {
            let e = self
                .subscribe_and_receive(first_attempt_tx, attempts > 0)
                .expect_err("delivery only ends on an error");
            attempts += 1;
            let shards = self.shards.clone();
            shards.rooms.disconnected(self.shard);
            shards.links.distrust();
            let _ = first_attempt_tx.try_send(());
            if self.wait_out_a_demo_cut() {
                failures = 0;
                continue;
            }
            failures += 1;
            let reason = shards.settings.explain(&e);
            self.catch_up.disconnected(&reason);
            // The first failure stops delivery: an error. Every attempt
            // after it says why it failed too, so that an operator
            // watching the log sees what Redis answers.
            if failures == 1 {
                error!(
                    "redis subscriber {}: {reason}; cross-instance delivery is down, retrying",
                    self.shard
                );
            } else {
                warn!(
                    "redis subscriber {}: attempt {failures} failed: {reason}; retrying",
                    self.shard
                );
            }
            thread::sleep(self.backoff.next_delay());
            shards.refresh_topology();
        }
    }

    /// After `/demo/cut-subscription`: stays away as long as asked, then
    /// reconnects at once, as after a real outage. False if no demo cut
    /// is in force (the failure is a real one).
    fn wait_out_a_demo_cut(&mut self) -> bool {
        let until = self.shards.held_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let left = until.saturating_sub(clock::wall_millis());
        info!(
            "redis subscriber {}: cut on purpose (/demo/cut-subscription); reconnecting in {} ms",
            self.shard, left
        );
        self.catch_up
            .disconnected("the subscription was cut on purpose (/demo/cut-subscription)");
        thread::sleep(Duration::from_millis(left));
        // Only one cut is waited out: a failure after it is real.
        self.shards.held_until_ms.store(0, Ordering::Relaxed);
        true
    }

    /// One life of the subscription: opens the subscribed connection,
    /// subscribes to every room this instance has clients in, catches
    /// each up on what it missed, then receives for ever: each push read
    /// (`next_push`, blocking) is taken (`take`) and forwarded to the
    /// fan-out. Returns when the connection fails; `run`
    /// waits out the backoff and calls it again (`again`).
    pub(crate) fn subscribe_and_receive(
        &mut self,
        first_attempt_tx: &Sender<()>,
        again: bool,
    ) -> Result<(), RedisError> {
        let shards = self.shards.clone();
        let info = shards.node_of(self.shard)?;
        let sharded = shards.topology.is_some();
        let (mut reader, subscription) = subscription::open(
            &info,
            shards.settings.tls.as_ref(),
            &self.name,
            &self.writer_thread,
            sharded,
            CONNECT_TIMEOUT,
        )?;
        // However this ends, the connection is closed: whoever holds its
        // handle finds it broken, not silently unread.
        let _closed = ShutdownOnDrop(subscription.clone());
        // The rooms' subscriptions are queued first and gated second: both
        // before anything of this connection is read, so nothing slips by.
        let rooms = shards.rooms.connected(self.shard, subscription);
        if again {
            // The master may have changed (a failover): the publishing
            // connections read the cluster's slots afresh before their next
            // command, so that `up` means a send will reach it.
            shards.links.distrust();
        }
        self.catch_up.connected(&rooms);
        self.backoff.reset();
        if again {
            Metrics::inc(&shards.metrics.redis_reconnects_total);
        }
        info!(
            "redis subscriber {}: connected to {}; {} rooms to subscribe and catch up",
            self.shard,
            shards.settings.display_url(),
            rooms.len()
        );
        let _ = first_attempt_tx.try_send(());
        loop {
            let push = reader.next_push()?;
            self.take(push)?;
        }
    }

    /// Handles one push from the subscribed connection, by its kind.
    fn take(&mut self, push: Push) -> Result<(), RedisError> {
        match push {
            Push::Message { channel, payload } => self.take_payload(&channel, &payload),
            Push::Subscribed(channel) => self.subscribed(&channel),
            Push::Unsubscribed { channel, asked } => self.unsubscribed(&channel, asked),
            Push::Refused { channel, error } => return self.refused(&channel, error),
            Push::Pong => {}
        }
        Ok(())
    }

    /// Redis confirmed a room's subscription: its catch-up may start.
    fn subscribed(&self, channel: &str) {
        let shards = &self.shards;
        let room = shards.keys.room_of_channel(channel).unwrap_or_default();
        match shards.rooms.confirmed(channel) {
            Confirmed::CatchUp => self.catch_up.start(room),
            Confirmed::Fresh => {}
            Confirmed::Unwanted => self.catch_up.abandon(room),
        }
    }

    /// A room's subscription ended: asked for (the room emptied), or not
    /// (Redis Cluster moved the room's slot to another master).
    fn unsubscribed(&self, channel: &str, asked: bool) {
        let shards = &self.shards;
        let Some(room) = shards.keys.room_of_channel(channel) else {
            return;
        };
        if !shards.rooms.is_wanted(room) {
            self.catch_up.forget(room);
            self.catch_up.abandon(room);
        } else if !asked {
            // Find where the room is now, and subscribe there.
            info!(
                "redis subscriber {}: room {room} moved to another shard",
                self.shard
            );
            self.relocate(room);
        }
    }

    /// Redis refused a room's subscription: a slot that moved is followed;
    /// anything else breaks the connection.
    fn refused(&self, channel: &str, error: redis::ServerError) -> Result<(), RedisError> {
        let room = self
            .shards
            .keys
            .room_of_channel(channel)
            .unwrap_or_default();
        warn!(
            "redis subscriber {}: subscribing to room {room:?} refused: {} {}",
            self.shard,
            error.code(),
            error.details().unwrap_or_default()
        );
        match error.kind() {
            Some(ServerErrorKind::Moved | ServerErrorKind::Ask) if !room.is_empty() => {
                self.relocate(room);
                Ok(())
            }
            _ => Err(error.into()),
        }
    }

    /// `room` is not served on this connection any more: subscribed again
    /// where the cluster's map says, and caught up there.
    fn relocate(&self, room: &str) {
        self.shards.rooms.unplace(room);
        self.catch_up.abandon(room);
        self.catch_up.relocate(room);
    }

    /// Checks a payload and passes its event on (or holds it at the room's
    /// catch-up gate).
    fn take_payload(&self, channel: &str, payload: &[u8]) {
        let shards = &self.shards;
        let received = Received::now(Via::Pubsub);
        let event = parse_channel_event(payload, &shards.settings.limits).and_then(|event| {
            // A room's channel carries that room's events only: anything
            // else was published by hand, and would reach one instance's
            // clients of another room.
            if shards.keys.room_of_channel(channel) == Some(event.room()) {
                Ok(event)
            } else {
                Err(BadPayload(format!(
                    "an event of room {:?} on channel {channel}",
                    event.room()
                )))
            }
        });
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                Metrics::inc(&shards.metrics.broker_messages_total);
                Metrics::inc(&shards.metrics.broker_payloads_invalid_total);
                warn!("redis subscriber: payload on {channel} skipped: {e}");
                return;
            }
        };
        let room = event.room().to_string();
        let event = match event {
            ChannelEvent::Message(message) => {
                Metrics::inc(&shards.metrics.broker_messages_total);
                faults::inject("subscriber", &message.text);
                BrokerEvent::Message(message, received)
            }
            ChannelEvent::MemberChange(change) => {
                presence(&shards.metrics, PresenceChange::MemberChange(change))
            }
            ChannelEvent::MembersExpired(expired) => {
                presence(&shards.metrics, PresenceChange::MembersExpired(expired))
            }
            ChannelEvent::MembersRewritten(rewritten) => {
                presence(&shards.metrics, PresenceChange::MembersRewritten(rewritten))
            }
            ChannelEvent::Typing { room, name } => {
                presence(&shards.metrics, PresenceChange::Typing { room, name })
            }
        };
        self.catch_up.pass(&room, event);
    }
}

fn presence(metrics: &Metrics, change: PresenceChange) -> BrokerEvent {
    Metrics::inc(&metrics.broker_presence_events_total);
    BrokerEvent::Presence(change)
}

/// Shuts the subscribed connection down when the subscriber lets go of it.
struct ShutdownOnDrop(Arc<Subscription>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}
