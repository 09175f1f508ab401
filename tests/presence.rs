//! Verifies presence over the wire: every client of a room gets the room's
//! members (over all instances) after `welcome` and before history, then
//! `join` and `leave` events in order with the chat; several tabs with one
//! name are one member; a SIGKILLed instance's members expire everywhere
//! within the TTL; `typing` reaches the others, not the sender, and is
//! throttled silently; presence recovers after a Redis restart; and a
//! snapshot lists at most `--presence-max-members` members.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Client, Instance, RedisServer, TIMEOUT, two_instances, unique};
use serde_json::{Value, json};
use tungstenite::Message;

/// One member of a `presence` snapshot: name, instances, connections.
type Row = (String, Vec<String>, u64);

fn row(name: &str, instances: &[&str], connections: u64) -> Row {
    (
        name.to_string(),
        instances.iter().map(|s| s.to_string()).collect(),
        connections,
    )
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The next text frame within `wait`, or `None` if none came; panics if the
/// connection ends or a non-text data frame arrives.
fn next_frame(client: &mut Client, who: &str, wait: Duration) -> Option<Value> {
    let deadline = Instant::now() + wait;
    let frame = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        client.set_read_timeout(left);
        match client.socket.read() {
            Ok(Message::Text(text)) => {
                break Some(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{who}: frame is not JSON ({e}): {text}")),
                );
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(other) => panic!("{who}: expected a text frame, got {other:?}"),
            Err(e) if common::timed_out(&e) => break None,
            Err(e) => panic!("{who}: connection lost: {e}"),
        }
    };
    client.set_read_timeout(TIMEOUT);
    frame
}

/// The members of a `presence` frame, checked against the contract: sorted
/// by name, each with its instances sorted, at least one connection per
/// instance.
fn rows(frame: &Value) -> Vec<Row> {
    let members = frame["members"]
        .as_array()
        .unwrap_or_else(|| panic!("presence without a members array: {frame}"));
    let rows: Vec<Row> = members
        .iter()
        .map(|m| {
            let name = m["name"]
                .as_str()
                .unwrap_or_else(|| panic!("member without a name in {frame}"));
            let instances: Vec<String> = m["instances"]
                .as_array()
                .unwrap_or_else(|| panic!("member without instances in {frame}"))
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect();
            let connections = m["connections"]
                .as_u64()
                .unwrap_or_else(|| panic!("member without connections in {frame}"));
            (name.to_string(), instances, connections)
        })
        .collect();
    assert!(
        rows.windows(2).all(|w| w[0].0 < w[1].0),
        "members not sorted by name (or listed twice): {frame}"
    );
    for (name, instances, connections) in &rows {
        assert!(
            !instances.is_empty() && instances.windows(2).all(|w| w[0] < w[1]),
            "{name}: instances not sorted, empty or repeated: {frame}"
        );
        assert!(
            *connections >= instances.len() as u64,
            "{name}: fewer connections than instances: {frame}"
        );
    }
    rows
}

/// A client that keeps every frame it reads and follows the room's members
/// as it knows them: the snapshot, then `join` and `leave` events, applied
/// idempotently (a `join` for someone already listed changes nothing).
struct Tracker {
    who: String,
    room: String,
    client: Client,
    /// Every frame after `welcome`, in order.
    frames: Vec<Value>,
    /// The members as this client knows them now.
    members: BTreeSet<String>,
    /// The first `presence` frame.
    snapshot: Value,
}

impl Tracker {
    /// Connects as `name` to `room`, and reads until the snapshot, which
    /// must come before any history message.
    fn join(instance: &Instance, name: &str, room: &str) -> Self {
        let client = instance.client(name, room);
        let who = format!(
            "{name}@{}({})",
            instance.id,
            client.welcome["client"].as_str().unwrap_or("?")
        );
        let mut tracker = Tracker {
            who,
            room: room.to_string(),
            client,
            frames: Vec::new(),
            members: BTreeSet::new(),
            snapshot: Value::Null,
        };
        let snapshot = tracker.next_of_type("presence");
        for frame in &tracker.frames[..tracker.frames.len() - 1] {
            assert!(
                !matches!(frame["type"].as_str(), Some("message" | "error")),
                "{}: {frame} arrived before the presence snapshot",
                tracker.who
            );
        }
        tracker.snapshot = snapshot;
        tracker
    }

    /// The members of the first snapshot.
    fn rows(&self) -> Vec<Row> {
        rows(&self.snapshot)
    }

    /// How many members the first snapshot left out.
    fn more(&self) -> u64 {
        self.snapshot["more"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: snapshot without `more`: {}", self.who, self.snapshot))
    }

    /// Reads one frame within `wait`, checks it, and applies it.
    fn read(&mut self, wait: Duration) -> Option<Value> {
        let frame = next_frame(&mut self.client, &self.who, wait)?;
        self.apply(&frame);
        self.frames.push(frame.clone());
        Some(frame)
    }

    fn apply(&mut self, frame: &Value) {
        let who = &self.who;
        let kind = frame["type"].as_str().unwrap_or("");
        if matches!(kind, "presence" | "join" | "leave" | "typing") {
            assert_eq!(
                frame["room"],
                self.room.as_str(),
                "{who}: wrong room: {frame}"
            );
        }
        let name = || {
            frame["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{who}: {kind} without a name: {frame}"))
                .to_string()
        };
        match kind {
            "presence" => {
                assert!(
                    frame["more"].is_u64(),
                    "{who}: presence without `more`: {frame}"
                );
                self.members = rows(frame).into_iter().map(|r| r.0).collect();
            }
            "join" => {
                assert!(frame["instance"].is_string(), "{who}: {frame}");
                self.members.insert(name());
            }
            "leave" => {
                assert!(frame["instance"].is_string(), "{who}: {frame}");
                assert!(
                    matches!(frame["reason"].as_str(), Some("left" | "expired")),
                    "{who}: leave with an unknown reason: {frame}"
                );
                self.members.remove(&name());
            }
            "typing" => {
                name();
            }
            _ => {}
        }
    }

    fn dump(&self) -> String {
        self.frames
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Reads until `check` holds; panics after `within`.
    fn until(&mut self, what: &str, within: Duration, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no {what} within {within:?}; members {:?}; frames:\n{}",
                self.who,
                self.members,
                self.dump()
            );
            self.read(left);
        }
    }

    /// Reads until the members it knows are exactly `expected`.
    fn converge(&mut self, expected: &[&str]) {
        let expected = names(expected);
        self.until(&format!("member list {expected:?}"), TIMEOUT, |t| {
            t.members == expected
        });
    }

    /// Reads until a frame of type `kind` arrives, and returns it.
    fn next_of_type(&mut self, kind: &str) -> Value {
        let mark = self.frames.len();
        self.until(&format!("`{kind}` frame"), TIMEOUT, |t| {
            t.frames[mark..].iter().any(|f| f["type"] == kind)
        });
        self.frames[mark..]
            .iter()
            .find(|f| f["type"] == kind)
            .unwrap()
            .clone()
    }

    /// Reads everything that arrives during `window`.
    fn watch(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.read(left);
        }
    }

    /// Reads until nothing arrives for `quiet`.
    fn settle(&mut self, quiet: Duration) {
        let deadline = Instant::now() + TIMEOUT;
        while self.read(quiet).is_some() {
            assert!(
                Instant::now() < deadline,
                "{}: never quiet for {quiet:?}",
                self.who
            );
        }
    }

    /// Asserts that no frame of type `kind` arrives during `window`.
    fn expect_no_frame_of_type(&mut self, kind: &str, window: Duration) {
        let mark = self.frames.len();
        self.watch(window);
        let got = self.since(mark, kind);
        assert!(
            got.is_empty(),
            "{}: unexpected `{kind}` frames: {got:?}",
            self.who
        );
    }

    /// The frames of type `kind` from index `mark` on.
    fn since(&self, mark: usize, kind: &str) -> Vec<&Value> {
        self.frames[mark..]
            .iter()
            .filter(|f| f["type"] == kind)
            .collect()
    }

    /// Every event of type `kind` about `name` so far.
    fn events(&self, kind: &str, name: &str) -> Vec<&Value> {
        self.since(0, kind)
            .into_iter()
            .filter(|f| f["name"] == name)
            .collect()
    }

    fn send_typing(&mut self) {
        self.client
            .send_raw(Message::text(json!({"type": "typing"}).to_string()));
    }

    /// Closes the connection and reads until the server's answer.
    fn hang_up(mut self) {
        let _ = self.client.socket.close(None);
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            self.client.set_read_timeout(Duration::from_millis(200));
            match self.client.socket.read() {
                Ok(_) => continue,
                Err(e) if common::timed_out(&e) => continue,
                Err(_) => return,
            }
        }
        panic!("{}: the server never answered the close", self.who);
    }
}

