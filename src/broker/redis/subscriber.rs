//! The subscriber threads: each reads one subscribed Redis connection and
//! blocks on it. One with a single Redis; one per shard of a Redis Cluster.
//!
//! A connection that has sent `SUBSCRIBE` can do nothing but receive, and
//! reading from it blocks until a message comes, which may be never: the
//! blocking-subscription pitfall. So this thread does nothing else. It
//! validates what arrives, passes subscription confirmations to the room
//! bookkeeping ([`super::rooms`]), catches up from history after a
//! reconnection, and emits events in order into the fan-out's channel; it
//! knows nothing of clients, and never waits on one, or Redis would cut it
//! off at `client-output-buffer-limit pubsub`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use log::{debug, error, info, warn};
use redis::{Connection, ConnectionInfo, RedisError};

use super::cluster::Topology;
use super::rooms::RoomSubscriptions;
use super::subscription::{self, Push};
use super::{CONNECT_TIMEOUT, RedisKeys, StreamEntry, connect, explain, parse_stream_entries};
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, DeliveryStatus, EventSender, PresenceChange};
use crate::clock;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{
    BadPayload, ChannelEvent, ChatMessage, Limits, MessageId, Received, Via, parse_channel_event,
};
use crate::sync::{Mutex, lock};

/// How far ahead of this machine's clock a message id may be and still
/// count as made by the accept script (clocks of Redis and of instances
/// differ a little).
const PLAUSIBLE_CLOCK_SKEW_MS: u64 = 60_000;

/// Live messages to skip after a catch-up, per room: those up to the id
/// the catch-up already delivered. A room's entry goes at its first newer
/// message, so the check costs nothing in steady state.
type CatchUpSeams = HashMap<String, MessageId>;

/// Per room, where catch-up resumes: the last id delivered, or the room's
/// last id in history when it was subscribed. Shared by the subscribers of
/// a cluster's shards, because a room whose slot moves is caught up by the
/// shard it moves to.
pub type Delivered = Arc<Mutex<HashMap<String, MessageId>>>;

/// Where a subscriber connects.
pub enum Node {
    /// The one Redis.
    Single(ConnectionInfo),
    /// The current master of a Redis Cluster shard.
    Shard(Arc<Topology>),
}

/// One subscriber thread's state.
pub struct Subscriber {
    /// Which subscribed connection this is (0 with a single Redis).
    pub shard: usize,
    pub node: Node,
    pub events_tx: EventSender,
    /// For the logs: where Redis is (without a password).
    pub url: String,
    /// The database the URL names (for the message when Redis has none
    /// of that number).
    pub db: i64,
    /// Why this connection is down, for `/readyz` (`None` until it fails).
    pub down_reason: Arc<Mutex<Option<String>>>,
    pub name: String,
    pub limits: Limits,
    pub keys: RedisKeys,
    /// The rooms with local clients: those subscribed, and caught up on.
    pub rooms: Arc<RoomSubscriptions>,
    pub metrics: Arc<Metrics>,
    pub subscribed: Arc<AtomicBool>,
    /// Told when this connection is back after a failure (presence is
    /// then registered again and re-sent).
    pub reconnected_tx: crossbeam_channel::Sender<()>,
    pub backoff: Backoff,
    pub delivered: Delivered,
    /// Until when (wall-clock ms) a demo cut keeps this subscriber away.
    pub held_until_ms: Arc<AtomicU64>,
    /// Counted up at every break, so that the publishing connections, which
    /// may not have noticed yet, reconnect before their next command.
    pub link_breaks: Arc<AtomicU64>,
}

impl Subscriber {
    /// The subscriber thread: connect, subscribe, catch up on what was
    /// missed, deliver until the link breaks, wait, and again; for the life
    /// of the process.
    pub fn run(mut self, first_attempt_tx: crossbeam_channel::Sender<()>) {
        let mut failures = 0u64;
        let mut was_subscribed = false;
        loop {
            // Clients that joined while Redis was away were told `down`:
            // the first subscription after any failure tells them `up`.
            let outcome =
                self.subscribe_and_deliver(&first_attempt_tx, was_subscribed, failures > 0);
            self.rooms.disconnected(self.shard);
            if self.subscribed.swap(false, Ordering::Relaxed) {
                was_subscribed = true;
                failures = 0;
                self.backoff.reset();
                self.emit(BrokerEvent::Delivery(DeliveryStatus::Down));
            }
            Metrics::set(&self.metrics.redis_subscriber_up, 0);
            let _ = first_attempt_tx.try_send(());
            let e = outcome.expect_err("delivery only ends on an error");
            self.link_breaks.fetch_add(1, Ordering::Relaxed);
            failures += 1;
            if self.wait_out_a_demo_cut() {
                failures = 0;
                continue;
            }
            let reason = explain::explain(&e, &self.url, self.db);
            let changed = lock(&self.down_reason).replace(reason.clone()) != Some(reason.clone());
            // Once per outage, and again when Redis answers something new
            // (it came back with another password).
            if failures == 1 || (changed && e.code().is_some()) {
                error!(
                    "redis subscriber {}: {reason}; cross-instance delivery is down, retrying",
                    self.shard
                );
            } else {
                debug!(
                    "redis subscriber {}: attempt {failures} failed: {e}",
                    self.shard
                );
            }
            thread::sleep(self.backoff.next_delay());
            if let Node::Shard(topology) = &self.node
                && let Err(e) = topology.refresh()
            {
                debug!(
                    "redis subscriber {}: cluster slots not read: {e}",
                    self.shard
                );
            }
        }
    }

