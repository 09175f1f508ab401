//! The hub: this instance's local clients, by room.
//!
//! It only keeps the registry; it writes to no socket. The fan-out
//! ([`crate::fanout`]) is the one caller that hands clients their
//! messages, through each client's outbox.
//!
//! Each room's member list is an immutable `Arc<[Member]>` replaced on
//! every join and leave (copy on write). A deliverer clones the `Arc` under
//! the read lock and releases it before touching any outbox, so no lock is
//! held while sending, and joins never wait on a delivery in progress.
//! Joins and leaves cost O(room size), which is cheap next to a handshake.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::clock::LastSeen;
use crate::presence::View;
use crate::protocol::CloseReason;
use crate::session::outbox::{Outbox, Queued};

/// A local client's number, unique within this instance's lifetime.
pub type ClientId = u64;

/// The hub's handle on one client.
#[derive(Clone)]
pub struct Member {
    pub id: ClientId,
    /// Its display name (typing is relayed to the other names).
    pub name: Arc<str>,
    pub outbox: Arc<Outbox>,
    /// When its reader last read a frame (for the pinger).
    pub last_seen: Arc<LastSeen>,
    /// It asked for the X-ray (`trace=1`): its message frames are made
    /// for it alone, with its own stamps.
    pub trace: bool,
    /// Its window on the room's member list, and what it was last told.
    pub view: Arc<View>,
}

/// Local clients by room.
#[derive(Default)]
pub struct Hub {
    rooms: RwLock<HashMap<String, Arc<[Member]>>>,
}

impl Hub {
    pub fn new() -> Self {
        Hub::default()
    }

    // Every change below leaves the map consistent before it can panic, so
    // a lock poisoned by a panic elsewhere is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<[Member]>>> {
        self.rooms.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Arc<[Member]>>> {
        self.rooms.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a client to a room: from now on it receives the room's messages.
    pub fn join(&self, room: &str, member: Member) {
        let mut rooms = self.write();
        let members = rooms
            .entry(room.to_string())
            .or_insert_with(|| Arc::from([]));
        let mut updated = Vec::with_capacity(members.len() + 1);
        updated.extend(members.iter().cloned());
        updated.push(member);
        *members = updated.into();
    }

    /// Removes a client from a room; harmless if it already left.
    pub fn leave(&self, room: &str, id: ClientId) {
        let mut rooms = self.write();
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        if !members.iter().any(|m| m.id == id) {
            return;
        }
        let updated: Vec<Member> = members.iter().filter(|m| m.id != id).cloned().collect();
        if updated.is_empty() {
            rooms.remove(room);
        } else {
            *members = updated.into();
        }
    }

    /// A room's members now (a snapshot), if it has any.
    pub fn room(&self, room: &str) -> Option<Arc<[Member]>> {
        self.read().get(room).cloned()
    }

    /// Every room's members now (a snapshot).
    pub fn all_rooms(&self) -> Vec<Arc<[Member]>> {
        self.read().values().cloned().collect()
    }

    /// Every local client now (a snapshot).
    pub fn members(&self) -> Vec<Member> {
        self.read()
            .values()
            .flat_map(|members| members.iter().cloned())
            .collect()
    }

    /// Asks every local client to close (shutdown), sending what is
    /// queued first. Never blocks.
    pub fn close_all(&self, reason: CloseReason) {
        for member in self.members() {
            member.outbox.close(reason, Queued::Send);
        }
    }

    /// How many clients are in the hub, over all rooms.
    pub fn len(&self) -> usize {
        self.read().values().map(|members| members.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::{SocketWire, Watcher};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    struct NoWatcher;

    impl Watcher for NoWatcher {
        fn watch_writable(&self, _: usize, _: &TcpStream) {}
        fn cut_at(&self, _: usize, _: Instant) {}
    }

    /// A member whose outbox writes to a real loopback socket.
    fn member(id: ClientId) -> (Member, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let wire = SocketWire {
            socket: Arc::new(socket),
            key: id as usize,
            watcher: Arc::new(NoWatcher),
            close_grace: Duration::from_secs(1),
        };
        let member = Member {
            id,
            name: "someone".into(),
            outbox: Arc::new(Outbox::new(wire, 1024)),
            last_seen: Arc::default(),
            trace: false,
            view: Arc::new(View::new(100)),
        };
        (member, peer)
    }

    #[test]
    fn members_join_and_leave_their_rooms_and_empty_rooms_vanish() {
        let hub = Hub::new();
        let (a, _pa) = member(1);
        let (b, _pb) = member(2);
        let (c, _pc) = member(3);
        hub.join("lobby", a);
        hub.join("lobby", b);
        hub.join("other", c);
        assert_eq!(hub.room("lobby").unwrap().len(), 2);
        assert_eq!(hub.room("other").unwrap().len(), 1);
        assert_eq!(hub.all_rooms().len(), 2);
        hub.leave("lobby", 1);
        hub.leave("lobby", 1);
        assert_eq!(hub.len(), 2, "leaving twice is harmless");
        hub.leave("other", 3);
        assert!(hub.room("other").is_none(), "an empty room vanishes");
    }

    #[test]
    fn a_lock_poisoned_by_a_panic_elsewhere_does_not_spread() {
        let hub = Arc::new(Hub::new());
        let (a, _pa) = member(1);
        hub.join("lobby", a);
        let poisoner = Arc::clone(&hub);
        let panicked = std::thread::spawn(move || {
            let _guard = poisoner.rooms.write().unwrap();
            panic!("a bug while holding the hub lock");
        })
        .join();
        assert!(panicked.is_err() && hub.rooms.is_poisoned());
        let (b, _pb) = member(2);
        hub.join("lobby", b);
        assert_eq!(hub.room("lobby").unwrap().len(), 2);
        hub.leave("lobby", 1);
        assert_eq!(hub.members().len(), 1);
    }
}
