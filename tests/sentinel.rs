//! Redis Sentinel, rehearsed: a primary, its replica and three sentinels
//! on loopback ports; two instances that find the primary through the
//! sentinels; the primary SIGKILLed while a sender streams; the replica
//! promoted. Every acknowledged message must reach the other instance's
//! client once, in order; what the failover cost (how long sends failed,
//! how many acknowledged messages the promoted replica lacks) is printed,
//! with and without `--redis-min-replicas 1`. And a primary the
//! sentinels replace while it still runs and the instances still reach
//! it: only `+switch-master` moves them.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::Message;

/// Three `redis-server --sentinel` processes watching master `m`, each
/// with its config file in `dir` (removed on drop).
struct Sentinels {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: TempDir,
}

impl Sentinels {
    fn start(primary_port: u16) -> Self {
        Self::start_with(primary_port, "")
    }

    /// With `extra` lines in each sentinel's config file.
    fn start_with(primary_port: u16, extra: &str) -> Self {
        let dir = temp_dir("sentinels");
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel-{port}.log\n\
                     sentinel monitor m 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds m 1000\n\
                     sentinel failover-timeout m 3000\n{extra}",
                    dir = dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is not installed");
            ports.push(port);
            children.push(child);
        }
        Sentinels {
            ports,
            children,
            dir,
        }
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    fn list(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ask(&self, port: u16, args: &[&str]) -> redis::RedisResult<Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let value: redis::Value = cmd.query(&mut conn)?;
        Ok(to_json(value))
    }

    /// Where every sentinel says the primary is (port), once they agree.
    fn primary_port(&self) -> Option<u16> {
        let mut seen = HashSet::new();
        for &port in &self.ports {
            let answer = self
                .ask(port, &["SENTINEL", "get-master-addr-by-name", "m"])
                .ok()?;
            seen.insert(answer[1].as_str()?.parse::<u16>().ok()?);
        }
        (seen.len() == 1).then(|| *seen.iter().next().unwrap())
    }

    /// Waits until every sentinel knows the replica and the two others:
    /// a failover can then be agreed on.
    fn wait_settled(&self) {
        wait_for("the sentinels to know the replica and each other", || {
            self.ports.iter().all(|&port| {
                let Ok(Value::Array(fields)) = self.ask(port, &["SENTINEL", "master", "m"]) else {
                    return false;
                };
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|pair| pair[0] == name)
                        .and_then(|pair| pair[1].as_str().map(str::to_string))
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            })
        });
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            for port in &self.ports {
                let log = std::fs::read_to_string(self.dir.join(format!("sentinel-{port}.log")))
                    .unwrap_or_default();
                eprintln!("---- sentinel {port} ----\n{log}");
            }
        }
    }
}

