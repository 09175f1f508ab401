//! Catching a room up from history after it lost its subscription, on a
//! thread and a connection of its own, so that the subscriber thread only
//! ever reads pushes.
//!
//! When a room is subscribed again (the connection came back, or a Redis
//! Cluster moved its slot), some of its messages were published while no
//! subscription listened: they are in its history, which the accept script
//! writes before it publishes. The subscriber must not read that history
//! itself: it forwards every room of its connection, and a history read
//! (on a slow link, or of a large room) would hold them all up. So the
//! subscriber gates the room and asks this file's thread, which reads the
//! history in pages and lifts the gate: the hand-over between the two is
//! [`super::gates`], checked by a model test on every interleaving.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};

use super::gates::{Bounds, Downstream, Gates, Lifted};
use super::health::Health;
use super::history::read_after;
use super::keys::RedisKeys;
use super::link::Link;
use super::rooms::RoomSubscriptions;
use crate::backoff::Backoff;
use crate::broker::{BrokerEvent, EventSender};
use crate::clock;
use crate::metrics::Metrics;
use crate::protocol::{Limits, MessageId};
use crate::sync::{Mutex, lock};

/// History entries read at once: a large room is caught up in pages, so
/// that a catch-up never holds a whole history in memory.
const PAGE: usize = 500;
/// How far ahead of this machine's clock a message id may be and still
/// count as made by the accept script (clocks of Redis and of instances
/// differ a little).
const PLAUSIBLE_CLOCK_SKEW_MS: u64 = 60_000;

/// Per room, the last id forwarded to this instance's fan-out (so
/// delivered to its clients): where a catch-up resumes. Shared by the
/// subscribers of a cluster's shards, because a room whose slot moves is
/// caught up by the shard it moves to.
#[derive(Default)]
pub struct ResumePoints(Mutex<HashMap<String, MessageId>>);

impl ResumePoints {
    pub fn get(&self, room: &str) -> Option<MessageId> {
        lock(&self.0).get(room).copied()
    }

    fn record(&self, room: &str, id: MessageId) {
        // Anyone can publish on the channel: an id from the future (say,
        // 9999999999999-0 typed into redis-cli) must not move the point
        // catch-up resumes from, or real messages after an outage would be
        // skipped. Ids the accept script makes are never ahead of the clock.
        if id.millis > clock::wall_millis() + PLAUSIBLE_CLOCK_SKEW_MS {
            return;
        }
        let mut forwarded = lock(&self.0);
        match forwarded.get_mut(room) {
            Some(last) => *last = (*last).max(id),
            None => {
                forwarded.insert(room.to_string(), id);
            }
        }
    }

    /// The room is no longer subscribed: a later subscription is a fresh
    /// one, whose clients read history themselves.
    pub fn forget(&self, room: &str) {
        lock(&self.0).remove(room);
    }
}

/// Where a shard's gates hand what they let through: the fan-out's
/// channel (noting the last id forwarded per room), and the shard's
/// health.
pub struct ToFanout {
    shard: usize,
    events_tx: EventSender,
    resume_points: Arc<ResumePoints>,
    health: Arc<Health>,
    /// Told when a connection is caught up (presence is then registered
    /// again and re-sent).
    reconnected_tx: Sender<()>,
}

impl Downstream for ToFanout {
    fn forward(&self, event: BrokerEvent) {
        if let BrokerEvent::Message(message, _) = &event {
            self.resume_points.record(&message.room, message.id);
        }
        // The fan-out only ends with the process, or dies, which the
        // supervisor reports.
        let _ = self.events_tx.send(event);
    }

    fn caught_up(&self) {
        self.health.subscription_up(self.shard);
        let _ = self.reconnected_tx.try_send(());
    }

    fn lost(&self, reason: &str) {
        self.health.subscription_down(self.shard, reason);
    }
}

pub enum Job {
    /// Catch `room` up, for the connection of `generation`.
    CatchUp { generation: u64, room: String },
    /// `room` lost its subscription while the connection stayed up (a
    /// Redis Cluster moved its slot): find where it is now.
    Relocate(String),
}

