//! The hub: this instance's local clients, by room.
//!
//! It only keeps the registry; it writes to no socket. The fan-out
//! ([`crate::delivery::fanout`]) is the one caller that hands clients their
//! messages, through each client's outbox.
//!
//! Each room's member list is an immutable snapshot ([`RoomMembers`])
//! replaced on every join and leave (copy on write). A deliverer clones
//! it under the read lock and releases the lock before touching any
//! outbox, so no lock is held while sending, and joins never wait on a
//! delivery in progress.
//!
//! A snapshot is a list of chunks of [`CHUNK`] members, shared between
//! snapshots: a join or leave copies at most two chunks and the list of
//! chunks, not the room. (A flat `Arc<[Member]>` copied whole made each
//! join in a room of 5,000 cost about a millisecond, under the write lock,
//! and whoever dropped the last reference to the snapshot it replaced,
//! usually the fan-out between two messages, paid as much again.)

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::clock::LastSeen;
use crate::delivery::outbox::{Outbox, Queued};
use crate::delivery::view::View;
use crate::protocol::CloseReason;

/// A local client's number, unique within this instance's lifetime.
pub type ClientId = u64;

/// The hub's handle on one client.
#[derive(Clone)]
pub struct Member {
    pub id: ClientId,
    /// Its presence key: its display name, and with `--auth token` its
    /// user id (`protocol::member_key`). Typing is relayed to the other
    /// keys, so one user's own tabs do not hear it.
    pub key: Arc<str>,
    pub outbox: Arc<Outbox>,
    /// When its reader last read a frame (for the pinger).
    pub last_seen: Arc<LastSeen>,
    /// `--auth token`: when its token expires, in seconds since the Unix
    /// epoch (the pinger closes it then); 0 with `--auth off`.
    pub token_expires: Arc<AtomicU64>,
    /// It asked for the X-ray (`trace=1`): its message frames are made
    /// for it alone, with its own stamps.
    pub trace: bool,
    /// Its window on the room's member list, and what it was last told.
    pub view: Arc<View>,
}

/// Members per chunk of a [`RoomMembers`]: a join or leave copies one or
/// two chunks, and the list of `n / CHUNK` chunks.
pub const CHUNK: usize = 128;

/// A room's local clients at one moment: cheap to clone (one counter), and
/// never changed; a join or leave makes a new one that shares every chunk
/// it did not touch. Every chunk but the last is full, so a room of `n`
/// has `n / CHUNK` chunks, rounded up. The order of members is not
/// meaningful (a leave moves the last member into the leaver's place).
#[derive(Clone, Default)]
pub struct RoomMembers {
    chunks: Arc<[Arc<[Member]>]>,
    len: usize,
}

impl RoomMembers {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    /// These members and `member`: the last chunk copied with it, or a new
    /// chunk of one.
    fn with(&self, member: Member) -> RoomMembers {
        let mut chunks: Vec<Arc<[Member]>> = self.chunks.to_vec();
        match chunks.last_mut() {
            Some(last) if last.len() < CHUNK => {
                let mut grown = last.to_vec();
                grown.push(member);
                *last = grown.into();
            }
            _ => chunks.push(Arc::from([member])),
        }
        RoomMembers {
            chunks: chunks.into(),
            len: self.len + 1,
        }
    }

    /// These members but client `id` (`None` if it is not one of them):
    /// the room's last member takes its place, so that only the leaver's
    /// chunk and the last one are copied, and every chunk but the last
    /// stays full.
    fn without(&self, id: ClientId) -> Option<RoomMembers> {
        let (at, index) = self.chunks.iter().enumerate().find_map(|(at, chunk)| {
            let index = chunk.iter().position(|member| member.id == id)?;
            Some((at, index))
        })?;
        let mut chunks: Vec<Arc<[Member]>> = self.chunks.to_vec();
        let mut last = chunks.pop().expect("a member was found").to_vec();
        let moved = last.pop().expect("chunks are never empty");
        if at == chunks.len() {
            // The leaver was in the last chunk (or was its last member).
            if index < last.len() {
                last[index] = moved;
            }
        } else {
            let mut chunk = chunks[at].to_vec();
            chunk[index] = moved;
            chunks[at] = chunk.into();
        }
        if !last.is_empty() {
            chunks.push(last.into());
        }
        Some(RoomMembers {
            chunks: chunks.into(),
            len: self.len - 1,
        })
    }
}

impl FromIterator<Member> for RoomMembers {
    fn from_iter<I: IntoIterator<Item = Member>>(members: I) -> Self {
        let mut chunks: Vec<Arc<[Member]>> = Vec::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut len = 0;
        for member in members {
            chunk.push(member);
            len += 1;
            if chunk.len() == CHUNK {
                chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)).into());
            }
        }
        if !chunk.is_empty() {
            chunks.push(chunk.into());
        }
        RoomMembers {
            chunks: chunks.into(),
            len,
        }
    }
}

