//! The subscriber thread: the one thread that owns the subscribed Redis
//! connection and blocks on it.
//!
//! A connection that has sent `SUBSCRIBE` can do nothing but receive, and
//! reading from it blocks until a message comes, which may be never: the
//! blocking-subscription pitfall. So this thread does nothing else. It
//! validates what arrives, catches up from history after a reconnection,
//! and emits events in order into the fan-out's channel; it knows nothing
//! of clients, and never waits on one, or Redis would cut it off at
//! `client-output-buffer-limit pubsub`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use log::{debug, error, info, warn};
use redis::{Client, RedisError};

use super::{RedisKeys, StreamEntry, connect, parse_last_id, parse_stream_entries};
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, DeliveryStatus, EventSender, RoomDirectory};
use crate::clock;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, Limits, MessageId, parse_channel_payload};

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
    /// The rooms with local clients: those to catch up on.
    pub rooms: Arc<dyn RoomDirectory>,
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
        }
        if reconnect || after_failure {
            self.emit(BrokerEvent::Delivery(DeliveryStatus::Up));
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
                    faults::inject("subscriber", &message.text);
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