/// Connects newcomers named `probe` to `room` on `instance`, one at a time
/// (each reads its snapshot and hangs up), until one's snapshot satisfies
/// `check`; returns that snapshot's members.
fn wait_for_snapshot(
    instance: &Instance,
    room: &str,
    what: &str,
    check: impl Fn(&[Row]) -> bool,
) -> Vec<Row> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let probe = Tracker::join(instance, "probe", room);
        let rows = probe.rows();
        probe.hang_up();
        if check(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot on {} showed {what}; the last: {rows:?}",
            instance.id
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn member<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.0 == name)
}

#[test]
fn members_on_two_instances_see_one_list() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-list"));
    let room = "lobby";

    let mut alice = Tracker::join(&a, "alice", room);
    assert_eq!(
        alice.rows(),
        [row("alice", &["a"], 1)],
        "the snapshot includes the client itself"
    );
    assert_eq!(alice.more(), 0);
    let mut bob = Tracker::join(&b, "bob", room);
    alice.converge(&["alice", "bob"]);
    bob.converge(&["alice", "bob"]);

    // A message in history, so that "presence before history" is tested.
    alice.client.send("hello", "h1");
    alice.until("alice's own message", TIMEOUT, |t| {
        t.frames.iter().any(|f| f["type"] == "message")
    });

    let mut carol = Tracker::join(&a, "carol", room);
    assert_eq!(
        carol.rows(),
        [
            row("alice", &["a"], 1),
            row("bob", &["b"], 1),
            row("carol", &["a"], 1)
        ],
        "carol's snapshot: everyone, over both instances"
    );
    assert_eq!(carol.more(), 0);
    let history = carol.next_of_type("message");
    assert_eq!(history["text"], "hello", "history follows the snapshot");

    for tracker in [&mut alice, &mut bob, &mut carol] {
        tracker.converge(&["alice", "bob", "carol"]);
    }
    for tracker in [&mut alice, &mut bob, &mut carol] {
        tracker.settle(Duration::from_millis(300));
        let own = tracker.who.split('@').next().unwrap().to_string();
        assert_eq!(
            tracker.events("join", &own).len(),
            1,
            "{}: its own join, once:\n{}",
            tracker.who,
            tracker.dump()
        );
        for name in ["alice", "bob", "carol"] {
            assert!(
                tracker.events("join", name).len() <= 1,
                "{}: {name} joined twice:\n{}",
                tracker.who,
                tracker.dump()
            );
        }
        assert!(
            tracker.since(0, "leave").is_empty(),
            "{}: nobody left:\n{}",
            tracker.who,
            tracker.dump()
        );
    }
    for (name, instance) in [("bob", "b"), ("carol", "a")] {
        let joins = alice.events("join", name);
        assert_eq!(joins.len(), 1, "alice saw {name} join once");
        assert_eq!(joins[0]["instance"], instance, "{}", joins[0]);
    }
    let carol_on_b = bob.events("join", "carol");
    assert_eq!(carol_on_b.len(), 1, "bob saw carol join once");
    assert_eq!(carol_on_b[0]["instance"], "a");

    let dave = Tracker::join(&b, "dave", room);
    assert_eq!(
        dave.rows(),
        [
            row("alice", &["a"], 1),
            row("bob", &["b"], 1),
            row("carol", &["a"], 1),
            row("dave", &["b"], 1)
        ],
        "a newcomer's snapshot"
    );
    assert_eq!(dave.more(), 0);
}

