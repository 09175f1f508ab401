//! A private Redis Cluster, the parts shared by the integration tests
//! (through `tests/common/cluster.rs`) and the load generator
//! (`benches/load/`, which includes this file with `#[path]` next to
//! `process.rs`): the command line of one cluster node, `redis-cli --cluster
//! create` (and `add-node`, for a master added later), the wait until the
//! cluster serves every slot, and what `CLUSTER SLOTS`, `CLUSTER KEYSLOT`,
//! `CLUSTER NODES` and `ROLE` say.
//!
//! Like `process.rs`, nothing here panics: every wait has a timeout and a
//! failure is an `Err` with a message (and the nodes' log tails), which the
//! tests turn into a panic and the load generator into its own report. The
//! caller spawns the nodes itself (the load generator ties them to its own
//! life), so this file never holds a child process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::process;

/// Nodes of a cluster: three masters, each with one replica.
pub const NODES: usize = 6;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;

/// One node's ports: clients, and the cluster bus. The bus port is chosen
/// (`--cluster-port`) rather than left at the client port + 10000, which
/// is past 65535 for an ephemeral port above 55535.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePorts {
    pub port: u16,
    pub bus_port: u16,
}

impl NodePorts {
    /// Two free loopback ports.
    pub fn free() -> Self {
        let port = process::free_port();
        let mut bus_port = process::free_port();
        while bus_port == port {
            bus_port = process::free_port();
        }
        NodePorts { port, bus_port }
    }
}

/// The directory of the node on `port` under the cluster's `dir`: its
/// `redis.log`, and its cluster configuration `nodes-<port>.conf`.
pub fn node_dir(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("node-{port}"))
}

/// `redis-server` as a cluster node on `ports` (loopback, no persistence,
/// its files in [`node_dir`], created here), not spawned. A node that
/// misses its master for `--cluster-node-timeout` (1 s) calls it failing;
/// `--cluster-replica-validity-factor 0` lets a replica take over however
/// long its link was down, so a killed master always has a successor.
pub fn node_command(ports: NodePorts, dir: &Path) -> std::io::Result<Command> {
    let dir = node_dir(dir, ports.port);
    std::fs::create_dir_all(&dir)?;
    let mut cmd = process::redis_server_command(ports.port, &dir);
    cmd.args(["--appendonly", "no"])
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{}.conf", ports.port)))
        .args(["--cluster-port", &ports.bus_port.to_string()])
        .args(["--cluster-node-timeout", "1000"])
        .args(["--cluster-replica-validity-factor", "0"]);
    Ok(cmd)
}

/// Waits for every node to answer `PING`.
pub fn wait_nodes(ports: &[u16], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    for &port in ports {
        let left = deadline.saturating_duration_since(Instant::now());
        if !process::wait_redis(port, left) {
            return Err(format!("cluster node on port {port} did not answer PING"));
        }
    }
    Ok(())
}

/// `redis-cli --cluster create` over `ports` with one replica per master
/// (the first half become masters), then waits until the cluster serves
/// every slot ([`wait_ready`]). Everything within `timeout`.
pub fn create(ports: &[u16], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut args = vec!["--cluster".to_string(), "create".to_string()];
    args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
    redis_cli(&args, timeout)?;
    wait_ready(ports, deadline.saturating_duration_since(Instant::now()))
}

