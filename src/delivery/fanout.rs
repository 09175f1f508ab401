//! The fan-out: the one consumer of the broker's events and the one caller
//! of the hub, in Redis and local mode alike.
//!
//! Each message is serialized and framed **once**, here; the messages of a
//! room that arrived together go into one shared buffer ([`Batch`]), and
//! each local client of the room gets a reference to it, handed to its
//! outbox, which sends at once when the socket takes it. A delivery never
//! waits on a client.
//!
//! - **Batch only what is already there.** The fan-out takes every event
//!   that queued up while it was busy (up to [`MAX_BATCH`] messages), and
//!   never waits on purpose for more: under load batches form by
//!   themselves, and a message on a quiet chat goes out at once.
//! - **Spread a big room over the cores.** Sending one message to a room
//!   of 10,000 is 10,000 sends. Clients are split into shards by id (`id %
//!   shards`): the fan-out sends to shard 0 itself, and one deliverer
//!   thread per other shard sends to its own, in parallel. A small room is
//!   sent to by the fan-out alone, but only while no deliverer has work
//!   left: a client's messages are then always sent by one thread at a
//!   time, in order.
//! - **Status frames travel in order** with the messages: a `down` between
//!   two messages reaches every client between them.
//! - **The X-ray costs only those who asked.** A client that connected with
//!   `trace=1` gets its message frames made for it alone, stamped when they
//!   enter its outbox and again when their first byte is handed to its
//!   socket (its outbox makes them again then); everyone else gets the
//!   shared batch, as before. The traced frames go by the same shard and
//!   thread as the shared ones, so a traced client's order holds the same
//!   way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};
use log::warn;

use crate::broker::{BrokerEvent, LinkChange, LinkStatus, PresenceChange};
use crate::delivery::hub::{Hub, Member, RoomMembers};
use crate::delivery::outbox::{Batch, Pushed};
use crate::delivery::pause::DeliveryPause;
use crate::delivery::xray::Traced;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, MessageFrame, Received, ServerFrame};
use crate::supervisor::Supervisor;

/// Events waiting between the broker and the fan-out. The fan-out never
/// waits on a client, so this only fills if the machine is overloaded; the
/// subscriber then waits, and Redis buffers behind it.
pub const EVENT_QUEUE: usize = 16 * 1024;
/// Most messages in one batch.
pub const MAX_BATCH: usize = 256;
/// Most bytes of text in one batch: bounds the buffer every client of a
/// room shares, and what one delivery adds to a client's outbox.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Rooms with fewer local clients than this are sent to by the fan-out
/// alone when the deliverers are idle: handing work to another thread
/// costs a wake-up, which is worth it only for many sends.
const SHARD_MIN_MEMBERS: usize = 32;
/// Jobs queued for one deliverer before the fan-out waits for it.
const JOB_QUEUE: usize = 1024;

/// One shard's share of one delivery.
struct Job {
    members: RoomMembers,
    batch: Arc<Batch>,
    /// What the batch holds, for members that asked for the X-ray.
    traced: Option<Arc<Traced>>,
    /// Chat messages in the batch (for the delivered counter).
    messages: usize,
    /// Members with this name are passed over (a typer's own tabs).
    skip: Option<Arc<str>>,
    shard: usize,
}

/// What the fan-out does with a presence change: hand it to whoever keeps
/// the rooms' member lists. A function rather than the tracker itself, so
/// that delivery does not depend on presence (presence depends on the hub).
pub type OnPresence = Box<dyn Fn(PresenceChange) + Send>;

/// How the fan-out runs, from the configuration.
pub struct FanoutSettings {
    /// The fan-out and its deliverers (`--delivery-threads`).
    pub threads: usize,
    /// This instance's name: the X-ray's `received_by`.
    pub instance: Arc<str>,
    /// `--demo-controls`: delivery may be paused on purpose.
    pub pause: Arc<DeliveryPause>,
}