    /// After `/demo/cut-subscription`: stays away as long as asked, then
    /// reconnects at once, as after a real outage. False if no demo cut
    /// is in force (the failure is a real one).
    fn wait_out_a_demo_cut(&mut self) -> bool {
        let until = self.held_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let left = until.saturating_sub(clock::wall_millis());
        info!(
            "redis subscriber {}: cut on purpose (/demo/cut-subscription); reconnecting in {} ms",
            self.shard, left
        );
        thread::sleep(Duration::from_millis(left));
        // Only one cut is waited out: a failure after it is real.
        self.held_until_ms.store(0, Ordering::Relaxed);
        true
    }

    /// The node to subscribe on now.
    fn node_info(&self) -> Result<ConnectionInfo, RedisError> {
        match &self.node {
            Node::Single(info) => Ok(info.clone()),
            Node::Shard(topology) => topology.master_of_shard(self.shard).ok_or_else(|| {
                std::io::Error::other(format!("cluster shard {} has no master", self.shard)).into()
            }),
        }
    }

    fn subscribe_and_deliver(
        &mut self,
        first_attempt_tx: &crossbeam_channel::Sender<()>,
        reconnect: bool,
        after_failure: bool,
    ) -> Result<(), RedisError> {
        let info = self.node_info()?;
        let sharded = matches!(self.node, Node::Shard(_));
        let (mut reader, writer) = subscription::open(&info, &self.name, sharded, CONNECT_TIMEOUT)?;
        // History is read from the same node, on a plain connection.
        let mut history = connect(&info, &format!("{}-history", self.name))?;
        let writer = Arc::new(writer);
        // However this ends, the connection is closed: sessions holding
        // the write half find it broken, not silently unread.
        let _closed = ShutdownOnDrop(writer.clone());
        let rooms = self.rooms.connected(self.shard, writer)?;
        let mut awaited: HashSet<String> = rooms
            .iter()
            .map(|room| self.keys.room_channel(room))
            .collect();
        // Confirmed first, history second: a message accepted in between
        // is in both, and the seams drop the second copy. What arrives
        // before every room is confirmed waits here.
        let mut early = Vec::new();
        while !awaited.is_empty() {
            match reader.next_push()? {
                Push::Subscribed(channel) => {
                    awaited.remove(&channel);
                    self.rooms.confirmed(&channel);
                }
                push => early.push(push),
            }
        }
        let mut seams = self.catch_up(&rooms, &mut history)?;
        self.subscribed.store(true, Ordering::Relaxed);
        Metrics::set(&self.metrics.redis_subscriber_up, 1);
        if reconnect {
            Metrics::inc(&self.metrics.redis_reconnects_total);
        }
        if reconnect || after_failure {
            self.emit(BrokerEvent::Delivery(DeliveryStatus::Up));
            let _ = self.reconnected_tx.try_send(());
        }
        info!("redis subscriber {}: connected to {}", self.shard, self.url);
        let _ = first_attempt_tx.try_send(());
        for push in early {
            self.take(push, &mut seams, &mut history)?;
        }
        loop {
            let push = reader.next_push()?;
            self.take(push, &mut seams, &mut history)?;
        }
    }

