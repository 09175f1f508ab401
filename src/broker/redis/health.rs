//! Whether this instance can deliver, link by link, and what its clients
//! are told about it.
//!
//! A room works when two links work: the subscription that brings its
//! messages (one per Redis Cluster shard; one in all with a single Redis)
//! and the publishing connection that accepts its clients' messages. Each
//! link reports here when it goes down or comes back, and this file
//! decides, per shard, what the clients of its rooms believe:
//! - `status` `down` goes to the clients of a shard's rooms when either
//!   link they depend on breaks; `up` when both work again, the
//!   subscription caught up from history first. So `up` means a send will
//!   be tried, and a shard's trouble is never heard by the rooms of
//!   another.
//! - A client that connects while its room's links are down is told
//!   `down` among its first frames ([`Health::check`]), and the shard is
//!   marked as told `down`: the `up` that follows reaches it too, however
//!   short the outage.
//! - Clients are told that a link is down, never why: the why names the
//!   Redis host, port, database and user. It goes to the logs and the
//!   admin listener's `/readyz` ([`Health::readiness`]).
//!
//! Events are sent under this file's lock, so that the order clients see
//! them in is the order the links changed in.

use std::sync::Arc;

use log::info;

use super::rooms::RoomSubscriptions;
use crate::broker::{BrokerEvent, EventSender, LinkChange, LinkStatus};
use crate::metrics::Metrics;
use crate::sync::{Mutex, lock};

/// Why a link is down, or `None` while it works.
type LinkState = Option<String>;

struct State {
    /// Per shard's subscription: `None` once it is live and caught up.
    subscriptions: Vec<LinkState>,
    /// The publishing connection.
    publisher: LinkState,
    /// Per shard: whether its rooms' clients were last told that sending
    /// works.
    told_up: Vec<bool>,
}

impl State {
    fn shard_up(&self, shard: usize) -> bool {
        self.subscriptions[shard].is_none() && self.publisher.is_none()
    }
}

pub struct Health {
    state: Mutex<State>,
    events_tx: EventSender,
    metrics: Arc<Metrics>,
    rooms: Arc<RoomSubscriptions>,
    cluster: bool,
}

impl Health {
    /// Every link starts down ("connecting"): nobody has been told
    /// anything yet, and the first time both links work, an `up` goes to
    /// whoever was told `down` meanwhile.
    pub fn new(
        shards: usize,
        cluster: bool,
        events_tx: EventSender,
        metrics: Arc<Metrics>,
        rooms: Arc<RoomSubscriptions>,
    ) -> Self {
        Health {
            state: Mutex::new(State {
                subscriptions: vec![Some("connecting".into()); shards],
                publisher: Some("connecting".into()),
                told_up: vec![false; shards],
            }),
            events_tx,
            metrics,
            rooms,
            cluster,
        }
    }

    /// Makes room for shard `shard` (a Redis Cluster master added after
    /// start-up); nothing if there is.
    pub fn ensure_shard(&self, shard: usize) {
        let mut state = lock(&self.state);
        if state.subscriptions.len() <= shard {
            state
                .subscriptions
                .resize(shard + 1, Some("connecting".into()));
            state.told_up.resize(shard + 1, false);
        }
    }

    /// `shard`'s subscription is live and caught up.
    pub fn subscription_up(&self, shard: usize) {
        self.change(|state| state.subscriptions[shard] = None);
    }

    pub fn subscription_down(&self, shard: usize, reason: &str) {
        self.change(|state| state.subscriptions[shard] = Some(reason.to_string()));
    }

    pub fn publisher_up(&self) {
        self.change(|state| state.publisher = None);
    }

    pub fn publisher_down(&self, reason: &str) {
        self.change(|state| state.publisher = Some(reason.to_string()));
    }

    /// Applies a change of one link, and tells the clients of every shard
    /// whose state it changed.
    fn change(&self, apply: impl FnOnce(&mut State)) {
        let mut state = lock(&self.state);
        apply(&mut state);
        let shards = state.subscriptions.len();
        Metrics::set(
            &self.metrics.redis_subscriber_up,
            i64::from(state.subscriptions.iter().all(Option::is_none)),
        );
        Metrics::set(
            &self.metrics.redis_publisher_up,
            i64::from(state.publisher.is_none()),
        );
        let mut went_up = Vec::new();
        let mut went_down = Vec::new();
        for shard in 0..shards {
            let up = state.shard_up(shard);
            if up != state.told_up[shard] {
                state.told_up[shard] = up;
                if up { &mut went_up } else { &mut went_down }.push(shard);
            }
        }
        if !went_down.is_empty() {
            let message = self.told_down().to_string();
            self.tell(LinkStatus::Down, &went_down, shards, message);
        }
        if !went_up.is_empty() {
            info!("redis: delivery is up again for shards {went_up:?}");
            let message = "the server is linked to Redis again".to_string();
            self.tell(LinkStatus::Up, &went_up, shards, message);
        }
    }

    fn tell(&self, status: LinkStatus, shards: &[usize], of: usize, message: String) {
        let rooms = (shards.len() < of).then(|| self.rooms.rooms_of(shards));
        let change = LinkChange {
            status,
            rooms,
            message,
        };
        // The fan-out only ends with the process.
        let _ = self.events_tx.send(BrokerEvent::Link(change));
    }

    /// For a client joining a room on `shard` (`None`: a room whose cluster
    /// shard is not known yet): `Err` with the reason if it cannot send
    /// now. It is then owed an `up`, which the next change sends.
    pub fn check(&self, shard: Option<usize>) -> Result<(), String> {
        let mut state = lock(&self.state);
        let Some(shard) = shard.filter(|&shard| shard < state.subscriptions.len()) else {
            return Err("the redis cluster master of this room is not known yet; looking".into());
        };
        if state.shard_up(shard) {
            Ok(())
        } else {
            state.told_up[shard] = false;
            Err(self.told_down().to_string())
        }
    }

    /// What clients are told when their rooms' links are down. Not why:
    /// the why names the Redis host, port, database and user, and is for
    /// the operator (the logs, the admin listener's `/readyz`).
    fn told_down(&self) -> &'static str {
        if self.cluster {
            "the server lost its link to the Redis Cluster shard that serves this room: \
             sending here is paused while it reconnects"
        } else {
            "the server lost its link to Redis: sending is paused while it reconnects"
        }
    }

    /// `Ok` while every link works; otherwise every reason, for `/readyz`.
    pub fn readiness(&self) -> Result<(), String> {
        let state = lock(&self.state);
        let mut reasons: Vec<String> = state
            .subscriptions
            .iter()
            .enumerate()
            .filter_map(|(shard, down)| {
                let which = if self.cluster {
                    format!(" (cluster shard {shard})")
                } else {
                    String::new()
                };
                down.as_ref()
                    .map(|reason| format!("redis subscription{which} is down: {reason}"))
            })
            .collect();
        if let Some(reason) = &state.publisher {
            reasons.push(format!("redis publisher is down: {reason}"));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(format!("{}; reconnecting", reasons.join("; ")))
        }
    }
}
