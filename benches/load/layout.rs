//! Where each client goes: its room, its instance, the worker process that
//! holds it, and whether it sends. A pure function of the options, so the
//! parent and every worker agree without telling each other.
//!
//! Client `k` is in room `k mod rooms`; sender `j` is client `j`. With one
//! room the clients alternate between the instances (`k mod 2`); with
//! several, a room's clients are all on one instance and the rooms
//! alternate (`room mod 2`), so that every delivery is same-instance;
//! except in `presence-idle`, where every room has members on both
//! instances: client `k` is on `(k div rooms) mod 2`.
//! Worker `w` of `W` holds the clients with `k mod W == w`.

use crate::options::{Opts, Scenario};

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub clients: usize,
    pub senders: usize,
    pub rooms: usize,
    pub workers: usize,
    /// Each room's clients alternate between the instances (presence-idle).
    pub spread: bool,
    /// Each client keeps its room's member list (presence-join).
    pub member_lists: bool,
}

impl Layout {
    pub fn new(opts: &Opts) -> Self {
        Layout {
            clients: opts.clients,
            senders: opts.senders.min(opts.clients),
            rooms: opts.rooms.max(1),
            workers: opts.workers(),
            spread: opts.scenario == Scenario::PresenceIdle,
            member_lists: opts.scenario == Scenario::PresenceJoin,
        }
    }

    pub fn room(&self, k: usize) -> usize {
        k % self.rooms
    }

    /// 0 for instance a, 1 for b.
    pub fn instance(&self, k: usize) -> usize {
        if self.spread {
            (k / self.rooms) % 2
        } else if self.rooms > 1 {
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

    /// Client `k`'s name, distinct over all clients.
    pub fn name(&self, k: usize) -> String {
        format!("c{k}")
    }

    /// The client whose name this is, if it is one of ours.
    pub fn client_of(&self, name: &str) -> Option<usize> {
        let digits = name.strip_prefix('c')?;
        // Digits only, and no leading zero: "c01" or "c+1" is not client 1.
        let canonical = digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if !canonical {
            return None;
        }
        digits.parse().ok().filter(|&k| k < self.clients)
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
