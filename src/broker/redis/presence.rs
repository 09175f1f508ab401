//! Presence in Redis: who is in each room, over every instance, and which
//! instances are alive.
//!
//! Per room, in the room's hash slot (so a cluster keeps it on one master,
//! and each step below is one atomic script):
//! - a hash `<prefix>:presence:{<room>}`: name → `{"<instance>": connections, ...}`;
//! - a counter `<prefix>:presence-seq:{<room>}`: the number of the room's
//!   last presence change.
//!
//! Every change (a connection more or less, an instance's members gone, a
//! rewrite) is one script that updates the hash, numbers the change, and
//! publishes it on the room's channel: each instance with clients in the
//! room keeps its own copy of the list from these (`crate::presence`), and
//! tells its clients, coalesced. A join is one script and one published
//! change, whatever the room's size.
//!
//! **Liveness per instance, not per member** (as Phoenix.Tracker does per
//! node). An instance refreshes one entry of its own, in a sorted set
//! `<prefix>:presence-instances` scored by when it expires, every third of
//! `--presence-ttl-ms`; its members live as long as it does. It also keeps
//! the set `<prefix>:presence-rooms:<instance>` of the rooms it has members
//! in. At each refresh it looks for instances whose entry expired (they
//! died, or lost Redis past the TTL): it claims one (`SET NX`, so that one
//! instance cleans it), removes its members room by room (a script that
//! publishes them as `members_expired`, in chunks), and forgets it. A
//! killed instance's members are gone from every list within the TTL plus
//! a third of it.
//!
//! **One thread writes it all.** The `presence` thread alone changes this
//! instance's counts and writes them to Redis: joins and leaves are queued
//! to it by the sessions, and it runs them, and the refreshes, one after
//! the other, on its own connection. No interleaving of a join, a leave
//! and a refresh can then undo one of them.
//!
//! **Redis lost it** (restarted empty): when its subscription comes back,
//! the instance writes its members of each room again in one script per
//! room (`members_rewritten`: receivers read the room again; no `join` per
//! name), and asks its own clients' lists to be read afresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};
use redis::Script;

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::{BrokerEvent, Connections, EventSender, PresenceChange, PresenceSnapshot};
use crate::metrics::Metrics;
use crate::protocol::MAX_EXPIRED_NAMES;

/// How long a joining session waits for its join to be written: the
/// presence connection's own timeouts end it sooner, unless joins queue
/// up behind a slow Redis.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// How long an empty room's change counter outlives its last member: a
/// room's hash vanishes with its last name, and its counter then expires
/// unless someone joins again (which keeps it). Long past the moment any
/// instance forgets the room (its next presence tick with no local
/// client there), so no instance reads a counter that started again.
const EMPTY_ROOM_SEQ_TTL_MS: u64 = 10 * 60 * 1000;

/// Pause between two refresh attempts right after a reconnection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One connection of `ARGV[4]` on instance `ARGV[3]` more (`ARGV[5]` = 1)
/// or less (-1, `ARGV[6]` the reason); numbers and publishes the change.
/// `KEYS`: the hash, the counter, the channel; `ARGV[1]` the publish
/// command, `ARGV[2]` the room; `ARGV[7]` how long the counter of a room
/// left empty lives. Returns the change's number.
const CHANGE: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[4])
local counts = raw and cjson.decode(raw) or {}
local n = (counts[ARGV[3]] or 0) + tonumber(ARGV[5])
if n > 0 then counts[ARGV[3]] = n else counts[ARGV[3]] = nil end
if next(counts) == nil then
  redis.call('HDEL', KEYS[1], ARGV[4])
else
  redis.call('HSET', KEYS[1], ARGV[4], cjson.encode(counts))
