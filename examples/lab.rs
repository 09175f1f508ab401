//! The tests' set-ups as a program, for `scripts/run_cluster.sh`: the
//! Redis Cluster and the nginx configuration are made by the same code the
//! integration tests use (`tests/common/cluster_process.rs`,
//! `tests/common/nginx_config.rs`), so the shell only starts processes.
//!
//! ```sh
//! cargo run --release --example lab -- redis-cluster DIR
//! cargo run --release --example lab -- nginx-config PORT DIR HTTP_PORT:WS_PORT...
//! ```
//!
//! `redis-cluster DIR` starts six `redis-server` cluster nodes on free
//! loopback ports (their files in `DIR/node-PORT/`), makes them one cluster
//! of three masters with a replica each, and once it serves every slot
//! writes `DIR/nodes.txt` (each node, its pid and role), `DIR/lobby.txt`
//! (`SLOT MASTER_PORT MASTER_PID REPLICA_PORT` for room `lobby`) and, last,
//! `DIR/seeds` (the masters, for `--redis-cluster`). Then it watches the
//! nodes: one that exits is reported at once, and the cluster's roles 5 s
//! later (a failover takes 2 to 3 s). SIGTERM or SIGINT stops the nodes;
//! they die with it even if it is killed.
//!
//! `nginx-config PORT DIR HTTP_PORT:WS_PORT...` prints the configuration of
//! an nginx on 127.0.0.1:PORT (its files in DIR) in front of instances on
//! those loopback ports.

#[path = "../tests/common/process.rs"]
mod process;

#[path = "../tests/common/cluster_process.rs"]
mod cluster_process;

#[path = "../tests/common/nginx_config.rs"]
mod nginx_config;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cluster_process::{NodePorts, NodeRole};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str =
    "usage: lab redis-cluster DIR\n       lab nginx-config PORT DIR HTTP_PORT:WS_PORT...";

