//! The hand-over between a shard's subscriber thread and its catch-up
//! thread, on its own and with no I/O, so that it can be checked on every
//! interleaving (the loom model below).
//!
//! When a room is subscribed again after losing its subscription, its
//! missed messages are in history, and its new ones arrive live. Both must
//! reach the fan-out once each, in id order, whatever the two threads do
//! meanwhile:
//!
//! 1. **Gate.** Before anything of the new subscription is read, the room
//!    is gated: what the subscriber receives for it is **held**, in order.
//! 2. **Pages.** The catch-up thread reads history after the last id
//!    forwarded (every message accepted before the subscription was
//!    confirmed is there) and forwards it, page by page.
//! 3. **Lift.** Under the lock, it forwards what the gate held past the
//!    last id it forwarded, and turns the gate into a **seam** at that id.
//! 4. **Seam.** A message history gave may still be on its way live
//!    (published before the history read, not read yet by the subscriber):
//!    the subscriber drops messages of the room up to the seam, and the
//!    seam goes at the room's first message past it.
//!
//! A gate holds a bounded number of bytes. Past it, what it held is
//! dropped (every dropped message is in history) and the lift says to
//! read history again from where the pages stopped. A connection that
//! breaks makes every catch-up asked on it stale: its pages and lift
//! forward nothing.

use std::collections::{HashMap, HashSet};

use crate::broker::BrokerEvent;
use crate::protocol::{ChatMessage, MessageId, Received, Via};
use crate::sync::{AtomicUsize, Mutex, Ordering, lock};

/// Where the gates hand what they let through, and whom they tell.
pub trait Downstream {
    /// An event for the clients, in its room's order.
    fn forward(&self, event: BrokerEvent);
    /// Every room of the connection is caught up: the shard is up.
    fn caught_up(&self);
    /// The connection broke: the shard is down.
    fn lost(&self, reason: &str);
}

/// How much the gates may hold, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// One room's gate.
    pub per_gate: usize,
    /// All the gates of one connection together.
    pub all: usize,
}

impl Bounds {
    /// 1 MiB a room, 16 MiB in all: a room catches up in well under a
    /// second, during which its live messages wait here.
    pub const DEFAULT: Bounds = Bounds {
        per_gate: 1024 * 1024,
        all: 16 * 1024 * 1024,
    };
}

/// What a gate holds.
#[derive(Default)]
struct Gate {
    held: Vec<BrokerEvent>,
    bytes: usize,
    /// It held too much and dropped it: history is to be read again.
    overflowed: bool,
}

#[derive(Default)]
struct State {
    /// Counts the subscribed connections: a catch-up asked on an earlier
    /// one is stale.
    generation: u64,
    gates: HashMap<String, Gate>,
    /// Per room caught up: its live copies up to this id were forwarded
    /// from history.
    seams: HashMap<String, MessageId>,
    /// The rooms a new connection subscribed, until each is caught up.
    resync: Option<HashSet<String>>,
    bytes: usize,
}

/// The catch-up this was asked for belongs to a connection that broke.
#[derive(Debug, PartialEq, Eq)]
pub struct Stale;

/// What [`Gates::lift`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Lifted {
    /// The gate is lifted: the room is caught up.
    Done,
    /// The gate overflowed: read history again after the last id forwarded.
    ReadAgain,
}

pub struct Gates<D> {
    state: Mutex<State>,
    /// Rooms gated or with a seam: the subscriber's steady state costs one
    /// atomic load per message, no lock. Decremented (release) only after
    /// what the gate let through was forwarded, so that a subscriber that
    /// sees it drop (acquire) forwards after it.
    watched: AtomicUsize,
    downstream: D,
    bounds: Bounds,
}

impl<D: Downstream> Gates<D> {
    pub fn new(downstream: D, bounds: Bounds) -> Self {
        Gates {
            state: Mutex::default(),
            watched: AtomicUsize::new(0),
            downstream,
            bounds,
        }
    }

    pub fn downstream(&self) -> &D {
        &self.downstream
    }

