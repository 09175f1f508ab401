//! Catching a room up from history after it lost its subscription, on a
//! thread and a connection of its own, so that the subscriber thread only
//! ever reads pushes.
//!
//! When a room is subscribed again (the connection came back, or a Redis
//! Cluster moved its slot), some of its messages were published while no
//! subscription listened: they are in its history, which the accept script
//! writes before it publishes. The subscriber must not read that history
//! itself: it delivers every room of its connection, and a history read
//! (on a slow link, or of a large room) would hold them all up. So:
//!
//! 1. the subscriber puts a **gate** on the room before anything of the
//!    new subscription is read: from then on, what arrives for the room is
//!    held at the gate, in order, instead of delivered;
//! 2. once Redis confirms the subscription, this room's catch-up thread
//!    reads its history after the last id delivered there (every message
//!    accepted before the confirmation is in it), in pages, and delivers
//!    it;
//! 3. then, under the gate's lock, it delivers what the gate held, less
//!    what history already had (ids up to the last delivered), and lifts
//!    the gate, leaving a **seam** at the last id it delivered: a message
//!    history had may still be on its way on the subscription (published
//!    before the history read, not yet read by the subscriber), and the
//!    subscriber drops it. At the room's first message past the seam, the
//!    seam goes, and the subscriber delivers the room as before.
//!
//! A gate holds a bounded amount: past it, what it held is dropped and the
//! catch-up reads history again from where it stopped (every dropped
//! message is in history; only frames that never are, typing and messages
//! injected from outside, can be lost that way, as they would be in any
//! outage). When every room a new connection subscribed is caught up, its
//! shard is up again ([`super::health`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};

use super::health::Health;
use super::history::read_after;
use super::keys::RedisKeys;
use super::link::Link;
use super::rooms::RoomSubscriptions;
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, EventSender};
use crate::clock;
use crate::metrics::Metrics;
use crate::protocol::{Limits, MessageId, Received, Via};
use crate::sync::{Mutex, lock};

/// History entries read at once: a large room is caught up in pages, so
/// that a catch-up never holds a whole history in memory.
const PAGE: usize = 500;
/// Most bytes one gate holds before it gives up and reads history again.
const GATE_BYTES: usize = 1024 * 1024;
/// Most bytes all the gates of one connection hold together.
const GATES_BYTES: usize = 16 * 1024 * 1024;
/// How far ahead of this machine's clock a message id may be and still
/// count as made by the accept script (clocks of Redis and of instances
/// differ a little).
const PLAUSIBLE_CLOCK_SKEW_MS: u64 = 60_000;

/// Per room, the last id delivered to this instance's clients: where a
/// catch-up resumes. Shared by the subscribers of a cluster's shards,
/// because a room whose slot moves is caught up by the shard it moves to.
#[derive(Default)]
pub struct Delivered(Mutex<HashMap<String, MessageId>>);

impl Delivered {
    pub fn get(&self, room: &str) -> Option<MessageId> {
        lock(&self.0).get(room).copied()
    }

    pub fn record(&self, room: &str, id: MessageId) {
        // Anyone can publish on the channel: an id from the future (say,
        // 9999999999999-0 typed into redis-cli) must not move the point
        // catch-up resumes from, or real messages after an outage would be
        // skipped. Ids the accept script makes are never ahead of the clock.
        if id.millis > clock::wall_millis() + PLAUSIBLE_CLOCK_SKEW_MS {
            return;
        }
        let mut delivered = lock(&self.0);
        match delivered.get_mut(room) {
            Some(last) => *last = (*last).max(id),
            None => {
                delivered.insert(room.to_string(), id);
            }
        }
    }

    /// The room is no longer subscribed: a later subscription is a fresh
    /// one, whose clients read history themselves.
    pub fn forget(&self, room: &str) {
        lock(&self.0).remove(room);
    }
}

/// What a gate holds: an event the subscriber received while the room was
/// being caught up.
struct Gate {
    held: Vec<BrokerEvent>,
    bytes: usize,
    /// It held too much and dropped it: history is to be read again.
    overflowed: bool,
}

struct Gates {
    /// Counts the subscribed connections: a catch-up asked for on an
    /// earlier one is dropped.
    generation: u64,
    rooms: HashMap<String, Gate>,
    /// Per room caught up: the live copies up to this id were delivered
    /// from history.
    seams: HashMap<String, MessageId>,
    /// The rooms a new connection subscribed, until each is caught up;
    /// then the shard is up.
    resync: Option<HashSet<String>>,
    bytes: usize,
}

pub enum Job {
    /// Catch `room` up, for the connection of `generation`.
    CatchUp { generation: u64, room: String },
    /// `room` lost its subscription while the connection stayed up (a
    /// Redis Cluster moved its slot): find where it is now.
    Relocate(String),
}

