//! A private Redis Cluster for a test: six `redis-server` nodes on free
//! loopback ports, three masters with one replica each (and any master
//! added later, with no replica), killed and reaped on drop; and the
//! helpers the cluster tests share. Built on `cluster_process.rs` (shared
//! with the load generator); here every failure is a panic with the nodes'
//! log tails.

use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use super::cluster_process::{self as cp, NodePorts, SlotRange};
use super::{Instance, TIMEOUT, TempDir, temp_dir};

/// An instance in cluster mode, seeded with the cluster's masters, its keys
/// under `prefix`, once ready.
pub fn cluster_instance(
    id: &str,
    cluster: &RedisCluster,
    prefix: &str,
    extra: &[&str],
) -> Instance {
    let seeds = cluster.seeds();
    let mut args = vec!["--redis-cluster", &seeds, "--redis-prefix", prefix];
    args.extend_from_slice(extra);
    let instance = Instance::start(id, &args);
    instance.wait_ready();
    instance
}

/// A room's sharded channel.
pub fn channel(prefix: &str, room: &str) -> String {
    format!("{prefix}:room:{{{room}}}")
}

/// `PUBSUB SHARDNUMSUB channel` on one node: its subscribers there.
pub fn shard_numsub(conn: &mut redis::Connection, channel: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channel)
        .query(conn)
        .unwrap();
    count
}

/// How long a replica may take to replace a killed master: the failure is
/// noticed after `--cluster-node-timeout` (1 s), then the replica waits
/// 0.5 to 1 s and asks the other masters for their votes.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long moving one hash slot may take, and then again how long the
/// other nodes may take to learn its new owner (by gossip).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(15);

struct Node {
    ports: NodePorts,
    child: Option<Child>,
}

