//! Redis Cluster mode (`--redis-cluster`): each room's channel is a sharded
//! channel (`SPUBLISH`/`SSUBSCRIBE` on `<prefix>:room:{<room>}`), served,
//! like the room's history and id counter, by the master of the room's
//! hash slot. Against a private six-node cluster (three masters, one
//! replica each): the harness itself fails over; every message reaches its
//! room on both instances exactly once, in id order, whichever master
//! serves the room; a master SIGKILLed mid-stream loses no accepted
//! message and lets no refused one through, and neither does a room whose
//! slot is moved to another master mid-stream (`CLUSTER SETSLOT`,
//! `MIGRATE`); and an instance is subscribed to a room's sharded channel
//! exactly while it has clients there.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{RedisCluster, channel, cluster_instance, shard_numsub};
use common::{Client, Listener, assert_exactly_once_in_order, unique, wait_for};
use serde_json::Value;

/// `per_master` room names for each master, as (room, master port): the
/// first names `r0`, `r1`, ... whose channel's slot that master serves.
fn rooms_on_every_master(
    cluster: &RedisCluster,
    prefix: &str,
    per_master: usize,
) -> Vec<(String, u16)> {
    let ranges = cluster.slots();
    let masters = cluster.masters();
    let mut chosen: Vec<(String, u16)> = Vec::new();
    for i in 0..1000 {
        let room = format!("r{i}");
        let slot = cluster.slot_of(&channel(prefix, &room));
        let master = ranges
            .iter()
            .find(|r| r.contains(slot))
            .expect("every slot is served")
            .master;
        if chosen.iter().filter(|(_, m)| *m == master).count() < per_master {
            chosen.push((room, master));
        }
        if chosen.len() == per_master * masters.len() {
            return chosen;
        }
    }
    panic!("1000 room names did not cover every master: {chosen:?}");
}

#[test]
fn cluster_harness_promotes_a_replica_when_a_master_dies() {
    let mut cluster = RedisCluster::start();
    assert_eq!(cluster.ports().len(), 6);
    let ranges = cluster.slots();
    let covered: u32 = ranges.iter().map(|r| r.end - r.start + 1).sum();
    assert_eq!(covered, 16384, "every slot is served: {ranges:?}");
    assert!(
        ranges.iter().all(|r| r.replicas.len() == 1),
        "each master has its replica: {ranges:?}"
    );
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "three masters: {ranges:?}");
    assert_eq!(
        cluster.seeds(),
        masters
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );

    // A key is written through the master of its slot; any other master
    // sends the client there.
    let key = format!("{}:history:{{lobby}}", unique("harness"));
    let slot = cluster.slot_of(&key);
    assert_eq!(slot, cluster.slot_of("{lobby}"), "only the hash tag counts");
    let master = cluster.master_port_of_key(&key);
    assert!(masters.contains(&master));
    let other = *masters.iter().find(|p| **p != master).unwrap();
    let refused = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query::<()>(&mut cluster.connection_to(other))
        .unwrap_err();
    let master_addr = format!("127.0.0.1:{master}");
    assert_eq!(
        refused.redirect_node(),
        Some((master_addr.as_str(), slot)),
        "another master redirects to the slot's master (MOVED): {refused}"
    );
    let mut conn = cluster.connection_to(master);
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("written before the failover")
        .query(&mut conn)
        .unwrap();
    let replicated: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut conn)
        .unwrap();
    assert_eq!(replicated, 1, "the replica has the write");
    drop(conn);

    // Kill that master: its replica takes over the slot.
    let started = Instant::now();
    let promoted = cluster.kill_master_of_key(&key);
    let took = started.elapsed();
    assert_ne!(promoted, master);
    assert!(!cluster.live_ports().contains(&master));
    assert_eq!(cluster.live_ports().len(), 5);
    assert_eq!(cluster.master_port_of_key(&key), promoted);
    let masters_after = cluster.masters();
    assert_eq!(masters_after.len(), 3, "three masters again");
    assert!(masters_after.contains(&promoted) && !masters_after.contains(&master));
    assert!(!cluster.seeds().contains(&format!(":{master}")));
    cluster.wait_state_ok();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query(&mut cluster.connection_to(promoted))
        .unwrap();
    assert_eq!(value, "written before the failover");
    eprintln!("failover of slot {slot}: {master} -> {promoted} in {took:?}");
}