#[test]
fn two_tabs_with_one_name_count_once_and_leave_at_the_last() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-tabs"));
    let room = "lobby";

    let mut watcher = Tracker::join(&b, "watcher", room);
    let mut tab1 = Tracker::join(&a, "alice", room);
    watcher.converge(&["alice", "watcher"]);
    let tab2 = Tracker::join(&a, "alice", room);
    assert_eq!(
        tab2.rows(),
        [row("alice", &["a"], 2), row("watcher", &["b"], 1)],
        "the second tab's snapshot counts both tabs"
    );
    let tab3 = Tracker::join(&b, "alice", room);
    assert_eq!(
        tab3.rows(),
        [row("alice", &["a", "b"], 3), row("watcher", &["b"], 1)],
        "three tabs on two instances are one member"
    );

    watcher.settle(Duration::from_millis(300));
    let joins = watcher.events("join", "alice");
    assert_eq!(
        joins.len(),
        1,
        "one join for three tabs:\n{}",
        watcher.dump()
    );
    assert_eq!(joins[0]["instance"], "a");
    tab1.settle(Duration::from_millis(300));
    assert_eq!(
        tab1.events("join", "alice").len(),
        1,
        "the first tab gets its own join, and no other:\n{}",
        tab1.dump()
    );

    // Close the tabs on a first: alice stays, on b only.
    tab1.hang_up();
    wait_for_snapshot(&a, room, "alice with 2 connections", |rows| {
        member(rows, "alice") == Some(&row("alice", &["a", "b"], 2))
    });
    tab2.hang_up();
    wait_for_snapshot(&a, room, "alice on b only", |rows| {
        member(rows, "alice") == Some(&row("alice", &["b"], 1))
    });
    watcher.settle(Duration::from_millis(300));
    assert!(
        watcher.events("leave", "alice").is_empty(),
        "no leave while a tab remains:\n{}",
        watcher.dump()
    );
    assert!(watcher.members.contains("alice"));

    // The last tab goes: alice leaves, from b.
    tab3.hang_up();
    watcher.until("alice's leave", TIMEOUT, |t| !t.members.contains("alice"));
    let leaves = watcher.events("leave", "alice");
    assert_eq!(leaves.len(), 1, "{}", watcher.dump());
    assert_eq!(leaves[0]["reason"], "left");
    assert_eq!(
        leaves[0]["instance"], "b",
        "the instance where the last tab was"
    );
    let rows = wait_for_snapshot(&a, room, "no alice", |rows| member(rows, "alice").is_none());
    assert_eq!(member(&rows, "watcher"), Some(&row("watcher", &["b"], 1)));
}

