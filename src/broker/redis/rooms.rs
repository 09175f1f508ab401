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
//! The `SUBSCRIBE` and `UNSUBSCRIBE` commands are queued on the room's
//! subscribed connection under this file's lock, which costs no I/O (the
//! connection's writer thread writes them, see `subscription.rs`) and keeps
//! them in the order they were decided in. The confirmations come back
//! through the subscriber thread, which calls [`RoomSubscriptions::confirmed`].
//! A small `room-linger` thread ends the subscriptions whose linger is over.
//!
//! A room that lost its subscription (the connection broke, or a Redis
//! Cluster moved its slot) is marked to be caught up: when it is
//! subscribed again, its subscriber delivers from history what it missed.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::debug;

use super::keys::RedisKeys;
use super::subscription::Subscription;
use crate::metrics::Metrics;

/// How long a join waits for Redis to confirm its room's subscription
/// before it goes on without (the subscriber then catches the room up
/// from history when it is subscribed).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a joining client's room is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Redis confirmed the subscription: every message accepted from now on
    /// reaches this instance.
    Live,
    /// The room's subscriber is not connected (or Redis did not answer in
    /// time): the room is wanted, and is subscribed and caught up from
    /// history as soon as it can be.
    NotLive,
    /// In a Redis Cluster, the master of the room's slot is not one this
    /// instance knows: its map of the cluster needs reading again.
    Unplaced,
}

#[derive(Debug, Default)]
struct Room {
    /// The subscribed connection (cluster shard) the room's channel is on.
    shard: Option<usize>,
    /// Local clients in the room.
    clients: usize,
    /// Redis confirmed the subscription on the current connection.
    live: bool,
    /// `SUBSCRIBE` was queued on the current connection.
    requested: bool,
    /// The room lost its subscription: what it missed meanwhile is to be
    /// delivered from history once it is subscribed again.
    catch_up: bool,
    /// When the last client left, if none is left.
    idle_since: Option<Instant>,
}

struct State {
    rooms: HashMap<String, Room>,
    /// Each subscribed connection, while it is up: one with a single
    /// Redis, one per shard of a Redis Cluster.
    subscriptions: Vec<Option<Arc<Subscription>>>,
}

/// Which shard a room's channel is on now (always 0 with a single Redis;
/// `None` while the cluster master of its slot is unknown).
pub type ShardOf = Box<dyn Fn(&str) -> Option<usize> + Send + Sync>;

pub struct RoomSubscriptions {
    keys: RedisKeys,
    linger: Duration,
    metrics: Arc<Metrics>,
    shard_of: ShardOf,
    state: Mutex<State>,
    /// Signalled on confirmations, disconnections and departures.
    changed: Condvar,
}

