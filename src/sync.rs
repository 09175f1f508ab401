//! The lock of the delivery path, switchable to loom's.
//!
//! Built with `RUSTFLAGS="--cfg loom"`, [`Mutex`] is loom's, so that the
//! outbox's model test (`src/session/outbox.rs`) explores every
//! interleaving of the real code; otherwise it is the standard one.

#[cfg(loom)]
pub use loom::sync::{Mutex, MutexGuard};
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
