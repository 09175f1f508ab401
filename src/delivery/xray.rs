//! The X-ray (`trace=1` on the WebSocket URL): a client that asks gets
//! each message with its path (sent, accepted by Redis, received by this
//! instance, handed to its socket), to watch a message travel. Everything
//! the X-ray adds is here, behind three calls: [`Slots::take`] when a
//! client joins (at most `--max-traced-clients` have it), [`history_frame`]
//! for the messages of its first frames, and [`Traced`] for the fan-out,
//! which makes a traced member's frames for it alone. Everyone else gets
//! the shared, untouched bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::clock;
use crate::delivery::outbox::Batch;
use crate::protocol::{ChatMessage, MessageFrame, Received, ServerFrame};

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
/// if the client has the X-ray, plain otherwise.
pub fn history_frame(
    message: &ChatMessage,
    received: Received,
    instance: &str,
    trace: bool,
) -> Vec<u8> {
    let frame = if trace {
        MessageFrame::traced(message, received, instance, clock::wall_micros())
    } else {
        MessageFrame::plain(message)
    };
    ServerFrame::Message(frame).to_ws_bytes().to_vec()
}

/// One room's share of a delivery, kept for its members that asked for
/// the X-ray: their frames are made one by one, each with its own stamp.
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

    /// The batch for one traced member, stamped now.
    pub fn batch(&self) -> Arc<Batch> {
        let mut batch = Batch::default();
        for (message, received) in &self.messages {
            let frame =
                MessageFrame::traced(message, *received, &self.received_by, clock::wall_micros());
            batch.push(Some(message.id), &ServerFrame::Message(frame).to_ws_bytes());
        }
        Arc::new(batch)
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