/// Runs `redis-cli` with `args` (a `--cluster` subcommand), within
/// `timeout`; the error has its output.
fn redis_cli(args: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let what = format!("redis-cli {}", args[..2.min(args.len())].join(" "));
    let mut child = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    // Its output is a few KiB: it fits the pipes, so waiting before reading
    // cannot block it.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {timeout:?}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{what} failed ({status}):\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// `redis-cli --cluster add-node 127.0.0.1:<new> 127.0.0.1:<existing>`:
/// the empty node on `new` joins the cluster of `existing` as a master
/// with no slot. Then waits until `new` and every node in `known` list
/// one another in `CLUSTER NODES`, out of handshake, and `new` says
/// `cluster_state:ok` (a master refuses everything, `MIGRATE` into it
/// included, for its first 2 s in a cluster). Everything within
/// `timeout`.
pub fn add_node(new: u16, existing: u16, known: &[u16], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let args = [
        "--cluster".to_string(),
        "add-node".to_string(),
        format!("127.0.0.1:{new}"),
        format!("127.0.0.1:{existing}"),
    ];
    redis_cli(&args, timeout)?;
    let mut everyone: Vec<u16> = known.to_vec();
    everyone.push(new);
    let ids = everyone
        .iter()
        .map(|&port| my_id(port))
        .collect::<Result<Vec<_>, _>>()?;
    loop {
        let unknown = everyone.iter().find_map(|&port| {
            if port == new {
                match cluster_state(port) {
                    Ok(state) if state == "ok" => {}
                    Ok(state) => return Some(format!("node {port} says cluster_state:{state}")),
                    Err(e) => return Some(format!("node {port}: {e}")),
                }
            }
            let nodes = match cluster_nodes(port) {
                Ok(nodes) => nodes,
                Err(e) => return Some(format!("node {port}: {e}")),
            };
            ids.iter().find_map(|id| {
                match nodes.lines().find(|line| line.starts_with(id.as_str())) {
                    None => Some(format!("node {port} does not list {id}")),
                    Some(line) if line.contains("handshake") || line.contains("noaddr") => {
                        Some(format!("node {port} is not through with {id}: {line}"))
                    }
                    Some(_) => None,
                }
            })
        });
        let Some(why) = unknown else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "node {new} is not part of the cluster after {timeout:?}: {why}"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `CLUSTER NODES` of the node on `port`: one line per node it knows.
pub fn cluster_nodes(port: u16) -> Result<String, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut conn)
        .map_err(|e| format!("CLUSTER NODES on node {port}: {e}"))
}

/// What a node is, as `CLUSTER NODES` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRole {
    /// A master, and its slot ranges as listed (`0-5460`).
    Master { slots: Vec<String> },
    /// A replica of the master on this port.
    Replica { of: u16 },
    /// Flagged `fail` (or `fail?`): down, as far as this node knows.
    Failed,
}

/// Every node's port and role, as the node on `port` sees them: masters
/// first, then replicas, then failed nodes, each by port.
pub fn roles(port: u16) -> Result<Vec<(u16, NodeRole)>, String> {
    parse_roles(&cluster_nodes(port)?)
}

/// [`roles`] from the text of `CLUSTER NODES`: `<id> <ip:port@bus>
/// <flags> <master id> <ping> <pong> <epoch> <link> <slot>...`.
pub fn parse_roles(nodes: &str) -> Result<Vec<(u16, NodeRole)>, String> {
    let port_of = |addr: &str| {
        addr.split(['@', ','])
            .next()
            .and_then(|host_port| host_port.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
    };
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 8)
        .collect();
    let mut roles = Vec::new();
    for fields in &lines {
        let port = port_of(fields[1]).ok_or_else(|| format!("no port in {:?}", fields[1]))?;
        let flags = fields[2];
        let role = if flags.contains("fail") {
            NodeRole::Failed
        } else if flags.contains("master") {
            NodeRole::Master {
                slots: fields[8..].iter().map(|s| s.to_string()).collect(),
            }
        } else {
            let master = lines
                .iter()
                .find(|other| other[0] == fields[3])
                .and_then(|other| port_of(other[1]))
                .ok_or_else(|| format!("node {port}'s master {} is unknown", fields[3]))?;
            NodeRole::Replica { of: master }
        };
        roles.push((port, role));
    }
    let rank = |role: &NodeRole| match role {
        NodeRole::Master { .. } => 0,
        NodeRole::Replica { .. } => 1,
        NodeRole::Failed => 2,
    };
    roles.sort_by_key(|(port, role)| (rank(role), *port));
    Ok(roles)
}

/// The first field of `ROLE` on the node on `port`: `master` (with slots
/// or not) or `slave` (a replica).
pub fn role(port: u16) -> Result<String, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    let value: redis::Value = redis::cmd("ROLE")
        .query(&mut conn)
        .map_err(|e| format!("ROLE on node {port}: {e}"))?;
    match &value {
        redis::Value::Array(fields) => match fields.first() {
            Some(redis::Value::BulkString(bytes)) => Ok(String::from_utf8_lossy(bytes).into()),
            Some(redis::Value::SimpleString(text)) => Ok(text.clone()),
            _ => Err(format!("unexpected ROLE reply from node {port}: {value:?}")),
        },
        _ => Err(format!("unexpected ROLE reply from node {port}: {value:?}")),
    }
}