#[test]
fn a_killed_instances_members_expire_everywhere_within_the_ttl() {
    let redis = RedisServer::start();
    let prefix = unique("presence-ttl");
    let ttl = ["--presence-ttl-ms", "1500"];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &ttl);
    let mut b = Instance::redis_with("b", &redis.url(), &prefix, &ttl);
    a.wait_ready();
    b.wait_ready();
    let room = "lobby";

    let mut olga = Tracker::join(&a, "olga", room);
    let _bob = Tracker::join(&b, "bob", room);
    let _dave_a = Tracker::join(&a, "dave", room);
    olga.converge(&["bob", "dave", "olga"]);
    let dave_b = Tracker::join(&b, "dave", room);
    assert_eq!(
        member(&dave_b.rows(), "dave"),
        Some(&row("dave", &["a", "b"], 2))
    );

    let killed = Instant::now();
    b.kill();
    // ttl 1.5 s + one refresh interval (0.5 s), with room to spare.
    olga.until("bob's expiry", Duration::from_secs(6), |t| {
        !t.members.contains("bob")
    });
    eprintln!("bob expired {:?} after the kill", killed.elapsed());
    let leaves = olga.events("leave", "bob");
    assert_eq!(leaves.len(), 1, "{}", olga.dump());
    assert_eq!(leaves[0]["reason"], "expired");
    assert_eq!(leaves[0]["instance"], "b");

    // Members of the live instance are refreshed and stay: watch past
    // another ttl and refresh interval.
    olga.watch(Duration::from_secs(2));
    for name in ["dave", "olga"] {
        assert!(
            olga.events("leave", name).is_empty(),
            "{name} is still connected on a:\n{}",
            olga.dump()
        );
    }
    let nina = Tracker::join(&a, "nina", room);
    assert_eq!(
        nina.rows(),
        [
            row("dave", &["a"], 1),
            row("nina", &["a"], 1),
            row("olga", &["a"], 1)
        ],
        "a newcomer's snapshot after b died"
    );
}