/// Starts the fan-out thread and `threads - 1` deliverer threads.
pub fn spawn_fanout(
    events_rx: Receiver<BrokerEvent>,
    hub: Arc<Hub>,
    on_presence: OnPresence,
    metrics: Arc<Metrics>,
    settings: FanoutSettings,
    supervisor: &Arc<Supervisor>,
) -> std::io::Result<()> {
    let FanoutSettings {
        threads,
        instance,
        pause,
    } = settings;
    let busy = Arc::new(AtomicUsize::new(0));
    let shards = threads.max(1);
    let mut deliverers = Vec::new();
    for shard in 1..shards {
        let (jobs_tx, jobs_rx) = bounded::<Job>(JOB_QUEUE);
        let (metrics, busy) = (metrics.clone(), busy.clone());
        supervisor.spawn(&format!("deliverer-{shard}"), move || {
            for job in jobs_rx {
                let outcome = deliver_to(
                    &job.members,
                    &job.batch,
                    job.traced.as_ref(),
                    job.skip.as_deref(),
                    Some((job.shard, shards)),
                );
                outcome.count(&metrics, job.messages);
                busy.fetch_sub(1, Ordering::Release);
            }
        })?;
        deliverers.push(jobs_tx);
    }
    let fanout = Fanout {
        hub,
        metrics,
        deliverers,
        busy,
        instance,
        pause,
        on_presence,
    };
    supervisor.spawn("fan-out", move || fanout.run(&events_rx))?;
    Ok(())
}

/// A message waiting to be handed out, in arrival order.
type Pending = (ChatMessage, Received);

pub(crate) struct Fanout {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    deliverers: Vec<Sender<Job>>,
    /// Jobs handed to deliverers and not finished.
    busy: Arc<AtomicUsize>,
    /// This instance's name: the X-ray's `received_by`.
    instance: Arc<str>,
    /// `--demo-controls`: delivery may be paused on purpose.
    pause: Arc<DeliveryPause>,
    /// Where presence changes go: the member lists (`crate::presence`).
    on_presence: OnPresence,
}

/// The frames of one room in one delivery, and which pending events
/// they came from.
struct RoomBatch<'a> {
    room: &'a str,
    batch: Batch,
    messages: usize,
    items: Vec<usize>,
}

