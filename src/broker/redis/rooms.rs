//! Which rooms this instance subscribes to: exactly those with local
//! clients, plus a short linger after the last one leaves.
//!
//! With one channel for every room, each instance would receive, parse
//! and drop every message of every room, and adding instances would add
//! traffic, not capacity. So each room has its own channel, and an
//! instance subscribes to a room's channel only while it has clients
//! there. A client's join waits until Redis has confirmed the room's
//! subscription, and only then reads history, so that the seam between
//! history and live messages stays exact. After the last client leaves,
//! the subscription lingers for `--room-linger-ms`, so that a page reload
//! does not unsubscribe and subscribe again.
//!
//! The subscribe and unsubscribe commands are written on the subscribed
//! connection by whichever thread needs them (see `subscription.rs`); the
//! confirmations come back through the subscriber thread, which calls
//! [`RoomSubscriptions::confirmed`]. A small `room-linger` thread ends the
//! subscriptions whose linger is over.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::RedisKeys;
use super::subscription::SubscriptionWriter;
use crate::metrics::Metrics;

/// How long a join waits for Redis to confirm its room's subscription
/// before it goes on without (the subscriber then catches the room up
/// from history when it reconnects).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a joining client's room is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Redis confirmed the subscription: every message accepted from now on
    /// reaches this instance.
    Live,
    /// The subscriber is not connected (or Redis did not answer in time):
    /// the room is wanted, and is subscribed and caught up from history as
    /// soon as the subscriber is back.
    NotLive,
}

#[derive(Debug, Default)]
struct Room {
    /// The subscriber connection (shard) the room's channel is on.
    shard: usize,
    /// Local clients in the room.
    clients: usize,
    /// Redis confirmed the subscription on the current connection.
    live: bool,
    /// `SUBSCRIBE` was written on the current connection.
    requested: bool,
    /// When the last client left, if none is left.
    idle_since: Option<Instant>,
}

struct State {
    rooms: HashMap<String, Room>,
    /// Each subscribed connection's write half, while it is up: one with a
    /// single Redis, one per shard of a Redis Cluster.
    writers: Vec<Option<Arc<SubscriptionWriter>>>,
}

/// Which shard a room's channel is on (always 0 with a single Redis).
pub type ShardOf = Box<dyn Fn(&str) -> usize + Send + Sync>;

pub struct RoomSubscriptions {
    keys: RedisKeys,
    linger: Duration,
    metrics: Arc<Metrics>,
    shard_of: ShardOf,
    state: Mutex<State>,
    /// Signalled on confirmations, disconnections and departures.
    changed: Condvar,
}

impl RoomSubscriptions {
    pub fn new(
        keys: RedisKeys,
        linger: Duration,
        metrics: Arc<Metrics>,
        shards: usize,
        shard_of: ShardOf,
    ) -> Self {
        RoomSubscriptions {
            keys,
            linger,
            metrics,
            shard_of,
            state: Mutex::new(State {
                rooms: HashMap::new(),
                writers: vec![None; shards.max(1)],
            }),
            changed: Condvar::new(),
        }
    }

    // Every step below leaves the state consistent before it can panic.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts every subscribed connection (`--demo-controls`): each
    /// subscriber sees its link break and recovers as from a real outage.
    /// Returns how many were cut.
    pub fn cut(&self) -> usize {
        let state = self.state();
        let live: Vec<_> = state.writers.iter().flatten().collect();
        for writer in &live {
            writer.shutdown();
        }
        live.len()
    }

