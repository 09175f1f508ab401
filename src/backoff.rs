//! Capped exponential backoff with jitter, for reconnecting to Redis.
//!
//! Jitter matters when many instances lose Redis at once: without it they
//! all come back in the same millisecond, again and again.

use std::time::Duration;

use crate::clock;

/// The first wait after a failure: short, because most outages are a
/// restart that is over in well under a second.
const INITIAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        let seed = clock::wall_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32);
        Backoff {
            next: INITIAL.min(max),
            max,
            rng: seed | 1,
        }
    }

    /// The wait before the next attempt: between half and all of the
    /// current step, which then doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        // xorshift64: plenty for spreading reconnects, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng % 1000) as f64 / 2000.0;
        step.mul_f64(fraction)
    }

    /// Back to short waits, after a success.
    pub fn reset(&mut self) {
        self.next = INITIAL.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let max = Duration::from_secs(1);
        let mut backoff = Backoff::new(max);
        let first = backoff.next_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL);
        for _ in 0..20 {
            assert!(backoff.next_delay() <= max);
        }
        assert!(backoff.next_delay() >= max / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL);
    }
}