#[test]
fn in_cluster_mode_every_message_reaches_its_room_on_both_instances_exactly_once_in_order() {
    let cluster = RedisCluster::start();
    let prefix = unique("cfanout");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let b = cluster_instance("b", &cluster, &prefix, &[]);
    let rooms = rooms_on_every_master(&cluster, &prefix, 2);
    const PER_SENDER: usize = 20;

    // In each room: a sender and a listener on each instance.
    let mut listeners = Vec::new();
    let mut senders = Vec::new();
    for (room, _) in &rooms {
        for (inst, instance) in [("a", &a), ("b", &b)] {
            let name = format!("{room}-{inst}-listener");
            listeners.push((room.clone(), name.clone(), instance.client(&name, room)));
            let name = format!("{room}-{inst}-sender");
            senders.push((room.clone(), name.clone(), instance.client(&name, room)));
        }
    }
    // Every sender at once, each paced a little.
    let handles: Vec<_> = senders
        .into_iter()
        .map(|(room, name, mut client)| {
            thread::spawn(move || {
                for n in 0..PER_SENDER {
                    let text = format!("{name}-{n}");
                    client.send(&text, &text);
                    thread::sleep(Duration::from_millis(2));
                }
                (room, name, client)
            })
        })
        .collect();
    let mut everyone = listeners;
    for handle in handles {
        everyone.push(handle.join().expect("a sender failed"));
    }

    let expected: HashMap<String, HashSet<String>> = rooms
        .iter()
        .map(|(room, _)| {
            let texts = ["a", "b"]
                .iter()
                .flat_map(|inst| (0..PER_SENDER).map(move |n| format!("{room}-{inst}-sender-{n}")))
                .collect();
            (room.clone(), texts)
        })
        .collect();
    let running: Vec<_> = everyone
        .into_iter()
        .map(|(room, name, client)| {
            let listener = Listener::spawn_for(client, name.clone(), Duration::from_secs(30));
            (room, name, listener)
        })
        .collect();
    for (room, name, listener) in running {
        let messages = listener.finish(expected[&room].len());
        for m in &messages {
            assert_eq!(
                m["room"],
                room.as_str(),
                "{name}: another room's message {m}"
            );
        }
        assert_exactly_once_in_order(&name, &messages, &expected[&room]);
    }
    let masters: HashSet<u16> = rooms.iter().map(|(_, m)| *m).collect();
    assert_eq!(masters.len(), 3, "the rooms were on every master");
}

/// What became of each message of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
}

/// One read of the streaming sender.
enum Frame {
    Message(Value),
    Error(Value),
    /// A `status` frame (down, up), a ping, or nothing within the wait.
    Nothing,
}

/// Reads one frame from `client` within `wait` (at least 1 ms).
fn read_within(client: &mut Client, wait: Duration) -> Frame {
    client.set_read_timeout(wait);
    match client.socket.read() {
        Ok(tungstenite::Message::Text(text)) => {
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["type"].as_str() {
                Some("message") => Frame::Message(frame),
                Some("error") => Frame::Error(frame),
                Some("status") => Frame::Nothing,
                Some(kind) if common::is_presence(kind) => Frame::Nothing,
                _ => panic!("sender: unexpected frame {frame}"),
            }
        }
        Ok(_) => Frame::Nothing,
        Err(e) if common::timed_out(&e) => Frame::Nothing,
        Err(e) => panic!("sender: connection lost: {e}"),
    }
}

/// What a streaming sender saw: every message it sent, in order, what
/// became of each, and every message frame it received.
struct Stream {
    order: Vec<String>,
    outcomes: HashMap<String, Outcome>,
    received: Vec<Value>,
    /// How many messages were out when `event` was seen set.
    first_after_event: Option<usize>,
    /// When each message was sent (as `order`), and when it was answered.
    sent_at: Vec<Instant>,
    answered_at: HashMap<String, Instant>,
    event_at: Option<Instant>,
    /// The `error` frames of the refused messages.
    refusals: Vec<Value>,
}

