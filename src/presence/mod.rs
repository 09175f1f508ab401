//! Who is in each room, as this instance tells its clients: cheap in a
//! room of 20,000.
//!
//! Telling every client every join made a join storm quadratic: each of
//! `n` joins went to the `n` clients already there, each of whom rebuilt
//! its list. So (the way Phoenix Presence batches its diffs and Discord
//! shows a large guild's member list):
//!
//! - **A replica per room.** Each instance keeps, for each room it has
//!   clients in, the room's member list ([`roster::Roster`]): read once
//!   from the broker when the room gets its first local client, then kept
//!   in step by the changes the broker emits (one per connection that
//!   comes or goes, numbered, so a missed one is noticed and the room read
//!   again). A joining client's member list comes from it: no Redis read
//!   per join.
//! - **Coalesced changes.** Nothing goes to clients as a change happens.
//!   Every `--presence-diff-ms` the `presence-diff` thread tells each room's
//!   clients what changed since its last tick, in one `presence_diff`
//!   frame at most, with the count: a storm of joins, or a crashed
//!   instance's thousands of members expiring, costs each client a frame
//!   per tick.
//! - **A window on large rooms.** A room of at most
//!   `--presence-full-list-max` members is shown whole, with every join
//!   and leave. A larger one is shown as its count and each client's
//!   window (the first members in name order, or the range it asked for
//!   with a `members` frame): a client hears of a change only when its
//!   window's contents change, and then only which names entered and left
//!   the window since the last tick (the window whole if what it holds is
//!   not the last tick's), bounded by the window's size.
//! - **Each client is told from what it holds.** A room's state has a
//!   version (one more at every change the roster takes). Each client's
//!   [`View`] records the version of the last list it was given, whoever
//!   gave it: its first frames, an answer to `members`, or a tick. A tick
//!   gives a client only what is newer than what it holds, under the
//!   client's own lock, so a frame built from an older state can never
//!   land after a newer one, and a client that joins between two ticks is
//!   not told again what its first list already said.
//!
//! Typing is not here: it goes to the room's clients as it comes (see
//! `crate::delivery::fanout`).

pub mod roster;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::broker::{Presence, PresenceChange};
use crate::delivery::hub::{Hub, Member, RoomMembers};
use crate::delivery::outbox::{Batch, Outbox, Pushed};
use crate::delivery::view::{Shown, View};
use crate::metrics::Metrics;
use crate::protocol::{MemberRef, PresenceDiff, PresenceMember, ServerFrame};
use roster::{Applied, Changes, Roster};

/// Most changes kept for a room while its roster is being read: past it,
/// they are dropped, and the room is read again.
const EARLY_MAX: usize = 10_000;
/// How long a joining client's member list waits for its own join to come
/// back from Redis (a millisecond or two), so that it lists itself.
const OWN_JOIN_WAIT: Duration = Duration::from_millis(500);

/// What presence costs and shows: a group of the server's options
/// (`crate::config`).
#[derive(Debug, Clone, Copy, clap::Args)]
#[command(next_help_heading = "Presence")]
pub struct PresenceSettings {
    /// `on`: clients are told who is in their room, and who is typing.
    /// `off`: no presence at all (no Redis writes per join, no frames).
    #[arg(
        long = "presence",
        env = "PRESENCE",
        value_name = "PRESENCE",
        action = clap::ArgAction::Set,
        default_value = "on",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(["on", "off"]),
            |v| v == "on"
        )
    )]
    pub enabled: bool,
    /// Milliseconds a member stays listed after its instance stopped
    /// refreshing its liveness (the instance died); instances refresh
    /// every third.
    #[arg(id = "presence_ttl", long = "presence-ttl-ms", env = "PRESENCE_TTL_MS", value_name = "PRESENCE_TTL_MS", default_value = "15000", value_parser = crate::clock::millis)]
    pub ttl: Duration,
    /// Milliseconds between two `presence_diff` frames of a room: joins
    /// and leaves meanwhile are told together.
    #[arg(long = "presence-diff-ms", env = "PRESENCE_DIFF_MS", value_name = "PRESENCE_DIFF_MS", default_value = "1000", value_parser = crate::clock::millis)]
    pub diff_interval: Duration,
    /// The largest room whose member list a client gets whole, with every
    /// join and leave; past it, clients get the count and a window of
    /// this many members.
    #[arg(
        long = "presence-full-list-max",
        env = "PRESENCE_FULL_LIST_MAX",
        value_name = "PRESENCE_FULL_LIST_MAX",
        default_value_t = 100
    )]
    pub full_list_max: usize,
    /// The largest window of the member list a client may ask for
    /// (`members` frame).
    #[arg(
        long = "presence-max-members",
        env = "PRESENCE_MAX_MEMBERS",
        value_name = "PRESENCE_MAX_MEMBERS",
        default_value_t = 1000
    )]
    pub max_members: usize,
}

