//! Verifies presence over the wire (docs/PROTOCOL.md, `presence`,
//! `presence_diff`, `members`), on real instances and a real Redis.
//!
//! Small rooms (at most `--presence-full-list-max` members): every client
//! gets the room whole after `welcome` and before history, then every
//! join, leave and change, coalesced into one `presence_diff` per
//! interval; several tabs with one name are one member; a SIGKILLed
//! instance's members expire everywhere within the TTL; `typing` reaches
//! the others, not the sender, and is throttled silently; after a Redis
//! restart each client gets one fresh list; a newcomer to a room of 8,500
//! gets it whole when `--presence-max-members 10000` allows it.
//!
//! Large rooms: each client holds the count and a window, asks for another
//! with `members`, and hears only of its window's changes; after a join
//! storm, churn, a Redis restart and an instance's crash, on two
//! instances, every client's count and window are exact, and the crash's
//! mass expiry costs each client a few frames.
//!
//! Every client checks each frame against the contract as it applies it:
//! a whole list always matches its count.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Client, Instance, RedisServer, TIMEOUT, two_instances, unique};
use serde_json::{Value, json};
use tungstenite::Message;

/// One member as a list shows it: instances (sorted) and connections.
type Row = (Vec<String>, u64);

fn row(instances: &[&str], connections: u64) -> Row {
    (
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

/// A list of members in a frame, checked against the contract: sorted by
/// name, each with its instances sorted, at least one connection per
/// instance.
fn rows(frame: &Value, field: &str) -> Vec<(String, Row)> {
    let members = frame[field]
        .as_array()
        .unwrap_or_else(|| panic!("no `{field}` array in {frame}"));
    let rows: Vec<(String, Row)> = members.iter().map(|m| parse_member(m, frame)).collect();
    assert!(
        rows.windows(2).all(|w| w[0].0 < w[1].0),
        "`{field}` not sorted by name (or a name twice): {frame}"
    );
    rows
}

fn parse_member(member: &Value, frame: &Value) -> (String, Row) {
    let name = member["name"]
        .as_str()
        .unwrap_or_else(|| panic!("member without a name in {frame}"));
    let instances: Vec<String> = member["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("member without instances in {frame}"))
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    let connections = member["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("member without connections in {frame}"));
    assert!(
        !instances.is_empty() && instances.windows(2).all(|w| w[0] < w[1]),
        "{name}: instances not sorted, empty or repeated: {frame}"
    );
    assert!(
        connections >= instances.len() as u64,
        "{name}: fewer connections than instances: {frame}"
    );
    (name.to_string(), (instances, connections))
}

/// A client that keeps every frame it reads and follows the room's member
/// list as the protocol says a client should: a `presence` replaces what
/// it holds, a `presence_diff` updates it (joins and changes upserted,
/// leaves removed, idempotently; or a new window, whole).
struct Follower {
    who: String,
    room: String,
    client: Client,
    /// Every frame after `welcome`, in order.
    frames: Vec<Value>,
    /// What it holds: the whole room, or its window.
    held: BTreeMap<String, Row>,
    full: bool,
    count: u64,
    offset: u64,
    /// The first `presence` frame.
    snapshot: Value,
}

impl Follower {
    /// Connects as `name` to `room`, and reads until the first `presence`
    /// frame, which must come before any history message.
    fn join(instance: &Instance, name: &str, room: &str) -> Self {
        let client = instance.client(name, room);
        Self::follow(client, instance, name, room)
    }

    fn follow(client: Client, instance: &Instance, name: &str, room: &str) -> Self {
        let who = format!(
            "{name}@{}({})",
            instance.id,
            client.welcome["client"].as_str().unwrap_or("?")
        );
        let mut follower = Follower {
            who,
            room: room.to_string(),
            client,
            frames: Vec::new(),
            held: BTreeMap::new(),
            full: true,
            count: 0,
            offset: 0,
            snapshot: Value::Null,
        };
        let snapshot = follower.next_of_type("presence");
        for frame in &follower.frames[..follower.frames.len() - 1] {
            assert!(
                !matches!(frame["type"].as_str(), Some("message" | "error")),
                "{}: {frame} arrived before the member list",
                follower.who
            );
        }
        follower.snapshot = snapshot;
        follower
    }

    /// The members of the first `presence` frame.
    fn first_rows(&self) -> Vec<(String, Row)> {
        rows(&self.snapshot, "members")
    }

    /// The names it holds.
    fn members(&self) -> BTreeSet<String> {
        self.held.keys().cloned().collect()
    }

    /// Reads one frame within `wait`, checks it, and applies it.
    fn read(&mut self, wait: Duration) -> Option<Value> {
        let frame = next_frame(&mut self.client, &self.who, wait)?;
        self.apply(&frame);
        self.frames.push(frame.clone());
        Some(frame)
    }

    fn apply(&mut self, frame: &Value) {
        let who = self.who.clone();
        let kind = frame["type"].as_str().unwrap_or("");
        if matches!(kind, "presence" | "presence_diff" | "typing") {
            assert_eq!(
                frame["room"],
                self.room.as_str(),
                "{who}: wrong room: {frame}"
            );
        }
        match kind {
            "presence" => {
                let count = frame["count"].as_u64().expect("presence without count");
                let full = frame["full"].as_bool().expect("presence without full");
                let offset = frame["offset"].as_u64().expect("presence without offset");
                self.held = rows(frame, "members").into_iter().collect();
                assert_eq!(
                    frame["more"].as_u64(),
                    Some(count - self.held.len() as u64),
                    "{who}: `more` is count minus the listed: {frame}"
                );
                if full {
                    assert_eq!(offset, 0, "{who}: a whole room starts at 0: {frame}");
                }
                (self.count, self.full, self.offset) = (count, full, offset);
            }
            "presence_diff" => {
                self.count = frame["count"].as_u64().expect("diff without count");
                let lists = ["joins", "leaves", "changed"];
                if lists.iter().any(|list| frame.get(list).is_some()) {
                    assert!(
                        self.full,
                        "{who}: joins and leaves in a large room: {frame}"
                    );
                    assert!(frame.get("members").is_none(), "{who}: {frame}");
                }
                for list in ["joins", "changed"] {
                    if frame.get(list).is_some() {
                        for (name, row) in rows(frame, list) {
                            self.held.insert(name, row);
                        }
                    }
                }
                if let Some(leaves) = frame.get("leaves") {
                    for leave in leaves.as_array().expect("leaves is an array") {
                        assert!(leave["instance"].is_string(), "{who}: {frame}");
                        assert!(
                            matches!(leave["reason"].as_str(), Some("left" | "expired")),
                            "{who}: a leave with an unknown reason: {frame}"
                        );
                        self.held
                            .remove(leave["name"].as_str().expect("a leave's name"));
                    }
                }
                if frame.get("members").is_some() {
                    assert!(!self.full, "{who}: a window in a small room: {frame}");
                    self.offset = frame["offset"].as_u64().expect("a window's offset");
                    self.held = rows(frame, "members").into_iter().collect();
                }
                if frame.get("added").is_some() || frame.get("removed").is_some() {
                    assert!(
                        !self.full,
                        "{who}: a window change in a small room: {frame}"
                    );
                    assert!(frame.get("members").is_none(), "{who}: {frame}");
                    assert_eq!(
                        frame["offset"].as_u64(),
                        Some(self.offset),
                        "{who}: a window change is to the window held: {frame}"
                    );
                    for name in frame
                        .get("removed")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let name = name.as_str().expect("a removed name");
                        assert!(
                            self.held.remove(name).is_some(),
                            "{who}: {name} removed from a window that did not hold it: {frame}"
                        );
                    }
                    if frame.get("added").is_some() {
                        for (name, row) in rows(frame, "added") {
                            self.held.insert(name, row);
                        }
                    }
                }
            }
            "typing" => {
                assert!(frame["name"].is_string(), "{who}: {frame}");
            }
            _ => {}
        }
        if matches!(kind, "presence" | "presence_diff") {
            if self.full {
                assert_eq!(
                    self.held.len() as u64,
                    self.count,
                    "{who}: the whole list does not match its count after {frame}:\n{:?}",
                    self.held
                );
            } else {
                assert!(
                    self.held.len() as u64 <= self.count,
                    "{who}: a window longer than the room after {frame}"
                );
            }
        }
    }

    fn dump(&self) -> String {
        let frames: Vec<String> = self.frames.iter().map(|f| f.to_string()).collect();
        let shown = frames.len().min(60);
        format!(
            "(last {shown} of {} frames)\n{}",
            frames.len(),
            frames[frames.len() - shown..].join("\n")
        )
    }

    /// Reads until `check` holds; panics after `within`.
    fn until(&mut self, what: &str, within: Duration, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no {what} within {within:?}; count {}, held {:?}; frames:\n{}",
                self.who,
                self.count,
                self.members(),
                self.dump()
            );
            self.read(left);
        }
    }

    /// Reads until the members it holds are exactly `expected` (a small
    /// room).
    fn converge(&mut self, expected: &[&str]) {
        let expected = names(expected);
        self.until(&format!("member list {expected:?}"), TIMEOUT, |f| {
            f.full && f.members() == expected
        });
    }

    /// Reads until its count is `room.len()` and its window is exactly
    /// the room's members from its offset (a large room, `window` wide).
    fn converge_window(&mut self, room: &BTreeSet<String>, window: usize, within: Duration) {
        self.until(
            &format!("count {} and its window of the room", room.len()),
            within,
            |f| {
                let expected: BTreeSet<String> = room
                    .iter()
                    .skip(f.offset as usize)
                    .take(window)
                    .cloned()
                    .collect();
                !f.full && f.count == room.len() as u64 && f.members() == expected
            },
        );
    }

    /// Reads until a frame of type `kind` arrives, and returns it.
    fn next_of_type(&mut self, kind: &str) -> Value {
        let mark = self.frames.len();
        self.until(&format!("`{kind}` frame"), TIMEOUT, |f| {
            f.frames[mark..].iter().any(|frame| frame["type"] == kind)
        });
        self.frames[mark..]
            .iter()
            .find(|frame| frame["type"] == kind)
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

    /// Every entry of a diff list (`joins`, `leaves`, `changed`) naming
    /// `name`, from index `mark` on.
    fn listed_in(&self, mark: usize, list: &str, name: &str) -> Vec<Value> {
        self.since(mark, "presence_diff")
            .into_iter()
            .filter_map(|f| f.get(list).and_then(Value::as_array))
            .flatten()
            .filter(|entry| entry["name"] == name)
            .cloned()
            .collect()
    }

    fn send_typing(&mut self) {
        self.client
            .send_raw(Message::text(json!({"type": "typing"}).to_string()));
    }

    fn ask_members(&mut self, request: Value) {
        self.client.send_raw(Message::text(request.to_string()));
    }

    /// Closes the connection and reads until the server's answer.
    fn hang_up(self) {
        hang_up(self.client, &self.who);
    }
}

fn hang_up(mut client: Client, who: &str) {
    let _ = client.socket.close(None);
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        client.set_read_timeout(Duration::from_millis(200));
        match client.socket.read() {
            Ok(_) => continue,
            Err(e) if common::timed_out(&e) => continue,
            Err(_) => return,
        }
    }
    panic!("{who}: the server never answered the close");
}

/// Connects newcomers named `probe` to `room` on `instance`, one at a time
/// (each reads its first list and hangs up), until one's list satisfies
/// `check`; returns that list.
fn wait_for_list(
    instance: &Instance,
    room: &str,
    what: &str,
    check: impl Fn(&BTreeMap<String, Row>) -> bool,
) -> BTreeMap<String, Row> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let probe = Follower::join(instance, "probe", room);
        let held = probe.held.clone();
        probe.hang_up();
        if check(&held) {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "no first list on {} showed {what}; the last: {held:?}",
            instance.id
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Clients connected to `room` at once, from several threads (a storm):
/// `names` on `instance`; each is connected when this returns, and has
/// read its welcome (nothing else).
fn connect_storm(instance: &Instance, room: &str, names: &[String]) -> Vec<Client> {
    const THREADS: usize = 8;
    let start = Arc::new(Barrier::new(THREADS));
    let chunks: Vec<Vec<String>> = names
        .chunks(names.len().div_ceil(THREADS))
        .map(|chunk| chunk.to_vec())
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (ws, room, start) = (instance.ws, room.to_string(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                chunk
                    .iter()
                    .map(|name| Client::connect(ws, &format!("name={name}&room={room}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Fewer chunks than threads: the rest of the barrier.
    for _ in handles.len()..THREADS {
        start.wait();
    }
    handles
        .into_iter()
        .flat_map(|handle| handle.join().expect("a storm thread failed"))
        .collect()
}

#[test]
fn members_on_two_instances_see_one_list() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-list"));
    let room = "lobby";

    let mut alice = Follower::join(&a, "alice", room);
    assert_eq!(
        alice.first_rows(),
        [("alice".to_string(), row(&["a"], 1))],
        "the first list includes the client itself"
    );
    assert_eq!(alice.snapshot["full"], true);
    assert_eq!(alice.snapshot["count"], 1);
    let mut bob = Follower::join(&b, "bob", room);
    alice.converge(&["alice", "bob"]);
    bob.converge(&["alice", "bob"]);

    // A message in history, so that "the list before history" is tested.
    alice.client.send("hello", "h1");
    alice.until("alice's own message", TIMEOUT, |f| {
        f.frames.iter().any(|frame| frame["type"] == "message")
    });

    let mut carol = Follower::join(&a, "carol", room);
    assert_eq!(
        carol.first_rows(),
        [
            ("alice".to_string(), row(&["a"], 1)),
            ("bob".to_string(), row(&["b"], 1)),
            ("carol".to_string(), row(&["a"], 1))
        ],
        "carol's first list: everyone, over both instances"
    );
    assert_eq!(carol.snapshot["more"], 0);
    let history = carol.next_of_type("message");
    assert_eq!(history["text"], "hello", "history follows the list");

    for follower in [&mut alice, &mut bob, &mut carol] {
        follower.converge(&["alice", "bob", "carol"]);
    }
    for follower in [&mut alice, &mut bob, &mut carol] {
        follower.settle(Duration::from_millis(800));
        assert_eq!(
            follower.since(0, "presence").len(),
            1,
            "{}: one whole list, then changes:\n{}",
            follower.who,
            follower.dump()
        );
        for name in ["alice", "bob", "carol"] {
            assert!(
                follower.listed_in(0, "joins", name).len() <= 1,
                "{}: {name} joined twice:\n{}",
                follower.who,
                follower.dump()
            );
            assert!(
                follower.listed_in(0, "leaves", name).is_empty(),
                "{}: nobody left:\n{}",
                follower.who,
                follower.dump()
            );
        }
    }
    for (name, instance) in [("bob", "b"), ("carol", "a")] {
        let joins = alice.listed_in(0, "joins", name);
        assert_eq!(joins.len(), 1, "alice saw {name} join once");
        assert_eq!(joins[0]["instances"], json!([instance]), "{}", joins[0]);
    }
    let carol_on_b = bob.listed_in(0, "joins", "carol");
    assert_eq!(carol_on_b.len(), 1, "bob saw carol join once");
    assert_eq!(carol_on_b[0]["instances"], json!(["a"]));

    let dave = Follower::join(&b, "dave", room);
    assert_eq!(
        dave.members(),
        names(&["alice", "bob", "carol", "dave"]),
        "a newcomer's first list"
    );
}

#[test]
fn a_join_storm_reaches_each_client_as_one_frame_per_interval() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-storm"));
    let room = "lobby";
    let mut watcher = Follower::join(&a, "watcher", room);
    let mark = watcher.frames.len();

    let started = Instant::now();
    let names_a: Vec<String> = (0..30).map(|n| format!("a{n:02}")).collect();
    let names_b: Vec<String> = (0..30).map(|n| format!("b{n:02}")).collect();
    let (on_a, on_b) = std::thread::scope(|scope| {
        let on_a = scope.spawn(|| connect_storm(&a, room, &names_a));
        let on_b = scope.spawn(|| connect_storm(&b, room, &names_b));
        (on_a.join().unwrap(), on_b.join().unwrap())
    });
    let mut everyone: Vec<&str> = names_a.iter().chain(&names_b).map(String::as_str).collect();
    everyone.push("watcher");
    watcher.converge(&everyone);
    let took = started.elapsed();
    let diffs = watcher.since(mark, "presence_diff").len();
    // One frame per 500 ms interval at most, plus the interval in which
    // the storm began and the one in which it ended.
    let bound = (took.as_millis() / 500) as usize + 2;
    println!(
        "FIGURES presence storm: 60 joins over two instances in {took:?} reached a watcher as {diffs} presence_diff frames (bound {bound})"
    );
    assert!(
        diffs <= bound,
        "{diffs} frames for 60 joins in {took:?}: not coalesced:\n{}",
        watcher.dump()
    );
    assert_eq!(
        watcher.held["a00"],
        row(&["a"], 1),
        "joins carry their instances"
    );
    assert_eq!(watcher.held["b29"], row(&["b"], 1));
    drop((on_a, on_b));
    watcher.converge(&["watcher"]);
}

#[test]
fn two_tabs_with_one_name_count_once_and_leave_at_the_last() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-tabs"));
    let room = "lobby";

    let mut watcher = Follower::join(&b, "watcher", room);
    let tab1 = Follower::join(&a, "alice", room);
    watcher.converge(&["alice", "watcher"]);
    let tab2 = Follower::join(&a, "alice", room);
    assert_eq!(
        tab2.held["alice"],
        row(&["a"], 2),
        "the second tab's list counts both tabs"
    );
    let tab3 = Follower::join(&b, "alice", room);
    assert_eq!(
        tab3.held["alice"],
        row(&["a", "b"], 3),
        "three tabs on two instances are one member"
    );
    watcher.until("alice's three tabs", TIMEOUT, |f| {
        f.held.get("alice") == Some(&row(&["a", "b"], 3))
    });
    assert_eq!(
        watcher.listed_in(0, "joins", "alice").len(),
        1,
        "one join for three tabs (the others are changes):\n{}",
        watcher.dump()
    );

    // Close the tabs on a: alice stays, on b only.
    tab1.hang_up();
    watcher.until("alice with 2 connections", TIMEOUT, |f| {
        f.held.get("alice") == Some(&row(&["a", "b"], 2))
    });
    tab2.hang_up();
    watcher.until("alice on b only", TIMEOUT, |f| {
        f.held.get("alice") == Some(&row(&["b"], 1))
    });
    watcher.settle(Duration::from_millis(800));
    assert!(
        watcher.listed_in(0, "leaves", "alice").is_empty(),
        "no leave while a tab remains:\n{}",
        watcher.dump()
    );

    // The last tab goes: alice leaves, from b.
    let mark = watcher.frames.len();
    tab3.hang_up();
    watcher.until("alice's leave", TIMEOUT, |f| !f.held.contains_key("alice"));
    let leaves = watcher.listed_in(mark, "leaves", "alice");
    assert_eq!(leaves.len(), 1, "{}", watcher.dump());
    assert_eq!(leaves[0]["reason"], "left");
    assert_eq!(
        leaves[0]["instance"], "b",
        "the instance where the last tab was"
    );
    let list = wait_for_list(&a, room, "no alice", |held| !held.contains_key("alice"));
    assert_eq!(list["watcher"], row(&["b"], 1));
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

    let mut olga = Follower::join(&a, "olga", room);
    let _bob = Follower::join(&b, "bob", room);
    let _dave_a = Follower::join(&a, "dave", room);
    olga.converge(&["bob", "dave", "olga"]);
    let dave_b = Follower::join(&b, "dave", room);
    assert_eq!(dave_b.held["dave"], row(&["a", "b"], 2));
    olga.until("dave's second tab", TIMEOUT, |f| {
        f.held["dave"] == row(&["a", "b"], 2)
    });

    let mark = olga.frames.len();
    let killed = Instant::now();
    b.kill();
    // ttl 1.5 s + one refresh interval (0.5 s) + a diff interval (1 s), with
    // room to spare.
    olga.until("bob's expiry", Duration::from_secs(6), |f| {
        !f.held.contains_key("bob")
    });
    eprintln!("bob expired {:?} after the kill", killed.elapsed());
    let leaves = olga.listed_in(mark, "leaves", "bob");
    assert_eq!(leaves.len(), 1, "{}", olga.dump());
    assert_eq!(leaves[0]["reason"], "expired");
    assert_eq!(leaves[0]["instance"], "b");
    assert_eq!(
        olga.held["dave"],
        row(&["a"], 1),
        "dave's tab on b is gone, his tab on a stays"
    );

    // Members of the live instance are refreshed and stay: watch past
    // another ttl and refresh interval.
    olga.watch(Duration::from_secs(2));
    for name in ["dave", "olga"] {
        assert!(
            olga.listed_in(0, "leaves", name).is_empty(),
            "{name} is still connected on a:\n{}",
            olga.dump()
        );
    }
    let nina = Follower::join(&a, "nina", room);
    assert_eq!(
        nina.first_rows(),
        [
            ("dave".to_string(), row(&["a"], 1)),
            ("nina".to_string(), row(&["a"], 1)),
            ("olga".to_string(), row(&["a"], 1))
        ],
        "a newcomer's list after b died"
    );
}

#[test]
fn typing_reaches_the_others_not_the_sender_and_is_throttled() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-typing"));
    let room = "lobby";
    let mut alice = Follower::join(&a, "alice", room);
    let mut bob = Follower::join(&b, "bob", room);
    let mut alice2 = Follower::join(&b, "alice", room);
    for follower in [&mut alice, &mut bob, &mut alice2] {
        follower.converge(&["alice", "bob"]);
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
    alice.until("alice's message back", TIMEOUT, |f| {
        f.frames.iter().any(|frame| frame["cid"] == "s1")
    });
    let back = alice.frames.iter().find(|f| f["cid"] == "s1").unwrap();
    assert_eq!(back["type"], "message", "{back}");
}

#[test]
fn after_a_redis_restart_each_client_gets_one_fresh_list() {
    let mut redis = RedisServer::start();
    let (a, b) = two_instances(&redis, &unique("presence-restart"));
    let room = "lobby";
    let mut alice = Follower::join(&a, "alice", room);
    let mut bob = Follower::join(&b, "bob", room);
    let mut carol = Follower::join(&a, "carol", room);
    let mut dave = Follower::join(&b, "dave", room);
    for follower in [&mut alice, &mut bob, &mut carol, &mut dave] {
        follower.converge(&["alice", "bob", "carol", "dave"]);
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
    for (follower, mark) in [&mut alice, &mut bob, &mut carol].into_iter().zip(marks) {
        follower.until(
            "a fresh list, status up, and the members still connected",
            TIMEOUT,
            |f| {
                !f.since(mark, "presence").is_empty()
                    && f.since(mark, "status")
                        .iter()
                        .any(|frame| frame["delivery"] == "up")
                    && f.members() == expected
            },
        );
        follower.settle(Duration::from_millis(1500));
        assert_eq!(
            follower.since(mark, "presence").len(),
            1,
            "{}: one fresh list after the restart:\n{}",
            follower.who,
            follower.dump()
        );
        let fresh = rows(follower.since(mark, "presence")[0], "members");
        assert!(
            !fresh.iter().any(|(name, _)| name == "dave"),
            "{}: dave left while Redis was down: {fresh:?}",
            follower.who
        );
        for name in ["alice", "bob", "carol"] {
            assert!(
                follower.listed_in(mark, "leaves", name).is_empty(),
                "{}: {name} never left:\n{}",
                follower.who,
                follower.dump()
            );
        }
    }

    let erin = Follower::join(&b, "erin", room);
    assert_eq!(
        erin.first_rows(),
        [
            ("alice".to_string(), row(&["a"], 1)),
            ("bob".to_string(), row(&["b"], 1)),
            ("carol".to_string(), row(&["a"], 1)),
            ("erin".to_string(), row(&["b"], 1))
        ],
        "a newcomer's list after the restart"
    );
}

#[test]
fn a_large_room_is_a_count_and_a_window_the_client_can_move() {
    let redis = RedisServer::start();
    let prefix = unique("presence-window");
    let limits = [
        "--presence-full-list-max",
        "4",
        "--presence-max-members",
        "10",
    ];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &limits);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &limits);
    a.wait_ready();
    b.wait_ready();
    let room = "big";

    let mut kim = Follower::join(&a, "kim", room);
    let mut others: Vec<Follower> = Vec::new();
    for (n, name) in ["ben", "dan", "eve"].into_iter().enumerate() {
        let instance = if n % 2 == 0 { &b } else { &a };
        others.push(Follower::join(instance, name, room));
    }
    kim.converge(&["ben", "dan", "eve", "kim"]);
    assert!(kim.full);

    // The fifth member: the room is large now, and everyone gets it
    // afresh: the count and the first four.
    let mark = kim.frames.len();
    let mut room_now = names(&["ben", "dan", "eve", "kim", "ray"]);
    let ray = Follower::join(&b, "ray", room);
    assert_eq!(ray.snapshot["full"], false, "{}", ray.snapshot);
    assert_eq!(ray.snapshot["count"], 5);
    assert_eq!(ray.snapshot["more"], 1);
    kim.converge_window(&room_now, 4, TIMEOUT);
    let crossed = kim.since(mark, "presence");
    assert_eq!(crossed.len(), 1, "{}", kim.dump());
    assert_eq!(crossed[0]["full"], false);

    // A name after the window changes only the count.
    let mark = kim.frames.len();
    let _zed = Follower::join(&a, "zed", room);
    room_now.insert("zed".into());
    kim.converge_window(&room_now, 4, TIMEOUT);
    let diffs = kim.since(mark, "presence_diff");
    assert!(
        diffs.iter().all(|f| f.get("members").is_none()),
        "zed is past kim's window: {diffs:?}"
    );
    // A name before it moves the window: what entered and left it comes,
    // not the window whole.
    let mark = kim.frames.len();
    let _abe = Follower::join(&b, "abe", room);
    room_now.insert("abe".into());
    kim.converge_window(&room_now, 4, TIMEOUT);
    let moved = kim.since(mark, "presence_diff");
    assert!(
        moved.iter().any(|f| f["offset"] == 0
            && f["added"][0]["name"] == "abe"
            && f["removed"] == json!(["kim"])
            && f.get("members").is_none()),
        "{}",
        kim.dump()
    );

    // Another window: from 3, three members.
    kim.ask_members(json!({"type": "members", "offset": 3, "limit": 3, "cid": "w1"}));
    let answer = kim.next_of_type("presence");
    assert_eq!(answer["offset"], 3, "{answer}");
    assert_eq!(answer["count"], room_now.len());
    let listed: Vec<String> = rows(&answer, "members").into_iter().map(|r| r.0).collect();
    let expected: Vec<String> = room_now.iter().skip(3).take(3).cloned().collect();
    assert_eq!(listed, expected, "the window asked for");
    assert_eq!(answer["more"], room_now.len() - 3);
    // Changes in it come whole; the first window is no longer followed.
    let mark = kim.frames.len();
    ray.hang_up();
    room_now.remove("ray");
    kim.converge_window(&room_now, 3, TIMEOUT);
    let moved = kim.since(mark, "presence_diff");
    assert!(
        moved.iter().any(|f| f["offset"] == 3),
        "ray was in kim's window: {moved:?}"
    );

    // Bad windows: a clear error, with the cid, and the window stays.
    for (request, says) in [
        (json!({"type": "members", "limit": 0, "cid": "w2"}), "limit"),
        (json!({"type": "members", "limit": 11, "cid": "w3"}), "10"),
        (
            json!({"type": "members", "offset": -1, "cid": "w4"}),
            "members",
        ),
    ] {
        let cid = request["cid"].clone();
        kim.ask_members(request);
        let error = kim.next_of_type("error");
        assert_eq!(error["code"], "bad_request", "{error}");
        assert_eq!(error["cid"], cid, "{error}");
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    assert_eq!(kim.offset, 3);

    // Back to four members: the room is small again, whole, for everyone.
    let mark = kim.frames.len();
    for follower in others.drain(..) {
        follower.hang_up();
    }
    kim.converge(&["abe", "kim", "zed"]);
    let fresh = kim.since(mark, "presence");
    assert_eq!(fresh.len(), 1, "{}", kim.dump());
    assert_eq!(fresh[0]["full"], true);
}

#[test]
fn a_large_room_stays_exact_through_a_storm_churn_a_redis_restart_and_a_crash() {
    const WINDOW: usize = 20;
    let mut redis = RedisServer::start();
    let prefix = unique("presence-large");
    let options = [
        "--presence-full-list-max",
        "20",
        "--presence-ttl-ms",
        "1500",
    ];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &options);
    let mut b = Instance::redis_with("b", &redis.url(), &prefix, &options);
    a.wait_ready();
    b.wait_ready();
    let room = "arena";
    // Observers sort after every member: windows hold members only.
    let mut watch_a = Follower::join(&a, "zz-watch-a", room);
    let mut watch_b = Follower::join(&b, "zz-watch-b", room);
    let mut room_now = names(&["zz-watch-a", "zz-watch-b"]);

    // A storm: 120 members at once, half on each instance.
    let on_a: Vec<String> = (0..60).map(|n| format!("m{:03}", 2 * n)).collect();
    let on_b: Vec<String> = (0..60).map(|n| format!("m{:03}", 2 * n + 1)).collect();
    let marks = [watch_a.frames.len(), watch_b.frames.len()];
    let started = Instant::now();
    let (mut clients_a, mut clients_b) = std::thread::scope(|scope| {
        let on_a = scope.spawn(|| connect_storm(&a, room, &on_a));
        let on_b = scope.spawn(|| connect_storm(&b, room, &on_b));
        (on_a.join().unwrap(), on_b.join().unwrap())
    });
    room_now.extend(on_a.iter().chain(&on_b).cloned());
    for watcher in [&mut watch_a, &mut watch_b] {
        watcher.converge_window(&room_now, WINDOW, TIMEOUT);
    }
    let took = started.elapsed();
    for (watcher, mark) in [&watch_a, &watch_b].into_iter().zip(marks) {
        let frames = watcher.frames.len() - mark;
        let bound = (took.as_millis() / 500) as usize + 3;
        println!(
            "FIGURES presence large storm: 120 joins in {took:?}: {} got {frames} frames (bound {bound})",
            watcher.who
        );
        assert!(frames <= bound, "{}", watcher.dump());
    }
    assert_eq!(
        watch_a.held["m000"],
        row(&["a"], 1),
        "the window's members carry their instances"
    );
    assert_eq!(watch_a.held["m001"], row(&["b"], 1));

    // Churn: the first 20 of each instance leave (the window empties),
    // 20 new names come to each, concurrently.
    let leaving_a: Vec<Client> = clients_a.drain(..20).collect();
    let leaving_b: Vec<Client> = clients_b.drain(..20).collect();
    for client in leaving_a.iter().chain(&leaving_b) {
        let name = client.welcome["name"].as_str().unwrap().to_string();
        room_now.remove(&name);
    }
    let new_a: Vec<String> = (0..20).map(|n| format!("n{:03}", 2 * n)).collect();
    let new_b: Vec<String> = (0..20).map(|n| format!("n{:03}", 2 * n + 1)).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for client in leaving_a.into_iter().chain(leaving_b) {
                hang_up(client, "a leaving member");
            }
        });
        let joined_a = scope.spawn(|| connect_storm(&a, room, &new_a));
        let joined_b = scope.spawn(|| connect_storm(&b, room, &new_b));
        clients_a.extend(joined_a.join().unwrap());
        clients_b.extend(joined_b.join().unwrap());
    });
    room_now.extend(new_a.iter().chain(&new_b).cloned());
    for watcher in [&mut watch_a, &mut watch_b] {
        watcher.converge_window(&room_now, WINDOW, TIMEOUT);
    }

    // Redis restarts empty: every instance writes its members again, and
    // each client gets one fresh window.
    let marks = [watch_a.frames.len(), watch_b.frames.len()];
    redis.kill();
    redis.restart();
    a.wait_ready();
    b.wait_ready();
    for (watcher, mark) in [&mut watch_a, &mut watch_b].into_iter().zip(marks) {
        watcher.until("a fresh window", TIMEOUT, |f| {
            !f.since(mark, "presence").is_empty()
        });
        watcher.converge_window(&room_now, WINDOW, TIMEOUT);
        watcher.settle(Duration::from_millis(1500));
        assert_eq!(
            watcher.since(mark, "presence").len(),
            1,
            "{}: one fresh window:\n{}",
            watcher.who,
            watcher.dump()
        );
    }

    // Instance b dies with its 60 members (and a watcher): they expire.
    let mark = watch_a.frames.len();
    let killed = Instant::now();
    b.kill();
    drop(clients_b);
    room_now.retain(|name| {
        name == "zz-watch-a" || clients_a.iter().any(|c| c.welcome["name"] == name.as_str())
    });
    assert_eq!(room_now.len(), 61);
    watch_a.converge_window(&room_now, WINDOW, Duration::from_secs(8));
    let expired_in = killed.elapsed();
    let frames = watch_a.frames.len() - mark;
    println!(
        "FIGURES presence crash: 61 members of instance b expired from a's lists in {expired_in:?}, as {frames} frames"
    );
    assert!(
        frames <= 4,
        "a crash's mass expiry is a few frames, not one per member:\n{}",
        watch_a.dump()
    );
    drop(watch_b);
}