fn to_json(value: redis::Value) -> Value {
    match value {
        redis::Value::BulkString(bytes) => Value::String(String::from_utf8_lossy(&bytes).into()),
        redis::Value::SimpleString(text) => Value::String(text),
        redis::Value::Int(n) => Value::String(n.to_string()),
        redis::Value::Array(items) => Value::Array(items.into_iter().map(to_json).collect()),
        redis::Value::Map(pairs) => Value::Array(
            pairs
                .into_iter()
                .flat_map(|(k, v)| [to_json(k), to_json(v)])
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn replication(port: u16) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return String::new();
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return String::new();
    };
    redis::cmd("INFO")
        .arg("replication")
        .query::<String>(&mut conn)
        .unwrap_or_default()
}

/// What a client on the other instance received, frame by frame.
struct Receiver {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(Vec<Value>, Vec<String>)>,
}

impl Receiver {
    fn spawn(mut client: Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = thread::spawn(move || {
            client.set_read_timeout(Duration::from_millis(100));
            let (mut messages, mut statuses) = (Vec::new(), Vec::new());
            let mut quiet_since = Instant::now();
            loop {
                match client.socket.read() {
                    Ok(Message::Text(text)) => {
                        let frame: Value = serde_json::from_str(&text).unwrap();
                        match frame["type"].as_str() {
                            Some("message") => messages.push(frame),
                            Some("status") => {
                                statuses.push(frame["delivery"].as_str().unwrap_or("?").to_string())
                            }
                            _ => {}
                        }
                        quiet_since = Instant::now();
                    }
                    Ok(_) => {}
                    Err(e) if timed_out(&e) => {
                        if stopped.load(Ordering::Relaxed)
                            && quiet_since.elapsed() > Duration::from_millis(700)
                        {
                            break;
                        }
                    }
                    Err(e) => panic!("receiver lost its connection: {e}"),
                }
            }
            (messages, statuses)
        });
        Receiver { stop, handle }
    }

    fn finish(self) -> (Vec<Value>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("receiver failed")
    }
}

/// The failover, rehearsed; `min_replicas` is passed as
/// `--redis-min-replicas`.
fn failover(min_replicas: usize) {
    let started = Instant::now();
    let mut primary = RedisServer::start();
    let old_primary_port = primary.port;
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_for("the replica to sync", || {
        replication(replica.port).contains("master_link_status:up")
    });
    let sentinels = Sentinels::start(primary.port);
    sentinels.wait_settled();
    assert_eq!(sentinels.primary_port(), Some(primary.port));

    let prefix = unique("sentinel");
    let room = "failover";
    let min = min_replicas.to_string();
    let args = [
        "--broker",
        "redis",
        "--redis-sentinel",
        &sentinels.list(),
        "--redis-sentinel-master",
        "m",
        "--redis-prefix",
        &prefix,
        "--redis-min-replicas",
        &min,
    ];
    let a = Instance::start("a", &args);
    let b = Instance::start("b", &args);
    a.wait_ready();
    b.wait_ready();

    let receiver = Receiver::spawn(b.client("bob", room));
    let mut sender = a.client("alice", room);
    let pace = Duration::from_millis(20);

    let mut acknowledged = Vec::new();
    let mut unknown = HashSet::new();
    let mut refused = 0;
    let mut sender_statuses = Vec::new();
    let mut killed_at = None;
    let mut first_ack_after_kill = None;
    let mut restarted = false;
    let mut acks_after_recovery = 0;
    let mut wait_latencies = Vec::new();
    let stream_started = Instant::now();
    let mut n = 0;
    loop {
        if killed_at.is_none() && stream_started.elapsed() > Duration::from_secs(2) {
            primary.kill();
            killed_at = Some(Instant::now());
            println!("primary {old_primary_port} SIGKILLed after {n} sends");
        }
        // The old primary comes back (its supervisor restarts it): the
        // sentinels make it a replica of the promoted one, so that the
        // new primary has a replica again.
        if let Some(killed_at) = killed_at
            && !restarted
            && sentinels.primary_port() == Some(replica.port)
        {
            primary = RedisServer::start_on(old_primary_port);
            restarted = true;
            println!(
                "replica {} promoted {} ms after the kill; old primary restarted",
                replica.port,
                killed_at.elapsed().as_millis()
            );
        }
        if acks_after_recovery >= 50 || started.elapsed() > Duration::from_secs(50) {
            break;
        }
        let text = format!("m-{n}");
        n += 1;
        let sent_at = Instant::now();
        sender.send(&text, &text);
        loop {
            let frame = sender.recv();
            match frame["type"].as_str() {
                Some("message") if frame["cid"] == text.as_str() => {
                    acknowledged.push(text.clone());
                    wait_latencies.push(sent_at.elapsed());
                    if killed_at.is_some() {
                        first_ack_after_kill.get_or_insert_with(Instant::now);
                        acks_after_recovery += 1;
                    }
                    break;
                }
                Some("message") => {}
                Some("error") if frame["cid"] == text.as_str() => {
                    match frame["code"].as_str() {
                        Some("unavailable") => refused += 1,
                        Some("outcome_unknown") => {
                            unknown.insert(text.clone());
                        }
                        _ => panic!("unexpected error {frame}"),
                    }
                    break;
                }
                Some("status") => {
                    sender_statuses.push(frame["delivery"].as_str().unwrap_or("?").to_string())
                }
                // An earlier message's `outcome_unknown` after its copy:
                // its WAIT timed out while another publish's flush sent
                // it. The protocol allows both ("if it was, it appears").
                Some("error")
                    if frame["code"] == "outcome_unknown"
                        && frame["cid"]
                            .as_str()
                            .is_some_and(|cid| acknowledged.iter().any(|a| a == cid)) => {}
                _ => panic!("sender: unexpected frame {frame}"),
            }
        }
        thread::sleep(pace);
    }
    let killed_at = killed_at.expect("the primary was killed");
    let first_ack = first_ack_after_kill.expect("no message was acknowledged after the failover");
    assert!(restarted, "the sentinels never promoted the replica");

    // Both instances are ready again, on the promoted replica.
    a.wait_ready();
    b.wait_ready();
    let new_primary = replica.connection().unwrap();
    let mut new_primary = new_primary;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut new_primary)
        .unwrap();
    for name in ["a:pub", "a:sub", "b:pub", "b:sub"] {
        assert!(
            clients.contains(&format!("name={prefix}:{name} ")),
            "{name} not connected to the promoted replica:\n{clients}"
        );
    }

    let (received, receiver_statuses) = receiver.finish();
    // Every acknowledged message reached the other instance's client
    // once, in order; messages told `outcome_unknown` may or may not.
    let got = texts(&received);
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(
        distinct.len(),
        got.len(),
        "duplicates at the receiver: {got:?}"
    );
    assert!(
        received
            .windows(2)
            .all(|pair| id_of(&pair[0]) < id_of(&pair[1])),
        "receiver: ids out of order"
    );
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|text| !distinct.contains(text))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged, never received: {missing:?}"
    );
    let extra: Vec<&String> = got
        .iter()
        .filter(|text| !acknowledged.contains(text) && !unknown.contains(*text))
        .collect();
    assert!(extra.is_empty(), "received, never acknowledged: {extra:?}");

    // The clients were told the link went down, then up again.
    for (who, statuses) in [
        ("sender", &sender_statuses),
        ("receiver", &receiver_statuses),
    ] {
        assert_eq!(
            statuses.first().map(String::as_str),
            Some("down"),
            "{who}: {statuses:?}"
        );
        assert_eq!(
            statuses.last().map(String::as_str),
            Some("up"),
            "{who}: {statuses:?}"
        );
    }

    // What the promoted replica holds of the acknowledged messages.
    let history: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:history:{room}"))
        .arg("-")
        .arg("+")
        .query(&mut new_primary)
        .unwrap();
    let kept: HashSet<String> = history
        .iter()
        .filter_map(|(_, fields)| {
            let frame: Value = serde_json::from_str(&fields.first()?.1).ok()?;
            frame["text"].as_str().map(str::to_string)
        })
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|text| !kept.contains(*text))
        .collect();

    wait_latencies.sort();
    let median = wait_latencies[wait_latencies.len() / 2];
    let p99 = wait_latencies[wait_latencies.len() * 99 / 100];
    println!(
        "--redis-min-replicas {min_replicas}: {} sent, {} acknowledged, {} refused (unavailable), \
         {} outcome_unknown; no acknowledgement for {} ms after the kill; acknowledged but missing \
         from the promoted replica's history: {} {:?}; receipt latency median {:?}, p99 {:?}; \
         statuses: sender {:?}, receiver {:?}; test took {:?}",
        n,
        acknowledged.len(),
        refused,
        unknown.len(),
        (first_ack - killed_at).as_millis(),
        lost.len(),
        lost,
        median,
        p99,
        sender_statuses,
        receiver_statuses,
        started.elapsed()
    );
    if min_replicas > 0 {
        assert!(
            lost.is_empty(),
            "acknowledged with --redis-min-replicas {min_replicas}, yet lost: {lost:?}"
        );
    }
}