/// How a room is to be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reread {
    /// A change was missed, or the room was rewritten: what differs goes
    /// out as a diff.
    Diff,
    /// This instance's link to Redis came back: its clients get the room
    /// afresh, whole.
    Fresh,
}

#[derive(Debug, Default)]
struct Room {
    /// `None` until first read.
    roster: Option<Roster>,
    /// Changes that came while the roster was being read first.
    early: Vec<PresenceChange>,
    reread: Option<Reread>,
    /// One more at every change the roster takes.
    version: u64,
    epoch: u64,
    /// The version its clients were last told of, at a tick.
    told: u64,
    /// A large room: each window's members as last told, which the next
    /// tick's window diffs are taken from.
    told_windows: HashMap<(usize, usize), Arc<Listed>>,
}

impl Room {
    /// Applies a change to a loaded roster; a gap asks for a reread.
    fn take(&mut self, change: &PresenceChange) {
        let Some(roster) = &mut self.roster else {
            return;
        };
        let at = self.version + 1;
        let applied = match change {
            PresenceChange::MemberChange(change) => roster.apply_change(change, at),
            PresenceChange::MembersExpired(expired) => roster.apply_expired(expired, at),
            PresenceChange::MembersRewritten(rewritten) if rewritten.seq > roster.seq() => {
                Applied::Gap
            }
            _ => Applied::Old,
        };
        match applied {
            Applied::Yes => self.version += 1,
            Applied::Gap => self.reread = self.reread.max(Some(Reread::Diff)),
            Applied::Old => {}
        }
    }
}

/// A room's state at a tick, taken under the lock, to be told outside it.
struct Telling {
    room: String,
    version: u64,
    /// The version told at the last tick: `changes` are those since.
    since: u64,
    epoch: u64,
    count: usize,
    full: bool,
    /// A small room: its members, and what changed since the last tick.
    whole: Listed,
    changes: Changes,
    /// A large room: each window its clients hold.
    windows: HashMap<(usize, usize), Window>,
}

/// A large room's window at a tick: its members, and what changed in it
/// since the last tick, for clients that hold the last tick's.
struct Window {
    now: Arc<Listed>,
    since: Option<WindowChange>,
}

/// Which names entered (or changed) and left a window between two ticks.
struct WindowChange {
    /// The hash of the window as told at the last tick.
    from: u64,
    added: Vec<PresenceMember>,
    removed: Vec<MemberRef>,
}

impl WindowChange {
    /// Both lists are in name order: one merge.
    fn between(before: &Listed, now: &Listed) -> Self {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let (mut old, mut new) = (
            before.members.iter().peekable(),
            now.members.iter().peekable(),
        );
        loop {
            match (old.peek(), new.peek()) {
                (Some(o), Some(n)) if o.name == n.name => {
                    if o != n {
                        added.push((*n).clone());
                    }
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) if o.name < n.name => {
                    removed.push(MemberRef(o.name.clone()));
                    old.next();
                }
                (Some(o), None) => {
                    removed.push(MemberRef(o.name.clone()));
                    old.next();
                }
                (_, Some(n)) => {
                    added.push((*n).clone());
                    new.next();
                }
                (None, None) => break,
            }
        }
        WindowChange {
            from: before.hash,
            added,
            removed,
        }
    }
}

