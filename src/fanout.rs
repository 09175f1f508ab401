//! The fan-out thread: takes the messages the subscriber received, in
//! order, and hands them to the hub in batches.
//!
//! Delivering a message costs, per local client, a wake-up of its writer
//! thread and a `write` system call: in a room of a thousand, that is a
//! thousand context switches per message, and it is what caps a
//! thread-per-connection server. A batch of messages costs the same per
//! client as one message, so this thread batches when it pays:
//! - whatever arrived while the previous batch was being handed out goes
//!   out together (no waiting: this only happens under load);
//! - a message arriving less than `window` after the previous hand-out
//!   waits for the rest of the window, so that under a steady stream each
//!   client is woken at most once per window. A message after a quiet spell
//!   goes out at once, so an idle chat sees no added latency.
//!
//! Splitting this from the subscriber thread also keeps the subscriber's
//! one job simple: read from Redis as fast as Redis sends, so Redis never
//! sees it fall behind.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use crate::hub::Hub;
use crate::protocol::ChatMessage;

/// Messages waiting between the subscriber and the fan-out thread. The
/// fan-out never blocks on a client, so this only fills if the machine is
/// overloaded, and then the subscriber waits (Redis buffers behind it).
const QUEUE: usize = 16 * 1024;
/// Most messages in one batch: bounds the buffer every client shares.
const MAX_BATCH: usize = 256;

/// Starts the fan-out thread; returns where to send received messages.
pub fn spawn_fanout(hub: Arc<Hub>, window: Duration) -> std::io::Result<Sender<ChatMessage>> {
    let (messages_tx, messages_rx) = bounded(QUEUE);
    thread::Builder::new()
        .name("fan-out".into())
        .spawn(move || run_fanout(&messages_rx, &hub, window))?;
    Ok(messages_tx)
}

fn run_fanout(messages_rx: &Receiver<ChatMessage>, hub: &Hub, window: Duration) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_hand_out: Option<Instant> = None;
    while let Ok(first) = messages_rx.recv() {
        batch.push(first);
        batch.extend(messages_rx.try_iter().take(MAX_BATCH - 1));
        if let Some(deadline) = last_hand_out.map(|at| at + window) {
            while batch.len() < MAX_BATCH {
                match messages_rx.recv_deadline(deadline) {
                    Ok(message) => batch.push(message),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        hub.deliver_batch(&batch);
        batch.clear();
        last_hand_out = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Delivery, Member};
    use crate::protocol::MessageId;

    fn message(seq: u64) -> ChatMessage {
        ChatMessage {
            id: MessageId { millis: 1, seq },
            room: "lobby".into(),
            from: "a".into(),
            text: "t".into(),
            ts: 1,
            instance: "i".into(),
            cid: None,
        }
    }

    #[test]
    fn a_steady_stream_is_handed_out_in_batches_and_in_order() {
        let hub = Arc::new(Hub::new(Arc::default()));
        let (frames_tx, frames_rx) = bounded::<Delivery>(64);
        let (control_tx, _control_rx) = bounded(1);
        hub.join(Member {
            id: 1,
            room: "lobby".into(),
            last_seen: Arc::default(),
            direct: None,
            frames_tx,
            control_tx,
            closing: Arc::default(),
        });
        let messages_tx = spawn_fanout(hub, Duration::from_millis(50)).unwrap();
        let started = Instant::now();
        messages_tx.send(message(0)).unwrap();
        let first = frames_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            first.frames.len(),
            1,
            "after a quiet spell a message goes at once"
        );
        assert!(started.elapsed() < Duration::from_millis(50));
        for seq in 1..=5 {
            messages_tx.send(message(seq)).unwrap();
        }
        let second = frames_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let ids: Vec<u64> = second.frames().map(|(id, _)| id.unwrap().seq).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "within the window, one batch");
    }
}