    /// A new connection subscribed `rooms`: each is gated until caught up,
    /// and the shard is up once all are (at once, if there are none).
    /// Returns the connection's generation.
    pub fn connected(&self, rooms: &[String]) -> u64 {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.gates = rooms
            .iter()
            .map(|room| (room.clone(), Gate::default()))
            .collect();
        state.seams.clear();
        state.bytes = 0;
        self.watched.store(state.gates.len(), Ordering::Release);
        if rooms.is_empty() {
            state.resync = None;
            self.downstream.caught_up();
        } else {
            state.resync = Some(rooms.iter().cloned().collect());
        }
        state.generation
    }

    /// The connection broke: nothing is gated any more, and every catch-up
    /// asked on it is stale. Told under the lock, so that it is told after
    /// any `caught_up` of the connection.
    pub fn disconnected(&self, reason: &str) {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.gates.clear();
        state.seams.clear();
        state.resync = None;
        state.bytes = 0;
        self.watched.store(0, Ordering::Release);
        self.downstream.lost(reason);
    }

    /// Gates `room` (if it is not already) to catch it up on the current
    /// connection; returns the connection's generation.
    pub fn gate(&self, room: &str) -> u64 {
        let mut state = lock(&self.state);
        if state.seams.remove(room).is_some() {
            self.watched.fetch_sub(1, Ordering::Release);
        }
        if !state.gates.contains_key(room) {
            state.gates.insert(room.to_string(), Gate::default());
            self.watched.fetch_add(1, Ordering::Release);
        }
        state.generation
    }

    /// The subscriber's way: forwards `event` of `room`, holds it if the
    /// room is gated, or drops it if it is a message its catch-up already
    /// forwarded.
    pub fn pass(&self, room: &str, event: BrokerEvent) {
        if self.watched.load(Ordering::Acquire) == 0 {
            self.downstream.forward(event);
            return;
        }
        let mut state = lock(&self.state);
        let State {
            gates,
            seams,
            bytes,
            ..
        } = &mut *state;
        if let Some(gate) = gates.get_mut(room) {
            if gate.overflowed {
                return;
            }
            let size = size_of(&event);
            if gate.bytes + size > self.bounds.per_gate || *bytes + size > self.bounds.all {
                *bytes -= gate.bytes;
                *gate = Gate {
                    overflowed: true,
                    ..Gate::default()
                };
                return;
            }
            gate.bytes += size;
            *bytes += size;
            gate.held.push(event);
            return;
        }
        if let (Some(seam), BrokerEvent::Message(message, _)) = (seams.get(room), &event) {
            if message.id <= *seam {
                return;
            }
            seams.remove(room);
            self.watched.fetch_sub(1, Ordering::Release);
        }
        drop(state);
        // Only this thread gates a room again: no catch-up forwards for it
        // until then, so this needs no lock.
        self.downstream.forward(event);
    }

    /// `room` will not be caught up on this connection (Redis refused it
    /// here, moved it away, or nobody wants it any more): its gate and seam
    /// go, with what the gate held.
    pub fn abandon(&self, room: &str) {
        let mut state = lock(&self.state);
        if let Some(gate) = state.gates.remove(room) {
            state.bytes -= gate.bytes;
            self.watched.fetch_sub(1, Ordering::Release);
        }
        if state.seams.remove(room).is_some() {
            self.watched.fetch_sub(1, Ordering::Release);
        }
        self.resynced(&mut state, room);
    }

    /// The catch-up's way: forwards a page of `room`'s history, those past
    /// `from` (the last id forwarded); returns the new `from` and how many
    /// it forwarded.
    pub fn page(
        &self,
        room: &str,
        generation: u64,
        messages: Vec<ChatMessage>,
        mut from: Option<MessageId>,
    ) -> Result<(Option<MessageId>, u64), Stale> {
        let state = lock(&self.state);
        if state.generation != generation || !state.gates.contains_key(room) {
            return Err(Stale);
        }
        let mut forwarded = 0;
        for message in messages {
            if Some(message.id) <= from {
                continue;
            }
            from = Some(message.id);
            forwarded += 1;
            self.downstream
                .forward(BrokerEvent::Message(message, Received::now(Via::History)));
        }
        Ok((from, forwarded))
    }

