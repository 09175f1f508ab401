//! Redis Cluster: which master serves which room, for the subscribers.
//!
//! In a cluster a plain `PUBLISH` is broadcast to every node, so it spreads
//! no load; sharded Pub/Sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7) keeps a
//! channel on the master that owns its hash slot. Every key of a room
//! carries the room as its hash tag (`{lobby}`), so its channel, history,
//! id counter and dedup keys share one slot, and the accept script stays
//! one atomic step on one master.
//!
//! redis-rs's cluster client routes commands (the accept script, history
//! reads) by key, follows `MOVED` and refreshes its slot map on failover,
//! but it has no sharded Pub/Sub in its synchronous API. So the
//! subscribers speak `SSUBSCRIBE` themselves (see `subscription.rs`): one
//! subscribed connection per **shard** (a master and its replicas), found
//! here from `CLUSTER SLOTS`.
//!
//! A shard keeps its number for the life of the instance, while its master
//! may change: after a failover the promoted replica serves the slots the
//! old master served, and [`Topology::refresh`] gives it the old master's
//! shard. A master that appears later (a node added, slots moved to it)
//! becomes a new shard, with a subscriber of its own.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisError, Value};

use super::connect::tcp_settings;
use crate::sync::{Mutex, lock};

/// Redis Cluster's hash slots.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key, as Redis computes it: CRC16 (XMODEM) of the
/// key's hash tag (the part between the first `{` and the next `}`, if not
/// empty), or of the whole key, modulo 16384.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// A node's address.
pub type Node = (String, u16);

#[derive(Debug, Clone)]
struct SlotRange {
    start: u16,
    end: u16,
    master: Node,
}

