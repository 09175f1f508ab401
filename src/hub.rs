//! The hub: this instance's local clients, by room, and the one place that
//! hands a message to them.
//!
//! The subscriber thread calls [`Hub::deliver`] for every message; it must
//! never block there, or one client that stops reading would stall every
//! other client and, behind them, the Redis subscription itself (Redis cuts
//! a subscriber whose output buffer grows past `client-output-buffer-limit
//! pubsub`). So each client has a bounded queue, delivery is `try_send`,
//! and a client whose queue is full is dropped as a slow consumer.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

use crossbeam_channel::{Sender, TrySendError};
use log::warn;

use crate::direct::{Direct, SocketOwner};
use crate::liveness::LastSeen;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, MessageId, ServerFrame, WsBytes};

/// A local client's number, unique within this instance's lifetime.
pub type ClientId = u64;

/// Frames on their way to the clients of one room: one or more complete
/// WebSocket frames back to back in one buffer, shared by every receiver,
/// and where each begins, with its message id (none for a status frame), so
/// that a writer can drop what history already sent.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub frames: Vec<(Option<MessageId>, usize)>,
}

impl Batch {
    pub fn push(&mut self, id: Option<MessageId>, frame: &[u8]) {
        self.frames.push((id, self.bytes.len()));
        self.bytes.extend_from_slice(frame);
    }

    /// The frames one by one: (id, bytes).
    pub fn frames(&self) -> impl Iterator<Item = (Option<MessageId>, &[u8])> {
        let ends = self
            .frames
            .iter()
            .skip(1)
            .map(|&(_, start)| start)
            .chain([self.bytes.len()]);
        self.frames
            .iter()
            .zip(ends)
            .map(|(&(id, start), end)| (id, &self.bytes[start..end]))
    }

    /// The last message id in it.
    pub fn last_id(&self) -> Option<MessageId> {
        self.frames.iter().rev().find_map(|&(id, _)| id)
    }
}

/// What a client's queue holds: a reference to a batch. Queuing it costs a
/// reference-count increment, whatever the batch holds.
pub type Delivery = Arc<Batch>;

impl From<&WsBytes> for Batch {
    fn from(frame: &WsBytes) -> Self {
        let mut batch = Batch::default();
        batch.push(None, frame);
        batch
    }
}

/// Why the server ends a connection: the close frame's code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseReason {
    /// The client did not read fast enough and its queue filled up.
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer: send queue full",
    };
    /// The client stopped answering pings: a dead peer, most likely.
    pub const IDLE: CloseReason = CloseReason {
        code: 1001,
        reason: "no answer to ping",
    };
    /// The client kept sending past its rate limit.
    pub const FLOODING: CloseReason = CloseReason {
        code: 1008,
        reason: "rate limit exceeded repeatedly",
    };
    /// The instance is shutting down (1001, "going away").
    pub const SHUTDOWN: CloseReason = CloseReason {
        code: 1001,
        reason: "server shutting down",
    };
}

/// What else a writer can be told, besides chat messages.
#[derive(Debug)]
pub enum Control {
    /// Bytes tungstenite wrote on the reader's side (pong, close reply,
    /// an error frame to this client), to go out in order.
    Raw(Vec<u8>),
    /// Close the connection with this reason, dropping anything queued.
    Close(CloseReason),
}

/// The hub's handle on one client: the sending halves of its two queues.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: ClientId,
    pub room: Arc<str>,
    /// When its reader last read a frame (for the pinger).
    pub last_seen: Arc<LastSeen>,
    pub frames_tx: Sender<Delivery>,
    pub control_tx: Sender<Control>,
    /// The socket and its ownership, for writing straight from the
    /// fan-out while the writer is idle (see `direct.rs`); `None` in unit
    /// tests without sockets.
    pub direct: Option<DirectPath>,
    /// Set once when the server decides to close this client, so that a
    /// writer that missed the `Control::Close` (its control queue was full)
    /// still sees it after its current write.
    pub closing: Arc<OnceLock<CloseReason>>,
}

impl Member {
    /// Asks the client's writer to close the connection. Never blocks.
    pub fn close(&self, reason: CloseReason) {
        if self.closing.set(reason).is_ok() {
            let _ = self.control_tx.try_send(Control::Close(reason));
        }
    }
}

/// What a deliverer needs to write to a client's socket itself.
#[derive(Debug, Clone)]
pub struct DirectPath {
    pub socket: Arc<TcpStream>,
    pub owner: Arc<SocketOwner>,
}