    /// After the last page: forwards what the gate held past `from`, and
    /// turns the gate into a seam at the last id forwarded; or, if the gate
    /// overflowed meanwhile, asks for history again from `from`.
    pub fn lift(
        &self,
        room: &str,
        generation: u64,
        mut from: Option<MessageId>,
    ) -> Result<Lifted, Stale> {
        let mut state = lock(&self.state);
        if state.generation != generation {
            return Err(Stale);
        }
        let Some(gate) = state.gates.get_mut(room) else {
            return Err(Stale);
        };
        if gate.overflowed {
            gate.overflowed = false;
            return Ok(Lifted::ReadAgain);
        }
        let gate = state.gates.remove(room).expect("found above");
        state.bytes -= gate.bytes;
        for event in gate.held {
            if let BrokerEvent::Message(message, _) = &event {
                if Some(message.id) <= from {
                    continue;
                }
                from = Some(message.id);
            }
            self.downstream.forward(event);
        }
        // The gate becomes a seam: the count of rooms watched only drops,
        // after the deliveries above, when there is no seam to leave.
        match from {
            Some(from) => {
                state.seams.insert(room.to_string(), from);
            }
            None => {
                self.watched.fetch_sub(1, Ordering::Release);
            }
        }
        self.resynced(&mut state, room);
        Ok(Lifted::Done)
    }