/// A shard's catch-ups: its subscriber thread gates rooms and asks; its
/// catch-up thread reads history and lifts the gates.
pub struct CatchUp {
    shard: usize,
    gates: Gates<ToFanout>,
    jobs_tx: Sender<Job>,
    metrics: Arc<Metrics>,
}

/// The catch-up thread's state.
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
        resume_points: Arc<ResumePoints>,
        health: Arc<Health>,
        reconnected_tx: Sender<()>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, Receiver<Job>) {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let downstream = ToFanout {
            shard,
            events_tx,
            resume_points,
            health,
            reconnected_tx,
        };
        let catch_up = CatchUp {
            shard,
            gates: Gates::new(downstream, Bounds::DEFAULT),
            jobs_tx,
            metrics,
        };
        (Arc::new(catch_up), jobs_rx)
    }

    /// A new connection subscribed `rooms`: each is gated until caught up,
    /// and the shard is up once all are (at once, if there are none).
    pub fn connected(&self, rooms: &[String]) {
        self.gates.connected(rooms);
    }

    /// The connection broke: nothing is gated any more, pending catch-ups
    /// are dropped, and the shard is down.
    pub fn disconnected(&self, reason: &str) {
        self.gates.disconnected(reason);
    }

    /// Redis confirmed the subscription of a room that missed messages:
    /// gated (if it is not already), and caught up.
    pub fn start(&self, room: &str) {
        let generation = self.gates.gate(room);
        let job = Job::CatchUp {
            generation,
            room: room.to_string(),
        };
        let _ = self.jobs_tx.send(job);
    }

    /// Forwards `event` of `room`, or holds it at the room's gate, or drops
    /// it if the room's catch-up forwarded it already.
    pub fn pass(&self, room: &str, event: BrokerEvent) {
        self.gates.pass(room, event);
    }

    /// `room` will not be caught up on this connection: its gate goes.
    pub fn abandon(&self, room: &str) {
        self.gates.abandon(room);
    }

    /// `room` lost its subscription while the connection stayed up: the
    /// catch-up thread finds where it is now.
    pub fn relocate(&self, room: &str) {
        let _ = self.jobs_tx.send(Job::Relocate(room.to_string()));
    }

    /// The room is no longer subscribed (see [`ResumePoints::forget`]).
    pub fn forget(&self, room: &str) {
        self.gates.downstream().resume_points.forget(room);
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

    /// Forwards what `room` missed, page by page, then what its gate held,
    /// and lifts the gate; gives up when the connection that asked is gone.
    fn catch_up(&mut self, generation: u64, room: &str) {
        let shared = self.catch_up.clone();
        let gates = &shared.gates;
        let mut from = gates.downstream().resume_points.get(room);
        let mut missed = 0;
        loop {
            let page = self.link.run(|connection| {
                read_after(connection, &self.keys, &self.limits, room, from, PAGE)
            });
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    warn!(
                        "redis subscriber {}: catching room {room} up failed: {}; again",
                        shared.shard,
                        e.into_unavailable()
                    );
                    thread::sleep(self.backoff.next_delay());
                    // Given up if the connection broke meanwhile.
                    if gates.page(room, generation, Vec::new(), from).is_err() {
                        return;
                    }
                    continue;
                }
            };
            self.backoff.reset();
            let full = page.full;
            let last_id = page.last_id;
            match gates.page(room, generation, page.messages, from) {
                Ok((forwarded_up_to, forwarded)) => {
                    // Past entries that were skipped as invalid too.
                    from = forwarded_up_to.max(last_id);
                    missed += forwarded;
                }
                Err(_) => return,
            }
            if full {
                continue;
            }
            match gates.lift(room, generation, from) {
                Ok(Lifted::Done) => break,
                Ok(Lifted::ReadAgain) => {
                    debug!("room {room}: its catch-up gate overflowed; reading history again");
                }
                Err(_) => return,
            }
        }
        if missed > 0 {
            info!(
                "redis subscriber {}: room {room} caught up on {missed} messages published while it was not subscribed",
                shared.shard
            );
        }
        Metrics::add(&shared.metrics.history_caught_up_total, missed);
    }
}