end
local seq = redis.call('INCR', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
else
  redis.call('PERSIST', KEYS[2])
end
local change = {type = 'member_change', room = ARGV[2], name = ARGV[4], instance = ARGV[3], delta = tonumber(ARGV[5]), seq = seq}
if ARGV[6] ~= '' then change.reason = ARGV[6] end
redis.call(ARGV[1], KEYS[3], cjson.encode(change))
return seq
"#;

/// Removes every connection of instance `ARGV[3]` from the room (it
/// died), and publishes the names it had, `ARGV[4]` at a time, each chunk
/// a numbered change; a room left empty has its counter expire in
/// `ARGV[5]` ms. Returns how many names lost it.
const EXPIRE: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local names = {}
for i = 1, #all, 2 do
  local counts = cjson.decode(all[i + 1])
  if counts[ARGV[3]] then
    counts[ARGV[3]] = nil
    if next(counts) == nil then
      redis.call('HDEL', KEYS[1], all[i])
    else
      redis.call('HSET', KEYS[1], all[i], cjson.encode(counts))
    end
    table.insert(names, all[i])
  end
end
local chunk = tonumber(ARGV[4])
for first = 1, #names, chunk do
  local part = {}
  for i = first, math.min(first + chunk - 1, #names) do table.insert(part, names[i]) end
  local seq = redis.call('INCR', KEYS[2])
  redis.call(ARGV[1], KEYS[3], cjson.encode({type = 'members_expired', room = ARGV[2], instance = ARGV[3], names = part, seq = seq}))
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return #names
"#;

/// Instance `ARGV[3]`'s connections in the room are exactly `ARGV[4..]`
/// (name, count, ...): after Redis lost them. Publishes one
/// `members_rewritten`: receivers read the room again.
const REWRITE: &str = r#"
local mine = {}
for i = 4, #ARGV, 2 do mine[ARGV[i]] = tonumber(ARGV[i + 1]) end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local counts = cjson.decode(all[i + 1])
  if counts[ARGV[3]] and not mine[all[i]] then
    counts[ARGV[3]] = nil
    if next(counts) == nil then
      redis.call('HDEL', KEYS[1], all[i])
    else
      redis.call('HSET', KEYS[1], all[i], cjson.encode(counts))
    end
  end
end
for name, n in pairs(mine) do
  local raw = redis.call('HGET', KEYS[1], name)
  local counts = raw and cjson.decode(raw) or {}
  counts[ARGV[3]] = n
  redis.call('HSET', KEYS[1], name, cjson.encode(counts))
end
local seq = redis.call('INCR', KEYS[2])
redis.call(ARGV[1], KEYS[3], cjson.encode({type = 'members_rewritten', room = ARGV[2], instance = ARGV[3], seq = seq}))
return seq
"#;

/// The room's presence and the number of its last change, read at once.
const SNAPSHOT: &str = r#"
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
"#;

/// Keeps instance `ARGV[1]` alive for `ARGV[2]` ms in the sorted set
/// `KEYS[1]`. Returns whether it had to be added (it was not there: a
/// first refresh, or it was taken for dead and cleaned up), and the
/// instances whose time is up.
const LIVENESS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {added, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)}
"#;

/// What the sessions ask of the presence thread.
enum Ask {
    /// One more connection of `name` in `room`; `done` is told the
    /// change's number once it is written (`None` if it failed).
    Join {
        room: String,
        name: String,
        done: Sender<Option<u64>>,
    },
    /// One connection of `name` in `room` less.
    Leave { room: String, name: String },
}

/// The sessions' side of presence: queues changes for the presence thread,
/// and reads rooms (on the caller's connection).
pub struct PresenceStore {
    asks_tx: Sender<Ask>,
    scripts: Arc<Scripts>,
}

/// The scripts, and how to call them on one room.
struct Scripts {
    keys: RedisKeys,
    instance: String,
    change: Script,
    expire: Script,
    rewrite: Script,
    snapshot: Script,
    liveness: Script,
}

/// The `presence` thread's state.
pub struct PresenceThread {
    asks_rx: Receiver<Ask>,
    /// Told when a subscription is caught up after a reconnection.
    reconnected_rx: Receiver<()>,
    scripts: Arc<Scripts>,
    link: Link,
    ttl: Duration,
    /// This instance's connections by room and name: what it writes again
    /// after Redis lost it.
    local: HashMap<String, BTreeMap<String, u64>>,
    events_tx: EventSender,
    metrics: Arc<Metrics>,
}

impl PresenceStore {
    /// The store and the thread that writes it (to be started by the caller).
    pub fn new(
        keys: RedisKeys,
        instance: String,
        ttl: Duration,
        link: Link,
        reconnected_rx: Receiver<()>,
        events_tx: EventSender,
        metrics: Arc<Metrics>,
    ) -> (Self, PresenceThread) {
        let script = |body: &str| Script::new(body);
        let scripts = Arc::new(Scripts {
            keys,
            instance,
            change: script(CHANGE),
            expire: script(EXPIRE),
            rewrite: script(REWRITE),
            snapshot: script(SNAPSHOT),
            liveness: script(LIVENESS),
        });
        let (asks_tx, asks_rx) = crossbeam_channel::unbounded();
        let store = PresenceStore {
            asks_tx,
            scripts: scripts.clone(),
        };
        let thread = PresenceThread {
            asks_rx,
            reconnected_rx,
            scripts,
            link,
            ttl,
            local: HashMap::new(),
            events_tx,
            metrics,
        };
        (store, thread)
    }

    /// One more local connection of `name` in `room`: returns the change's
    /// number once it is written, or `None` if it failed (the next
    /// rewrite registers it).
    pub fn join(&self, room: &str, name: &str) -> Option<u64> {
        let (done, written) = crossbeam_channel::bounded(1);
        let ask = Ask::Join {
            room: room.to_string(),
            name: name.to_string(),
            done,
        };
        self.asks_tx.send(ask).ok()?;
        match written.recv_timeout(JOIN_WAIT) {
            Ok(seq) => seq,
            Err(_) => {
                warn!("presence: {name:?} in room {room} not written within {JOIN_WAIT:?}");
                None
            }
        }
    }

    /// One local connection of `name` in `room` less (not waited for).
    pub fn leave(&self, room: &str, name: &str) {
        let _ = self.asks_tx.send(Ask::Leave {
            room: room.to_string(),
            name: name.to_string(),
        });
    }

    /// A room's presence, read on `link`.
    pub fn snapshot(&self, link: &Link, room: &str) -> Result<PresenceSnapshot, Failure> {
        self.scripts.snapshot(link, room)
    }
}

impl Scripts {
    fn invocation<'a>(&self, script: &'a Script, room: &str) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.key(self.keys.presence(room));
        invocation
            .key(self.keys.presence_seq(room))
            .key(self.keys.room_channel(room))
            .arg(self.keys.publish_command())
            .arg(room)
            .arg(&self.instance);
        invocation
    }

    fn change(&self, link: &Link, room: &str, name: &str, delta: i64) -> Result<u64, Failure> {
        let reason = if delta < 0 { "left" } else { "" };
        link.run(|connection| {
            self.invocation(&self.change, room)
                .arg(name)
                .arg(delta)
                .arg(reason)
                .arg(EMPTY_ROOM_SEQ_TTL_MS)
                .invoke::<u64>(connection)
        })
    }

    fn rewrite(
        &self,
        link: &Link,
        room: &str,
        names: &BTreeMap<String, u64>,
    ) -> Result<u64, Failure> {
        let mut invocation = self.invocation(&self.rewrite, room);
        for (name, count) in names {
            invocation.arg(name).arg(*count);
        }
        link.run(|connection| invocation.invoke::<u64>(connection))
    }

    /// Removes `instance`'s members from `room`; returns how many names.
    fn expire(&self, link: &Link, room: &str, instance: &str) -> Result<u64, Failure> {
        link.run(|connection| {
            let mut invocation = self.expire.key(self.keys.presence(room));
            invocation
                .key(self.keys.presence_seq(room))
                .key(self.keys.room_channel(room))
                .arg(self.keys.publish_command())
                .arg(room)
                .arg(instance)
                .arg(MAX_EXPIRED_NAMES)
                .arg(EMPTY_ROOM_SEQ_TTL_MS);
            invocation.invoke::<u64>(connection)
        })
    }

    fn snapshot(&self, link: &Link, room: &str) -> Result<PresenceSnapshot, Failure> {
        let (seq, pairs): (String, Vec<(String, String)>) = link.run(|connection| {
            self.snapshot
                .key(self.keys.presence(room))
                .key(self.keys.presence_seq(room))
                .invoke(connection)
        })?;
        let members = pairs
            .into_iter()
            .filter_map(|(name, raw)| Some((name, connections_of(&raw)?)))
            .filter(|(_, connections)| !connections.is_empty())
            .collect();
        Ok(PresenceSnapshot {
            seq: seq.parse().unwrap_or(0),
            members,
        })
    }
}