/// Members as one frame lists them, and their hash (what a client that
/// holds them recorded).
#[derive(Debug, Default)]
struct Listed {
    members: Vec<PresenceMember>,
    hash: u64,
}

impl Listed {
    fn new(members: Vec<PresenceMember>) -> Self {
        Listed {
            hash: hash(&members),
            members,
        }
    }
}

pub struct Tracker {
    settings: PresenceSettings,
    rooms: Mutex<HashMap<String, Room>>,
    /// Signalled when changes are applied (a joiner waits for its own).
    applied: Condvar,
    hub: Arc<Hub>,
    broker: Arc<dyn Presence>,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub fn new(
        settings: PresenceSettings,
        hub: Arc<Hub>,
        broker: Arc<dyn Presence>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Tracker {
            settings,
            rooms: Mutex::default(),
            applied: Condvar::new(),
            hub,
            broker,
            metrics,
        }
    }

    pub fn settings(&self) -> &PresenceSettings {
        &self.settings
    }

    /// A view for a new client: the default window.
    pub fn new_view(&self) -> View {
        View::new(self.settings.full_list_max)
    }

    // Every step below leaves the rooms consistent before it can panic.
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change from the broker (the fan-out thread's call): applied to its
    /// room's roster, if this instance has clients there. No I/O.
    pub fn apply(&self, change: PresenceChange) {
        if !self.settings.enabled {
            return;
        }
        let mut rooms = self.rooms();
        let Some(room_name) = change.room() else {
            // Every room afresh (a reconnection to Redis).
            for room in rooms.values_mut() {
                room.reread = Some(Reread::Fresh);
            }
            return;
        };
        let Some(room) = rooms.get_mut(room_name) else {
            return;
        };
        if room.roster.is_none() {
            if room.early.len() < EARLY_MAX {
                room.early.push(change);
            } else {
                room.reread = room.reread.max(Some(Reread::Diff));
            }
            return;
        }
        room.take(&change);
        drop(rooms);
        self.applied.notify_all();
    }

    /// The `presence` frame a client joining `room` gets among its first
    /// frames, for its `view`; `None` if presence is off or the room
    /// cannot be read (the client then gets it at a tick, once it can).
    /// `own`: the number of this client's own join, to wait for, so that
    /// the list includes it.
    pub fn first_frame(&self, room: &str, view: &View, own: Option<u64>) -> Option<Vec<u8>> {
        if !self.settings.enabled {
            return None;
        }
        self.rooms().entry(room.to_string()).or_default();
        if !self.loaded(room) {
            self.load(room);
        }
        if let Some(own) = own {
            self.wait_for(room, own);
        }
        let mut shown = view.shown();
        let rooms = self.rooms();
        let frame = rooms
            .get(room)
            .filter(|room| room.roster.is_some())
            .map(|state| self.presence_frame(room, state, view.window(), &mut shown));
        if shown.is_none() {
            *shown = Some(Shown::OWED);
        }
        frame
    }

    /// Waits (a little) until `room`'s roster holds change `own`.
    fn wait_for(&self, room: &str, own: u64) {
        let deadline = Instant::now() + OWN_JOIN_WAIT;
        let mut rooms = self.rooms();
        loop {
            let behind = rooms
                .get(room)
                .and_then(|room| room.roster.as_ref())
                .is_some_and(|roster| roster.seq() < own);
            let left = deadline.saturating_duration_since(Instant::now());
            if !behind || left.is_zero() {
                return;
            }
            rooms = self
                .applied
                .wait_timeout(rooms, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A `members` request: the client's window becomes `offset`, `limit`
    /// (its size so far if `None`), and it is sent a `presence` frame for
    /// it. `Err` says what is wrong with the request.
    pub fn request(
        &self,
        room: &str,
        view: &View,
        outbox: &Outbox,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<(), String> {
        if !self.settings.enabled {
            return Err("presence is off on this server (--presence off)".into());
        }
        let max = self.settings.max_members;
        let limit = limit.unwrap_or(view.window().1 as u64);
        if limit == 0 || limit > max as u64 {
            return Err(format!("limit must be 1 to {max} (--presence-max-members)"));
        }
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut shown = view.shown();
        let rooms = self.rooms();
        let state = rooms
            .get(room)
            .filter(|room| room.roster.is_some())
            .ok_or_else(|| "the member list is not read yet; ask again".to_string())?;
        view.set_window(offset, limit as usize);
        let frame = self.presence_frame(room, state, view.window(), &mut shown);
        drop(rooms);
        self.push(outbox, frame);
        Ok(())
    }

    fn loaded(&self, room: &str) -> bool {
        self.rooms()
            .get(room)
            .is_some_and(|room| room.roster.is_some())
    }

    /// Reads `room` from the broker (outside the lock) and installs it,
    /// with the changes that came meanwhile.
    fn load(&self, room_name: &str) {
        let snapshot = match self.broker.presence_snapshot(room_name) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                debug!("presence: room {room_name} not read: {e}");
                return;
            }
        };
        let mut rooms = self.rooms();
        let Some(room) = rooms.get_mut(room_name) else {
            return;
        };
        if room.roster.is_some() {
            return;
        }
        room.roster = Some(Roster::new(snapshot));
        room.version += 1;
        for change in std::mem::take(&mut room.early) {
            room.take(&change);
        }
        drop(rooms);
        self.applied.notify_all();
    }

    /// A `presence` frame of `room` for a window, and records it as what
    /// the client holds.
    fn presence_frame(
        &self,
        name: &str,
        room: &Room,
        window: (usize, usize),
        shown: &mut Option<Shown>,
    ) -> Vec<u8> {
        let roster = room.roster.as_ref().expect("a loaded room");
        let count = roster.count();
        let full = count <= self.settings.full_list_max;
        let (offset, limit) = if full { (0, count) } else { window };
        let members = roster.window(offset, limit);
        *shown = Some(Shown {
            version: room.version,
            epoch: room.epoch,
            full: Some(full),
            count,
            content: hash(&members),
        });
        whole_frame(name, count, offset, full, &members)
    }

    /// The `presence-diff` thread: every `--presence-diff-ms`, reads again
    /// the rooms that need it and tells each room's clients what changed.
    pub fn run(&self) {
        loop {
            thread::sleep(self.settings.diff_interval);
            self.tick();
        }
    }

    /// One tick: forget rooms with no local client, read those that need
    /// it, then tell each room's clients what is new to them.
    pub fn tick(&self) {
        let to_read: Vec<(String, Option<Reread>)> = {
            let mut rooms = self.rooms();
            rooms.retain(|name, _| self.hub.room(name).is_some());
            rooms
                .iter()
                .filter(|(_, room)| room.roster.is_none() || room.reread.is_some())
                .map(|(name, room)| (name.clone(), room.reread))
                .collect()
        };
        for (name, reread) in to_read {
            match reread {
                None => self.load(&name),
                Some(how) => self.reread(&name, how),
            }
        }
        let names: Vec<String> = self.rooms().keys().cloned().collect();
        for name in names {
            if let Some((telling, members)) = self.telling(&name) {
                self.tell(&telling, &members);
            }
        }
    }

    fn reread(&self, room_name: &str, how: Reread) {
        let snapshot = match self.broker.presence_snapshot(room_name) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                debug!("presence: room {room_name} not read again: {e}");
                return;
            }
        };
        let mut rooms = self.rooms();
        let Some(room) = rooms.get_mut(room_name) else {
            return;
        };
        room.version += 1;
        match &mut room.roster {
            Some(roster) => roster.replace(snapshot, room.version),
            None => room.roster = Some(Roster::new(snapshot)),
        }
        if how == Reread::Fresh {
            room.epoch += 1;
        }
        room.reread = None;
    }

    /// A room's state to tell, if it changed since the last tick, with the
    /// clients to tell it to (taken under the same lock: a client missing
    /// from them joined later, and its first list is newer).
    fn telling(&self, name: &str) -> Option<(Telling, RoomMembers)> {
        let mut rooms = self.rooms();
        let room = rooms.get_mut(name)?;
        let roster = room.roster.as_mut()?;
        if room.version == room.told {
            return None;
        }
        let since = std::mem::replace(&mut room.told, room.version);
        let members = self.hub.room(name)?;
        let count = roster.count();
        let full = count <= self.settings.full_list_max;
        let changes = roster.take_changes();
        let mut telling = Telling {
            room: name.to_string(),
            version: room.version,
            since,
            epoch: room.epoch,
            count,
            full,
            whole: Listed::default(),
            changes: Changes::default(),
            windows: HashMap::new(),
        };
        if full {
            telling.whole = Listed::new(roster.window(0, count));
            telling.changes = changes;
        } else {
            for member in members.iter() {
                let window = member.view.window();
                telling.windows.entry(window).or_insert_with(|| {
                    let now = Arc::new(Listed::new(roster.window(window.0, window.1)));
                    let since = room
                        .told_windows
                        .get(&window)
                        .filter(|before| before.hash != now.hash)
                        .map(|before| WindowChange::between(before, &now));
                    Window { now, since }
                });
            }
        }
        room.told_windows = telling
            .windows
            .iter()
            .map(|(window, listed)| (*window, listed.now.clone()))
            .collect();
        Some((telling, members))
    }

    /// Gives each client what is new to it: nothing if its list is as new
    /// as this tick's, the room whole if it holds another kind of list (or
    /// an older epoch), else the changes (a small room) or its window and
    /// the count (a large one).
    fn tell(&self, telling: &Telling, members: &RoomMembers) {
        let mut frames: HashMap<Told, Arc<Batch>> = HashMap::new();
        // The changes since a version (the last tick's, for nearly every
        // client; a client that read the room since, from then on).
        let mut changes_since: HashMap<u64, Changes> = HashMap::new();
        for member in members.iter() {
            let mut shown = member.view.shown();
            let Some(held) = *shown else {
                continue;
            };
            if held.version >= telling.version {
                continue;
            }
            // Read under the client's lock, as a `members` request sets it.
            let window = if telling.full {
                (0, telling.count)
            } else {
                member.view.window()
            };
            let (listed, since) = if telling.full {
                (&telling.whole, None)
            } else {
                match telling.windows.get(&window) {
                    Some(w) => (&*w.now, w.since.as_ref()),
                    // Moved since the tick began: it was answered then.
                    None => continue,
                }
            };
            let content = listed.hash;
            let told = if held.full != Some(telling.full) || held.epoch != telling.epoch {
                Told::Whole(window)
            } else if telling.full {
                let since = held.version.max(telling.since);
                let changes = changes_since
                    .entry(since)
                    .or_insert_with(|| telling.changes.since(since));
                match changes.is_empty() {
                    false => Told::Changes(since),
                    true if held.count != telling.count => Told::Count,
                    true => Told::Nothing,
                }
            } else if held.content == content {
                match held.count != telling.count {
                    true => Told::Count,
                    false => Told::Nothing,
                }
            } else if since.is_some_and(|change| change.from == held.content) {
                Told::WindowChange(window)
            } else {
                Told::Window(window)
            };
            *shown = Some(Shown {
                version: telling.version,
                epoch: telling.epoch,
                full: Some(telling.full),
                count: telling.count,
                content,
            });
            if told == Told::Nothing {
                continue;
            }
            let batch = frames.entry(told).or_insert_with(|| {
                let frame = match told {
                    Told::Whole(_) => whole_frame(
                        &telling.room,
                        telling.count,
                        window.0,
                        telling.full,
                        &listed.members,
                    ),
                    Told::Changes(since) => {
                        let changes = &changes_since[&since];
                        diff_frame(&PresenceDiff {
                            room: telling.room.clone(),
                            count: telling.count,
                            joins: changes.joins.clone(),
                            leaves: changes.leaves.clone(),
                            changed: changes.changed.clone(),
                            ..PresenceDiff::default()
                        })
                    }
                    Told::WindowChange(_) => {
                        let change = since.expect("told only with a change");
                        diff_frame(&PresenceDiff {
                            room: telling.room.clone(),
                            count: telling.count,
                            offset: Some(window.0),
                            added: change.added.clone(),
                            removed: change.removed.clone(),
                            ..PresenceDiff::default()
                        })
                    }
                    Told::Window(_) => diff_frame(&PresenceDiff {
                        room: telling.room.clone(),
                        count: telling.count,
                        offset: Some(window.0),
                        members: Some(listed.members.clone()),
                        ..PresenceDiff::default()
                    }),
                    Told::Count | Told::Nothing => diff_frame(&PresenceDiff {
                        room: telling.room.clone(),
                        count: telling.count,
                        ..PresenceDiff::default()
                    }),
                };
                Arc::new(Batch::single(&frame))
            });
            // Under the client's lock: no older frame can follow it.
            self.deliver(member, batch);
        }
    }

    fn deliver(&self, member: &Member, batch: &Arc<Batch>) {
        match member.outbox.deliver(batch) {
            Pushed::Sent | Pushed::Queued => Metrics::inc(&self.metrics.presence_frames_total),
            Pushed::Overflowed => {
                warn!(
                    "client {} dropped: send buffer full (slow consumer)",
                    member.id
                );
                Metrics::inc(&self.metrics.slow_clients_dropped_total);
            }
            Pushed::Refused => {}
        }
    }

    fn push(&self, outbox: &Outbox, frame: Vec<u8>) {
        if matches!(outbox.push(frame), Pushed::Sent | Pushed::Queued) {
            Metrics::inc(&self.metrics.presence_frames_total);
        }
    }
}

/// What one client is told at a tick; clients told the same share a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Told {
    Nothing,
    /// A `presence` frame: the room whole, or this window of it.
    Whole((usize, usize)),
    /// A small room's `presence_diff` of the joins and leaves after a
    /// version.
    Changes(u64),
    /// A large room's `presence_diff` with the names that entered and left
    /// this window since the last tick.
    WindowChange((usize, usize)),
    /// A large room's `presence_diff` with this window's members.
    Window((usize, usize)),
    /// A `presence_diff` with the count alone.
    Count,
}