/// What a confirmation means for the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// A room subscribed for its first client: nothing was missed.
    Fresh,
    /// A room subscribed again after losing its subscription: catch it up.
    CatchUp,
    /// Nobody wants the room any more, or it was not asked on this
    /// connection.
    Unwanted,
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
                subscriptions: vec![None; shards.max(1)],
            }),
            changed: Condvar::new(),
        }
    }

    // Every step below leaves the state consistent before it can panic.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes room for shard `shard` (a Redis Cluster master added after
    /// start-up); nothing if there is.
    pub fn ensure_shard(&self, shard: usize) {
        let mut state = self.state();
        if state.subscriptions.len() <= shard {
            state.subscriptions.resize(shard + 1, None);
        }
    }

    /// The shard `room` is on now.
    pub fn shard_of(&self, room: &str) -> Option<usize> {
        (self.shard_of)(room)
    }

    /// Every subscribed connection that is up, by shard (for the watcher).
    pub fn subscriptions(&self) -> Vec<(usize, Arc<Subscription>)> {
        let state = self.state();
        state
            .subscriptions
            .iter()
            .enumerate()
            .filter_map(|(shard, subscription)| Some((shard, subscription.clone()?)))
            .collect()
    }

    /// The wanted rooms on any of `shards`.
    pub fn rooms_of(&self, shards: &[usize]) -> Vec<String> {
        let state = self.state();
        state
            .rooms
            .iter()
            .filter(|(_, room)| room.shard.is_some_and(|shard| shards.contains(&shard)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Cuts every subscribed connection (`--demo-controls`): each
    /// subscriber sees its link break and recovers as from a real outage.
    /// Returns how many were cut.
    pub fn cut(&self) -> usize {
        let live = self.subscriptions();
        for (_, subscription) in &live {
            subscription.shutdown();
        }
        live.len()
    }

    /// A local client joins `room`: subscribes to it if needed, and waits
    /// until Redis confirms.
    pub fn attach(&self, room: &str) -> Attached {
        let shard = self.shard_of(room);
        let mut state = self.state();
        let State {
            rooms,
            subscriptions,
        } = &mut *state;
        let entry = rooms.entry(room.to_string()).or_default();
        entry.clients += 1;
        entry.idle_since = None;
        if entry.live {
            return Attached::Live;
        }
        // A room that cannot be subscribed now is caught up when it is: its
        // clients read history meanwhile, and must miss nothing after it.
        let Some(shard) = shard else {
            entry.catch_up = true;
            return Attached::Unplaced;
        };
        if !entry.requested {
            entry.shard = Some(shard);
            let Some(subscription) = subscriptions.get(shard).cloned().flatten() else {
                entry.catch_up = true;
                return Attached::NotLive;
            };
            entry.requested = true;
            Metrics::inc(&self.metrics.room_subscriptions_total);
            subscription.subscribe(&self.keys.room_channel(room));
        }
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let room_state = state.rooms.get(room);
            if room_state.is_some_and(|r| r.live) {
                return Attached::Live;
            }
            if room_state.is_none_or(|r| !r.requested) {
                return Attached::NotLive;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                debug!("redis subscriber: room {room} not confirmed within {CONFIRM_TIMEOUT:?}");
                if let Some(entry) = state.rooms.get_mut(room) {
                    entry.catch_up = true;
                }
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
    /// is subscribed on the new connection (queued before this returns,
    /// read by the caller after). Returns those rooms: each is to be caught
    /// up once confirmed.
    pub fn connected(&self, shard: usize, subscription: Arc<Subscription>) -> Vec<String> {
        let mut state = self.state();
        let mut rooms = Vec::new();
        for (room, entry) in state.rooms.iter_mut() {
            // Rooms move between shards only when the cluster's slots do.
            if (self.shard_of)(room) == Some(shard) {
                if entry.live {
                    Metrics::down(&self.metrics.room_subscriptions);
                }
                entry.shard = Some(shard);
                entry.requested = true;
                entry.live = false;
                entry.catch_up = true;
                subscription.subscribe(&self.keys.room_channel(room));
                rooms.push(room.clone());
            }
        }
        if let Some(slot) = state.subscriptions.get_mut(shard) {
            *slot = Some(subscription);
        }
        self.adopt_orphans(&mut state);
        rooms
    }

    /// Subscribes, on the shard that owns them now, wanted rooms that have
    /// no subscription: their slot moved (Redis Cluster resharding), or
    /// their shard was not known when they were wanted.
    fn adopt_orphans(&self, state: &mut State) {
        let State {
            rooms,
            subscriptions,
        } = state;
        for (room, entry) in rooms.iter_mut().filter(|(_, entry)| !entry.requested) {
            let Some(shard) = (self.shard_of)(room) else {
                continue;
            };
            entry.shard = Some(shard);
            if let Some(subscription) = subscriptions.get(shard).cloned().flatten() {
                entry.requested = true;
                subscription.subscribe(&self.keys.room_channel(room));
            }
        }
    }

    /// A subscriber lost its connection: none of its rooms is live, and
    /// each is to be caught up when subscribed again.
    pub fn disconnected(&self, shard: usize) {
        let mut state = self.state();
        if let Some(slot) = state.subscriptions.get_mut(shard) {
            *slot = None;
        }
        for room in state.rooms.values_mut() {
            if room.shard == Some(shard) {
                if room.live {
                    Metrics::down(&self.metrics.room_subscriptions);
                }
                room.requested = false;
                room.live = false;
                room.catch_up = true;
            }
        }
        self.changed.notify_all();
    }

    /// Redis confirmed the subscription to `channel`.
    pub fn confirmed(&self, channel: &str) -> Confirmed {
        let Some(room) = self.keys.room_of_channel(channel) else {
            return Confirmed::Unwanted;
        };
        let mut state = self.state();
        let Some(entry) = state.rooms.get_mut(room) else {
            return Confirmed::Unwanted;
        };
        if !entry.requested {
            return Confirmed::Unwanted;
        }
        if !entry.live {
            entry.live = true;
            Metrics::up(&self.metrics.room_subscriptions);
            self.changed.notify_all();
        }
        if std::mem::take(&mut entry.catch_up) {
            Confirmed::CatchUp
        } else {
            Confirmed::Fresh
        }
    }

    /// `room` lost its subscription while its connection stayed up: Redis
    /// Cluster moved its slot away, or refused it there (`MOVED`). The
    /// caller reads the cluster's slots again, then calls [`place`](Self::place).
    pub fn unplace(&self, room: &str) {
        let mut state = self.state();
        if let Some(entry) = state.rooms.get_mut(room) {
            if entry.live {
                Metrics::down(&self.metrics.room_subscriptions);
            }
            entry.requested = false;
            entry.live = false;
            entry.catch_up = true;
        }
        self.changed.notify_all();
    }

    /// Subscribes every wanted room that has no subscription on the shard
    /// that owns it now (after the cluster's slots were read again).
    pub fn place(&self) {
        let mut state = self.state();
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
                    && let Some(shard) = entry.shard
                    && let Some(subscription) = state.subscriptions.get(shard).cloned().flatten()
                {
                    subscription.unsubscribe(&self.keys.room_channel(room));
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
