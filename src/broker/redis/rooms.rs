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
    /// Local clients in the room.
    clients: usize,
    /// Redis confirmed the subscription on the current connection.
    live: bool,
    /// `SUBSCRIBE` was written on the current connection.
    requested: bool,
    /// When the last client left, if none is left.
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    /// The subscribed connection's write half, while it is up.
    writer: Option<Arc<SubscriptionWriter>>,
}

pub struct RoomSubscriptions {
    keys: RedisKeys,
    linger: Duration,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Signalled on confirmations, disconnections and departures.
    changed: Condvar,
}

impl RoomSubscriptions {
    pub fn new(keys: RedisKeys, linger: Duration, metrics: Arc<Metrics>) -> Self {
        RoomSubscriptions {
            keys,
            linger,
            metrics,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    // Every step below leaves the state consistent before it can panic.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A local client joins `room`: subscribes to it if needed, and waits
    /// until Redis confirms.
    pub fn attach(&self, room: &str) -> Attached {
        let mut state = self.state();
        let writer = state.writer.clone();
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
            if state.writer.is_none() || room_state.is_none_or(|r| !r.requested) {
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

    /// The subscriber connected: every wanted room is subscribed on the
    /// new connection. Returns their channels, whose confirmations the
    /// subscriber awaits before catching up.
    pub fn connected(&self, writer: Arc<SubscriptionWriter>) -> std::io::Result<Vec<String>> {
        let mut state = self.state();
        let channels: Vec<String> = state
            .rooms
            .keys()
            .map(|room| self.keys.room_channel(room))
            .collect();
        writer.subscribe(&channels)?;
        for room in state.rooms.values_mut() {
            room.requested = true;
            room.live = false;
        }
        state.writer = Some(writer);
        Ok(channels)
    }

    /// The subscriber lost its connection: nothing is live any more.
    pub fn disconnected(&self) {
        let mut state = self.state();
        state.writer = None;
        for room in state.rooms.values_mut() {
            room.requested = false;
            room.live = false;
        }
        Metrics::set(&self.metrics.room_subscriptions, 0);
        self.changed.notify_all();
    }

    /// Redis confirmed the subscription to `channel`.
    pub fn confirmed(&self, channel: &str) {
        let Some(room) = self.keys.room_of_channel(channel) else {
            return;
        };
        let mut state = self.state();
        if let Some(entry) = state.rooms.get_mut(room) {
            entry.live = true;
            Metrics::up(&self.metrics.room_subscriptions);
            self.changed.notify_all();
        }
    }

    /// The rooms wanted now: those to catch up on after a reconnection.
    pub fn rooms(&self) -> Vec<String> {
        self.state().rooms.keys().cloned().collect()
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
                let mut channels = Vec::new();
                for room in &expired {
                    if let Some(entry) = state.rooms.remove(room)
                        && entry.live
                    {
                        Metrics::down(&self.metrics.room_subscriptions);
                    }
                    channels.push(self.keys.room_channel(room));
                }
                debug!("redis subscriber: no local client left in {expired:?}; unsubscribing");
                if let Some(writer) = &state.writer
                    && let Err(e) = writer.unsubscribe(&channels)
                {
                    warn!("redis subscriber: cannot unsubscribe: {e}");
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