#[test]
fn with_presence_off_nothing_is_listed_written_or_relayed() {
    let redis = RedisServer::start();
    let prefix = unique("presence-off");
    let off = ["--presence", "off"];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &off);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &off);
    a.wait_ready();
    b.wait_ready();
    let mut alice = a.client("alice", "lobby");
    let mut bob = b.client("bob", "lobby");
    for (request, says) in [
        (json!({"type": "members", "cid": "m1"}), "presence is off"),
        (json!({"type": "typing"}), "presence is off"),
    ] {
        alice.send_raw(Message::text(request.to_string()));
        let error = next_frame(&mut alice, "alice", TIMEOUT).expect("an answer");
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["code"], "bad_request", "{error}");
        assert_eq!(
            error["cid"],
            request.get("cid").cloned().unwrap_or(Value::Null)
        );
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    alice.send("hello", "h1");
    let got = next_frame(&mut bob, "bob", TIMEOUT).expect("alice's message");
    assert_eq!(got["text"], "hello", "the first frame after welcome: {got}");
    bob.set_read_timeout(Duration::from_millis(1200));
    assert!(
        next_frame(&mut bob, "bob", Duration::from_millis(1200)).is_none(),
        "no presence frame ever"
    );
    let mut redis_client = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:presence*"))
        .query(&mut redis_client)
        .unwrap();
    let listed: Vec<&String> = keys.iter().filter(|key| key.contains("lobby")).collect();
    assert!(listed.is_empty(), "no member written: {listed:?}");
}