/// Local clients by room.
///
/// Each room's member list is an immutable `Arc<[Member]>` replaced on every
/// join and leave (copy on write). Delivery clones the `Arc` under the read
/// lock and releases it before touching any channel, so no lock is ever
/// held while sending, and joins never wait on a delivery in progress.
/// Joins and leaves cost O(room size), which is cheap next to a handshake.
#[derive(Debug)]
pub struct Hub {
    rooms: RwLock<HashMap<String, Arc<[Member]>>>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            rooms: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// Adds a client to a room: from now on it receives the room's messages.
    pub fn join(&self, member: Member) {
        let mut rooms = self.rooms.write().expect("hub lock poisoned");
        let members = rooms
            .entry(member.room.to_string())
            .or_insert_with(|| Arc::from([]));
        let mut updated = Vec::with_capacity(members.len() + 1);
        updated.extend(members.iter().cloned());
        updated.push(member);
        *members = updated.into();
    }

    /// Removes a client from a room; harmless if it already left.
    pub fn leave(&self, room: &str, id: ClientId) {
        let mut rooms = self.rooms.write().expect("hub lock poisoned");
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        if !members.iter().any(|m| m.id == id) {
            return;
        }
        let updated: Vec<Member> = members.iter().filter(|m| m.id != id).cloned().collect();
        if updated.is_empty() {
            rooms.remove(room);
        } else {
            *members = updated.into();
        }
    }

    fn room_members(&self, room: &str) -> Option<Arc<[Member]>> {
        let rooms = self.rooms.read().expect("hub lock poisoned");
        rooms.get(room).cloned()
    }

    /// Hands a message to every local client of its room, without ever
    /// blocking. Returns how many clients it was queued for.
    pub fn deliver(&self, message: &ChatMessage) -> usize {
        self.deliver_batch(std::slice::from_ref(message))
    }