/// A shard's catch-ups: shared by its subscriber thread, which gates rooms
/// and asks, and its catch-up thread, which reads history and lifts them.
pub struct CatchUp {
    shard: usize,
    gates: Mutex<Gates>,
    /// How many rooms are gated or have a seam: the subscriber's steady
    /// state costs one atomic load per message, no lock.
    watched: AtomicUsize,
    jobs_tx: Sender<Job>,
    events_tx: EventSender,
    delivered: Arc<Delivered>,
    health: Arc<Health>,
    /// Told when a connection is caught up (presence is then registered
    /// again and re-sent).
    reconnected_tx: Sender<()>,
    metrics: Arc<Metrics>,
}

/// What the catch-up thread needs besides the shared state.
pub struct CatchUpThread {
    pub catch_up: Arc<CatchUp>,
    pub jobs_rx: Receiver<Job>,
    /// Its own connection, to the shard's master.
    pub link: Link,
    pub keys: RedisKeys,
    pub limits: Limits,
    pub rooms: Arc<RoomSubscriptions>,
    /// Reads the cluster's slots again (and starts new shards' threads).
    pub refresh_topology: Box<dyn Fn() + Send>,
    pub backoff: Backoff,
}

impl CatchUp {
    pub fn new(
        shard: usize,
        events_tx: EventSender,
        delivered: Arc<Delivered>,
        health: Arc<Health>,
        reconnected_tx: Sender<()>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, Receiver<Job>) {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let catch_up = CatchUp {
            shard,
            gates: Mutex::new(Gates {
                generation: 0,
                rooms: HashMap::new(),
                seams: HashMap::new(),
                resync: None,
                bytes: 0,
            }),
            watched: AtomicUsize::new(0),
            jobs_tx,
            events_tx,
            delivered,
            health,
            reconnected_tx,
            metrics,
        };
        (Arc::new(catch_up), jobs_rx)
    }

    /// A new connection subscribed `rooms`: each is gated until caught up,
    /// and the shard is up once all are (at once, if there are none).
    pub fn connected(&self, rooms: &[String]) {
        let mut gates = lock(&self.gates);
        gates.generation += 1;
        gates.rooms = rooms
            .iter()
            .map(|room| (room.clone(), Gate::new()))
            .collect();
        gates.seams.clear();
        gates.bytes = 0;
        self.watched.store(gates.rooms.len(), Ordering::Relaxed);
        if rooms.is_empty() {
            gates.resync = None;
            self.caught_up();
        } else {
            gates.resync = Some(rooms.iter().cloned().collect());
        }
    }

    /// The connection broke: nothing is gated any more, pending catch-ups
    /// are dropped, and the shard is down.
    pub fn disconnected(&self, reason: &str) {
        let mut gates = lock(&self.gates);
        gates.generation += 1;
        gates.rooms.clear();
        gates.seams.clear();
        gates.resync = None;
        gates.bytes = 0;
        self.watched.store(0, Ordering::Relaxed);
        self.health.subscription_down(self.shard, reason);
    }

    /// Redis confirmed the subscription of a room that missed messages:
    /// gated (if it is not already), and caught up.
    pub fn start(&self, room: &str) {
        let mut gates = lock(&self.gates);
        if gates.seams.remove(room).is_some() {
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
        if !gates.rooms.contains_key(room) {
            gates.rooms.insert(room.to_string(), Gate::new());
            self.watched.fetch_add(1, Ordering::Relaxed);
        }
        let job = Job::CatchUp {
            generation: gates.generation,
            room: room.to_string(),
        };
        let _ = self.jobs_tx.send(job);
    }

    /// Passes `event` on, holds it if its room is gated, or drops it if
    /// it is a message its room's catch-up delivered already.
    pub fn pass(&self, room: &str, event: BrokerEvent) -> Option<BrokerEvent> {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return Some(event);
        }
        let mut gates = lock(&self.gates);
        let Gates {
            rooms,
            seams,
            bytes,
            ..
        } = &mut *gates;
        let Some(gate) = rooms.get_mut(room) else {
            if let (Some(seam), BrokerEvent::Message(message, _)) = (seams.get(room), &event) {
                if message.id <= *seam {
                    return None;
                }
                seams.remove(room);
                self.watched.fetch_sub(1, Ordering::Relaxed);
            }
            return Some(event);
        };
        if gate.overflowed {
            return None;
        }
        let size = size_of(&event);
        if gate.bytes + size > GATE_BYTES || *bytes + size > GATES_BYTES {
            debug!("room {room}: its catch-up gate is full; history will be read again");
            *bytes -= gate.bytes;
            *gate = Gate::new();
            gate.overflowed = true;
            return None;
        }
        gate.bytes += size;
        *bytes += size;
        gate.held.push(event);
        None
    }