/// How long after a node exits its cluster's roles are shown again: a
/// replica takes over 2 to 3 s after its master's death.
const REPORT_AFTER: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["redis-cluster", dir] => redis_cluster(Path::new(dir)),
        ["nginx-config", port, dir, ref backends @ ..] if !backends.is_empty() => {
            nginx(port, dir, backends)
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn nginx(port: &str, dir: &str, backends: &[&str]) -> Result<(), String> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let loopback = |port: &str| -> Result<SocketAddr, String> {
        let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        Ok(([127, 0, 0, 1], port).into())
    };
    let backends = backends
        .iter()
        .map(|pair| {
            let (http, ws) = pair
                .split_once(':')
                .ok_or_else(|| format!("{pair:?} is not HTTP_PORT:WS_PORT"))?;
            Ok((loopback(http)?, loopback(ws)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    print!("{}", nginx_config::config(port, Path::new(dir), &backends));
    Ok(())
}

/// One cluster node, and its process while it runs.
struct Node {
    port: u16,
    pid: u32,
    child: Option<Child>,
}

fn redis_cluster(dir: &Path) -> Result<(), String> {
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut nodes = start_nodes(dir)?;
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let ready = cluster_process::wait_nodes(&ports, Duration::from_secs(10))
        .and_then(|()| cluster_process::create(&ports, Duration::from_secs(60)))
        .and_then(|()| cluster_process::slots(ports[0]));
    let ranges = match ready {
        Ok(ranges) => ranges,
        Err(e) => {
            stop(&mut nodes);
            return Err(format!(
                "the Redis Cluster did not start: {e}\n{}",
                cluster_process::log_tails(dir, &ports, 10)
            ));
        }
    };
    let masters = cluster_process::masters(&ranges);
    let described = describe(&nodes).unwrap_or_else(|e| e);
    write(dir, "nodes.txt", &described)?;
    write(dir, "lobby.txt", &lobby(&nodes, &ranges)?)?;
    write(dir, "seeds", &cluster_process::seeds(&masters))?;
    say(&format!(
        "ready: masters {masters:?}; logs in {}/node-PORT/redis.log",
        dir.display()
    ));
    let mut report_at = None;
    while signals.pending().next().is_none() {
        for node in &mut nodes {
            let Some(child) = &mut node.child else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                say(&format!(
                    "node 127.0.0.1:{} (pid {}) exited ({status}); if it was a master, \
                     its replica takes over its slots within a few seconds",
                    node.port, node.pid
                ));
                report_at = Some(Instant::now() + REPORT_AFTER);
            }
        }
        if report_at.is_some_and(|at| Instant::now() >= at) {
            report_at = None;
            say(&format!(
                "nodes now:\n{}",
                describe(&nodes).unwrap_or_else(|e| e)
            ));
        }
        thread::sleep(Duration::from_millis(200));
    }
    stop(&mut nodes);
    Ok(())
}

/// Six nodes on twelve distinct free ports (client and bus ports).
fn start_nodes(dir: &Path) -> Result<Vec<Node>, String> {
    let mut taken = Vec::new();
    let mut nodes = Vec::new();
    while nodes.len() < cluster_process::NODES {
        let ports = NodePorts::free();
        if taken.contains(&ports.port) || taken.contains(&ports.bus_port) {
            continue;
        }
        taken.extend([ports.port, ports.bus_port]);
        let mut command = cluster_process::node_command(ports, dir)
            .map_err(|e| format!("cannot create a node's directory: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        process::die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            stop(&mut nodes);
            format!("cannot start redis-server: {e} (apt-get install redis-server)")
        })?;
        nodes.push(Node {
            port: ports.port,
            pid: child.id(),
            child: Some(child),
        });
    }
    Ok(nodes)
}

/// One line a node: its address, pid and role, from the first live node
/// that answers `CLUSTER NODES`.
fn describe(nodes: &[Node]) -> Result<String, String> {
    let roles = nodes
        .iter()
        .filter(|n| n.child.is_some())
        .find_map(|n| cluster_process::roles(n.port).ok())
        .ok_or("no cluster node answers CLUSTER NODES")?;
    let pid = |port: u16| {
        nodes
            .iter()
            .find(|n| n.port == port && n.child.is_some())
            .map_or("-".to_string(), |n| n.pid.to_string())
    };
    Ok(roles
        .iter()
        .map(|(port, role)| {
            let what = match role {
                NodeRole::Master { slots } => format!("master, slots {}", slots.join(" ")),
                NodeRole::Replica { of } => format!("replica of 127.0.0.1:{of}"),
                NodeRole::Failed => "failed".to_string(),
            };
            format!("    127.0.0.1:{port:<6} pid {:<8} {what}\n", pid(*port))
        })
        .collect())
}

/// `SLOT MASTER_PORT MASTER_PID REPLICA_PORT` of room `lobby`: its keys
/// and channel share the slot of the hash tag `{lobby}`.
fn lobby(nodes: &[Node], ranges: &[cluster_process::SlotRange]) -> Result<String, String> {
    let slot = cluster_process::key_slot(nodes[0].port, "{lobby}")?;
    let range = ranges
        .iter()
        .find(|r| r.contains(slot))
        .ok_or_else(|| format!("no master serves slot {slot}"))?;
    let pid = nodes
        .iter()
        .find(|n| n.port == range.master)
        .map_or(0, |n| n.pid);
    let replica = range.replicas.first().copied().unwrap_or(0);
    Ok(format!("{slot} {} {pid} {replica}\n", range.master))
}

/// Writes `name` in `dir` whole: a reader never sees half of it.
fn write(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let partial: PathBuf = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, dir.join(name)))
        .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
}

fn say(text: &str) {
    for line in text.lines() {
        println!("[redis-cluster] {line}");
    }
}

/// SIGTERM to every node still running, up to 5 s to exit, then SIGKILL.
fn stop(nodes: &mut [Node]) {
    for node in nodes.iter() {
        if node.child.is_some() {
            // SAFETY: kill(2) on a child of ours that is not reaped yet.
            unsafe { libc::kill(node.pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in nodes.iter_mut() {
        let Some(child) = &mut node.child else {
            continue;
        };
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        node.child = None;
    }
}
