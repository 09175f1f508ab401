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
//! here from `CLUSTER SLOTS`. The shards are those the cluster had when the
//! instance started; a failover changes a shard's master, which
//! [`Topology::refresh`] finds. A cluster that gains shards needs the
//! instances restarted to use them.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisError, Value};

use crate::redis_url::RedisUrl;
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

#[derive(Debug, Default)]
struct Map {
    ranges: Vec<SlotRange>,
    /// For each shard, a slot it owned at start-up, by which its current
    /// master is found again after a failover.
    anchors: Vec<u16>,
}

impl Map {
    fn master_of_slot(&self, slot: u16) -> Option<&Node> {
        self.ranges
            .iter()
            .find(|range| range.start <= slot && slot <= range.end)
            .map(|range| &range.master)
    }
}

pub struct Topology {
    seeds: Vec<ConnectionInfo>,
    timeout: Duration,
    map: Mutex<Map>,
}

impl Topology {
    /// Reads the cluster's slots from the first seed that answers; its
    /// masters are the shards.
    pub fn discover(seeds: &[RedisUrl], timeout: Duration) -> Result<Topology, String> {
        let seeds = seeds
            .iter()
            .map(|seed| seed.connection_info().clone())
            .collect();
        let topology = Topology {
            seeds,
            timeout,
            map: Mutex::default(),
        };
        topology.refresh().map_err(|e| {
            format!("cannot read the cluster's slots from any --redis-cluster node: {e}")
        })?;
        let mut map = lock(&topology.map);
        let mut masters: Vec<(u16, Node)> = Vec::new();
        for range in &map.ranges {
            match masters.iter_mut().find(|(_, node)| *node == range.master) {
                Some((first, _)) => *first = (*first).min(range.start),
                None => masters.push((range.start, range.master.clone())),
            }
        }
        masters.sort();
        map.anchors = masters.into_iter().map(|(slot, _)| slot).collect();
        drop(map);
        Ok(topology)
    }

    /// How many shards (subscriber connections) there are.
    pub fn shards(&self) -> usize {
        lock(&self.map).anchors.len()
    }

    /// The shard whose master serves `key`'s slot now (shard 0 if the slot
    /// has no known master: it is then resubscribed when one is found).
    pub fn shard_of_key(&self, key: &str) -> usize {
        let map = lock(&self.map);
        let Some(master) = map.master_of_slot(slot_of(key)) else {
            return 0;
        };
        map.anchors
            .iter()
            .position(|&anchor| map.master_of_slot(anchor) == Some(master))
            .unwrap_or(0)
    }

    /// The master of `shard` now, if it has one.
    pub fn master_of_shard(&self, shard: usize) -> Option<ConnectionInfo> {
        let map = lock(&self.map);
        let anchor = *map.anchors.get(shard)?;
        let (host, port) = map.master_of_slot(anchor)?.clone();
        Some(
            self.seeds[0]
                .clone()
                .set_addr(ConnectionAddr::Tcp(host, port)),
        )
    }

    /// Reads `CLUSTER SLOTS` again, from the current masters or the seeds.
    pub fn refresh(&self) -> Result<(), RedisError> {
        let known: Vec<ConnectionInfo> = {
            let map = lock(&self.map);
            map.ranges
                .iter()
                .map(|range| {
                    let (host, port) = range.master.clone();
                    self.seeds[0]
                        .clone()
                        .set_addr(ConnectionAddr::Tcp(host, port))
                })
                .collect()
        };
        let mut last_error = None;
        for node in known.iter().chain(&self.seeds) {
            match self.slots_from(node) {
                Ok(ranges) if !ranges.is_empty() => {
                    lock(&self.map).ranges = ranges;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no node reported any slot").into()))
    }

    fn slots_from(&self, node: &ConnectionInfo) -> Result<Vec<SlotRange>, RedisError> {
        let client = redis::Client::open(node.clone())?;
        let mut connection = client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
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
}