/// Waits until every node in `ports` says `cluster_state:ok` and its
/// `CLUSTER SLOTS` covers all 16384 slots, each range with a master and a
/// replica. The error says what was missing last.
pub fn wait_ready(ports: &[u16], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = ports.iter().find_map(|&port| node_not_ready(port));
        let Some(why) = missing else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(format!("the cluster is not ready after {timeout:?}: {why}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Why the node on `port` is not ready yet (see [`wait_ready`]), or `None`.
fn node_not_ready(port: u16) -> Option<String> {
    match cluster_state(port) {
        Ok(state) if state == "ok" => {}
        Ok(state) => return Some(format!("node {port} says cluster_state:{state}")),
        Err(e) => return Some(format!("node {port}: {e}")),
    }
    let ranges = match slots(port) {
        Ok(ranges) => ranges,
        Err(e) => return Some(format!("node {port}: {e}")),
    };
    let covered: u32 = ranges.iter().map(|r| r.end - r.start + 1).sum();
    if covered != SLOTS {
        return Some(format!(
            "node {port}'s CLUSTER SLOTS covers {covered} slots"
        ));
    }
    if let Some(r) = ranges.iter().find(|r| r.replicas.is_empty()) {
        return Some(format!(
            "node {port}: slots {}-{} have no replica yet",
            r.start, r.end
        ));
    }
    None
}

/// A connection to the node on loopback `port`, with short timeouts.
pub fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// `cluster_state` from the node's `CLUSTER INFO` (`ok` or `fail`).
pub fn cluster_state(port: u16) -> Result<String, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| l.strip_prefix("cluster_state:"))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| format!("no cluster_state in CLUSTER INFO: {info:?}"))
}

/// One entry of `CLUSTER SLOTS`: an inclusive slot range, the port of its
/// master, and the ports of its replicas (all on 127.0.0.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u32,
    pub end: u32,
    pub master: u16,
    pub replicas: Vec<u16>,
}

impl SlotRange {
    pub fn contains(&self, slot: u16) -> bool {
        (self.start..=self.end).contains(&u32::from(slot))
    }
}

/// `CLUSTER SLOTS` as the node on `port` sees it.
pub fn slots(port: u16) -> Result<Vec<SlotRange>, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    let value: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    let bad = || format!("unexpected CLUSTER SLOTS reply from node {port}: {value:?}");
    let redis::Value::Array(entries) = &value else {
        return Err(bad());
    };
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => Some(*n),
        _ => None,
    };
    // A node is [ip, port, id, ...]; only its port matters here.
    let node_port = |v: &redis::Value| match v {
        redis::Value::Array(fields) => fields
            .get(1)
            .and_then(int)
            .and_then(|p| u16::try_from(p).ok()),
        _ => None,
    };
    let mut ranges = Vec::new();
    for entry in entries {
        let redis::Value::Array(fields) = entry else {
            return Err(bad());
        };
        let (Some(start), Some(end), Some(master)) = (
            fields.first().and_then(int),
            fields.get(1).and_then(int),
            fields.get(2).and_then(node_port),
        ) else {
            return Err(bad());
        };
        let replicas = fields[3..].iter().filter_map(node_port).collect();
        ranges.push(SlotRange {
            start: start as u32,
            end: end as u32,
            master,
            replicas,
        });
    }
    ranges.sort_by_key(|r| r.start);
    Ok(ranges)
}

/// The hash slot of `key`, as the node on `port` computes it
/// (`CLUSTER KEYSLOT`; a `{hash tag}` is what counts).
pub fn key_slot(port: u16, key: &str) -> Result<u16, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut conn)
        .map_err(|e| e.to_string())
}

/// The master ports in `ranges`, each once, in increasing order.
pub fn masters(ranges: &[SlotRange]) -> Vec<u16> {
    let mut masters: Vec<u16> = ranges.iter().map(|r| r.master).collect();
    masters.sort_unstable();
    masters.dedup();
    masters
}