impl SlotRange {
    fn overlaps(&self, other: &SlotRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

/// One shard: its master now, and the slots it served when last read.
#[derive(Debug, Clone)]
struct Shard {
    master: Node,
    slots: Vec<SlotRange>,
}

#[derive(Debug, Default)]
struct Map {
    ranges: Vec<SlotRange>,
    shards: Vec<Shard>,
}

impl Map {
    fn master_of_slot(&self, slot: u16) -> Option<&Node> {
        self.ranges
            .iter()
            .find(|range| range.start <= slot && slot <= range.end)
            .map(|range| &range.master)
    }

    /// Takes a new reading of the slots: each shard keeps its master if
    /// that is still a master, or else takes the master that now serves
    /// its slots (its promoted replica); a master no shard claims is a new
    /// shard. Returns how many shards were added.
    fn update(&mut self, ranges: Vec<SlotRange>) -> usize {
        let mut masters: Vec<Shard> = Vec::new();
        for range in &ranges {
            match masters
                .iter_mut()
                .find(|shard| shard.master == range.master)
            {
                Some(shard) => shard.slots.push(range.clone()),
                None => masters.push(Shard {
                    master: range.master.clone(),
                    slots: vec![range.clone()],
                }),
            }
        }
        masters.sort_by_key(|shard| shard.slots.iter().map(|r| r.start).min());
        let mut unclaimed: Vec<Shard> = masters
            .iter()
            .filter(|master| {
                !self
                    .shards
                    .iter()
                    .any(|shard| shard.master == master.master)
            })
            .cloned()
            .collect();
        for shard in &mut self.shards {
            if let Some(current) = masters.iter().find(|m| m.master == shard.master) {
                shard.slots = current.slots.clone();
                continue;
            }
            // Its master is gone: its successor serves some of its slots.
            if let Some(at) = unclaimed.iter().position(|candidate| {
                candidate
                    .slots
                    .iter()
                    .any(|new| shard.slots.iter().any(|old| old.overlaps(new)))
            }) {
                *shard = unclaimed.remove(at);
            }
        }
        let added = unclaimed.len();
        self.shards.extend(unclaimed);
        self.ranges = ranges;
        added
    }
}

pub struct Topology {
    seeds: Vec<ConnectionInfo>,
    timeout: Duration,
    map: Mutex<Map>,
}

impl Topology {
    /// Reads the cluster's slots from the first seed that answers; its
    /// masters, in the order of the slots they serve, are the shards.
    /// `seeds` carry the password and TLS settings every node is reached
    /// with.
    pub fn discover(seeds: Vec<ConnectionInfo>, timeout: Duration) -> Result<Topology, RedisError> {
        let topology = Topology {
            seeds,
            timeout,
            map: Mutex::default(),
        };
        topology.refresh()?;
        Ok(topology)
    }

    /// How many shards (subscriber connections) there are.
    pub fn shards(&self) -> usize {
        lock(&self.map).shards.len()
    }

    /// The shard whose master serves `key`'s slot now; `None` if no known
    /// master serves it (the map needs reading again).
    pub fn shard_of_key(&self, key: &str) -> Option<usize> {
        let map = lock(&self.map);
        let master = map.master_of_slot(slot_of(key))?;
        map.shards.iter().position(|shard| shard.master == *master)
    }

    /// The master of `shard` now.
    pub fn master_of_shard(&self, shard: usize) -> Option<ConnectionInfo> {
        let map = lock(&self.map);
        let master = map.shards.get(shard)?.master.clone();
        Some(self.node(master).set_tcp_settings(tcp_settings()))
    }

    /// Reads `CLUSTER SLOTS` again, from the current masters or the seeds.
    /// Returns how many shards there are now (more than before when a new
    /// master appeared).
    pub fn refresh(&self) -> Result<usize, RedisError> {
        let known: Vec<ConnectionInfo> = {
            let map = lock(&self.map);
            map.shards
                .iter()
                .map(|shard| self.node(shard.master.clone()))
                .collect()
        };
        let mut last_error = None;
        for node in known.iter().chain(&self.seeds) {
            match self.slots_from(node) {
                Ok(ranges) if !ranges.is_empty() => {
                    let mut map = lock(&self.map);
                    map.update(ranges);
                    return Ok(map.shards.len());
                }
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no node reported any slot").into()))
    }

    /// How to reach `node`: as the first seed is reached (password, TLS).
    fn node(&self, (host, port): Node) -> ConnectionInfo {
        let addr = match self.seeds[0].addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.seeds[0].clone().set_addr(addr)
    }

    fn slots_from(&self, node: &ConnectionInfo) -> Result<Vec<SlotRange>, RedisError> {
        let client = redis::Client::open(node.clone().set_tcp_settings(tcp_settings()))?;
        let mut connection = client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
        connection.set_write_timeout(Some(self.timeout))?;
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut connection)?;
        Ok(parse_slots(reply))
    }
}

/// Reads a `CLUSTER SLOTS` reply: `[[start, end, [ip, port, id], replicas...], ...]`.
fn parse_slots(reply: Value) -> Vec<SlotRange> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let int = |value: &Value| match value {
                Value::Int(n) => u16::try_from(*n).ok(),
                _ => None,
            };
            let start = int(fields.first()?)?;
            let end = int(fields.get(1)?)?;
            let Value::Array(master) = fields.get(2)? else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let port = int(master.get(1)?)?;
            Some(SlotRange {
                start,
                end,
                master: (host, port),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_hash_tags() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(
            slot_of("chat:room:{lobby}"),
            slot_of("chat:history:{lobby}")
        );
        assert_eq!(
            slot_of("{}x"),
            slot_of("{}x"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(slot_of("{}x"), slot_of(""));
    }

    #[test]
    fn a_cluster_slots_reply_is_read_into_ranges() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node(7001)]),
        ]);
        let ranges = parse_slots(reply);
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[1].start, ranges[1].end), (5461, 16383));
        assert_eq!(ranges[0].master, ("127.0.0.1".to_string(), 7000));
    }

    fn range(start: u16, end: u16, port: u16) -> SlotRange {
        SlotRange {
            start,
            end,
            master: ("127.0.0.1".to_string(), port),
        }
    }

    fn masters(map: &Map) -> Vec<u16> {
        map.shards.iter().map(|shard| shard.master.1).collect()
    }

    #[test]
    fn a_shard_keeps_its_number_through_a_failover_and_new_masters_get_new_ones() {
        let mut map = Map::default();
        let added = map.update(vec![range(5461, 16383, 7001), range(0, 5460, 7000)]);
        assert_eq!(
            (added, masters(&map)),
            (2, vec![7000, 7001]),
            "in slot order"
        );
        // 7000 died; its replica 7003 now serves its slots.
        map.update(vec![range(0, 5460, 7003), range(5461, 16383, 7001)]);
        assert_eq!(masters(&map), [7003, 7001]);
        assert_eq!(
            map.master_of_slot(10),
            Some(&("127.0.0.1".to_string(), 7003))
        );
        // A new master 7006 takes part of 7001's slots: a third shard.
        let added = map.update(vec![
            range(0, 5460, 7003),
            range(5461, 6000, 7006),
            range(6001, 16383, 7001),
        ]);
        assert_eq!((added, masters(&map)), (1, vec![7003, 7001, 7006]));
        // Part of 7003's slots move to 7001: nobody's number changes.
        let added = map.update(vec![
            range(0, 100, 7001),
            range(101, 5460, 7003),
            range(5461, 6000, 7006),
            range(6001, 16383, 7001),
        ]);
        assert_eq!((added, masters(&map)), (0, vec![7003, 7001, 7006]));
    }
}