#[test]
fn a_local_instance_lists_its_own_clients() {
    let a = Instance::local("solo");
    let mut ann = Follower::join(&a, "ann", "lobby");
    let bob = Follower::join(&a, "bob", "lobby");
    assert_eq!(bob.members(), names(&["ann", "bob"]));
    ann.converge(&["ann", "bob"]);
    bob.hang_up();
    ann.converge(&["ann"]);
    let leaves = ann.listed_in(0, "leaves", "bob");
    assert_eq!(leaves[0]["instance"], "solo");
    assert_eq!(leaves[0]["reason"], "left");
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
fn joins_and_leaves_racing_the_refresh_never_expire_a_live_member() {
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
    let mut watcher = Follower::join(&b, "watcher", &room);

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
                    hang_up(client, &format!("u{tab}"));
                    std::thread::sleep(jitter.millis(20));
                }
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    while tabs.iter().any(|tab| !tab.is_finished()) {
        watcher.read(Duration::from_millis(100));
        seen.extend(watcher.members());
    }
    for tab in tabs {
        tab.join().expect("a tab failed");
    }
    // Longer than the TTL and two refreshes: a phantom join would have
    // expired by now, and said so.
    watcher.watch(Duration::from_millis(1500));

    let expired: Vec<Value> = (0..TABS)
        .flat_map(|tab| watcher.listed_in(0, "leaves", &format!("u{tab}")))
        .filter(|leave| leave["reason"] == "expired")
        .collect();
    assert!(
        expired.is_empty(),
        "members of a live instance expired (a refresh undid a leave): {expired:?}"
    );
    let diffs = watcher.since(0, "presence_diff").len();
    watcher.converge(&["watcher"]);
    let list = wait_for_list(&b, &room, "the watcher alone (and the probe)", |held| {
        held.keys().map(String::as_str).collect::<Vec<_>>() == ["probe", "watcher"]
    });
    println!(
        "FIGURES presence race: {TABS} tabs x {CYCLES} joins and leaves on an instance 15 ms from Redis, refresh every 300 ms: {diffs} presence_diff frames, names seen {seen:?}, none expired; final list {list:?}"
    );
}

