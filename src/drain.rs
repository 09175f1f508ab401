//! Knowing when the last client has gone, without polling: every joined
//! session holds a [`Guard`] (a clone of one channel's sender that never
//! sends), and shutdown drops the original and waits until the channel
//! says no sender is left. mini-redis ends its shutdown the same way.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

/// Held by a joined session for as long as it lives.
pub struct Guard {
    _alive: Sender<()>,
}

pub struct Drain {
    /// The original sender; `None` once draining, so that no session
    /// takes a guard after the wait began.
    original: Mutex<Option<Sender<()>>>,
    done: Receiver<()>,
}

impl Default for Drain {
    fn default() -> Self {
        let (original, done) = bounded(0);
        Drain {
            original: Mutex::new(Some(original)),
            done,
        }
    }
}

impl Drain {
    fn original(&self) -> MutexGuard<'_, Option<Sender<()>>> {
        // Nothing can be left half-done under this lock: a panic elsewhere
        // does not spread.
        self.original.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guard for a session that joins, or `None` once shutdown began.
    pub fn guard(&self) -> Option<Guard> {
        self.original().as_ref().map(|sender| Guard {
            _alive: sender.clone(),
        })
    }

    /// Stops handing out guards and waits until every one is dropped, or
    /// `deadline`. True if every session ended.
    pub fn wait(&self, deadline: Instant) -> bool {
        self.original().take();
        matches!(
            self.done.recv_deadline(deadline),
            Err(RecvTimeoutError::Disconnected)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_wait_ends_when_the_last_guard_is_dropped() {
        let drain = Drain::default();
        let first = drain.guard().expect("not draining yet");
        let second = drain.guard().expect("not draining yet");
        let dropper = std::thread::spawn(move || {
            drop(first);
            std::thread::sleep(Duration::from_millis(50));
            drop(second);
        });
        let started = Instant::now();
        assert!(drain.wait(started + Duration::from_secs(5)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(drain.guard().is_none(), "no guard once draining");
        dropper.join().unwrap();
    }

    #[test]
    fn a_guard_kept_past_the_deadline_is_reported() {
        let drain = Drain::default();
        let _kept = drain.guard();
        assert!(!drain.wait(Instant::now() + Duration::from_millis(20)));
    }
}