/// Reads `{"a":2,"b":1}` (cjson may write the counts as floats).
fn connections_of(raw: &str) -> Option<Connections> {
    let by_instance: HashMap<String, f64> = serde_json::from_str(raw).ok()?;
    Some(
        by_instance
            .into_iter()
            .filter(|(_, n)| *n >= 1.0)
            .map(|(instance, n)| (instance, n as u64))
            .collect(),
    )
}

impl PresenceThread {
    /// How often this instance refreshes its liveness: a third of the TTL,
    /// so that two refreshes can be late before it is taken for dead.
    fn refresh_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// The `presence` thread: runs the sessions' joins and leaves in the
    /// order asked, refreshes this instance's liveness (and cleans up after
    /// dead ones) every third of the TTL, and after a reconnection writes
    /// its members again and has every local room read afresh.
    pub fn run(mut self) {
        let mut next_refresh = Instant::now();
        // After a reconnection: until when a failed rewrite is tried again
        // (the presence connection may still be waiting out its backoff),
        // between the asks queued meanwhile.
        let mut insist_until: Option<Instant> = None;
        let mut rewrite_due = false;
        loop {
            let wait = next_refresh.saturating_duration_since(Instant::now());
            select! {
                recv(self.asks_rx) -> ask => match ask {
                    Ok(ask) => self.apply(ask),
                    Err(_) => return,
                },
                recv(self.reconnected_rx) -> _ => {
                    insist_until = Some(Instant::now() + self.refresh_interval());
                    rewrite_due = true;
                    next_refresh = Instant::now();
                }
                default(wait) => {}
            }
            // Also after an ask: a storm of joins must not starve the
            // refresh, or this instance would be taken for dead.
            if Instant::now() < next_refresh {
                continue;
            }
            let outcome = self.refresh(rewrite_due).map(|()| rewrite_due = false);
            match outcome {
                Ok(()) => {
                    insist_until = None;
                    next_refresh = Instant::now() + self.refresh_interval();
                }
                Err(e) if insist_until.is_some_and(|until| Instant::now() < until) => {
                    debug!(
                        "presence: refresh failed, again soon: {}",
                        e.into_unavailable()
                    );
                    next_refresh = Instant::now() + RETRY_PAUSE;
                }
                Err(e) => {
                    debug!("presence: refresh failed: {}", e.into_unavailable());
                    insist_until = None;
                    next_refresh = Instant::now() + self.refresh_interval();
                }
            }
        }
    }