/// `redis://127.0.0.1:P` of each port, comma-separated: the seed list of
/// the server's `--redis-cluster`.
pub fn seeds(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The last `lines` lines of each node's `redis.log`, for a failure report.
pub fn log_tails(dir: &Path, ports: &[u16], lines: usize) -> String {
    let mut out = String::new();
    for &port in ports {
        let log = std::fs::read_to_string(node_dir(dir, port).join("redis.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let all: Vec<&str> = log.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        out += &format!("---- cluster node {port} ----\n{}\n", tail.join("\n"));
    }
    out
}

/// `CLUSTER MYID` of the node on `port`: its 40-character node id.
pub fn my_id(port: u16) -> Result<String, String> {
    let mut conn = connect(port).map_err(|e| e.to_string())?;
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut conn)
        .map_err(|e| format!("CLUSTER MYID on node {port}: {e}"))
}

/// Moves hash `slot`, with every key in it, from the master on `from` to
/// the master on `to`, the way `redis-cli --cluster reshard` does:
/// `CLUSTER SETSLOT slot IMPORTING <from's id>` on `to`, `... MIGRATING
/// <to's id>` on `from`, then `CLUSTER GETKEYSINSLOT slot 100` and
/// `MIGRATE ... KEYS ...` on `from` until it has no key left there, and
/// last `CLUSTER SETSLOT slot NODE <to's id>` on `to`, on `from`, and on
/// every other master in `masters`. Meanwhile `from` still serves the keys
/// it has and answers `ASK` (or `TRYAGAIN`, for a command on keys on both
/// sides) for the others. Does not wait for the other nodes to learn the
/// new owner (see [`wait_slot_owner`]). Everything within `timeout`.
pub fn migrate_slot(
    slot: u16,
    from: u16,
    to: u16,
    masters: &[u16],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let from_id = my_id(from)?;
    let to_id = my_id(to)?;
    let setslot = |port: u16, args: &[&str]| -> Result<(), String> {
        let mut conn = connect(port).map_err(|e| format!("node {port}: {e}"))?;
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query::<()>(&mut conn)
            .map_err(|e| format!("CLUSTER SETSLOT {slot} {args:?} on node {port}: {e}"))
    };
    setslot(to, &["IMPORTING", &from_id])?;
    setslot(from, &["MIGRATING", &to_id])?;

    let mut source = connect(from).map_err(|e| format!("node {from}: {e}"))?;
    // MIGRATE itself may take up to its own timeout (5 s).
    source
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut moved = 0;
    loop {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut source)
            .map_err(|e| format!("CLUSTER GETKEYSINSLOT {slot} 100 on node {from}: {e}"))?;
        if keys.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "slot {slot}: {moved} keys moved from {from} to {to}, still {} or more \
                 left after {timeout:?}",
                keys.len()
            ));
        }
        // `OK`, or `NOKEY` when every one of them expired meanwhile.
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut source)
            .map_err(|e| format!("MIGRATE of {} keys of slot {slot} to {to}: {e}", keys.len()))?;
        moved += keys.len();
    }

    let node = ["NODE", to_id.as_str()];
    setslot(to, &node)?;
    setslot(from, &node)?;
    for &port in masters.iter().filter(|&&p| p != from && p != to) {
        setslot(port, &node)?;
    }
    Ok(())
}

/// Waits until the `CLUSTER SLOTS` of every node in `ports` names the
/// master on `owner` for `slot`. The error says what each node saw last.
pub fn wait_slot_owner(
    ports: &[u16],
    slot: u16,
    owner: u16,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen: Vec<(u16, Result<Option<u16>, String>)> = ports
            .iter()
            .map(|&port| {
                let master = slots(port)
                    .map(|ranges| ranges.iter().find(|r| r.contains(slot)).map(|r| r.master));
                (port, master)
            })
            .collect();
        if seen
            .iter()
            .all(|(_, m)| matches!(m, Ok(Some(p)) if *p == owner))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not every node names {owner} as the master of slot {slot} after \
                 {timeout:?}: (node, master) {seen:?}"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
