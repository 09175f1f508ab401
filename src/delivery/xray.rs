//! The X-ray (`trace=1` on the WebSocket URL): a client that asks gets
//! each message with its path (sent, accepted by Redis, received by this
//! instance, queued in its outbox, handed to its socket), to watch a
//! message travel. Everything the X-ray adds is here, behind three calls:
//! [`Slots::take`] when a client joins (at most `--max-traced-clients`
//! have it), [`history_frame`] for the messages of its first frames, and
//! [`Traced`] for the fan-out, which makes a traced member's frames for it
//! alone: [`LateFrame`]s, made again by the outbox right before their
//! first byte goes to the socket, so that "written" is stamped when the
//! frame leaves the outbox, after any wait there (a full socket, a stalled
//! tab). Everyone else gets the shared, untouched bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::clock;
use crate::delivery::outbox::LateFrame;
use crate::protocol::{ChatMessage, MessageFrame, MessageId, Received, ServerFrame, WsBytes};

/// The X-ray's places: at most `max` clients of this instance have it.
pub struct Slots {
    taken: AtomicUsize,
    max: usize,
}

/// One client's place, given back when dropped (when the client leaves).
pub struct Slot<'a>(&'a Slots);

impl Slots {
    pub fn new(max: usize) -> Self {
        Slots {
            taken: AtomicUsize::new(0),
            max,
        }
    }

    /// A place, if one is free.
    pub fn take(&self) -> Option<Slot<'_>> {
        let taken = self.taken.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self);
        (taken < self.max).then_some(slot)
    }

    /// `--max-traced-clients`, for the refusal's words.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A history message as a client's first frames carry it: with its path
/// if the client has the X-ray, plain otherwise. The first frames are
/// written as soon as they are made, so "queued" and "written" are both
/// stamped now.
pub fn history_frame(
    message: &ChatMessage,
    received: Received,
    instance: &str,
    trace: bool,
) -> Vec<u8> {
    let frame = if trace {
        let now = clock::wall_micros();
        MessageFrame::traced(message, received, instance, now, now)
    } else {
        MessageFrame::plain(message)
    };
    ServerFrame::Message(frame).to_ws_bytes().to_vec()
}

/// One room's share of a delivery, kept for its members that asked for
/// the X-ray: their frames are made one by one, each with its own stamps.
#[derive(Debug)]
pub struct Traced {
    received_by: Arc<str>,
    messages: Vec<(ChatMessage, Received)>,
}

impl Traced {
    /// The messages of one room's delivery, received by `received_by`.
    pub fn new(received_by: Arc<str>, messages: Vec<(ChatMessage, Received)>) -> Self {
        Traced {
            received_by,
            messages,
        }
    }

    /// The frames for one traced member, queued now: their outbox stamps
    /// each "written" when it sends it.
    pub fn frames(self: &Arc<Self>) -> Vec<Box<dyn LateFrame>> {
        let queued_us = clock::wall_micros();
        (0..self.messages.len())
            .map(|index| {
                Box::new(TracedFrame {
                    traced: Arc::clone(self),
                    index,
                    queued_us,
                }) as Box<dyn LateFrame>
            })
            .collect()
    }
}

/// One message of a [`Traced`] delivery, for one member.
#[derive(Debug)]
struct TracedFrame {
    traced: Arc<Traced>,
    index: usize,
    /// When it entered the member's outbox.
    queued_us: u64,
}

impl LateFrame for TracedFrame {
    fn id(&self) -> MessageId {
        self.traced.messages[self.index].0.id
    }

    fn render(&self) -> WsBytes {
        let (message, received) = &self.traced.messages[self.index];
        let frame = MessageFrame::traced(
            message,
            *received,
            &self.traced.received_by,
            self.queued_us,
            clock::wall_micros(),
        );
        ServerFrame::Message(frame).to_ws_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_when_its_client_leaves() {
        let slots = Slots::new(1);
        let first = slots.take().expect("one place");
        assert!(slots.take().is_none(), "the only place is taken");
        drop(first);
        assert!(slots.take().is_some(), "given back");
        assert!(Slots::new(0).take().is_none(), "0 turns the X-ray off");
    }
}