impl Stream {
    /// How many of `texts` were accepted.
    fn accepted_among(&self, texts: &[String]) -> usize {
        texts
            .iter()
            .filter(|t| self.outcomes.get(*t) == Some(&Outcome::Accepted))
            .count()
    }

    /// The accepted texts.
    fn accepted(&self) -> HashSet<String> {
        self.outcomes
            .iter()
            .filter(|(_, o)| **o == Outcome::Accepted)
            .map(|(t, _)| t.clone())
            .collect()
    }

    fn refused(&self) -> usize {
        self.outcomes
            .values()
            .filter(|o| **o == Outcome::Refused)
            .count()
    }

    /// The longest wait for an answer, and the message that waited.
    fn slowest_answer(&self) -> (Duration, String) {
        self.order
            .iter()
            .zip(&self.sent_at)
            .filter_map(|(t, sent)| {
                Some((self.answered_at.get(t)?.duration_since(*sent), t.clone()))
            })
            .max()
            .unwrap_or_default()
    }

    /// From the event to the first acceptance of a message sent after it.
    fn first_acceptance_after_event(&self) -> Option<Duration> {
        let from = self.first_after_event?;
        let event_at = self.event_at?;
        self.order[from..]
            .iter()
            .filter(|t| self.outcomes.get(*t) == Some(&Outcome::Accepted))
            .filter_map(|t| self.answered_at.get(t))
            .min()
            .map(|at| at.duration_since(event_at))
    }

    /// How many of the messages sent after the event were accepted.
    fn accepted_after_event(&self) -> usize {
        let from = self
            .first_after_event
            .expect("the stream outlasted the event");
        self.accepted_among(&self.order[from..])
    }
}

/// The time `sender` has, after its stream ends, to get every message's
/// outcome; and after the `event`, to have 50 messages accepted.
const RECOVERY: Duration = Duration::from_secs(20);

/// Streams `m-0`, `m-1`, ... from `sender`, one every 5 ms, reading its
/// socket in between, and publishing how many are out in `sent` (another
/// thread acts on that: kills a master, moves a slot) until `event` is set.
/// At least `min_sent` messages, and on until 50 of those sent after
/// `event` was seen were accepted (or [`RECOVERY`] after it, or 60 s in
/// all); then every message must get its answer (its own copy back:
/// accepted; an `unavailable` error naming its cid: refused) within
/// [`RECOVERY`].
fn stream_through(
    sender: &mut Client,
    sent: &AtomicUsize,
    event: &AtomicBool,
    min_sent: usize,
) -> Stream {
    const PACE: Duration = Duration::from_millis(5);
    let mut stream = Stream {
        order: Vec::new(),
        outcomes: HashMap::new(),
        received: Vec::new(),
        first_after_event: None,
        sent_at: Vec::new(),
        answered_at: HashMap::new(),
        event_at: None,
        refusals: Vec::new(),
    };
    let mut stopped_at: Option<Instant> = None;
    let mut next_send = Instant::now();
    let stream_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if stream.event_at.is_none() && event.load(Ordering::Relaxed) {
            stream.event_at = Some(Instant::now());
            stream.first_after_event = Some(stream.order.len());
        }
        if stopped_at.is_none() {
            let recovered = stream
                .first_after_event
                .is_some_and(|from| stream.accepted_among(&stream.order[from..]) >= 50);
            let gave_up = stream.event_at.is_some_and(|t| t.elapsed() > RECOVERY);
            if (stream.order.len() >= min_sent && (recovered || gave_up))
                || Instant::now() >= stream_deadline
            {
                stopped_at = Some(Instant::now());
            }
        }
        let pending = stream.order.len() - stream.outcomes.len();
        match stopped_at {
            Some(_) if pending == 0 => break,
            Some(stopped) => assert!(
                stopped.elapsed() < RECOVERY,
                "{pending} messages got no answer within {RECOVERY:?} of the stream's end"
            ),
            None if Instant::now() >= next_send => {
                let text = format!("m-{}", stream.order.len());
                sender.send(&text, &text);
                stream.order.push(text);
                stream.sent_at.push(Instant::now());
                sent.store(stream.order.len(), Ordering::Relaxed);
                next_send += PACE;
                continue;
            }
            None => {}
        }
        let wait = match stopped_at {
            None => next_send.saturating_duration_since(Instant::now()),
            Some(_) => Duration::from_millis(100),
        };
        match read_within(sender, wait) {
            Frame::Message(frame) => {
                if let Some(cid) = frame["cid"].as_str() {
                    let previous = stream.outcomes.insert(cid.to_string(), Outcome::Accepted);
                    stream.answered_at.insert(cid.to_string(), Instant::now());
                    assert_eq!(previous, None, "{cid}: a second outcome, {frame}");
                }
                stream.received.push(frame);
            }
            Frame::Error(frame) => {
                let cid = frame["cid"].as_str().unwrap_or_else(|| {
                    panic!("sender: an error about no message of its own: {frame}")
                });
                assert_eq!(frame["code"], "unavailable", "unexpected refusal: {frame}");
                let previous = stream.outcomes.insert(cid.to_string(), Outcome::Refused);
                stream.answered_at.insert(cid.to_string(), Instant::now());
                assert_eq!(previous, None, "{cid}: a second outcome, {frame}");
                stream.refusals.push(frame);
            }
            Frame::Nothing => {}
        }
    }
    stream
}