/// Six cluster nodes of this test's own (see the module documentation).
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl RedisCluster {
    /// Starts six nodes, waits for their `PING`, makes them one cluster
    /// with `redis-cli --cluster create ... --cluster-replicas 1`, and waits
    /// until every node serves all 16384 slots (`cluster_state:ok`).
    pub fn start() -> Self {
        // Free ports are found by binding and letting go, so a test running
        // alongside can take one before a node binds it: the node then
        // never answers. That is the harness's race, not the code's under
        // test: start again on other ports, a bounded number of times.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let mut cluster = RedisCluster {
                nodes: Vec::new(),
                dir: temp_dir("redis-cluster"),
            };
            for _ in 0..cp::NODES {
                let ports = NodePorts::free();
                let child = cp::node_command(ports, &cluster.dir)
                    .unwrap_or_else(|e| panic!("cannot create a cluster node's directory: {e}"))
                    .spawn()
                    .expect("redis-server is not installed: run ./scripts/test.sh, or apt-get install redis-server");
                cluster.nodes.push(Node {
                    ports,
                    child: Some(child),
                });
            }
            let ports = cluster.ports();
            if let Err(e) = cp::wait_nodes(&ports, TIMEOUT) {
                if attempt < ATTEMPTS {
                    eprintln!("cluster start, attempt {attempt}: {e}; again on other ports");
                    continue;
                }
                cluster.fail(&e);
            }
            if let Err(e) = cp::create(&ports, Duration::from_secs(30)) {
                cluster.fail(&e);
            }
            return cluster;
        }
        unreachable!("the last attempt returns or fails")
    }

    fn fail(&self, why: &str) -> ! {
        panic!("{why}\n{}", cp::log_tails(&self.dir, &self.ports(), 30));
    }

    /// Every node's client port, killed ones included, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.ports.port).collect()
    }

    /// The ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.ports.port)
            .collect()
    }

    /// `CLUSTER SLOTS` as the first live node that answers sees it.
    pub fn slots(&self) -> Vec<SlotRange> {
        let mut last = String::from("no live node");
        for port in self.live_ports() {
            match cp::slots(port) {
                Ok(ranges) => return ranges,
                Err(e) => last = e,
            }
        }
        self.fail(&format!("CLUSTER SLOTS failed on every live node: {last}"))
    }

    /// The ports of the masters that serve slots, in increasing order (a
    /// master just added, with no slot yet, is not among them).
    pub fn masters(&self) -> Vec<u16> {
        cp::masters(&self.slots())
    }

    /// The masters as the server's `--redis-cluster` takes them:
    /// `redis://127.0.0.1:P1,redis://127.0.0.1:P2,...`.
    pub fn seeds(&self) -> String {
        cp::seeds(&self.masters())
    }

    /// The hash slot of `key`, computed by Redis (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = *self.live_ports().first().expect("no live cluster node");
        cp::key_slot(port, key)
            .unwrap_or_else(|e| self.fail(&format!("CLUSTER KEYSLOT {key}: {e}")))
    }

    /// The port of the master that serves `slot` now.
    pub fn master_port_of_slot(&self, slot: u16) -> u16 {
        self.slots()
            .iter()
            .find(|r| r.contains(slot))
            .map(|r| r.master)
            .unwrap_or_else(|| self.fail(&format!("no node serves slot {slot}")))
    }

    /// The port of the master that serves `key`'s slot now.
    pub fn master_port_of_key(&self, key: &str) -> u16 {
        self.master_port_of_slot(self.slot_of(key))
    }

    /// A plain (not cluster-aware) connection to the node on `port`:
    /// commands on keys of other nodes' slots answer `MOVED`.
    pub fn connection_to(&self, port: u16) -> redis::Connection {
        let conn = cp::connect(port)
            .unwrap_or_else(|e| self.fail(&format!("cannot connect to node {port}: {e}")));
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn
    }

    /// `CONFIG SET parameter value` on every live node.
    pub fn config_set(&self, parameter: &str, value: &str) {
        for port in self.live_ports() {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(parameter)
                .arg(value)
                .query::<()>(&mut self.connection_to(port))
                .unwrap_or_else(|e| {
                    self.fail(&format!(
                        "CONFIG SET {parameter} {value} on node {port}: {e}"
                    ))
                });
        }
    }

    /// SIGKILLs the node on `port` (no shutdown) and reaps it.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.ports.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILLs the master of `key`'s slot, waits until every surviving
    /// node's `CLUSTER SLOTS` names the same other master for that slot,
    /// one that answers `PING` (its replica, promoted), and returns the new
    /// master's port.
    pub fn kill_master_of_key(&mut self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        let old = self.master_port_of_slot(slot);
        self.kill(old);
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        let seen = loop {
            let seen = self
                .live_ports()
                .into_iter()
                .map(|port| {
                    let master = cp::slots(port).ok().and_then(|ranges| {
                        ranges.iter().find(|r| r.contains(slot)).map(|r| r.master)
                    });
                    (port, master)
                })
                .collect::<Vec<_>>();
            if let Some((_, Some(new))) = seen.first().copied()
                && new != old
                && seen.iter().all(|(_, m)| *m == Some(new))
                && super::process::redis_pings(new)
            {
                return new;
            }
            if Instant::now() >= deadline {
                break seen;
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.fail(&format!(
            "the surviving nodes do not agree on a new master for slot {slot} within \
             {FAILOVER_TIMEOUT:?} of killing master {old}: (node, master) {seen:?}"
        ))
    }

    /// Starts one more node like the others, makes it a master of the
    /// cluster with no slot (`redis-cli --cluster add-node`), waits until
    /// it and every live node know one another and it says
    /// `cluster_state:ok` (see [`cp::add_node`]), and returns its port.
    /// Give it slots with [`migrate_slot`](Self::migrate_slot).
    pub fn add_master(&mut self) -> u16 {
        let ports = NodePorts::free();
        let child = cp::node_command(ports, &self.dir)
            .unwrap_or_else(|e| panic!("cannot create a cluster node's directory: {e}"))
            .spawn()
            .expect("cannot start redis-server");
        self.nodes.push(Node {
            ports,
            child: Some(child),
        });
        if let Err(e) = cp::wait_nodes(&[ports.port], TIMEOUT) {
            self.fail(&e);
        }
        let existing = *self.masters().first().expect("the cluster has masters");
        let known: Vec<u16> = self
            .live_ports()
            .into_iter()
            .filter(|&p| p != ports.port)
            .collect();
        if let Err(e) = cp::add_node(ports.port, existing, &known, Duration::from_secs(30)) {
            self.fail(&e);
        }
        ports.port
    }

    /// Moves hash `slot`, with its keys, from the master that serves it to
    /// the master on `to_port`, which may have no slot yet (`CLUSTER
    /// SETSLOT ... IMPORTING / MIGRATING`, `MIGRATE` of every key, `CLUSTER
    /// SETSLOT ... NODE` on every master: see [`cp::migrate_slot`]), then
    /// waits until every live node's `CLUSTER SLOTS` names `to_port` for it.
    /// Returns the old master's port.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) -> u16 {
        let from = self.master_port_of_slot(slot);
        assert_ne!(from, to_port, "slot {slot} is on {to_port} already");
        match cp::role(to_port) {
            Ok(role) if role == "master" => {}
            Ok(role) => panic!("{to_port} is not a master: ROLE says {role}"),
            Err(e) => self.fail(&e),
        }
        let masters = self.masters();
        if let Err(e) = cp::migrate_slot(slot, from, to_port, &masters, MIGRATION_TIMEOUT) {
            self.fail(&e);
        }
        if let Err(e) = cp::wait_slot_owner(&self.live_ports(), slot, to_port, MIGRATION_TIMEOUT) {
            self.fail(&e);
        }
        from
    }

    /// Waits until every live node says `cluster_state:ok` and serves all
    /// slots again (after a failover, the killed master's replica slot has
    /// no replica: that is not waited for).
    pub fn wait_state_ok(&self) {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let bad =
                self.live_ports()
                    .into_iter()
                    .find_map(|port| match cp::cluster_state(port) {
                        Ok(state) if state == "ok" => None,
                        Ok(state) => Some(format!("node {port}: cluster_state:{state}")),
                        Err(e) => Some(format!("node {port}: {e}")),
                    });
            let Some(why) = bad else { return };
            if Instant::now() >= deadline {
                self.fail(&format!("the cluster is not ok again: {why}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every node's log.
    pub fn logs(&self) -> String {
        cp::log_tails(&self.dir, &self.ports(), 30)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", cp::log_tails(&self.dir, &self.ports(), 15));
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