fn whole_frame(
    room: &str,
    count: usize,
    offset: usize,
    full: bool,
    members: &[PresenceMember],
) -> Vec<u8> {
    ServerFrame::Presence {
        room,
        count,
        offset,
        full,
        members,
        more: count.saturating_sub(members.len()),
    }
    .to_ws_bytes()
    .to_vec()
}

fn diff_frame(diff: &PresenceDiff) -> Vec<u8> {
    ServerFrame::PresenceDiff(diff).to_ws_bytes().to_vec()
}

/// A hash of a list of members: whether a client's window changed.
fn hash(members: &[PresenceMember]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for member in members {
        member.name.hash(&mut hasher);
        member.instances.hash(&mut hasher);
        member.connections.hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    //! The tracker on its own: a local broker, a hub of clients on real
    //! loopback sockets, and ticks run by hand, so that each interleaving
    //! of joins, changes and ticks is chosen, not hoped for.

    use super::*;
    use crate::broker::local::LocalBroker;
    use crate::broker::{BrokerEvent, PresenceChange};
    use crate::delivery::outbox::{SocketWire, Watcher};
    use crossbeam_channel::Receiver;
    use serde_json::{Value, json};
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    struct NoWatcher;

    impl Watcher for NoWatcher {
        fn watch_writable(&self, _: usize, _: &TcpStream) {}
        fn cut_at(&self, _: usize, _: Instant) {}
    }

    struct Room {
        tracker: Tracker,
        hub: Arc<Hub>,
        broker: Arc<LocalBroker>,
        events: Receiver<BrokerEvent>,
    }

    /// A client as the tracker sees it, and the other end of its socket.
    struct Client {
        member: Member,
        peer: TcpStream,
    }

    fn room(full_list_max: usize) -> Room {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let broker = Arc::new(LocalBroker::new(events_tx, Arc::default(), 10, "i".into()));
        let hub = Arc::new(Hub::new());
        let settings = PresenceSettings {
            enabled: true,
            ttl: Duration::from_secs(15),
            diff_interval: Duration::from_secs(3600),
            full_list_max,
            max_members: 1000,
        };
        let tracker = Tracker::new(settings, hub.clone(), broker.clone(), Arc::default());
        Room {
            tracker,
            hub,
            broker,
            events,
        }
    }

    impl Room {
        /// Hands the tracker what the broker emitted (the fan-out's job).
        fn pump(&self) {
            for event in self.events.try_iter() {
                if let BrokerEvent::Presence(change) = event {
                    self.tracker.apply(change);
                }
            }
        }

        /// `name` comes to the room with no client of this test's (another
        /// instance's client, as far as the list is concerned).
        fn present(&self, name: &str) {
            self.broker.present("r", name);
            self.pump();
        }

        fn absent(&self, name: &str) {
            self.broker.absent("r", name);
            self.pump();
        }

        /// A client joins as a session does: in the hub, present, then its
        /// first list. Returns the client and its first list.
        fn join(&self, id: u64, name: &str) -> (Client, Value) {
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
                key: name.into(),
                outbox: Arc::new(Outbox::new(wire, 1 << 20)),
                last_seen: Arc::default(),
                token_expires: Arc::default(),
                trace: false,
                view: Arc::new(self.tracker.new_view()),
            };
            self.hub.join("r", member.clone());
            let own = self.broker.present("r", name);
            self.pump();
            let first = self.tracker.first_frame("r", &member.view, own).unwrap();
            member.outbox.open(Vec::new(), None);
            let first = parse_frames(&first).remove(0);
            (Client { member, peer }, first)
        }
    }

    /// The text frames in a buffer of unmasked server frames.
    fn parse_frames(mut bytes: &[u8]) -> Vec<Value> {
        let mut frames = Vec::new();
        while bytes.len() >= 2 {
            let (len, header) = match bytes[1] & 0x7f {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            frames.push(serde_json::from_slice(&bytes[header..header + len]).unwrap());
            bytes = &bytes[header + len..];
        }
        frames
    }

    impl Client {
        /// What reached its socket so far.
        fn received(&mut self) -> Vec<Value> {
            self.peer
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut bytes = Vec::new();
            let mut buffer = [0u8; 65536];
            while let Ok(n) = self.peer.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&buffer[..n]);
            }
            parse_frames(&bytes)
        }
    }

    fn listed(frame: &Value, field: &str) -> Vec<String> {
        frame[field]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .map(|m| m["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_client_that_listed_a_name_gone_by_the_tick_is_told_it_left() {
        let room = room(100);
        let (mut old, _) = room.join(1, "old");
        room.tracker.tick();
        old.received();
        // x comes; a client joins and lists it; x goes; then the tick.
        room.present("x");
        let (mut new, first) = room.join(2, "new");
        assert_eq!(listed(&first, "members"), ["new", "old", "x"]);
        room.absent("x");
        room.tracker.tick();
        let told = new.received();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(listed(&told[0], "leaves"), ["x"], "{}", told[0]);
        assert!(
            told[0].get("joins").is_none(),
            "what its first list said is not said again: {}",
            told[0]
        );
        // The client that was there all along: new joined, x came and
        // went (a leave of a name it never listed changes nothing).
        let told = old.received();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(listed(&told[0], "joins"), ["new"]);
        assert_eq!(told[0]["count"], 2);
    }

    #[test]
    fn a_client_whose_first_list_is_as_new_as_the_tick_is_told_nothing() {
        let room = room(100);
        let (mut old, _) = room.join(1, "old");
        room.tracker.tick();
        old.received();
        room.present("x");
        let (mut new, _) = room.join(2, "new");
        room.tracker.tick();
        assert!(new.received().is_empty(), "its first list said it all");
        let told = old.received();
        assert_eq!(listed(&told[0], "joins"), ["new", "x"]);
        room.tracker.tick();
        assert!(old.received().is_empty(), "nothing new, nothing sent");
    }

    #[test]
    fn a_thousand_changes_between_two_ticks_are_one_frame() {
        let room = room(2000);
        let (mut client, _) = room.join(1, "watcher");
        room.tracker.tick();
        client.received();
        for n in 0..1000 {
            room.present(&format!("m{n:04}"));
        }
        for n in 0..500 {
            room.absent(&format!("m{n:04}"));
        }
        room.tracker.tick();
        let told = client.received();
        assert_eq!(told.len(), 1);
        assert_eq!(told[0]["count"], 501);
        assert_eq!(listed(&told[0], "joins").len(), 500);
        assert_eq!(listed(&told[0], "leaves").len(), 500);
    }

    #[test]
    fn a_large_room_tells_a_window_only_its_own_changes() {
        let room = room(2);
        for name in ["b", "d", "f"] {
            room.present(name);
        }
        let (mut client, first) = room.join(1, "e");
        assert_eq!(first["full"], false);
        assert_eq!(listed(&first, "members"), ["b", "d"]);
        assert_eq!(first["count"], 4);
        // Past the window: the count alone.
        room.present("z");
        room.tracker.tick();
        let told = client.received();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0]["count"], 5);
        assert!(told[0].get("members").is_none(), "{}", told[0]);
        // In it: what entered and left the window, not the window whole.
        room.present("a");
        room.tracker.tick();
        let told = client.received();
        assert_eq!(listed(&told[0], "added"), ["a"], "{}", told[0]);
        assert_eq!(told[0]["removed"], json!(["d"]), "{}", told[0]);
        assert!(told[0].get("members").is_none(), "{}", told[0]);
        assert_eq!(told[0]["offset"], 0);
        // Another window, asked for: answered at once, followed after.
        room.tracker
            .request("r", &client.member.view, &client.member.outbox, 3, Some(2))
            .unwrap();
        let told = client.received();
        assert_eq!(told[0]["type"], "presence");
        assert_eq!(listed(&told[0], "members"), ["e", "f"]);
        room.absent("a");
        room.tracker.tick();
        // A window the last tick did not tell: whole.
        let told = client.received();
        assert_eq!(listed(&told[0], "members"), ["f", "z"], "{}", told[0]);
        assert_eq!(told[0]["offset"], 3);
        // Shifted by a name before it: its changes again.
        room.present("c");
        room.tracker.tick();
        let told = client.received();
        assert_eq!(listed(&told[0], "added"), ["e"], "{}", told[0]);
        assert_eq!(told[0]["removed"], json!(["z"]), "{}", told[0]);
        let refused = room.tracker.request(
            "r",
            &client.member.view,
            &client.member.outbox,
            0,
            Some(1001),
        );
        assert!(refused.unwrap_err().contains("1 to 1000"));
        assert_eq!(
            client.member.view.window(),
            (3, 2),
            "a refused window changes nothing"
        );
    }

    #[test]
    fn a_resync_tells_every_client_its_list_afresh_once() {
        let room = room(100);
        let (mut client, _) = room.join(1, "c");
        room.tracker.tick();
        client.received();
        room.tracker.apply(PresenceChange::Resync);
        room.tracker.tick();
        let told = client.received();
        assert_eq!(told.len(), 1);
        assert_eq!(told[0]["type"], "presence");
        room.tracker.tick();
        assert!(client.received().is_empty());
    }
}
