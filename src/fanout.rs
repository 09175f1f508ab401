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
//!   are handed to its socket; everyone else gets the shared batch, as
//!   before. The traced frames go by the same shard and thread as the
//!   shared ones, so a traced client's order holds the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};
use log::warn;

use crate::broker::{BrokerEvent, DeliveryChange, DeliveryStatus, PresenceChange};
use crate::clock;
use crate::demo::DemoControls;
use crate::faults;
use crate::hub::{Hub, Member};
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, MessageFrame, Received, ServerFrame};
use crate::session::outbox::{Batch, Pushed};
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
    members: Arc<[Member]>,
    batch: Arc<Batch>,
    /// What the batch holds, for members that asked for the X-ray.
    traced: Option<Arc<Traced>>,
    /// Chat messages in the batch (for the delivered counter).
    messages: usize,
    shard: usize,
}

/// Starts the fan-out thread and `threads - 1` deliverer threads.
pub fn spawn_fanout(
    events_rx: Receiver<BrokerEvent>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    threads: usize,
    instance: Arc<str>,
    demo: Arc<DemoControls>,
    supervisor: &Arc<Supervisor>,
) -> std::io::Result<()> {
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
                    job.traced.as_deref(),
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
        demo,
    };
    supervisor.spawn("fan-out", move || fanout.run(&events_rx))?;
    Ok(())
}

/// What waits to be handed out, in arrival order.
enum Pending {
    Message(ChatMessage, Received),
    /// A join, a leave or a fresh member list (typing goes on its own).
    Presence(PresenceChange),
}

/// The frame a presence change reaches clients as.
fn presence_frame(change: &PresenceChange) -> ServerFrame<'_> {
    match change {
        PresenceChange::Join(event) => ServerFrame::Join(event),
        PresenceChange::Leave(event) => ServerFrame::Leave(event),
        PresenceChange::Typing { room, name } => ServerFrame::Typing { room, name },
        PresenceChange::Snapshot { room, presence } => ServerFrame::Presence {
            room,
            members: &presence.members,
            more: presence.more,
        },
    }
}

struct Fanout {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    deliverers: Vec<Sender<Job>>,
    /// Jobs handed to deliverers and not finished.
    busy: Arc<AtomicUsize>,
    /// This instance's name: the X-ray's `received_by`.
    instance: Arc<str>,
    /// `--demo-controls`: delivery may be paused on purpose.
    demo: Arc<DemoControls>,
}

/// The frames of one room in one delivery, and which pending events
/// they came from.
struct RoomBatch<'a> {
    room: &'a str,
    batch: Batch,
    messages: usize,
    items: Vec<usize>,
}

/// One room's share of a delivery, kept for its members that asked for
/// the X-ray: their frames are made one by one, each with its own stamp.
struct Traced {
    received_by: Arc<str>,
    items: Vec<TracedItem>,
}

enum TracedItem {
    Message(ChatMessage, Received),
    /// A join or leave: the same frame as everyone's.
    Frame(Vec<u8>),
}

impl Traced {
    /// The batch for one traced member, stamped now.
    fn batch(&self) -> Arc<Batch> {
        let mut batch = Batch::default();
        for item in &self.items {
            match item {
                TracedItem::Message(message, received) => {
                    let frame = MessageFrame::traced(
                        message,
                        *received,
                        &self.received_by,
                        clock::wall_micros(),
                    );
                    batch.push(Some(message.id), &ServerFrame::Message(frame).to_ws_bytes());
                }
                TracedItem::Frame(frame) => batch.push(None, frame),
            }
        }
        Arc::new(batch)
    }
}