    /// `room` will not be caught up on this connection (Redis refused it
    /// here, or moved it away, or nobody wants it any more): its gate goes,
    /// with what it held.
    pub fn abandon(&self, room: &str) {
        let mut gates = lock(&self.gates);
        if let Some(gate) = gates.rooms.remove(room) {
            gates.bytes -= gate.bytes;
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
        if gates.seams.remove(room).is_some() {
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
        self.resynced(&mut gates, room);
    }

    /// `room` lost its subscription while the connection stayed up: the
    /// catch-up thread finds where it is now.
    pub fn relocate(&self, room: &str) {
        let _ = self.jobs_tx.send(Job::Relocate(room.to_string()));
    }

    /// `room` is done with, for the connection's resync: the shard is up
    /// when it was the last.
    fn resynced(&self, gates: &mut Gates, room: &str) {
        if let Some(pending) = &mut gates.resync {
            pending.remove(room);
            if pending.is_empty() {
                gates.resync = None;
                self.caught_up();
            }
        }
    }

    /// Every room of the new connection is caught up (called under the
    /// gates' lock, so that a break that follows is told after it).
    fn caught_up(&self) {
        self.health.subscription_up(self.shard);
        let _ = self.reconnected_tx.try_send(());
    }

    fn emit(&self, event: BrokerEvent) {
        if let BrokerEvent::Message(message, _) = &event {
            self.delivered.record(&message.room, message.id);
        }
        // The fan-out only ends with the process.
        let _ = self.events_tx.send(event);
    }
}

impl Gate {
    fn new() -> Self {
        Gate {
            held: Vec::new(),
            bytes: 0,
            overflowed: false,
        }
    }
}

/// About what an event costs to hold.
fn size_of(event: &BrokerEvent) -> usize {
    match event {
        BrokerEvent::Message(message, _) => 256 + message.text.len() + message.from.len(),
        _ => 256,
    }
}

impl CatchUpThread {
    /// The catch-up thread: one job at a time, for the life of the process.
    pub fn run(mut self) {
        while let Ok(job) = self.jobs_rx.recv() {
            match job {
                Job::CatchUp { generation, room } => self.catch_up(generation, &room),
                Job::Relocate(room) => {
                    (self.refresh_topology)();
                    self.rooms.place();
                    debug!("room {room}: subscribed where it is now");
                }
            }
        }
    }

    /// Delivers what `room` missed, page by page, then what its gate held,
    /// and lifts the gate; gives up if the connection that asked is gone.
    fn catch_up(&mut self, generation: u64, room: &str) {
        let shared = self.catch_up.clone();
        let mut from = shared.delivered.get(room);
        let mut missed = 0u64;
        loop {
            let page = self.link.run(|connection| {
                read_after(connection, &self.keys, &self.limits, room, from, PAGE)
            });
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    if lock(&shared.gates).generation != generation {
                        return;
                    }
                    warn!(
                        "redis subscriber {}: catching room {room} up failed: {}; again",
                        shared.shard,
                        e.into_unavailable()
                    );
                    thread::sleep(self.backoff.next_delay());
                    continue;
                }
            };
            self.backoff.reset();
            let mut gates = lock(&shared.gates);
            if gates.generation != generation || !gates.rooms.contains_key(room) {
                return;
            }
            for message in page.messages {
                from = from.max(Some(message.id));
                missed += 1;
                shared.emit(BrokerEvent::Message(message, Received::now(Via::History)));
            }
            from = from.max(page.last_id);
            if page.full {
                continue;
            }
            let Gates {
                rooms,
                seams,
                bytes,
                ..
            } = &mut *gates;
            let gate = rooms.get_mut(room).expect("checked above");
            if gate.overflowed {
                // What it held is gone (see `pass`): read on from `from`.
                gate.overflowed = false;
                continue;
            }
            let gate = rooms.remove(room).expect("checked above");
            *bytes -= gate.bytes;
            for event in gate.held {
                if let BrokerEvent::Message(message, _) = &event {
                    // Already delivered from history.
                    if Some(message.id) <= from {
                        continue;
                    }
                    from = Some(message.id);
                }
                shared.emit(event);
            }
            // The gate becomes a seam (the count of rooms watched is
            // unchanged): the subscriber may still read live copies of
            // what history gave.
            if let Some(from) = from {
                seams.insert(room.to_string(), from);
            } else {
                shared.watched.fetch_sub(1, Ordering::Relaxed);
            }
            if missed > 0 {
                Metrics::add(&shared.metrics.history_caught_up_total, missed);
                info!(
                    "redis subscriber {}: room {room} caught up on {missed} messages published while it was not subscribed",
                    shared.shard
                );
            }
            shared.resynced(&mut gates, room);
            return;
        }
    }
}
