//! Presence in Redis: who is in each room, over every instance.
//!
//! Per room, in the room's hash slot (so a cluster keeps it on one master,
//! and each step below is one atomic script):
//! - a hash `<prefix>:presence:{<room>}`: name → `{"<instance>": connections, ...}`;
//! - a sorted set `<prefix>:presence-exp:{<room>}`: `["<instance>","<name>"]`
//!   → the time (ms) that entry expires unless its instance refreshes it;
//! - a sorted set `<prefix>:presence-names:{<room>}` of the names (score
//!   0: in name order), so that a snapshot reads at most
//!   `--presence-max-members` of them, however big the room.
//!
//! A join publishes `join` on the room's channel when the name had no
//! connection anywhere; a leave publishes `leave` after its last one; both
//! go through the channel the messages take, so they are ordered with
//! them. Every third of `--presence-ttl-ms` the instance refreshes the
//! entries of all its members, room by room in one script each: an
//! instance that dies stops refreshing, and whoever reads or refreshes the
//! room next removes its entries and publishes a `leave` with reason
//! `expired` for each name that had no other connection. A killed
//! instance's members are thus gone from every list within the TTL plus
//! one refresh interval. (Centrifuge's Redis presence is built the same
//! way: a hash of members and a sorted set of expiry times, cleaned on
//! read.)
//!
//! **One thread writes it all.** The `presence` thread alone changes this
//! instance's counts and writes them to Redis: joins and leaves are queued
//! to it by the sessions, and it runs them, and the refreshes, one after
//! the other, on its own connection. A refresh that copied the counts and
//! wrote them a moment later could otherwise undo a leave that landed in
//! between (a phantom `join`, then a `leave` `expired` a TTL later), or
//! add a join to a count that already had it; here no interleaving exists
//! to get wrong.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};
use redis::Script;

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::{BrokerEvent, EventSender, Presence, PresenceChange};
use crate::metrics::Metrics;
use crate::protocol::{LeaveReason, PresenceEvent, ServerFrame};

/// How long a joining session waits for its join to be written: the
/// presence connection's own timeouts end it sooner, unless joins queue
/// up behind a slow Redis.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// Pause between two refresh attempts right after a reconnection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What every presence script starts with: the time, and a step that
/// removes expired entries and publishes a `leave` (reason `expired`) for
/// each name left with no connection. `KEYS`: the hash, the expiry set,
/// the room's channel, the names; `ARGV[1]` the publish command, `ARGV[2]`
/// the room, `ARGV[3]` this instance.
const CLEAN_EXPIRED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function clean()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, entry in ipairs(expired) do
    local who = cjson.decode(entry)
    local raw = redis.call('HGET', KEYS[1], who[2])
    if raw then
      local counts = cjson.decode(raw)
      counts[who[1]] = nil
      if next(counts) == nil then
        redis.call('HDEL', KEYS[1], who[2])
        redis.call('ZREM', KEYS[4], who[2])
        redis.call(ARGV[1], KEYS[3], cjson.encode({type = 'leave', room = ARGV[2], name = who[2], instance = who[1], reason = 'expired'}))
      else
        redis.call('HSET', KEYS[1], who[2], cjson.encode(counts))
      end
    end
    redis.call('ZREM', KEYS[2], entry)
  end
  return #expired
end
"#;

/// One more connection of `ARGV[4]` on instance `ARGV[3]`, expiring in
/// `ARGV[5]` ms; publishes `ARGV[6]` (the `join`) if it is the name's first.
const JOIN: &str = r#"
clean()
local raw = redis.call('HGET', KEYS[1], ARGV[4])
local counts = raw and cjson.decode(raw) or {}
local total = 0
for _, n in pairs(counts) do total = total + n end
counts[ARGV[3]] = (counts[ARGV[3]] or 0) + 1
redis.call('HSET', KEYS[1], ARGV[4], cjson.encode(counts))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), cjson.encode({ARGV[3], ARGV[4]}))
if total == 0 then
  redis.call('ZADD', KEYS[4], 0, ARGV[4])
  redis.call(ARGV[1], KEYS[3], ARGV[6])
