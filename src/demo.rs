//! The fault panel (`--demo-controls`, off by default): faults a student
//! can cause from the page to watch the server recover.
//!
//! Each control breaks something real, the way it breaks in production:
//! the Redis subscription is cut at its socket, delivery is held where the
//! fan-out takes its events, and a stalled tab is a client whose socket
//! the server stops writing to. Nothing here simulates the recovery: what
//! the page then shows is the server's ordinary code at work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use log::warn;

use crate::clock;
use crate::hub::Hub;

/// The longest pause or stall one request may ask for.
pub const MAX_SECONDS: u64 = 60;

/// What the controls share with the threads they act on.
#[derive(Debug, Default)]
pub struct DemoControls {
    enabled: bool,
    /// Wall-clock milliseconds until which the fan-out holds delivery.
    delivery_paused_until_ms: AtomicU64,
}

impl DemoControls {
    pub fn new(enabled: bool) -> Self {
        DemoControls {
            enabled,
            delivery_paused_until_ms: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Holds this instance's delivery for `seconds`: events wait, in
    /// order, in the fan-out's queue.
    pub fn pause_delivery(&self, seconds: u64) -> u64 {
        let until = clock::wall_millis() + seconds * 1000;
        self.delivery_paused_until_ms
            .store(until, Ordering::Relaxed);
        warn!("demo control: delivery paused for {seconds} s");
        until
    }

    /// Until when delivery is paused, if it is.
    pub fn delivery_paused_until(&self) -> Option<u64> {
        let until = self.delivery_paused_until_ms.load(Ordering::Relaxed);
        (until != 0 && until > clock::wall_millis()).then_some(until)
    }

    /// The fan-out calls this before each delivery: one atomic load, and
    /// returns at once, unless a pause was asked for.
    pub fn wait_while_delivery_paused(&self) {
        let asked = self.delivery_paused_until_ms.load(Ordering::Relaxed);
        if asked == 0 {
            return;
        }
        while let Some(until) = self.delivery_paused_until() {
            let left = until.saturating_sub(clock::wall_millis());
            thread::sleep(Duration::from_millis(left.min(100)));
        }
        // Back to the fast path, unless a new pause came meanwhile.
        let _ = self.delivery_paused_until_ms.compare_exchange(
            asked,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Stops writing to client `client`'s socket for `seconds`, as if its tab
/// had stopped reading: what it is sent meanwhile waits in its outbox, and
/// past `--client-buffer-bytes` the client is dropped as a slow consumer.
/// False when no such client is connected here.
pub fn stall_reading(hub: &Hub, client: u64, seconds: u64) -> bool {
    let Some(member) = hub.members().into_iter().find(|m| m.id == client) else {
        return false;
    };
    warn!("demo control: client {client}'s socket is not written to for {seconds} s");
    member.outbox.hold();
    let outbox = Arc::clone(&member.outbox);
    let resumed = thread::Builder::new()
        .name(format!("demo-stall-{client}"))
        .spawn(move || {
            thread::sleep(Duration::from_secs(seconds));
            outbox.release();
        });
    if resumed.is_err() {
        member.outbox.release();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_ends_on_its_own() {
        let demo = DemoControls::new(true);
        assert_eq!(demo.delivery_paused_until(), None);
        demo.pause_delivery(1);
        assert!(demo.delivery_paused_until().is_some());
        let started = std::time::Instant::now();
        demo.wait_while_delivery_paused();
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(demo.delivery_paused_until(), None);
    }
}
