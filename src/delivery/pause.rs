//! Delivery held on purpose: the gate the fan-out passes before each
//! delivery, which the fault panel's "pause delivery" closes for a while
//! (`crate::demo`). While it is closed, events wait in order in the
//! fan-out's queue; the subscriber thread is not held, so Redis never
//! sees a slow reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::clock;

/// Open unless someone holds it; costs the fan-out one atomic load per
/// delivery while open.
#[derive(Debug, Default)]
pub struct DeliveryPause {
    /// Wall-clock milliseconds until which delivery is held; 0 when open.
    until_ms: AtomicU64,
}

impl DeliveryPause {
    /// Holds delivery for `how_long`; returns until when (wall-clock ms).
    pub fn hold_for(&self, how_long: Duration) -> u64 {
        let until = clock::wall_millis() + how_long.as_millis() as u64;
        self.until_ms.store(until, Ordering::Relaxed);
        until
    }

    /// Until when delivery is held, if it is.
    pub fn held_until(&self) -> Option<u64> {
        let until = self.until_ms.load(Ordering::Relaxed);
        (until != 0 && until > clock::wall_millis()).then_some(until)
    }

    /// Returns at once while open; else sleeps until the hold ends.
    pub fn wait_while_held(&self) {
        let asked = self.until_ms.load(Ordering::Relaxed);
        if asked == 0 {
            return;
        }
        while let Some(until) = self.held_until() {
            let left = until.saturating_sub(clock::wall_millis());
            thread::sleep(Duration::from_millis(left.min(100)));
        }
        // Back to the fast path, unless a new hold came meanwhile.
        let _ = self
            .until_ms
            .compare_exchange(asked, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_on_its_own() {
        let pause = DeliveryPause::default();
        assert_eq!(pause.held_until(), None);
        pause.hold_for(Duration::from_secs(1));
        assert!(pause.held_until().is_some());
        let started = std::time::Instant::now();
        pause.wait_while_held();
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(pause.held_until(), None);
    }
}