#[test]
fn a_master_killed_mid_stream_loses_no_accepted_message() {
    let cluster = RedisCluster::start();
    let prefix = unique("cfailover");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let b = cluster_instance("b", &cluster, &prefix, &[]);
    let room = "stream";
    let key = channel(&prefix, room);
    let master = cluster.master_port_of_key(&key);

    let limit = Duration::from_secs(90);
    let on_a = Listener::spawn_for(a.client("ra", room), "ra".into(), limit);
    let on_b = Listener::spawn_for(b.client("rb", room), "rb".into(), limit);
    let mut sender = a.client("sender", room);

    // Once 100 messages are out, SIGKILL the room's master, on a thread
    // of its own: the stream goes on meanwhile.
    let sent = Arc::new(AtomicUsize::new(0));
    let promoted = Arc::new(AtomicBool::new(false));
    let killer = {
        let (sent, promoted) = (sent.clone(), promoted.clone());
        let mut cluster = cluster;
        let key = key.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sent.load(Ordering::Relaxed) < 100 {
                assert!(Instant::now() < deadline, "the stream never reached 100");
                thread::sleep(Duration::from_millis(5));
            }
            let new_master = cluster.kill_master_of_key(&key);
            promoted.store(true, Ordering::Relaxed);
            (cluster, new_master)
        })
    };

    // At least 300 messages, and on until 50 of those sent after the
    // promotion were accepted.
    let stream = stream_through(&mut sender, &sent, &promoted, 300);
    let (_cluster, new_master) = killer.join().expect("the failover failed");
    assert_ne!(new_master, master);

    let accepted = stream.accepted();
    let before_kill = stream.accepted_among(&stream.order[..100]);
    let after = stream.accepted_after_event();
    eprintln!(
        "{} sent: {} accepted, {} refused; {after} accepted after the promotion of {new_master}",
        stream.order.len(),
        accepted.len(),
        stream.refused()
    );
    assert!(before_kill > 0, "nothing was accepted before the kill");
    assert!(
        after >= 50,
        "sending did not recover within {RECOVERY:?} of the promotion ({after} accepted since)"
    );
    assert_exactly_once_in_order("sender", &stream.received, &accepted);
    for (name, listener) in [("ra", on_a), ("rb", on_b)] {
        let messages = listener.finish(accepted.len());
        assert_exactly_once_in_order(name, &messages, &accepted);
    }
}

