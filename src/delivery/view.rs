//! One client's window on its room's member list, and what it was last
//! shown of it: kept with the client's other delivery state in its hub
//! [`Member`](super::hub::Member), so that presence's tick, which walks a
//! room's members, finds each one's window without a second lookup.
//! Presence ([`crate::presence`]) reads and moves it; the hub only holds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// One client's view of its room's member list: the window it holds, and
/// what it was last given.
#[derive(Debug)]
pub struct View {
    /// (offset, limit), packed: read by the `presence-diff` thread for
    /// every client at each tick, without taking `shown`.
    window: AtomicU64,
    /// `None` until the client's first list is made: until then a tick
    /// leaves it alone (its first list will be newer).
    shown: Mutex<Option<Shown>>,
}

/// What a client's list says: as of which version of the room, and what it
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub version: u64,
    /// The room's epoch: one more every time the room is to be told afresh
    /// (after this instance reconnects to Redis).
    pub epoch: u64,
    /// Whether it holds the whole room; `None` if it holds nothing yet
    /// (its room could not be read when it joined).
    pub full: Option<bool>,
    pub count: usize,
    /// A hash of its window's members.
    pub content: u64,
}

impl Shown {
    /// A client owed its room's list.
    pub const OWED: Shown = Shown {
        version: 0,
        epoch: 0,
        full: None,
        count: 0,
        content: 0,
    };
}

impl View {
    pub fn new(limit: usize) -> Self {
        View {
            window: AtomicU64::new(pack(0, limit)),
            shown: Mutex::new(None),
        }
    }

    /// (offset, limit).
    pub fn window(&self) -> (usize, usize) {
        let packed = self.window.load(Ordering::Relaxed);
        ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize)
    }

    pub fn set_window(&self, offset: usize, limit: usize) {
        self.window.store(pack(offset, limit), Ordering::Relaxed);
    }

    pub fn shown(&self) -> MutexGuard<'_, Option<Shown>> {
        self.shown.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn pack(offset: usize, limit: usize) -> u64 {
    let clamp = |n: usize| n.min(u32::MAX as usize) as u64;
    (clamp(offset) << 32) | clamp(limit)
}