end
return total
"#;

/// One connection less; publishes `ARGV[5]` (the `leave`) after the name's
/// last.
const LEAVE: &str = r#"
clean()
local raw = redis.call('HGET', KEYS[1], ARGV[4])
if not raw then
  return 0
end
local counts = cjson.decode(raw)
local left = (counts[ARGV[3]] or 0) - 1
if left > 0 then
  counts[ARGV[3]] = left
else
  counts[ARGV[3]] = nil
  redis.call('ZREM', KEYS[2], cjson.encode({ARGV[3], ARGV[4]}))
end
if next(counts) == nil then
  redis.call('HDEL', KEYS[1], ARGV[4])
  redis.call('ZREM', KEYS[4], ARGV[4])
  redis.call(ARGV[1], KEYS[3], ARGV[5])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[4], cjson.encode(counts))
return 0
"#;

/// This instance's connections in the room (`ARGV[5..]`: name, count,
/// ...), written again and given a new expiry in `ARGV[4]` ms; then
/// expired entries are cleaned. A name Redis did not have (it restarted
/// empty) gets its `join` again, so that every instance's clients learn
/// it is back, whichever instance's snapshot they got first.
const REFRESH: &str = r#"
for i = 5, #ARGV, 2 do
  local name = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], name)
  local counts = raw and cjson.decode(raw) or {}
  if next(counts) == nil then
    redis.call('ZADD', KEYS[4], 0, name)
    redis.call(ARGV[1], KEYS[3], cjson.encode({type = 'join', room = ARGV[2], name = name, instance = ARGV[3]}))
  end
  counts[ARGV[3]] = tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], name, cjson.encode(counts))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), cjson.encode({ARGV[3], name}))
end
return clean()
"#;

/// The room's member count and its first `ARGV[4]` members in name order
/// (name, connections by instance, ...), after cleaning.
const SNAPSHOT: &str = r#"
clean()
local names = redis.call('ZRANGEBYLEX', KEYS[4], '-', '+', 'LIMIT', 0, tonumber(ARGV[4]))
local found = {}
if #names > 0 then
  local values = redis.call('HMGET', KEYS[1], unpack(names))
  for i, name in ipairs(names) do
    if values[i] then
      table.insert(found, name)
      table.insert(found, values[i])
    end
  end
end
return {redis.call('ZCARD', KEYS[4]), found}
"#;

/// What the sessions ask of the presence thread.
enum Change {
    /// One more connection of `name` in `room`; `done` is told once it is
    /// written (or failed), so that the joiner's member list includes it.
    Join {
        room: String,
        name: String,
        done: Sender<()>,
    },
    /// One connection of `name` in `room` less.
    Leave { room: String, name: String },
}

/// The sessions' side of presence: queues changes for the presence thread,
/// and reads member lists (on the caller's connection).
pub struct PresenceStore {
    changes_tx: Sender<Change>,
    scripts: Scripts,
}

/// The scripts, and how to call them on one room.
struct Scripts {
    keys: RedisKeys,
    instance: String,
    ttl: Duration,
    join: Script,
    leave: Script,
    refresh: Script,
    snapshot: Script,
}

/// The `presence` thread's state.
pub struct PresenceThread {
    changes_rx: Receiver<Change>,
    /// Told when a subscription is caught up after a reconnection.
    reconnected_rx: Receiver<()>,
    scripts: Scripts,
    link: Link,
    /// This instance's connections by room and name: what it refreshes.
    local: HashMap<String, BTreeMap<String, u64>>,
    events_tx: EventSender,
    metrics: std::sync::Arc<Metrics>,
    max_members: usize,
}

