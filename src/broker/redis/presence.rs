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
//! them. One `presence` thread per instance refreshes, every third of
//! `--presence-ttl-ms`, the entries of all its members, room by room in
//! one script each: an instance that dies stops refreshing, and whoever
//! reads or refreshes the room next removes its entries and publishes a
//! `leave` with reason `expired` for each name that had no other
//! connection. A killed instance's members are thus gone from every list
//! within the TTL plus one refresh interval. (Centrifuge's Redis presence
//! is built the same way: a hash of members and a sorted set of expiry
//! times, cleaned on read.)

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use log::warn;
use redis::Script;

use super::RedisKeys;
use super::publisher::{Failure, Publisher};
use crate::broker::Presence;
use crate::protocol::{LeaveReason, PresenceEvent, ServerFrame};
use crate::sync::{Mutex, lock};

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

pub struct PresenceStore {
    keys: RedisKeys,
    instance: String,
    ttl: Duration,
    /// This instance's connections by room and name: what it refreshes.
    local: Mutex<HashMap<String, BTreeMap<String, u64>>>,
    join: Script,
    leave: Script,
    refresh: Script,
    snapshot: Script,
}

impl PresenceStore {
    pub fn new(keys: RedisKeys, instance: String, ttl: Duration) -> Self {
        let script = |body: &str| Script::new(&format!("{CLEAN_EXPIRED}{body}"));
        PresenceStore {
            keys,
            instance,
            ttl,
            local: Mutex::default(),
            join: script(JOIN),
            leave: script(LEAVE),
            refresh: script(REFRESH),
            snapshot: script(SNAPSHOT),
        }
    }

    /// How often the `presence` thread refreshes: a third of the TTL, so
    /// that two refreshes can be late before an entry expires.
    pub fn refresh_interval(&self) -> Duration {
        self.ttl / 3
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

    /// One more local connection of `name` in `room`. Counted locally
    /// even if Redis is away: the next refresh registers it.
    pub fn join(&self, publisher: &Publisher, room: &str, name: &str) {
        *lock(&self.local)
            .entry(room.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default() += 1;
        let frame = ServerFrame::Join(&self.event(room, name, None)).to_json();
        let result = publisher.run(|connection| {
            self.invocation(&self.join, room)
                .arg(name)
                .arg(self.ttl.as_millis() as u64)
                .arg(&frame)
                .invoke::<i64>(connection)
        });
        if let Err(e) = result {
            warn!(
                "presence: {name:?} in room {room} not registered yet: {}",
                e.into_unavailable()
            );
        }
    }

    /// One local connection of `name` in `room` less.
    pub fn leave(&self, publisher: &Publisher, room: &str, name: &str) {
        {
            let mut local = lock(&self.local);
            if let Some(names) = local.get_mut(room) {
                if let Some(count) = names.get_mut(name) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        names.remove(name);
                    }
                }
                if names.is_empty() {
                    local.remove(room);
                }
            }
        }
        let frame = ServerFrame::Leave(&self.event(room, name, Some(LeaveReason::Left))).to_json();
        let result = publisher.run(|connection| {
            self.invocation(&self.leave, room)
                .arg(name)
                .arg(&frame)
                .invoke::<i64>(connection)
        });
        if let Err(e) = result {
            // Its entry expires, and is cleaned with a `leave` `expired`.
            warn!(
                "presence: {name:?} leaving room {room} not recorded: {}",
                e.into_unavailable()
            );
        }
    }

    /// A room's members, at most `limit`.
    pub fn snapshot(
        &self,
        publisher: &Publisher,
        room: &str,
        limit: usize,
    ) -> Result<Presence, Failure> {
        let (total, pairs): (usize, Vec<(String, String)>) = publisher.run(|connection| {
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

    /// Refreshes every local member, room by room; returns the entries of
    /// other instances found expired (and published as `leave`).
    pub fn refresh(&self, publisher: &Publisher) -> Result<u64, Failure> {
        let local = lock(&self.local).clone();
        let mut expired = 0;
        for (room, names) in &local {
            let mut invocation = self.invocation(&self.refresh, room);
            invocation.arg(self.ttl.as_millis() as u64);
            for (name, count) in names {
                invocation.arg(name).arg(*count);
            }
            expired += publisher.run(|connection| invocation.invoke::<u64>(connection))?;
        }
        Ok(expired)
    }

    /// The rooms with local members.
    pub fn rooms(&self) -> Vec<String> {
        lock(&self.local).keys().cloned().collect()
    }

    /// Relays `name` typing in `room` on the room's channel.
    pub fn typing(&self, publisher: &Publisher, room: &str, name: &str) {
        let frame = ServerFrame::Typing { room, name }.to_json();
        let channel = self.keys.room_channel(room);
        let command = self.keys.publish_command();
        let _ = publisher.run(|connection| {
            redis::cmd(command)
                .arg(&channel)
                .arg(&frame)
                .query::<i64>(connection)
        });
    }
}
