//! The lock of the delivery path, switchable to loom's.
//!
//! Built with `RUSTFLAGS="--cfg loom"`, [`Mutex`] and [`AtomicUsize`] are
//! loom's, so that the model tests of the outbox (`src/delivery/outbox.rs`)
//! and of the catch-up gates (`src/broker/redis/gates.rs`) explore every
//! interleaving of the real code; otherwise they are the standard ones.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Mutex, MutexGuard};

/// Takes a lock even if a thread panicked while holding it.
///
/// Every structure behind these locks is left consistent by each step
/// that changes it (no step panics half-way through), so a panic elsewhere
/// in the holder is no reason to make every other thread panic too.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