impl PresenceStore {
    /// The store and the thread that writes it (to be started by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keys: RedisKeys,
        instance: String,
        ttl: Duration,
        link: Link,
        reconnected_rx: Receiver<()>,
        events_tx: EventSender,
        metrics: std::sync::Arc<Metrics>,
        max_members: usize,
    ) -> (Self, PresenceThread) {
        let scripts = || Scripts::new(keys.clone(), instance.clone(), ttl);
        let (changes_tx, changes_rx) = crossbeam_channel::unbounded();
        let store = PresenceStore {
            changes_tx,
            scripts: scripts(),
        };
        let thread = PresenceThread {
            changes_rx,
            reconnected_rx,
            scripts: scripts(),
            link,
            local: HashMap::new(),
            events_tx,
            metrics,
            max_members,
        };
        (store, thread)
    }

    /// One more local connection of `name` in `room`: returns once it is
    /// written to Redis, or failed (then the next refresh registers it).
    pub fn join(&self, room: &str, name: &str) {
        let (done, written) = crossbeam_channel::bounded(1);
        let change = Change::Join {
            room: room.to_string(),
            name: name.to_string(),
            done,
        };
        if self.changes_tx.send(change).is_ok() && written.recv_timeout(JOIN_WAIT).is_err() {
            warn!("presence: {name:?} in room {room} not written within {JOIN_WAIT:?}");
        }
    }

    /// One local connection of `name` in `room` less (not waited for).
    pub fn leave(&self, room: &str, name: &str) {
        let _ = self.changes_tx.send(Change::Leave {
            room: room.to_string(),
            name: name.to_string(),
        });
    }

    /// A room's members, at most `limit`, read on `link`.
    pub fn snapshot(&self, link: &Link, room: &str, limit: usize) -> Result<Presence, Failure> {
        self.scripts.snapshot(link, room, limit)
    }
}

impl Scripts {
    fn new(keys: RedisKeys, instance: String, ttl: Duration) -> Self {
        let script = |body: &str| Script::new(&format!("{CLEAN_EXPIRED}{body}"));
        Scripts {
            keys,
            instance,
            ttl,
            join: script(JOIN),
            leave: script(LEAVE),
            refresh: script(REFRESH),
            snapshot: script(SNAPSHOT),
        }
    }

    fn invocation<'a>(&self, script: &'a Script, room: &str) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.key(self.keys.presence(room));
        invocation
            .key(self.keys.presence_expiry(room))
            .key(self.keys.room_channel(room))
            .key(self.keys.presence_names(room))
            .arg(self.keys.publish_command())
            .arg(room)
            .arg(&self.instance);
        invocation
    }

    fn event(&self, room: &str, name: &str, reason: Option<LeaveReason>) -> PresenceEvent {
        PresenceEvent {
            room: room.to_string(),
            name: name.to_string(),
            instance: self.instance.clone(),
            reason,
        }
    }

    fn join(&self, link: &Link, room: &str, name: &str) -> Result<i64, Failure> {
        let frame = ServerFrame::Join(&self.event(room, name, None)).to_json();
        link.run(|connection| {
            self.invocation(&self.join, room)
                .arg(name)
                .arg(self.ttl.as_millis() as u64)
                .arg(&frame)
                .invoke::<i64>(connection)
        })
    }

    fn leave(&self, link: &Link, room: &str, name: &str) -> Result<i64, Failure> {
        let frame = ServerFrame::Leave(&self.event(room, name, Some(LeaveReason::Left))).to_json();
        link.run(|connection| {
            self.invocation(&self.leave, room)
                .arg(name)
                .arg(&frame)
                .invoke::<i64>(connection)
        })
    }

    /// Writes this instance's `names` in `room` again, with a new expiry;
    /// returns the entries of other instances found expired.
    fn refresh(
        &self,
        link: &Link,
        room: &str,
        names: &BTreeMap<String, u64>,
    ) -> Result<u64, Failure> {
        let mut invocation = self.invocation(&self.refresh, room);
        invocation.arg(self.ttl.as_millis() as u64);
        for (name, count) in names {
            invocation.arg(name).arg(*count);
        }
        link.run(|connection| invocation.invoke::<u64>(connection))
    }

    fn snapshot(&self, link: &Link, room: &str, limit: usize) -> Result<Presence, Failure> {
        let (total, pairs): (usize, Vec<(String, String)>) = link.run(|connection| {
            self.invocation(&self.snapshot, room)
                .arg(limit)
                .invoke(connection)
        })?;
        let counts = pairs
            .into_iter()
            .filter_map(|(name, raw)| {
                let by_instance: HashMap<String, f64> = serde_json::from_str(&raw).ok()?;
                let by_instance = by_instance
                    .into_iter()
                    .map(|(instance, n)| (instance, n.max(0.0) as u64))
                    .collect();
                Some((name, by_instance))
            })
            .collect();
        let mut presence = Presence::from_counts(counts, limit);
        presence.more = total.saturating_sub(presence.members.len());
        Ok(presence)
    }
}