#[test]
fn a_room_whose_slot_moves_to_another_master_mid_stream_loses_nothing() {
    let cluster = RedisCluster::start();
    let prefix = unique("cmigrate");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let b = cluster_instance("b", &cluster, &prefix, &[]);
    let room = "moving";
    let key = channel(&prefix, room);
    let slot = cluster.slot_of(&key);
    let old_master = cluster.master_port_of_slot(slot);
    let new_master = *cluster
        .masters()
        .iter()
        .find(|&&p| p != old_master)
        .expect("another master");

    let limit = Duration::from_secs(90);
    let on_a = Listener::spawn_for(a.client("ra", room), "ra".into(), limit);
    let on_b = Listener::spawn_for(b.client("rb", room), "rb".into(), limit);
    let mut sender = a.client("sender", room);

    // Once 100 messages are out, move the room's slot (its channel, its
    // history, its id counter, its dedup keys) to another master, on a
    // thread of its own: the stream goes on meanwhile.
    let sent = Arc::new(AtomicUsize::new(0));
    let migrated = Arc::new(AtomicBool::new(false));
    let mover = {
        let (sent, migrated) = (sent.clone(), migrated.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sent.load(Ordering::Relaxed) < 100 {
                assert!(Instant::now() < deadline, "the stream never reached 100");
                thread::sleep(Duration::from_millis(5));
            }
            let started = Instant::now();
            let from = cluster.migrate_slot(slot, new_master);
            let took = started.elapsed();
            migrated.store(true, Ordering::Relaxed);
            (cluster, from, took)
        })
    };

    // On until 50 of the messages sent after the migration finished were
    // accepted.
    let started = Instant::now();
    let stream = stream_through(&mut sender, &sent, &migrated, 150);
    let streamed = started.elapsed();
    let (cluster, from, took) = mover.join().expect("the migration failed");
    assert_eq!(from, old_master);
    assert_eq!(cluster.master_port_of_key(&key), new_master);

    let accepted = stream.accepted();
    let before = stream.accepted_among(&stream.order[..100]);
    let after = stream.accepted_after_event();
    let refusals: Vec<String> = stream.refusals.iter().map(Value::to_string).collect();
    let (slowest, slowest_text) = stream.slowest_answer();
    eprintln!(
        "slot {slot} moved {old_master} -> {new_master} in {took:?} (from message {}); \
         {} sent in {streamed:?}: {} accepted, {} refused {refusals:?}; {after} accepted \
         after the migration, the first {:?} after it; slowest answer {slowest:?} ({slowest_text})",
        stream.first_after_event.unwrap_or_default(),
        stream.order.len(),
        accepted.len(),
        stream.refused(),
        stream.first_acceptance_after_event()
    );
    assert!(before > 0, "nothing was accepted before the migration");
    assert!(
        after >= 50,
        "sending did not recover within {RECOVERY:?} of the migration ({after} accepted since)"
    );
    assert_exactly_once_in_order("sender", &stream.received, &accepted);
    for (name, listener) in [("ra", on_a), ("rb", on_b)] {
        let messages = listener.finish(accepted.len());
        assert_exactly_once_in_order(name, &messages, &accepted);
    }
    // Both instances listen to the room on its new master, none on the old.
    let mut on_new = cluster.connection_to(new_master);
    let mut on_old = cluster.connection_to(old_master);
    wait_for("both instances to subscribe on the new master", || {
        shard_numsub(&mut on_new, &key) == 2
    });
    assert_eq!(
        shard_numsub(&mut on_old, &key),
        0,
        "nobody on the old master"
    );
}