    /// Hands messages, in order, to every local client of their rooms,
    /// without ever blocking. Returns how many (client, message) deliveries
    /// were queued.
    ///
    /// Each message is serialized and framed once, here; the messages of a
    /// room go into one shared buffer, and each receiver gets a reference to
    /// it: one queue slot, one wake-up and one `write` for the whole batch.
    pub fn deliver_batch(&self, messages: &[ChatMessage]) -> usize {
        let mut batches: Vec<(&str, Batch)> = Vec::new();
        for message in messages {
            let frame = ServerFrame::Message(message).to_ws_bytes();
            match batches.iter_mut().find(|(room, _)| *room == message.room) {
                Some((_, batch)) => batch.push(Some(message.id), &frame),
                None => {
                    let mut batch = Batch::default();
                    batch.push(Some(message.id), &frame);
                    batches.push((&message.room, batch));
                }
            }
        }
        let mut delivered = 0;
        for (room, batch) in batches {
            let Some(members) = self.room_members(room) else {
                continue;
            };
            let count = batch.frames.len();
            delivered += count * self.send_to(room, &members, &Arc::new(batch));
        }
        self.metrics
            .messages_delivered_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Sends a frame that is not a chat message (a status change) to every
    /// local client, with the same never-blocking rules.
    pub fn broadcast(&self, frame: &ServerFrame<'_>) {
        let delivery: Delivery = Arc::new(Batch::from(&frame.to_ws_bytes()));
        let rooms: Vec<(String, Arc<[Member]>)> = {
            let rooms = self.rooms.read().expect("hub lock poisoned");
            rooms
                .iter()
                .map(|(room, members)| (room.clone(), members.clone()))
                .collect()
        };
        for (room, members) in rooms {
            self.send_to(&room, &members, &delivery);
        }
    }

    /// Every local client now (a snapshot).
    pub fn members(&self) -> Vec<Member> {
        let rooms = self.rooms.read().expect("hub lock poisoned");
        rooms
            .values()
            .flat_map(|members| members.iter().cloned())
            .collect()
    }

    /// The rooms that have local clients now.
    pub fn rooms(&self) -> Vec<String> {
        let rooms = self.rooms.read().expect("hub lock poisoned");
        rooms.keys().cloned().collect()
    }

    fn send_to(&self, room: &str, members: &[Member], delivery: &Delivery) -> usize {
        let mut queued = 0;
        for member in members {
            let direct = member.direct.as_ref().map_or(Direct::NotNow, |direct| {
                let queues_empty = || member.frames_tx.is_empty() && member.control_tx.is_empty();
                direct
                    .owner
                    .try_write(&direct.socket, &delivery.bytes, queues_empty)
            });
            let delivery = match direct {
                Direct::Written => {
                    Metrics::inc(&self.metrics.direct_writes_total);
                    queued += 1;
                    continue;
                }
                // The writer owns the rest now: an empty delivery wakes it.
                Direct::HandedOver => Arc::new(Batch::default()),
                Direct::NotNow => Arc::clone(delivery),
            };
            match member.frames_tx.try_send(delivery) {
                Ok(()) => queued += 1,
                Err(TrySendError::Full(_)) => {
                    warn!(
                        "client {} dropped: send queue full (slow consumer)",
                        member.id
                    );
                    Metrics::inc(&self.metrics.slow_clients_dropped_total);
                    self.leave(room, member.id);
                    member.close(CloseReason::SLOW_CONSUMER);
                }
                // The session is ending and will leave the room itself.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        queued
    }

    /// Asks every local client to close (shutdown). Never blocks.
    pub fn close_all(&self, reason: CloseReason) {
        let rooms: Vec<Arc<[Member]>> = {
            let rooms = self.rooms.read().expect("hub lock poisoned");
            rooms.values().cloned().collect()
        };
        for member in rooms.iter().flat_map(|members| members.iter()) {
            member.close(reason);
        }
    }

    /// How many clients are in the hub, over all rooms.
    pub fn len(&self) -> usize {
        let rooms = self.rooms.read().expect("hub lock poisoned");
        rooms.values().map(|members| members.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Receiver, bounded};

    fn member(
        id: ClientId,
        room: &str,
        queue: usize,
    ) -> (Member, Receiver<Delivery>, Receiver<Control>) {
        let (frames_tx, frames_rx) = bounded(queue);
        let (control_tx, control_rx) = bounded(4);
        let member = Member {
            id,
            room: room.into(),
            last_seen: Arc::default(),
            direct: None,
            frames_tx,
            control_tx,
            closing: Arc::default(),
        };
        (member, frames_rx, control_rx)
    }

    fn message(room: &str, seq: u64) -> ChatMessage {
        ChatMessage {
            id: MessageId { millis: 1, seq },
            room: room.into(),
            from: "alice".into(),
            text: "hi".into(),
            ts: 1,
            instance: "a".into(),
            cid: None,
        }
    }

    #[test]
    fn delivery_reaches_only_the_room_and_shares_one_encoding() {
        let hub = Hub::new(Arc::default());
        let (a, a_rx, _a_ctl) = member(1, "lobby", 4);
        let (b, b_rx, _b_ctl) = member(2, "lobby", 4);
        let (c, c_rx, _c_ctl) = member(3, "other", 4);
        hub.join(a);
        hub.join(b);
        hub.join(c);
        assert_eq!(hub.deliver(&message("lobby", 0)), 2);
        let first = a_rx.try_recv().unwrap();
        let second = b_rx.try_recv().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "one encoding, shared");
        assert!(c_rx.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_drops_that_client_and_spares_the_others() {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(metrics.clone());
        let (slow, _slow_rx, slow_ctl) = member(1, "lobby", 1);
        let (fast, fast_rx, _fast_ctl) = member(2, "lobby", 8);
        hub.join(slow);
        hub.join(fast);
        for seq in 0..3 {
            hub.deliver(&message("lobby", seq));
        }
        assert_eq!(fast_rx.len(), 3);
        assert_eq!(hub.len(), 1);
        assert!(matches!(
            slow_ctl.try_recv(),
            Ok(Control::Close(CloseReason::SLOW_CONSUMER))
        ));
        assert_eq!(
            metrics.slow_clients_dropped_total.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn leaving_twice_is_harmless_and_empty_rooms_vanish() {
        let hub = Hub::new(Arc::default());
        let (a, _rx, _ctl) = member(1, "lobby", 1);
        hub.join(a);
        hub.leave("lobby", 1);
        hub.leave("lobby", 1);
        assert!(hub.is_empty());
        assert_eq!(hub.deliver(&message("lobby", 0)), 0);
    }

    #[test]
    fn a_batch_groups_messages_by_room_in_order() {
        let hub = Hub::new(Arc::default());
        let (a, a_rx, _a_ctl) = member(1, "lobby", 4);
        let (c, c_rx, _c_ctl) = member(3, "other", 4);
        hub.join(a);
        hub.join(c);
        let messages = [
            message("lobby", 0),
            message("other", 1),
            message("lobby", 2),
        ];
        assert_eq!(hub.deliver_batch(&messages), 3);
        let lobby = a_rx.try_recv().unwrap();
        let ids: Vec<_> = lobby.frames().map(|(id, _)| id.unwrap().seq).collect();
        assert_eq!(
            ids,
            [0, 2],
            "one slot for the room's two messages, in order"
        );
        assert_eq!(lobby.last_id(), Some(MessageId { millis: 1, seq: 2 }));
        let framed: Vec<u8> = lobby
            .frames()
            .flat_map(|(_, bytes)| bytes.to_vec())
            .collect();
        assert_eq!(framed, lobby.bytes);
        assert_eq!(c_rx.try_recv().unwrap().frames.len(), 1);
    }
}
