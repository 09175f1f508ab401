//! Where each client goes: its room, its instance, the worker process that
//! holds it, and whether it sends. A pure function of the options, so the
//! parent and every worker agree without telling each other.
//!
//! Client `k` is in room `k mod rooms`; sender `j` is client `j`. With one
//! room the clients alternate between the instances (`k mod 2`); with
//! several, a room's clients are all on one instance and the rooms
//! alternate (`room mod 2`), so that every delivery is same-instance.
//! Worker `w` of `W` holds the clients with `k mod W == w`.

use crate::options::Opts;

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub clients: usize,
    pub senders: usize,
    pub rooms: usize,
    pub workers: usize,
}

impl Layout {
    pub fn new(opts: &Opts) -> Self {
        Layout {
            clients: opts.clients,
            senders: opts.senders.min(opts.clients),
            rooms: opts.rooms.max(1),
            workers: opts.workers(),
        }
    }

    pub fn room(&self, k: usize) -> usize {
        k % self.rooms
    }

    /// 0 for instance a, 1 for b.
    pub fn instance(&self, k: usize) -> usize {
        if self.rooms > 1 {
            self.room(k) % 2
        } else {
            k % 2
        }
    }

    pub fn worker(&self, k: usize) -> usize {
        k % self.workers
    }

    pub fn is_sender(&self, k: usize) -> bool {
        k < self.senders
    }

    /// Whether client `k` is meant to receive sender `j`'s messages.
    pub fn hears(&self, k: usize, j: usize) -> bool {
        j < self.senders && self.room(j) == self.room(k)
    }

    /// The room's name: `base` itself when there is one room.
    pub fn room_name(&self, base: &str, room: usize) -> String {
        if self.rooms == 1 {
            base.to_string()
        } else {
            format!("{base}r{room}")
        }
    }
}
