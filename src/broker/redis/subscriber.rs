//! The subscriber thread: the one thread that reads the subscribed Redis
//! connection and blocks on it.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use log::{debug, error, info, warn};
use redis::{Client, RedisError};

use super::rooms::RoomSubscriptions;
use super::subscription::{self, Push};
use super::{
    CONNECT_TIMEOUT, RedisKeys, StreamEntry, connect, parse_last_id, parse_stream_entries,
};
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, DeliveryStatus, EventSender};
use crate::clock;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{BadPayload, ChatMessage, Limits, MessageId, parse_channel_payload};

/// How far ahead of this machine's clock a message id may be and still
/// count as made by the accept script (clocks of Redis and of instances
/// differ a little).
const PLAUSIBLE_CLOCK_SKEW_MS: u64 = 60_000;

/// Live messages to skip after a catch-up, per room: those up to the id
/// the catch-up already delivered. A room's entry goes at its first newer
/// message, so the check costs nothing in steady state.
type CatchUpSeams = HashMap<String, MessageId>;

/// The subscriber thread's state.
pub struct Subscriber {
    pub events_tx: EventSender,
    pub client: Client,
    pub url: String,
    pub name: String,
    pub limits: Limits,
    pub keys: RedisKeys,
    /// The rooms with local clients: those subscribed, and caught up on.
    pub rooms: Arc<RoomSubscriptions>,
    pub metrics: Arc<Metrics>,
    pub subscribed: Arc<AtomicBool>,
    pub backoff: Backoff,
    /// The last id delivered in each room: where catch-up resumes.
    pub last_delivered: HashMap<String, MessageId>,
    /// The chat's last id when the previous subscription began: where
    /// catch-up resumes for rooms that had no message since.
    pub baseline: Option<MessageId>,
}

impl Subscriber {
    /// The subscriber thread: subscribe, catch up on what was missed,
    /// deliver until the link breaks, wait, and again; for the life of the
    /// process.
    pub fn run(mut self, first_attempt_tx: crossbeam_channel::Sender<()>) {
        let mut failures = 0u64;
        let mut was_subscribed = false;
        loop {
            // Clients that joined while Redis was away were told `down`:
            // the first subscription after any failure tells them `up`.
            let outcome =
                self.subscribe_and_deliver(&first_attempt_tx, was_subscribed, failures > 0);
            self.rooms.disconnected();
            if self.subscribed.swap(false, Ordering::Relaxed) {
                was_subscribed = true;
                failures = 0;
                self.backoff.reset();
                self.emit(BrokerEvent::Delivery(DeliveryStatus::Down));
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
        after_failure: bool,
    ) -> Result<(), RedisError> {
        let (mut reader, writer) = subscription::open(
            self.client.get_connection_info(),
            &self.name,
            CONNECT_TIMEOUT,
        )?;
        let writer = Arc::new(writer);
        // However this ends, the connection is closed: sessions holding
        // the write half find it broken, not silently unread.
        let _closed = ShutdownOnDrop(writer.clone());
        let mut awaited: HashSet<String> = self.rooms.connected(writer)?.into_iter().collect();
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
        let mut seams = self.catch_up(reconnect)?;
        self.subscribed.store(true, Ordering::Relaxed);
        Metrics::set(&self.metrics.redis_subscriber_up, 1);
        if reconnect {
            Metrics::inc(&self.metrics.redis_reconnects_total);
        }
        if reconnect || after_failure {
            self.emit(BrokerEvent::Delivery(DeliveryStatus::Up));
        }
        info!("redis subscriber: connected to {}", self.url);
        let _ = first_attempt_tx.try_send(());
        for push in early {
            self.take(push, &mut seams);
        }
        loop {
            let push = reader.next_push()?;
            self.take(push, &mut seams);
        }
    }

    /// Handles one push from the subscribed connection.
    fn take(&mut self, push: Push, seams: &mut CatchUpSeams) {
        let (channel, payload) = match push {
            Push::Subscribed(channel) => return self.rooms.confirmed(&channel),
            Push::Unsubscribed(_) => return,
            Push::Message { channel, payload } => (channel, payload),
        };
        Metrics::inc(&self.metrics.broker_messages_total);
        let message = parse_channel_payload(&payload, &self.limits).and_then(|message| {
            // A room's channel carries that room's messages only: anything
            // else was published by hand, and would reach one instance's
            // clients of another room.
            if self.keys.room_of_channel(&channel) == Some(message.room.as_str()) {
                Ok(message)
            } else {
                Err(BadPayload(format!(
                    "a message of room {:?} on channel {channel}",
                    message.room
                )))
            }
        });
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                Metrics::inc(&self.metrics.broker_payloads_invalid_total);
                warn!("redis subscriber: payload on {channel} skipped: {e}");
                return;
            }
        };
        faults::inject("subscriber", &message.text);
        if let Some(seam) = seams.get(&message.room) {
            if message.id <= *seam {
                return;
            }
            seams.remove(&message.room);
        }
        self.deliver(message);
    }

    fn emit(&self, event: BrokerEvent) {
        // The fan-out only ends with the process, or dies, which the
        // supervisor reports.
        let _ = self.events_tx.send(event);
    }

    fn deliver(&mut self, message: ChatMessage) {
        let id = message.id;
        let room = message.room.clone();
        self.emit(BrokerEvent::Message(message));
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
            for room in self.rooms.rooms() {
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

/// Shuts the subscribed connection down when the subscriber lets go of it.
struct ShutdownOnDrop(Arc<subscription::SubscriptionWriter>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}