#[test]
fn a_failover_moves_both_instances_to_the_promoted_replica() {
    failover(0);
}

#[test]
fn with_min_replicas_no_acknowledged_message_is_lost_at_failover() {
    failover(1);
}

/// A primary the sentinels replace while it still runs and the instances
/// still reach it: a partition between it and the sentinels, made here by
/// taking every command from the sentinels' Redis user on it (their
/// `PING`s are refused, so they call it down, and neither `INFO` nor
/// `REPLICAOF` reaches it to demote it). Nothing breaks the
/// instances' links and the old primary still says `ROLE` master, so only
/// `+switch-master` can move them; until they move, their messages go to
/// a primary nobody else uses. Afterwards an instance started fresh
/// (which asks the sentinels) and the two old ones share the room, and
/// the old primary holds no connection of theirs.
#[test]
fn instances_follow_switch_master_away_from_a_primary_that_still_runs() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    for node in [&primary, &replica] {
        node.add_acl_user("sentinel", "sentinel-password");
    }
    let sentinels = Sentinels::start_with(
        primary.port,
        "sentinel auth-user m sentinel\nsentinel auth-pass m sentinel-password\n",
    );
    sentinels.wait_settled();
    let (list, prefix) = (sentinels.list(), unique("switch"));
    let args = [
        "--redis-sentinel",
        list.as_str(),
        "--redis-sentinel-master",
        "m",
        "--redis-prefix",
        prefix.as_str(),
    ];
    let a = Instance::start("a", &args);
    let b = Instance::start("b", &args);
    a.wait_ready();
    b.wait_ready();
    let mut alice = a.client("alice", "switch");
    let mut bob = b.client("bob", "switch");
    alice.send("before", "c0");
    assert_eq!(bob.recv_messages(1)[0]["text"], "before");

    let mut on_primary = primary.connection().unwrap();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sentinel")
        .arg("-@all")
        .query::<()>(&mut on_primary)
        .unwrap();
    wait_for("the sentinels to promote the replica", || {
        sentinels.primary_port() == Some(replica.port)
    });
    let promoted = Instant::now();
    assert!(
        replication(primary.port).contains("role:master"),
        "the old primary still runs as a master:\n{}",
        replication(primary.port)
    );
    let clients_of_old_primary = |on_primary: &mut redis::Connection| -> String {
        redis::cmd("CLIENT").arg("LIST").query(on_primary).unwrap()
    };
    wait_for("a and b to leave the old primary", || {
        !clients_of_old_primary(&mut on_primary).contains(&prefix)
    });
    eprintln!(
        "a and b left the old primary {} ms after every sentinel named the new one",
        promoted.elapsed().as_millis()
    );

    let c = Instance::start("c", &args);
    c.wait_ready();
    let mut carol = c.client("carol", "switch");
    carol.drain_messages(Duration::from_millis(300));
    // Until a and b have moved, what alice sends reaches only the old
    // primary, which c does not use.
    let mut probe = 0;
    wait_for(
        "alice's messages to reach carol on the fresh instance",
        || {
            probe += 1;
            alice.send(&format!("probe {probe}"), &format!("p{probe}"));
            !carol.drain_messages(Duration::from_millis(500)).is_empty()
        },
    );
    bob.drain_messages(Duration::from_millis(300));
    alice.drain_messages(Duration::from_millis(300));
    alice.send("after", "c1");
    for who in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(texts(&who.recv_messages(1)), ["after"]);
    }
    carol.send("from c", "c2");
    for who in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(texts(&who.recv_messages(1)), ["from c"]);
    }
    let clients = clients_of_old_primary(&mut on_primary);
    assert!(
        !clients.contains(&prefix),
        "an instance went back to the old primary:\n{clients}"
    );
    for instance in [&a, &b] {
        assert!(
            instance.log().contains("+switch-master"),
            "{} says why it moved:\n{}",
            instance.id,
            instance.log()
        );
    }
}