#[test]
fn typing_reaches_the_others_not_the_sender_and_is_throttled() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-typing"));
    let room = "lobby";
    let mut alice = Tracker::join(&a, "alice", room);
    let mut bob = Tracker::join(&b, "bob", room);
    let mut alice2 = Tracker::join(&b, "alice", room);
    for tracker in [&mut alice, &mut bob, &mut alice2] {
        tracker.converge(&["alice", "bob"]);
    }

    for burst in 0..2 {
        let mark = (alice.frames.len(), alice2.frames.len());
        for _ in 0..10 {
            alice.send_typing();
        }
        let typing = bob.next_of_type("typing");
        let relayed = Instant::now();
        assert_eq!(typing["name"], "alice", "{typing}");
        assert_eq!(typing["room"], room, "{typing}");
        // The rest of the burst is dropped, not deferred: nothing more
        // until past the 2 s throttle.
        bob.expect_no_frame_of_type(
            "typing",
            (relayed + Duration::from_millis(2200)).saturating_duration_since(Instant::now()),
        );
        alice.watch(Duration::from_millis(300));
        alice2.watch(Duration::from_millis(300));
        assert!(
            alice.since(mark.0, "typing").is_empty() && alice.since(mark.0, "error").is_empty(),
            "burst {burst}: the sender gets nothing back:\n{}",
            alice.dump()
        );
        assert!(
            alice2.since(mark.1, "typing").is_empty(),
            "burst {burst}: the sender's other tab gets nothing:\n{}",
            alice2.dump()
        );
    }
    assert_eq!(bob.since(0, "typing").len(), 2, "{}", bob.dump());
    assert_eq!(a.metric("chat_rate_limited_total"), 0.0);
    assert_eq!(b.metric("chat_rate_limited_total"), 0.0);

    // The connection stays.
    alice.client.send("still here", "s1");
    alice.until("alice's message back", TIMEOUT, |t| {
        t.frames.iter().any(|f| f["cid"] == "s1")
    });
    let back = alice.frames.iter().find(|f| f["cid"] == "s1").unwrap();
    assert_eq!(back["type"], "message", "{back}");
}

#[test]
fn presence_recovers_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-restart"));
    let room = "lobby";
    let mut alice = Tracker::join(&a, "alice", room);
    let mut bob = Tracker::join(&b, "bob", room);
    let mut carol = Tracker::join(&a, "carol", room);
    let mut dave = Tracker::join(&b, "dave", room);
    for tracker in [&mut alice, &mut bob, &mut carol, &mut dave] {
        tracker.converge(&["alice", "bob", "carol", "dave"]);
    }

    // Redis dies; dave leaves while it is down; Redis comes back empty.
    redis.kill();
    dave.hang_up();
    b.wait_metric("chat_clients_connected", 1.0);
    let marks = [alice.frames.len(), bob.frames.len(), carol.frames.len()];
    redis.restart();
    a.wait_ready();
    b.wait_ready();

    let expected = names(&["alice", "bob", "carol"]);
    for (tracker, mark) in [&mut alice, &mut bob, &mut carol].into_iter().zip(marks) {
        tracker.until(
            "a fresh snapshot, status up, and the members still connected",
            TIMEOUT,
            |t| {
                !t.since(mark, "presence").is_empty()
                    && t.since(mark, "status")
                        .iter()
                        .any(|f| f["delivery"] == "up")
                    && t.members == expected
            },
        );
        let fresh = rows(tracker.since(mark, "presence")[0]);
        let listed: BTreeSet<String> = fresh.iter().map(|r| r.0.clone()).collect();
        if listed != expected {
            eprintln!(
                "{}: the fresh snapshot listed {listed:?}; events completed it",
                tracker.who
            );
        }
        assert!(
            !listed.contains("dave"),
            "{}: dave left while Redis was down: {fresh:?}",
            tracker.who
        );
    }

    let erin = Tracker::join(&b, "erin", room);
    assert_eq!(
        erin.rows(),
        [
            row("alice", &["a"], 1),
            row("bob", &["b"], 1),
            row("carol", &["a"], 1),
            row("erin", &["b"], 1)
        ],
        "a newcomer's snapshot after the restart"
    );
}

#[test]
fn a_snapshot_lists_at_most_the_limit_and_says_how_many_more() {
    let redis = RedisServer::start();
    let prefix = unique("presence-max");
    let limit = ["--presence-max-members", "3"];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &limit);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &limit);
    a.wait_ready();
    b.wait_ready();
    let room = "lobby";

    let everyone = [
        row("ann", &["a"], 1),
        row("ben", &["b"], 1),
        row("cat", &["a"], 1),
        row("dan", &["b"], 1),
        row("eve", &["a"], 1),
    ];
    let mut ann = Tracker::join(&a, "ann", room);
    let mut joined = vec![ann.rows()];
    let mut more = vec![ann.more()];
    // Kept connected until the end.
    let mut others = Vec::new();
    for (n, name) in ["ben", "cat", "dan", "eve"].into_iter().enumerate() {
        let instance = if n % 2 == 0 { &b } else { &a };
        let tracker = Tracker::join(instance, name, room);
        joined.push(tracker.rows());
        more.push(tracker.more());
        others.push(tracker);
        // Events are not limited: ann learns of everyone.
        let expected: Vec<&str> = everyone[..n + 2].iter().map(|r| r.0.as_str()).collect();
        ann.converge(&expected);
    }
    let counts: Vec<usize> = joined.iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 2, 3, 3, 3], "members listed: {joined:?}");
    assert_eq!(more, [0, 0, 0, 1, 2], "members left out: {joined:?}");
    for rows in &joined {
        for listed in rows {
            assert!(
                everyone.contains(listed),
                "{listed:?} is not one of {everyone:?}"
            );
        }
    }
}