impl Fanout {
    fn run(&self, events_rx: &Receiver<BrokerEvent>) {
        let mut pending = Vec::with_capacity(MAX_BATCH);
        let mut typing = Vec::new();
        while let Ok(first) = events_rx.recv() {
            self.pause.wait_while_held();
            let mut next = Some(first);
            let mut bytes = 0;
            while let Some(event) = next.take() {
                match event {
                    BrokerEvent::Message(message, received) => {
                        bytes += message.text.len() + message.from.len();
                        pending.push((message, received));
                    }
                    BrokerEvent::Link(change) => {
                        self.deliver(&mut pending);
                        self.tell_status(&change);
                    }
                    // After the batch's messages, without cutting it short.
                    BrokerEvent::Presence(PresenceChange::Typing { room, name }) => {
                        typing.push((room, name));
                    }
                    // Joins and leaves go to the room's member list; its
                    // clients hear of them coalesced, a tick later.
                    BrokerEvent::Presence(change) => (self.on_presence)(change),
                }
                if pending.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    next = events_rx.try_recv().ok();
                }
            }
            self.deliver(&mut pending);
            for (room, name) in typing.drain(..) {
                self.deliver_typing(&room, &name);
            }
        }
    }

    /// Frames each event once and hands each room's batch to its members,
    /// in order.
    pub(crate) fn deliver(&self, pending: &mut Vec<Pending>) {
        let mut rooms: Vec<RoomBatch<'_>> = Vec::new();
        for (index, (message, _)) in pending.iter().enumerate() {
            faults::inject("fan-out", &message.text);
            let frame = ServerFrame::Message(MessageFrame::plain(message)).to_ws_bytes();
            let room = message.room.as_str();
            let at = match rooms.iter().position(|batch| batch.room == room) {
                Some(at) => at,
                None => {
                    rooms.push(RoomBatch {
                        room,
                        batch: Batch::default(),
                        messages: 0,
                        items: Vec::new(),
                    });
                    rooms.len() - 1
                }
            };
            let entry = &mut rooms[at];
            entry.batch.push(Some(message.id), &frame);
            entry.messages += 1;
            entry.items.push(index);
        }
        for entry in rooms {
            if let Some(members) = self.hub.room(entry.room) {
                let traced = members.iter().any(|member| member.trace).then(|| {
                    let messages = entry.items.iter().map(|&i| pending[i].clone()).collect();
                    Arc::new(Traced::new(self.instance.clone(), messages))
                });
                self.send(members, Arc::new(entry.batch), traced, None, entry.messages);
            }
        }
        pending.clear();
    }

    /// Hands `name` typing to the room's members but its own tabs (passed
    /// over as the room is walked: no list is made for it).
    fn deliver_typing(&self, room: &str, name: &str) {
        let Some(members) = self.hub.room(room) else {
            return;
        };
        let frame = ServerFrame::typing(room, name).to_ws_bytes();
        self.send(
            members,
            Arc::new(Batch::single(&frame)),
            None,
            Some(name.into()),
            0,
        );
    }

    /// Tells the clients of the rooms concerned that sending went down or
    /// came back.
    fn tell_status(&self, change: &LinkChange) {
        let delivery = match change.status {
            LinkStatus::Down => "down",
            LinkStatus::Up => "up",
        };
        let frame = ServerFrame::Status {
            delivery,
            message: &change.message,
        };
        let batch = Arc::new(Batch::single(&frame.to_ws_bytes()));
        let rooms = match &change.rooms {
            None => self.hub.all_rooms(),
            Some(rooms) => rooms
                .iter()
                .filter_map(|room| self.hub.room(room))
                .collect(),
        };
        for members in rooms {
            self.send(members, batch.clone(), None, None, 0);
        }
    }

    fn send(
        &self,
        members: RoomMembers,
        batch: Arc<Batch>,
        traced: Option<Arc<Traced>>,
        skip: Option<Arc<str>>,
        messages: usize,
    ) {
        let shards = self.deliverers.len() + 1;
        let alone = members.len() < SHARD_MIN_MEMBERS && self.busy.load(Ordering::Acquire) == 0;
        if shards == 1 || alone {
            deliver_to(&members, &batch, traced.as_ref(), skip.as_deref(), None)
                .count(&self.metrics, messages);
            return;
        }
        for (n, jobs_tx) in self.deliverers.iter().enumerate() {
            self.busy.fetch_add(1, Ordering::Relaxed);
            let job = Job {
                members: members.clone(),
                batch: batch.clone(),
                traced: traced.clone(),
                messages,
                skip: skip.clone(),
                shard: n + 1,
            };
            if jobs_tx.send(job).is_err() {
                // A dead deliverer: the supervisor is already stopping the
                // instance.
                self.busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
        deliver_to(
            &members,
            &batch,
            traced.as_ref(),
            skip.as_deref(),
            Some((0, shards)),
        )
        .count(&self.metrics, messages);
    }
}

/// What one pass over a shard did.
#[derive(Default)]
struct Outcome {
    delivered: u64,
    queued: u64,
    dropped: u64,
}

impl Outcome {
    fn count(&self, metrics: &Metrics, messages: usize) {
        Metrics::add(
            &metrics.messages_delivered_total,
            self.delivered * messages as u64,
        );
        Metrics::add(&metrics.deliveries_queued_total, self.queued);
        Metrics::add(&metrics.slow_clients_dropped_total, self.dropped);
    }
}

/// Hands `batch` to the members of one shard (`(shard, shards)`), or to all,
/// but those named `skip`; members that asked for the X-ray get theirs
/// made from `traced`.
fn deliver_to(
    members: &RoomMembers,
    batch: &Arc<Batch>,
    traced: Option<&Arc<Traced>>,
    skip: Option<&str>,
    shard: Option<(usize, usize)>,
) -> Outcome {
    let mine = |member: &Member| {
        shard.is_none_or(|(n, of)| member.id as usize % of == n)
            && skip.is_none_or(|key| *member.key != *key)
    };
    let mut outcome = Outcome::default();
    for member in members.iter().filter(|member| mine(member)) {
        let pushed = match traced {
            Some(traced) if member.trace => member.outbox.deliver_late(traced.frames()),
            _ => member.outbox.deliver(batch),
        };
        match pushed {
            Pushed::Sent => outcome.delivered += 1,
            Pushed::Queued => {
                outcome.delivered += 1;
                outcome.queued += 1;
            }
            Pushed::Refused => {}
            Pushed::Overflowed => {
                warn!(
                    "client {} dropped: send buffer full (slow consumer)",
                    member.id
                );
                outcome.dropped += 1;
            }
        }
    }
    outcome
}