impl PresenceThread {
    /// How often the members are refreshed: a third of the TTL, so that
    /// two refreshes can be late before an entry expires.
    fn refresh_interval(&self) -> Duration {
        self.scripts.ttl / 3
    }

    /// The `presence` thread: runs the sessions' changes in the order
    /// asked, refreshes every member every third of the TTL, and after a
    /// reconnection refreshes at once and sends every local room a fresh
    /// member list.
    pub fn run(mut self) {
        let mut next_refresh = Instant::now() + self.refresh_interval();
        // After a reconnection: until when a failed refresh is tried again
        // (the presence connection may still be waiting out its backoff),
        // between the changes queued meanwhile.
        let mut insist_until: Option<Instant> = None;
        loop {
            let wait = next_refresh.saturating_duration_since(Instant::now());
            select! {
                recv(self.changes_rx) -> change => match change {
                    Ok(change) => self.apply(change),
                    Err(_) => return,
                },
                recv(self.reconnected_rx) -> _ => {
                    insist_until = Some(Instant::now() + self.refresh_interval());
                    next_refresh = Instant::now();
                }
                default(wait) => {}
            }
            // Also after a change: a storm of changes must not starve the
            // refresh, or live members expire.
            if Instant::now() < next_refresh {
                continue;
            }
            let reconnected = insist_until.is_some();
            match self.refresh(reconnected) {
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

    fn apply(&mut self, change: Change) {
        match change {
            Change::Join { room, name, done } => {
                *self
                    .local
                    .entry(room.clone())
                    .or_default()
                    .entry(name.clone())
                    .or_default() += 1;
                if let Err(e) = self.scripts.join(&self.link, &room, &name) {
                    warn!(
                        "presence: {name:?} in room {room} not registered yet: {}",
                        e.into_unavailable()
                    );
                }
                let _ = done.send(());
            }
            Change::Leave { room, name } => {
                if let Some(names) = self.local.get_mut(&room) {
                    if let Some(count) = names.get_mut(&name) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            names.remove(&name);
                        }
                    }
                    if names.is_empty() {
                        self.local.remove(&room);
                    }
                }
                if let Err(e) = self.scripts.leave(&self.link, &room, &name) {
                    // Its entry expires, and is cleaned with a `leave` `expired`.
                    warn!(
                        "presence: {name:?} leaving room {room} not recorded: {}",
                        e.into_unavailable()
                    );
                }
            }
        }
    }

    /// Refreshes every local member, room by room. `reconnected`: presence
    /// was as stale as the outage, so every local room is then sent its
    /// member list afresh.
    fn refresh(&mut self, reconnected: bool) -> Result<(), Failure> {
        let expired = self.refresh_all()?;
        Metrics::inc(&self.metrics.presence_refreshes_total);
        Metrics::add(&self.metrics.presence_expired_total, expired);
        if expired > 0 {
            info!("presence: {expired} members of stopped instances expired");
        }
        if reconnected {
            for room in self.local.keys() {
                if let Ok(presence) = self.scripts.snapshot(&self.link, room, self.max_members) {
                    let snapshot = PresenceChange::Snapshot {
                        room: room.clone(),
                        presence,
                    };
                    let _ = self.events_tx.send(BrokerEvent::Presence(snapshot));
                }
            }
        }
        Ok(())
    }

    fn refresh_all(&self) -> Result<u64, Failure> {
        let mut expired = 0;
        for (room, names) in &self.local {
            expired += self.scripts.refresh(&self.link, room, names)?;
        }
        Ok(expired)
    }
}
