//! The two clocks the server reads, in one place.
//!
//! - The **wall clock** (milliseconds since the Unix epoch) is what ids and
//!   `ts` are made of, and what tells a plausible id from a forged one.
//! - The **monotonic clock** (milliseconds since this process started)
//!   measures silences and deadlines: it never jumps when the wall clock is
//!   set.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before 1970).
pub fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch: the X-ray's stamps, fine enough to
/// tell the hops of one message apart on one machine.
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch: a seed, or a nonce that tells this
/// run of the process from earlier ones.
pub fn wall_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Milliseconds since the process started, on the monotonic clock.
pub fn mono_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a client was last heard from: written by its reader at every
/// frame, read by the pinger. One relaxed atomic, because a stale read
/// only delays a ping by one round.
#[derive(Debug)]
pub struct LastSeen(AtomicU64);

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen(AtomicU64::new(mono_millis()))
    }
}

impl LastSeen {
    pub fn touch(&self) {
        self.0.store(mono_millis(), Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(mono_millis().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// `--...-ms` options: a whole number of milliseconds, kept as a
/// [`Duration`] from the start, so that no code converts it again.
pub fn millis(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{text:?} is not a whole number of milliseconds"))
}