    /// Handles one push from the subscribed connection.
    fn take(
        &mut self,
        push: Push,
        seams: &mut CatchUpSeams,
        history: &mut Connection,
    ) -> Result<(), RedisError> {
        let (channel, payload) = match push {
            Push::Subscribed(channel) => {
                if let Some(room) = self.keys.room_of_channel(&channel) {
                    let room = room.to_string();
                    if lock(&self.delivered).contains_key(&room) {
                        // A room that moved here from another shard:
                        // deliver what it missed on the way.
                        seams.extend(self.catch_up(std::slice::from_ref(&room), history)?);
                    } else if let Some(last) = self.last_in_history(&room, history)? {
                        // A room joined while this connection was up: its
                        // clients read history themselves; catch-up after
                        // a later outage resumes from what history holds now.
                        self.record_delivered(room, last);
                    }
                }
                self.rooms.confirmed(&channel);
                return Ok(());
            }
            Push::Unsubscribed(channel) => {
                let Some(room) = self.keys.room_of_channel(&channel) else {
                    return Ok(());
                };
                if !self.rooms.is_wanted(room) {
                    lock(&self.delivered).remove(room);
                } else if let Node::Shard(topology) = &self.node {
                    // Redis Cluster moved the room's slot to another
                    // shard: find where it is now, and subscribe there.
                    info!(
                        "redis subscriber {}: room {room} moved to another shard",
                        self.shard
                    );
                    topology.refresh()?;
                    self.rooms.relocate(room);
                }
                return Ok(());
            }
            Push::Message { channel, payload } => (channel, payload),
        };
        let received = Received::now(Via::Pubsub);
        let event = parse_channel_event(&payload, &self.limits).and_then(|event| {
            // A room's channel carries that room's events only: anything
            // else was published by hand, and would reach one instance's
            // clients of another room.
            if self.keys.room_of_channel(&channel) == Some(event.room()) {
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
                Metrics::inc(&self.metrics.broker_messages_total);
                Metrics::inc(&self.metrics.broker_payloads_invalid_total);
                warn!("redis subscriber: payload on {channel} skipped: {e}");
                return Ok(());
            }
        };
        let change = match event {
            ChannelEvent::Message(message) => {
                self.take_message(message, received, seams);
                return Ok(());
            }
            ChannelEvent::Join(event) => PresenceChange::Join(event),
            ChannelEvent::Leave(event) => PresenceChange::Leave(event),
            ChannelEvent::Typing { room, name } => PresenceChange::Typing { room, name },
        };
        Metrics::inc(&self.metrics.broker_presence_events_total);
        self.emit(BrokerEvent::Presence(change));
        Ok(())
    }

    /// Delivers a message received live, unless a catch-up already did.
    fn take_message(&mut self, message: ChatMessage, received: Received, seams: &mut CatchUpSeams) {
        Metrics::inc(&self.metrics.broker_messages_total);
        faults::inject("subscriber", &message.text);
        if let Some(seam) = seams.get(&message.room) {
            if message.id <= *seam {
                return;
            }
            seams.remove(&message.room);
        }
        self.deliver(message, received);
    }

    fn emit(&self, event: BrokerEvent) {
        // The fan-out only ends with the process, or dies, which the
        // supervisor reports.
        let _ = self.events_tx.send(event);
    }

    fn deliver(&mut self, message: ChatMessage, received: Received) {
        let id = message.id;
        let room = message.room.clone();
        self.emit(BrokerEvent::Message(message, received));
        self.record_delivered(room, id);
    }

    fn record_delivered(&mut self, room: String, id: MessageId) {
        // Anyone can publish on the channel: an id from the future (say,
        // 9999999999999-0 typed into redis-cli) must not move the point
        // catch-up resumes from, or real messages after an outage would be
        // skipped. Ids the accept script makes are never ahead of the clock.
        if id.millis > clock::wall_millis() + PLAUSIBLE_CLOCK_SKEW_MS {
            return;
        }
        let mut delivered = lock(&self.delivered);
        let last = delivered.entry(room).or_insert(id);
        *last = (*last).max(id);
    }

    /// The id of a room's newest message in history.
    fn last_in_history(
        &self,
        room: &str,
        history: &mut Connection,
    ) -> Result<Option<MessageId>, RedisError> {
        let newest: Vec<StreamEntry> = redis::cmd("XREVRANGE")
            .arg(self.keys.history(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(history)?;
        Ok(newest.first().and_then(|(id, _)| id.parse().ok()))
    }

    /// Delivers from history, in order, what each of `rooms` missed while
    /// this connection was down: after the last id delivered there, or,
    /// for a room first subscribed now (its clients joined while Redis was
    /// away), all that history holds; each client's outbox drops what it
    /// already got as history. Returns the seams that keep live copies of
    /// those from going out twice.
    fn catch_up(
        &mut self,
        rooms: &[String],
        history: &mut Connection,
    ) -> Result<CatchUpSeams, RedisError> {
        let mut seams = CatchUpSeams::new();
        let mut missed = 0;
        for room in rooms {
            let from = lock(&self.delivered).get(room).copied();
            let start = from.map_or_else(|| "-".to_string(), |id| format!("({id}"));
            let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
                .arg(self.keys.history(room))
                .arg(start)
                .arg("+")
                .query(history)?;
            for message in parse_stream_entries(entries, &self.limits) {
                seams.insert(room.clone(), message.id);
                self.deliver(message, Received::now(Via::History));
                missed += 1;
            }
        }
        if missed > 0 {
            info!(
                "redis subscriber {}: caught up on {missed} messages published while it was away",
                self.shard
            );
        }
        Ok(seams)
    }
}

/// Shuts the subscribed connection down when the subscriber lets go of it.
struct ShutdownOnDrop(Arc<subscription::SubscriptionWriter>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}