#[test]
fn start_up_errors_name_the_problem() {
    let redis = RedisServer::start();
    let sentinels = Sentinels::start(redis.port);
    wait_for("a sentinel to answer", || {
        sentinels.ask(sentinels.ports[0], &["PING"]).is_ok()
    });
    let (status, log) = run_to_exit(
        "x",
        &[
            "--redis-sentinel",
            &sentinels.list(),
            "--redis-sentinel-master",
            "nosuch",
        ],
        TIMEOUT,
    );
    assert!(!status.success());
    assert!(
        log.contains("no sentinel monitors a master named \"nosuch\""),
        "{log}"
    );
    let nowhere = refused_port();
    let dead = format!("127.0.0.1:{}", nowhere.port);
    let (status, log) = run_to_exit(
        "x",
        &["--redis-sentinel", &dead, "--redis-sentinel-master", "m"],
        TIMEOUT,
    );
    assert!(!status.success());
    assert!(log.contains("no sentinel answered"), "{log}");
    let (status, log) = run_to_exit(
        "x",
        &[
            "--redis-sentinel",
            &dead,
            "--redis-sentinel-master",
            "m",
            "--redis-url",
            &redis.url(),
        ],
        TIMEOUT,
    );
    assert!(!status.success());
    assert!(log.contains("give one"), "{log}");
}