#[test]
fn a_newcomer_to_a_room_of_8500_gets_the_whole_list_when_the_limits_allow_it() {
    // --presence-max-members 10000 once broke every snapshot past about
    // 8,000 names (Lua's unpack): the room's members are written here
    // as another, live instance's, so that only the snapshot is at stake.
    const MEMBERS: usize = 8500;
    let redis = RedisServer::start();
    let prefix = unique("presence-8500");
    let room = "crowd";
    let mut conn = redis.connection().unwrap();
    let mut pipe = redis::pipe();
    for chunk in (0..MEMBERS).collect::<Vec<_>>().chunks(1000) {
        let fields: Vec<(String, &str)> = chunk
            .iter()
            .map(|k| (format!("m{k:05}"), r#"{"ghost":1}"#))
            .collect();
        pipe.hset_multiple(format!("{prefix}:presence:{{{room}}}"), &fields)
            .ignore();
    }
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000) as f64;
    pipe.zadd(format!("{prefix}:presence-instances"), "ghost", far)
        .ignore();
    pipe.query::<()>(&mut conn).unwrap();

    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &prefix,
        &[
            "--presence-max-members",
            "10000",
            "--presence-full-list-max",
            "10000",
        ],
    );
    a.wait_ready();
    let mut zed = Client::connect(a.ws, &format!("name=zed&room={room}"));
    let frame = loop {
        let frame = next_frame(&mut zed, "zed", TIMEOUT).expect("zed's member list");
        if frame["type"] == "presence" {
            break frame;
        }
    };
    assert_eq!(frame["count"], MEMBERS + 1, "count: {}", frame["count"]);
    assert_eq!(frame["full"], true);
    let listed = rows(&frame, "members");
    assert_eq!(listed.len(), MEMBERS + 1);
    assert_eq!(listed[0].0, "m00000");
    assert_eq!(listed[MEMBERS].0, "zed");
}