impl Fanout {
    fn run(&self, events_rx: &Receiver<BrokerEvent>) {
        let mut pending = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = events_rx.recv() {
            self.demo.wait_while_delivery_paused();
            let mut next = Some(first);
            let mut bytes = 0;
            while let Some(event) = next.take() {
                match event {
                    BrokerEvent::Message(message, received) => {
                        bytes += message.text.len() + message.from.len();
                        pending.push(Pending::Message(message, received));
                    }
                    BrokerEvent::Delivery(change) => {
                        self.deliver(&mut pending);
                        self.tell_status(&change);
                    }
                    BrokerEvent::Presence(PresenceChange::Typing { room, name }) => {
                        self.deliver(&mut pending);
                        self.deliver_typing(&room, &name);
                    }
                    // Joins and leaves share the messages' batches: a join
                    // storm into a big room costs each client one send per
                    // batch, not one per join.
                    BrokerEvent::Presence(change) => pending.push(Pending::Presence(change)),
                }
                if pending.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    next = events_rx.try_recv().ok();
                }
            }
            self.deliver(&mut pending);
        }
    }

    /// Frames each event once and hands each room's batch to its members,
    /// in order.
    fn deliver(&self, pending: &mut Vec<Pending>) {
        let mut rooms: Vec<RoomBatch<'_>> = Vec::new();
        for (index, item) in pending.iter().enumerate() {
            let (room, id, frame, is_message) = match item {
                Pending::Message(message, _) => {
                    faults::inject("fan-out", &message.text);
                    let frame = ServerFrame::Message(MessageFrame::plain(message)).to_ws_bytes();
                    (message.room.as_str(), Some(message.id), frame, 1)
                }
                Pending::Presence(change) => {
                    let frame = presence_frame(change).to_ws_bytes();
                    (change.room(), None, frame, 0)
                }
            };
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
            entry.batch.push(id, &frame);
            entry.messages += is_message;
            entry.items.push(index);
        }
        for entry in rooms {
            if let Some(members) = self.hub.room(entry.room) {
                let traced = members
                    .iter()
                    .any(|member| member.trace)
                    .then(|| Arc::new(self.traced(pending, &entry.items, &entry.batch)));
                self.send(members, Arc::new(entry.batch), traced, entry.messages);
            }
        }
        pending.clear();
    }

    /// What the traced members of a room need to make their own frames:
    /// the messages, and the other frames as `batch` already holds them
    /// (its frames are the items', in order).
    fn traced(&self, pending: &[Pending], items: &[usize], batch: &Batch) -> Traced {
        let items = items
            .iter()
            .zip(batch.frames())
            .map(|(&index, (_, frame))| match &pending[index] {
                Pending::Message(message, received) => {
                    TracedItem::Message(message.clone(), *received)
                }
                Pending::Presence(_) => TracedItem::Frame(frame.to_vec()),
            })
            .collect();
        Traced {
            received_by: self.instance.clone(),
            items,
        }
    }

    /// Hands `name` typing to the room's members but its own tabs.
    fn deliver_typing(&self, room: &str, name: &str) {
        let Some(members) = self.hub.room(room) else {
            return;
        };
        let frame = ServerFrame::Typing { room, name }.to_ws_bytes();
        let others: Arc<[Member]> = members
            .iter()
            .filter(|member| *member.name != *name)
            .cloned()
            .collect();
        self.send(others, Arc::new(Batch::single(&frame)), None, 0);
    }

    /// Tells the clients of the rooms concerned that sending went down or
    /// came back.
    fn tell_status(&self, change: &DeliveryChange) {
        let delivery = match change.status {
            DeliveryStatus::Down => "down",
            DeliveryStatus::Up => "up",
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
            self.send(members, batch.clone(), None, 0);
        }
    }

    fn send(
        &self,
        members: Arc<[Member]>,
        batch: Arc<Batch>,
        traced: Option<Arc<Traced>>,
        messages: usize,
    ) {
        let shards = self.deliverers.len() + 1;
        let alone = members.len() < SHARD_MIN_MEMBERS && self.busy.load(Ordering::Acquire) == 0;
        if shards == 1 || alone {
            deliver_to(&members, &batch, traced.as_deref(), None).count(&self.metrics, messages);
            return;
        }
        for (n, jobs_tx) in self.deliverers.iter().enumerate() {
            self.busy.fetch_add(1, Ordering::Relaxed);
            let job = Job {
                members: members.clone(),
                batch: batch.clone(),
                traced: traced.clone(),
                messages,
                shard: n + 1,
            };
            if jobs_tx.send(job).is_err() {
                // A dead deliverer: the supervisor is already stopping the
                // instance.
                self.busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
        deliver_to(&members, &batch, traced.as_deref(), Some((0, shards)))
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

/// Hands `batch` to the members of one shard (`(shard, shards)`), or to all;
/// members that asked for the X-ray get theirs made from `traced`.
fn deliver_to(
    members: &[Member],
    batch: &Arc<Batch>,
    traced: Option<&Traced>,
    shard: Option<(usize, usize)>,
) -> Outcome {
    let mine = |member: &Member| shard.is_none_or(|(n, of)| member.id as usize % of == n);
    let mut outcome = Outcome::default();
    for member in members.iter().filter(|member| mine(member)) {
        let pushed = match traced {
            Some(traced) if member.trace => member.outbox.deliver(&traced.batch()),
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