/// A small deterministic generator (xorshift): the interleavings differ
/// from run to run of the scheduler, not of the test's choices.
struct Jitter(u64);

impl Jitter {
    fn millis(&mut self, below: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(self.0 % below)
    }
}

#[test]
fn joins_and_leaves_racing_the_refresh_never_produce_a_wrong_event() {
    use common::fault_proxy::{Fault, FaultProxy, Scope, Select};
    const TABS: usize = 4;
    const CYCLES: usize = 50;
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], redis.port)));
    // Redis 15 ms away from instance a: every script a runs takes a round
    // trip of 30 ms, long enough for a join or a leave to land in the
    // middle of a refresh.
    proxy.inject(
        Select::All,
        Fault::Latency(Duration::from_millis(15)),
        Scope::AlsoNew,
    );
    let prefix = unique("race");
    // A refresh every 300 ms: dozens of them meet the joins and leaves,
    // and a live member has 600 ms of margin before it would expire.
    let ttl = ["--presence-ttl-ms", "900"];
    let a = Instance::redis_with("a", &proxy.url(), &prefix, &ttl);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &ttl);
    a.wait_ready();
    b.wait_ready();
    let room = unique("room");
    let mut watcher = Tracker::join(&b, "watcher", &room);

    // TABS names each join and leave CYCLES times on a, concurrently.
    let tabs: Vec<std::thread::JoinHandle<()>> = (0..TABS)
        .map(|tab| {
            let ws = a.ws;
            let room = room.clone();
            std::thread::spawn(move || {
                let mut jitter = Jitter(0x9E37_79B9_7F4A_7C15 ^ (tab as u64 + 1));
                for _ in 0..CYCLES {
                    let client = Client::connect(ws, &format!("name=u{tab}&room={room}"));
                    std::thread::sleep(jitter.millis(40));
                    let tracker = Tracker {
                        who: format!("u{tab}"),
                        room: room.clone(),
                        client,
                        frames: Vec::new(),
                        members: BTreeSet::new(),
                        snapshot: Value::Null,
                    };
                    tracker.hang_up();
                    std::thread::sleep(jitter.millis(20));
                }
            })
        })
        .collect();
    while tabs.iter().any(|tab| !tab.is_finished()) {
        watcher.read(Duration::from_millis(100));
    }
    for tab in tabs {
        tab.join().expect("a tab failed");
    }
    // Longer than the TTL and two refreshes: a phantom join would have
    // expired by now, and said so.
    watcher.watch(Duration::from_millis(1500));

    let expired: Vec<&Value> = watcher
        .since(0, "leave")
        .into_iter()
        .filter(|f| f["reason"] == "expired")
        .collect();
    assert!(
        expired.is_empty(),
        "members of a live instance expired (a refresh undid a leave): {expired:?}"
    );
    for tab in 0..TABS {
        let name = format!("u{tab}");
        let kinds: Vec<&str> = watcher
            .frames
            .iter()
            .filter(|f| {
                f["name"] == name.as_str() && matches!(f["type"].as_str(), Some("join" | "leave"))
            })
            .map(|f| f["type"].as_str().unwrap())
            .collect();
        let alternate = kinds
            .iter()
            .enumerate()
            .all(|(n, kind)| *kind == if n % 2 == 0 { "join" } else { "leave" });
        assert!(
            alternate && kinds.len() == 2 * CYCLES,
            "{name}: {CYCLES} visits should read join, leave, ... {} times: {kinds:?}",
            2 * CYCLES
        );
    }
    watcher.converge(&["watcher"]);
    let rows = wait_for_snapshot(&b, &room, "the watcher alone (and the probe)", |rows| {
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>() == ["probe", "watcher"]
    });
    println!(
        "FIGURES presence race: {} tabs x {CYCLES} joins and leaves on an instance 15 ms from Redis, refresh every 300 ms: {} join and {} leave events, none expired, each name alternating; final list {rows:?}",
        TABS,
        watcher.since(0, "join").len(),
        watcher.since(0, "leave").len()
    );
}