    /// A local client joins `room`: subscribes to it if needed, and waits
    /// until Redis confirms.
    pub fn attach(&self, room: &str) -> Attached {
        let mut state = self.state();
        let shard = (self.shard_of)(room);
        let writer = state.writers.get(shard).cloned().flatten();
        let entry = state.rooms.entry(room.to_string()).or_default();
        entry.clients += 1;
        entry.idle_since = None;
        if entry.live {
            return Attached::Live;
        }
        let Some(writer) = writer else {
            return Attached::NotLive;
        };
        if !entry.requested {
            entry.requested = true;
            entry.shard = shard;
            Metrics::inc(&self.metrics.room_subscriptions_total);
            if let Err(e) = writer.subscribe(&[self.keys.room_channel(room)]) {
                // The subscriber sees the broken link too, and will
                // subscribe again on its next connection.
                warn!("redis subscriber: cannot subscribe to room {room}: {e}");
                return Attached::NotLive;
            }
        }
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let room_state = state.rooms.get(room);
            if room_state.is_some_and(|r| r.live) {
                return Attached::Live;
            }
            if room_state.is_none_or(|r| !r.requested || state.writers[r.shard].is_none()) {
                return Attached::NotLive;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!("redis subscriber: room {room} not confirmed within {CONFIRM_TIMEOUT:?}");
                return Attached::NotLive;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A local client left `room`.
    pub fn detach(&self, room: &str) {
        let mut state = self.state();
        if let Some(entry) = state.rooms.get_mut(room) {
            entry.clients = entry.clients.saturating_sub(1);
            if entry.clients == 0 {
                entry.idle_since = Some(Instant::now());
                self.changed.notify_all();
            }
        }
    }

    /// A subscriber connected to `shard`: every wanted room of that shard
    /// is subscribed on the new connection. Returns those rooms, whose
    /// confirmations the subscriber awaits before catching up.
    pub fn connected(
        &self,
        shard: usize,
        writer: Arc<SubscriptionWriter>,
    ) -> std::io::Result<Vec<String>> {
        let mut state = self.state();
        let mut rooms = Vec::new();
        for (room, entry) in state.rooms.iter_mut() {
            // Rooms move between shards only when the cluster's slots do.
            if (self.shard_of)(room) == shard {
                entry.shard = shard;
                entry.requested = true;
                entry.live = false;
                rooms.push(room.clone());
            }
        }
        let channels: Vec<String> = rooms
            .iter()
            .map(|room| self.keys.room_channel(room))
            .collect();
        writer.subscribe(&channels)?;
        state.writers[shard] = Some(writer);
        self.adopt_orphans(&mut state);
        Ok(rooms)
    }

    /// Subscribes, on the shard that owns them now, wanted rooms whose
    /// slot moved away from the shard they were on (Redis Cluster
    /// resharding): that shard's subscriber found out and reconnected
    /// without them.
    fn adopt_orphans(&self, state: &mut State) {
        let State { rooms, writers } = state;
        for (room, entry) in rooms.iter_mut().filter(|(_, entry)| !entry.requested) {
            let shard = (self.shard_of)(room);
            if let Some(writer) = &writers[shard] {
                entry.shard = shard;
                entry.requested = true;
                if let Err(e) = writer.subscribe(&[self.keys.room_channel(room)]) {
                    warn!("redis subscriber: cannot subscribe to room {room}: {e}");
                }
            }
        }
    }

    /// A subscriber lost its connection: none of its rooms is live.
    pub fn disconnected(&self, shard: usize) {
        let mut state = self.state();
        state.writers[shard] = None;
        for room in state.rooms.values_mut() {
            if room.shard == shard && room.requested {
                if room.live {
                    Metrics::down(&self.metrics.room_subscriptions);
                }
                room.requested = false;
                room.live = false;
            }
        }
        self.changed.notify_all();
    }

    /// Redis confirmed the subscription to `channel`.
    pub fn confirmed(&self, channel: &str) {
        let Some(room) = self.keys.room_of_channel(channel) else {
            return;
        };
        let mut state = self.state();
        if let Some(entry) = state.rooms.get_mut(room)
            && entry.requested
            && !entry.live
        {
            entry.live = true;
            Metrics::up(&self.metrics.room_subscriptions);
            self.changed.notify_all();
        }
    }

    /// Redis Cluster moved `room`'s slot away from the shard it was on:
    /// subscribe it on the shard that owns it now (the topology was just
    /// read again), whose subscriber catches it up.
    pub fn relocate(&self, room: &str) {
        let mut state = self.state();
        if let Some(entry) = state.rooms.get_mut(room) {
            if entry.live {
                Metrics::down(&self.metrics.room_subscriptions);
            }
            entry.requested = false;
            entry.live = false;
        }
        self.adopt_orphans(&mut state);
    }

    /// Whether `room` is wanted (has clients, or lingers).
    pub fn is_wanted(&self, room: &str) -> bool {
        self.state().rooms.contains_key(room)
    }

    /// The `room-linger` thread: ends the subscriptions whose linger is
    /// over, sleeping until the next one is due.
    pub fn run_linger(&self) {
        let mut state = self.state();
        loop {
            let now = Instant::now();
            let mut expired = Vec::new();
            let mut next_due: Option<Instant> = None;
            for (room, entry) in &state.rooms {
                if let Some(since) = entry.idle_since {
                    let due = since + self.linger;
                    if due <= now {
                        expired.push(room.clone());
                    } else {
                        next_due = Some(next_due.map_or(due, |next| next.min(due)));
                    }
                }
            }
            if !expired.is_empty() {
                debug!("redis subscriber: no local client left in {expired:?}; unsubscribing");
            }
            for room in &expired {
                let Some(entry) = state.rooms.remove(room) else {
                    continue;
                };
                if entry.live {
                    Metrics::down(&self.metrics.room_subscriptions);
                }
                if entry.requested
                    && let Some(writer) = &state.writers[entry.shard]
                    && let Err(e) = writer.unsubscribe(&[self.keys.room_channel(room)])
                {
                    warn!("redis subscriber: cannot unsubscribe from room {room}: {e}");
                }
            }
            state = match next_due {
                Some(due) => {
                    let wait = due.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}