/// Local clients by room.
#[derive(Default)]
pub struct Hub {
    rooms: RwLock<HashMap<String, RoomMembers>>,
}

impl Hub {
    pub fn new() -> Self {
        Hub::default()
    }

    // Every change below leaves the map consistent before it can panic, so
    // a lock poisoned by a panic elsewhere is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, RoomMembers>> {
        self.rooms.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, RoomMembers>> {
        self.rooms.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a client to a room: from now on it receives the room's messages.
    pub fn join(&self, room: &str, member: Member) {
        let mut rooms = self.write();
        let members = rooms.entry(room.to_string()).or_default();
        let joined = members.with(member);
        let replaced = std::mem::replace(members, joined);
        // Dropped outside the lock (a chunk may be the last of its kind).
        drop(rooms);
        drop(replaced);
    }

    /// Removes a client from a room; harmless if it already left.
    pub fn leave(&self, room: &str, id: ClientId) {
        let mut rooms = self.write();
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        let Some(left) = members.without(id) else {
            return;
        };
        let replaced = if left.is_empty() {
            rooms.remove(room)
        } else {
            Some(std::mem::replace(members, left))
        };
        // Dropped outside the lock (a chunk may be the last of its kind).
        drop(rooms);
        drop(replaced);
    }

    /// A room's members now (a snapshot), if it has any.
    pub fn room(&self, room: &str) -> Option<RoomMembers> {
        self.read().get(room).cloned()
    }

    /// Every room's members now (a snapshot).
    pub fn all_rooms(&self) -> Vec<RoomMembers> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::outbox::{SocketWire, Watcher};
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
            key: "someone".into(),
            outbox: Arc::new(Outbox::new(wire, 1024)),
            last_seen: Arc::default(),
            token_expires: Arc::default(),
            trace: false,
            view: Arc::new(View::new(100)),
        };
        (member, peer)
    }

    /// `member(id)` with another id: members that share one outbox.
    fn same_but(member: &Member, id: ClientId) -> Member {
        Member {
            id,
            ..member.clone()
        }
    }

    fn ids(members: &RoomMembers) -> Vec<ClientId> {
        let mut ids: Vec<ClientId> = members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids
    }

    fn chunk_lens(members: &RoomMembers) -> Vec<usize> {
        members.chunks.iter().map(|chunk| chunk.len()).collect()
    }

    proptest::proptest! {
        /// Against a plain set: after any joins and leaves, the same
        /// members, every chunk but the last full, and every snapshot
        /// taken on the way unchanged by what came after it.
        #[test]
        fn joins_and_leaves_keep_exactly_the_members_in_full_chunks(
            steps in proptest::collection::vec((proptest::bool::weighted(0.6), 0u64..400), 1..900)
        ) {
            let (template, _peer) = member(0);
            let mut members = RoomMembers::default();
            let mut model = std::collections::BTreeSet::new();
            let mut snapshots = Vec::new();
            for (join, id) in steps {
                if join && !model.contains(&id) {
                    members = members.with(same_but(&template, id));
                    model.insert(id);
                } else if !join {
                    match members.without(id) {
                        Some(left) => {
                            proptest::prop_assert!(model.remove(&id));
                            members = left;
                        }
                        None => proptest::prop_assert!(!model.contains(&id)),
                    }
                }
                proptest::prop_assert_eq!(ids(&members), model.iter().copied().collect::<Vec<_>>());
                proptest::prop_assert_eq!(members.len(), model.len());
                let lens = chunk_lens(&members);
                if let Some((_, full)) = lens.split_last() {
                    proptest::prop_assert!(full.iter().all(|&n| n == CHUNK));
                    proptest::prop_assert!(lens.iter().all(|&n| n > 0));
                }
                if snapshots.len() < 50 {
                    snapshots.push((members.clone(), ids(&members)));
                }
            }
            for (snapshot, taken) in &snapshots {
                proptest::prop_assert_eq!(&ids(snapshot), taken);
            }
        }
    }

    #[test]
    fn a_join_or_leave_copies_at_most_two_chunks_of_a_large_room() {
        let (template, _peer) = member(0);
        let room: RoomMembers = (0..10 * CHUNK as u64 + 5)
            .map(|id| same_but(&template, id))
            .collect();
        let shared = |a: &RoomMembers, b: &RoomMembers| {
            a.chunks
                .iter()
                .zip(b.chunks.iter())
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        let joined = room.with(same_but(&template, 99_999));
        assert_eq!(shared(&room, &joined), 10, "only the last chunk is copied");
        let left = joined.without(3).expect("client 3 is in the room");
        assert_eq!(shared(&joined, &left), 9, "the leaver's chunk and the last");
        assert!(left.iter().all(|m| m.id != 3));
        assert_eq!(left.len(), 10 * CHUNK + 5);
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