    fn apply(&mut self, ask: Ask) {
        let scripts = self.scripts.clone();
        match ask {
            Ask::Join { room, name, done } => {
                let names = self.local.entry(room.clone()).or_default();
                if names.is_empty() {
                    // Listed before the member is written: a crash between
                    // the two leaves a room to clean that needs none.
                    self.note_room(&room, true);
                }
                *self
                    .local
                    .entry(room.clone())
                    .or_default()
                    .entry(name.clone())
                    .or_default() += 1;
                let written = match scripts.change(&self.link, &room, &name, 1) {
                    Ok(seq) => Some(seq),
                    Err(e) => {
                        warn!(
                            "presence: {name:?} in room {room} not registered yet: {}",
                            e.into_unavailable()
                        );
                        None
                    }
                };
                let _ = done.send(written);
            }
            Ask::Leave { room, name } => {
                let mut emptied = false;
                if let Some(names) = self.local.get_mut(&room) {
                    if let Some(count) = names.get_mut(&name) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            names.remove(&name);
                        }
                    }
                    if names.is_empty() {
                        self.local.remove(&room);
                        emptied = true;
                    }
                }
                if let Err(e) = scripts.change(&self.link, &room, &name, -1) {
                    // Removed when this instance's members are written
                    // again, or when it is found dead.
                    warn!(
                        "presence: {name:?} leaving room {room} not recorded: {}",
                        e.into_unavailable()
                    );
                }
                if emptied {
                    self.note_room(&room, false);
                }
            }
        }
    }

    /// Adds `room` to (or removes it from) the rooms this instance has
    /// members in: where to clean up after it, should it die.
    fn note_room(&self, room: &str, has_members: bool) {
        let key = self.scripts.keys.presence_rooms(&self.scripts.instance);
        let command = if has_members { "SADD" } else { "SREM" };
        let noted = self.link.run(|connection| {
            redis::cmd(command)
                .arg(&key)
                .arg(room)
                .query::<()>(connection)
        });
        if let Err(e) = noted {
            debug!("presence: room {room} not noted: {}", e.into_unavailable());
        }
    }

    /// Keeps this instance alive, and cleans up after instances that are
    /// not. Writes this instance's members again first if `rewrite` (a
    /// reconnection), or if it was taken for dead; once either way, so
    /// that its clients' lists are read afresh once.
    fn refresh(&mut self, rewrite: bool) -> Result<(), Failure> {
        let scripts = self.scripts.clone();
        let keys = &scripts.keys;
        let instances = keys.presence_instances();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (added, dead): (u64, Vec<String>) = self.link.run(|connection| {
            scripts
                .liveness
                .key(&instances)
                .arg(&scripts.instance)
                .arg(ttl_ms)
                .invoke(connection)
        })?;
        Metrics::inc(&self.metrics.presence_refreshes_total);
        if added == 1 && !rewrite && !self.local.is_empty() {
            // Taken for dead (a long silence) and cleaned up after: its
            // members, alive, are written again.
            warn!(
                "presence: this instance was taken for dead by the others; writing its members again"
            );
        }
        if rewrite || (added == 1 && !self.local.is_empty()) {
            self.rewrite_all()?;
        }
        let rooms_key = keys.presence_rooms(&scripts.instance);
        self.link.run(|connection| {
            redis::cmd("PEXPIRE")
                .arg(&rooms_key)
                .arg(ttl_ms * 4)
                .query::<()>(connection)
        })?;
        for instance in dead.iter().filter(|i| **i != scripts.instance) {
            self.clean_up_after(instance)?;
        }
        Ok(())
    }

    /// Removes a dead instance's members from every room it had members
    /// in, unless another instance is at it.
    fn clean_up_after(&mut self, dead: &str) -> Result<(), Failure> {
        let scripts = self.scripts.clone();
        let keys = &scripts.keys;
        let claim = keys.presence_cleaning(dead);
        let claimed: Option<String> = self.link.run(|connection| {
            redis::cmd("SET")
                .arg(&claim)
                .arg(&scripts.instance)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query(connection)
        })?;
        if claimed.is_none() {
            return Ok(());
        }
        let rooms_key = keys.presence_rooms(dead);
        let rooms: Vec<String> = self
            .link
            .run(|connection| redis::cmd("SMEMBERS").arg(&rooms_key).query(connection))?;
        let mut expired = 0;
        for room in &rooms {
            expired += scripts.expire(&self.link, room, dead)?;
        }
        let instances = keys.presence_instances();
        self.link
            .run(|connection| redis::cmd("DEL").arg(&rooms_key).query::<()>(connection))?;
        self.link.run(|connection| {
            redis::cmd("ZREM")
                .arg(&instances)
                .arg(dead)
                .query::<()>(connection)
        })?;
        Metrics::add(&self.metrics.presence_expired_total, expired);
        if expired > 0 {
            info!(
                "presence: instance {dead} stopped answering; its {expired} members of {} rooms expired",
                rooms.len()
            );
        }
        Ok(())
    }

    /// Writes this instance's members of every room again (Redis may have
    /// lost them), then asks every local room to be read afresh.
    fn rewrite_all(&mut self) -> Result<(), Failure> {
        let scripts = self.scripts.clone();
        for (room, names) in &self.local {
            self.note_room(room, true);
            scripts.rewrite(&self.link, room, names)?;
        }
        let _ = self
            .events_tx
            .send(BrokerEvent::Presence(PresenceChange::Resync));
        Ok(())
    }
}