    /// `room` is done with, for the connection's resync: the shard is up
    /// when it was the last.
    fn resynced(&self, state: &mut State, room: &str) {
        if let Some(pending) = &mut state.resync {
            pending.remove(room);
            if pending.is_empty() {
                state.resync = None;
                self.downstream.caught_up();
            }
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

#[cfg(test)]
fn message(seq: u64) -> ChatMessage {
    ChatMessage {
        id: MessageId { millis: 1, seq },
        room: "r".into(),
        from: "a".into(),
        user: None,
        text: format!("m{seq}"),
        ts: 1,
        instance: "i".into(),
        cid: None,
        typed_us: None,
        read_us: None,
    }
}

#[cfg(test)]
fn live(seq: u64) -> BrokerEvent {
    BrokerEvent::Message(message(seq), Received::now(Via::Pubsub))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Recorder {
        forwarded: StdMutex<Vec<u64>>,
        caught_up: StdMutex<usize>,
    }

    impl Downstream for Recorder {
        fn forward(&self, event: BrokerEvent) {
            if let BrokerEvent::Message(message, _) = event {
                self.forwarded.lock().unwrap().push(message.id.seq);
            }
        }
        fn caught_up(&self) {
            *self.caught_up.lock().unwrap() += 1;
        }
        fn lost(&self, _reason: &str) {}
    }

    fn forwarded(gates: &Gates<Recorder>) -> Vec<u64> {
        gates.downstream().forwarded.lock().unwrap().clone()
    }

    #[test]
    fn history_then_what_the_gate_held_then_live_each_once() {
        let gates = Gates::new(Recorder::default(), Bounds::DEFAULT);
        let generation = gates.connected(&["r".into()]);
        gates.pass("r", live(3));
        gates.pass("r", live(4));
        let (from, delivered_now) = gates
            .page("r", generation, (1..=3).map(message).collect(), None)
            .unwrap();
        assert_eq!(delivered_now, 3);
        assert_eq!(gates.lift("r", generation, from), Ok(Lifted::Done));
        assert_eq!(*gates.downstream().caught_up.lock().unwrap(), 1);
        // History had 5 already; it arrives live after the lift: dropped.
        gates.pass("r", live(4));
        gates.pass("r", live(5));
        gates.pass("r", live(6));
        assert_eq!(forwarded(&gates), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn an_overflowing_gate_drops_what_it_held_and_history_is_read_again() {
        let bounds = Bounds {
            per_gate: 600,
            all: 1 << 20,
        };
        let gates = Gates::new(Recorder::default(), bounds);
        let generation = gates.connected(&["r".into()]);
        for seq in 3..=6 {
            gates.pass("r", live(seq));
        }
        let (from, _) = gates
            .page("r", generation, (1..=3).map(message).collect(), None)
            .unwrap();
        assert_eq!(gates.lift("r", generation, from), Ok(Lifted::ReadAgain));
        let (from, _) = gates
            .page("r", generation, (4..=6).map(message).collect(), from)
            .unwrap();
        assert_eq!(gates.lift("r", generation, from), Ok(Lifted::Done));
        gates.pass("r", live(7));
        assert_eq!(forwarded(&gates), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_catch_up_of_a_broken_connection_delivers_nothing() {
        let gates = Gates::new(Recorder::default(), Bounds::DEFAULT);
        let generation = gates.connected(&["r".into()]);
        gates.disconnected("cut");
        assert_eq!(
            gates.page("r", generation, vec![message(1)], None),
            Err(Stale)
        );
        assert_eq!(gates.lift("r", generation, None), Err(Stale));
        assert!(forwarded(&gates).is_empty());
        // The next connection catches up afresh.
        let generation = gates.connected(&["r".into()]);
        let (from, _) = gates.page("r", generation, vec![message(1)], None).unwrap();
        assert_eq!(gates.lift("r", generation, from), Ok(Lifted::Done));
        assert_eq!(forwarded(&gates), [1]);
    }

    #[test]
    fn abandoning_the_last_room_of_a_resync_brings_the_shard_up() {
        let gates = Gates::new(Recorder::default(), Bounds::DEFAULT);
        gates.connected(&["r".into(), "moved".into()]);
        gates.abandon("moved");
        assert_eq!(*gates.downstream().caught_up.lock().unwrap(), 0);
        gates.abandon("r");
        assert_eq!(*gates.downstream().caught_up.lock().unwrap(), 1);
        gates.pass("r", live(1));
        assert_eq!(forwarded(&gates), [1]);
    }
}

/// Every interleaving of the subscriber passing live messages and the
/// catch-up thread forwarding history and lifting the gate, explored by
/// loom over the real code. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    #[derive(Default)]
    struct Recorder(loom::sync::Mutex<Vec<u64>>);

    impl Downstream for Recorder {
        fn forward(&self, event: BrokerEvent) {
            if let BrokerEvent::Message(message, _) = event {
                self.0.lock().unwrap().push(message.id.seq);
            }
        }
        fn caught_up(&self) {}
        fn lost(&self, _reason: &str) {}
    }

    /// History holds 1..=`last`; the subscriber receives 3, 4 and 5 live
    /// (3 was published between the subscription and the history read:
    /// it is in both). Every message reaches the clients once, in order.
    fn run(bounds: Bounds, first_page: u64) {
        loom::model(move || {
            let gates = Arc::new(Gates::new(Recorder::default(), bounds));
            let generation = gates.connected(&["r".into()]);
            let subscriber = {
                let gates = gates.clone();
                loom::thread::spawn(move || {
                    for seq in 3..=5 {
                        gates.pass("r", live(seq));
                    }
                })
            };
            let catch_up = {
                let gates = gates.clone();
                loom::thread::spawn(move || {
                    let (mut from, _) = gates
                        .page(
                            "r",
                            generation,
                            (1..=first_page).map(message).collect(),
                            None,
                        )
                        .unwrap();
                    while gates.lift("r", generation, from) == Ok(Lifted::ReadAgain) {
                        // Read again: by now history has all the subscriber
                        // received, and maybe more.
                        from = gates
                            .page("r", generation, (1..=5).map(message).collect(), from)
                            .unwrap()
                            .0;
                    }
                })
            };
            subscriber.join().unwrap();
            catch_up.join().unwrap();
            gates.pass("r", live(6));
            let forwarded = gates.downstream().0.lock().unwrap().clone();
            assert_eq!(forwarded, [1, 2, 3, 4, 5, 6]);
        });
    }

    #[test]
    fn loom_history_and_live_meet_once_in_order() {
        run(Bounds::DEFAULT, 3);
    }

    #[test]
    fn loom_history_ahead_of_the_subscriber_meets_it_once_in_order() {
        run(Bounds::DEFAULT, 5);
    }

    #[test]
    fn loom_an_overflowing_gate_reads_history_again_and_loses_nothing() {
        // Room for one held message: the second overflows the gate.
        let bounds = Bounds {
            per_gate: 300,
            all: 1 << 20,
        };
        run(bounds, 3);
    }
}