#[test]
fn in_cluster_mode_an_instance_with_no_client_in_a_room_receives_none_of_its_messages() {
    let cluster = RedisCluster::start();
    let prefix = unique("cperroom");
    let linger = ["--room-linger-ms", "300"];
    let a = cluster_instance("a", &cluster, &prefix, &linger);
    let b = cluster_instance("b", &cluster, &prefix, &linger);
    // Two rooms on the same master: what keeps b out of the kitchen is its
    // subscriptions, not which node it talks to.
    let kitchen = channel(&prefix, "kitchen");
    let master = cluster.master_port_of_key(&kitchen);
    let garden_room = (0..1000)
        .map(|i| format!("garden{i}"))
        .find(|room| cluster.master_port_of_key(&channel(&prefix, room)) == master)
        .expect("a room on the kitchen's master");
    let mut conn = cluster.connection_to(master);
    assert_eq!(
        shard_numsub(&mut conn, &kitchen),
        0,
        "nobody is in the kitchen yet"
    );

    let mut alice = a.client("alice", "kitchen");
    let _bob = b.client("bob", &garden_room);
    assert_eq!(
        shard_numsub(&mut conn, &kitchen),
        1,
        "only a has a client there"
    );
    assert_eq!(
        shard_numsub(&mut conn, &channel(&prefix, &garden_room)),
        1,
        "only b has a client in the garden"
    );
    for i in 0..20 {
        alice.send(&format!("k{i}"), &format!("k{i}"));
    }
    alice.recv_messages(20);
    assert_eq!(a.metric("chat_broker_messages_total"), 20.0);
    assert_eq!(
        b.metric("chat_broker_messages_total"),
        0.0,
        "b, with nobody in the kitchen, received none of its messages"
    );
    assert_eq!(b.metric("chat_room_subscriptions"), 1.0);

    // Carol joins the kitchen on b: b subscribes before her history is
    // read, and gets the room's messages from then on.
    let mut carol = b.client("carol", "kitchen");
    assert_eq!(shard_numsub(&mut conn, &kitchen), 2);
    assert_eq!(carol.recv_messages(20).len(), 20, "history");
    alice.send("hello carol", "h");
    assert_eq!(carol.recv_messages(1)[0]["text"], "hello carol");
    assert_eq!(b.metric("chat_room_subscriptions"), 2.0);
    wait_for("b to count the kitchen's live message", || {
        b.metric("chat_broker_messages_total") == 1.0
    });

    // She leaves: after the linger, b lets the room go.
    carol.socket.close(None).unwrap();
    wait_for("b to unsubscribe from the kitchen", || {
        shard_numsub(&mut conn, &kitchen) == 1
    });
    wait_for("b's gauge to follow", || {
        b.metric("chat_room_subscriptions") == 1.0
    });
}

/// A cluster that wants a password, asked with a wrong one or none: the
/// instance cannot read the cluster's slots and does not start, and says
/// why in the words a single Redis gets, naming `--redis-cluster` (it used
/// to print redis-rs's raw "Password authentication failed -
/// AuthenticationFailed").
#[test]
fn a_cluster_login_refused_is_explained_like_a_single_redis_one() {
    let cluster = RedisCluster::start();
    cluster.config_set("requirepass", "right-password");
    let port = cluster.ports()[0];
    for (seeds, expected) in [
        (
            format!("redis://:wrong-password@127.0.0.1:{port}"),
            "refused the login",
        ),
        (format!("redis://127.0.0.1:{port}"), "wants a password"),
    ] {
        let (status, log) = common::run_to_exit(
            "a",
            &[
                "--redis-cluster",
                &seeds,
                "--redis-prefix",
                &unique("login"),
            ],
            Duration::from_secs(30),
        );
        assert!(!status.success(), "started with {seeds}:\n{log}");
        assert!(log.contains(expected), "not explained ({expected}):\n{log}");
        assert!(
            log.contains("--redis-cluster / REDIS_CLUSTER"),
            "no advice:\n{log}"
        );
        assert!(
            !log.contains("wrong-password"),
            "the password shows:\n{log}"
        );
    }
}

/// What `scripts/run_cluster.sh` shows of its cluster (through
/// `examples/lab.rs`) and what `pubsub-chat check-redis` says of it come
/// from the cluster itself: three masters that share the slots, each with
/// a replica, and a check that finds three shards.
#[test]
fn the_cluster_s_roles_and_check_redis_see_it_as_it_is() {
    use common::cluster_process::{self as cp, NodeRole};

    let cluster = RedisCluster::start();
    let roles = cp::roles(cluster.ports()[0]).unwrap();
    let masters: Vec<u16> = roles
        .iter()
        .filter(|(_, role)| matches!(role, NodeRole::Master { slots } if !slots.is_empty()))
        .map(|(port, _)| *port)
        .collect();
    assert_eq!(masters, cluster.masters(), "{roles:?}");
    let replicas_of: Vec<u16> = roles
        .iter()
        .filter_map(|(_, role)| match role {
            NodeRole::Replica { of } => Some(*of),
            _ => None,
        })
        .collect();
    assert_eq!(replicas_of.len(), 3, "{roles:?}");
    assert!(
        replicas_of.iter().all(|of| masters.contains(of)),
        "{roles:?}"
    );

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_pubsub-chat"))
        .args(["check-redis", "--redis-cluster", &cluster.seeds()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains("(3 shards)"), "{said}");
}
