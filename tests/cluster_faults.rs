//! Redis Cluster mode (`--redis-cluster`) under faults that hit one shard
//! of the cluster, against a private cluster: a shard whose subscribed
//! connections are killed (`CLIENT KILL TYPE pubsub`) while it serves rooms
//! in two hash slots subscribes every room again and loses no message; a
//! master's death is told (`status`, `/readyz`) only to the clients of its
//! own rooms, and `/readyz` names that shard; a room whose slot moves to a
//! master added after the instances started keeps its messages flowing;
//! and while a master is dead and not yet replaced, the publisher does not
//! open new connections to the cluster at every message.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{RedisCluster, channel, cluster_instance, shard_numsub};
use common::{Client, Listener, assert_exactly_once_in_order, http_get, unique};
use serde_json::Value;

/// How long a sent message may wait for its answer (its own copy back, or
/// an `unavailable` error) before it counts as never answered.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// The next frame within `wait`, presence frames and pings aside; `None`
/// if none came.
fn next_frame(client: &mut Client, who: &str, wait: Duration) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        client.set_read_timeout(left);
        match client.socket.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if !frame["type"].as_str().is_some_and(common::is_presence) {
                    return Some(frame);
                }
            }
            Ok(_) => {}
            Err(e) if common::timed_out(&e) => return None,
            Err(e) => panic!("{who}: connection lost: {e}"),
        }
    }
}

/// Reads `client` until a frame `wanted` accepts comes (returned), or
/// nothing more within `wait` (`None`). Every `status` frame read on the
/// way is kept in `statuses`, with `who`; other frames are passed over.
fn await_frame(
    client: &mut Client,
    who: &str,
    wait: Duration,
    statuses: &mut Vec<(String, Value)>,
    wanted: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let frame = next_frame(
            client,
            who,
            deadline.saturating_duration_since(Instant::now()),
        )?;
        if wanted(&frame) {
            return Some(frame);
        }
        if frame["type"] == "status" {
            statuses.push((who.to_string(), frame));
        }
    }
}

/// Whether `frame` answers the message whose cid is `cid`: its own copy,
/// or an error about it.
fn answers(frame: &Value, cid: &str) -> bool {
    matches!(frame["type"].as_str(), Some("message" | "error")) && frame["cid"] == cid
}

/// What a paced sender saw.
#[derive(Debug, Default)]
struct Sent {
    /// Texts whose own copy came back.
    accepted: Vec<String>,
    /// Texts answered with an `unavailable` error.
    refused: Vec<String>,
    /// Every message frame received, in order.
    received: Vec<Value>,
    /// The `status` frames received, in order.
    statuses: Vec<Value>,
    /// The message that got no answer within [`ANSWER_WAIT`] (the sender
    /// stopped there), if one did not.
    unanswered: Option<String>,
}

impl Sent {
    fn accepted_set(&self) -> HashSet<String> {
        self.accepted.iter().cloned().collect()
    }
}

/// Sends `label-0` .. `label-<count - 1>` from `client`, each once the
/// previous one was answered (its own copy back: accepted; an
/// `unavailable` error naming its cid: refused) and `pace` more has
/// passed, counting in `sent` how many are out. Stops at the first message
/// with no answer within [`ANSWER_WAIT`].
fn send_paced(
    client: &mut Client,
    label: &str,
    count: usize,
    pace: Duration,
    sent: &AtomicUsize,
) -> Sent {
    let mut out = Sent::default();
    for n in 0..count {
        let text = format!("{label}-{n}");
        client.send(&text, &text);
        sent.store(n + 1, Ordering::Relaxed);
        let deadline = Instant::now() + ANSWER_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = next_frame(client, label, left) else {
                out.unanswered = Some(text);
                return out;
            };
            match frame["type"].as_str() {
                Some("message") => {
                    let own = frame["cid"] == text.as_str();
                    out.received.push(frame);
                    if own {
                        out.accepted.push(text.clone());
                        break;
                    }
                }
                Some("error") if frame["cid"] == text.as_str() => {
                    assert_eq!(
                        frame["code"], "unavailable",
                        "{label}: unexpected refusal: {frame}"
                    );
                    out.refused.push(text.clone());
                    break;
                }
                Some("status") => out.statuses.push(frame),
                _ => panic!("{label}: unexpected frame {frame}"),
            }
        }
        thread::sleep(pace);
    }
    out
}

/// Polls `/readyz` of every address until all answer 200 in the same
/// round: how long that took, or, after `within`, the last answers.
fn wait_all_ready(addrs: &[SocketAddr], within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let answers: Vec<(u16, String)> = addrs
            .iter()
            .map(|&addr| http_get(addr, "/readyz"))
            .collect();
        if answers.iter().all(|(status, _)| *status == 200) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= within {
            return Err(format!("{answers:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How many times each instance's log names `CROSSSLOT`.
fn crossslot_lines(instances: &[&common::Instance]) -> Vec<(String, usize)> {
    instances
        .iter()
        .map(|i| (i.id.clone(), i.log().matches("CROSSSLOT").count()))
        .collect()
}

/// Two rooms whose channels are in two different hash slots served by the
/// same master: (rooms, that master's port).
fn two_rooms_in_two_slots_of_one_master(
    cluster: &RedisCluster,
    prefix: &str,
) -> ([String; 2], u16) {
    let ranges = cluster.slots();
    let master_of = |slot: u16| {
        ranges
            .iter()
            .find(|r| r.contains(slot))
            .expect("every slot is served")
            .master
    };
    let first = "r0".to_string();
    let first_slot = cluster.slot_of(&channel(prefix, &first));
    let master = master_of(first_slot);
    for i in 1..1000 {
        let room = format!("r{i}");
        let slot = cluster.slot_of(&channel(prefix, &room));
        if slot != first_slot && master_of(slot) == master {
            return ([first, room], master);
        }
    }
    panic!("no second room on master {master} in 1000 names");
}

/// The shard number `Topology::discover` gives the master on `port`: its
/// index among the masters sorted by the lowest slot each serves.
fn shard_index(ranges: &[common::cluster_process::SlotRange], port: u16) -> usize {
    let mut firsts: Vec<(u32, u16)> = Vec::new();
    for range in ranges {
        match firsts
            .iter_mut()
            .find(|(_, master)| *master == range.master)
        {
            Some((first, _)) => *first = (*first).min(range.start),
            None => firsts.push((range.start, range.master)),
        }
    }
    firsts.sort_unstable();
    firsts
        .iter()
        .position(|(_, master)| *master == port)
        .unwrap_or_else(|| panic!("{port} serves no slot: {ranges:?}"))
}

/// The shard numbers a `/readyz` body names (`cluster shard N`).
fn shards_named(body: &str) -> Vec<usize> {
    body.match_indices("cluster shard ")
        .filter_map(|(at, tag)| {
            let digits: String = body[at + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn a_shard_whose_subscription_breaks_with_rooms_in_two_slots_resubscribes_every_room() {
    let cluster = RedisCluster::start();
    let prefix = unique("ccrossslot");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let b = cluster_instance("b", &cluster, &prefix, &[]);
    let (rooms, master) = two_rooms_in_two_slots_of_one_master(&cluster, &prefix);
    const PER_ROOM: usize = 40;
    const PACE: Duration = Duration::from_millis(50);

    // In each room: a listener on each instance, a sender on a.
    let limit = Duration::from_secs(90);
    let mut listeners = Vec::new();
    let mut senders = Vec::new();
    for room in &rooms {
        for (inst, instance) in [("a", &a), ("b", &b)] {
            let name = format!("{room}-{inst}-listener");
            let client = instance.client(&name, room);
            listeners.push((
                room.clone(),
                name.clone(),
                Listener::spawn_for(client, name, limit),
            ));
        }
        senders.push((room.clone(), a.client(&format!("{room}-sender"), room)));
    }
    // Both instances listen to both rooms on that master.
    let mut conn = cluster.connection_to(master);
    for room in &rooms {
        assert_eq!(
            shard_numsub(&mut conn, &channel(&prefix, room)),
            2,
            "both instances are subscribed to {room} on {master}"
        );
    }

    let counters: Vec<Arc<AtomicUsize>> = rooms.iter().map(|_| Arc::default()).collect();
    let handles: Vec<_> = senders
        .into_iter()
        .zip(&counters)
        .map(|((room, mut client), sent)| {
            let sent = sent.clone();
            thread::spawn(move || {
                let outcome = send_paced(&mut client, &room, PER_ROOM, PACE, &sent);
                (room, outcome)
            })
        })
        .collect();

    // Once each sender has 10 messages out, kill every subscribed
    // connection on that master: both instances' link to that shard.
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.iter().any(|c| c.load(Ordering::Relaxed) < 10) {
        assert!(Instant::now() < deadline, "the senders never reached 10");
        thread::sleep(Duration::from_millis(5));
    }
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .expect("CLIENT KILL TYPE pubsub");
    let killed_at = Instant::now();
    assert_eq!(
        killed, 2,
        "one subscribed connection per instance on master {master}"
    );

    // Within 10 s: both instances subscribed to both rooms there again
    // (the kill ended every subscription there at once), and ready, in
    // the same round.
    let addrs = [a.admin(), b.admin()];
    let recovered = {
        let deadline = killed_at + Duration::from_secs(10);
        loop {
            let counts: Vec<i64> = rooms
                .iter()
                .map(|room| shard_numsub(&mut conn, &channel(&prefix, room)))
                .collect();
            let ready: Vec<(u16, String)> = addrs
                .iter()
                .map(|&addr| http_get(addr, "/readyz"))
                .collect();
            if counts.iter().all(|&n| n == 2) && ready.iter().all(|(status, _)| *status == 200) {
                break Ok(killed_at.elapsed());
            }
            if Instant::now() >= deadline {
                break Err(format!(
                    "subscribers of {rooms:?} on master {master}: {counts:?}; /readyz: {ready:?}"
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    };

    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(handle.join().expect("a sender failed"));
    }
    let crossslot = crossslot_lines(&[&a, &b]);
    for (room, sent) in &outcomes {
        eprintln!(
            "{room}: {} accepted, {} refused, unanswered {:?}; {} status frames",
            sent.accepted.len(),
            sent.refused.len(),
            sent.unanswered,
            sent.statuses.len()
        );
    }
    eprintln!("recovery: {recovered:?}; CROSSSLOT in the logs (instance, lines): {crossslot:?}");
    for (room, sent) in &outcomes {
        assert!(
            sent.unanswered.is_none(),
            "{room}: message {} got no answer within {ANSWER_WAIT:?} (neither its own copy back \
             nor an `unavailable` error) after the subscriptions on master {master} were killed; \
             {} accepted and {} refused before it; recovery: {recovered:?}; CROSSSLOT in the \
             logs (instance, lines): {crossslot:?}",
            sent.unanswered.as_deref().unwrap_or_default(),
            sent.accepted.len(),
            sent.refused.len()
        );
        assert_eq!(sent.accepted.len() + sent.refused.len(), PER_ROOM);
    }
    let took = recovered.unwrap_or_else(|e| {
        panic!(
            "not ready again within 10 s of the kill: {e}; CROSSSLOT in the logs (instance, \
             lines): {crossslot:?}"
        )
    });
    eprintln!("ready and subscribed again {took:?} after the kill");
    for (room, sent) in &outcomes {
        assert_exactly_once_in_order(
            &format!("{room}-sender"),
            &sent.received,
            &sent.accepted_set(),
        );
    }
    for (room, name, listener) in listeners {
        let sent = &outcomes.iter().find(|(r, _)| *r == room).unwrap().1;
        let messages = listener.finish(sent.accepted.len());
        assert_exactly_once_in_order(&name, &messages, &sent.accepted_set());
    }
    assert!(
        crossslot.iter().all(|(_, n)| *n == 0),
        "an instance sent SSUBSCRIBE over two slots (CROSSSLOT in its log): {crossslot:?}"
    );
}

#[test]
fn a_shard_outage_is_told_only_to_the_clients_of_its_rooms() {
    let mut cluster = RedisCluster::start();
    // By default (`cluster-require-full-coverage yes`) every node answers
    // CLUSTERDOWN to every command from the moment a master is flagged
    // failing until its replica takes over: no server could keep Y's room
    // talking then. With `no`, Y's master keeps serving Y.
    cluster.config_set("cluster-require-full-coverage", "no");
    let prefix = unique("cshardstatus");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let ranges = cluster.slots();
    let master_of = |room: &str| {
        let slot = cluster.slot_of(&channel(&prefix, room));
        ranges
            .iter()
            .find(|r| r.contains(slot))
            .expect("every slot is served")
            .master
    };
    let x = "x-room";
    let x_master = master_of(x);
    let y = (0..1000)
        .map(|i| format!("y{i}"))
        .find(|room| master_of(room) != x_master)
        .expect("a room on another master");
    let y_master = master_of(&y);
    let x_shard = shard_index(&ranges, x_master);
    let y_shard = shard_index(&ranges, y_master);
    eprintln!(
        "room {x}: master {x_master}, shard {x_shard}; room {y}: master {y_master}, shard {y_shard}"
    );

    let mut x1 = a.client("x1", x);
    let mut x2 = a.client("x2", x);
    let y1 = a.client("y1", &y);
    let y2 = a.client("y2", &y);

    // Y's clients talk all along, and keep every status frame they get.
    let stop = Arc::new(AtomicBool::new(false));
    let bystanders = {
        let stop = stop.clone();
        thread::spawn(move || keep_talking(y1, y2, &stop))
    };
    // /readyz, every 50 ms, until it is 200 after a 503 (or the end):
    // each distinct 503 body.
    let poller = {
        let (stop, addr) = (stop.clone(), a.admin());
        thread::spawn(move || {
            let mut bodies: Vec<String> = Vec::new();
            // When the first 503 came, and the first 200 after it.
            let mut down_at = None;
            let mut up_at = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let (status, body) = http_get(addr, "/readyz");
                if status == 503 {
                    down_at.get_or_insert_with(Instant::now);
                    if !bodies.contains(&body) {
                        bodies.push(body);
                    }
                } else if down_at.is_some() {
                    up_at = Some(Instant::now());
                    break;
                } else if stop.load(Ordering::Relaxed) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            (bodies, down_at, up_at)
        })
    };
    // Y talks a little before the kill.
    thread::sleep(Duration::from_millis(500));

    let killed_at = Instant::now();
    let promoted = cluster.kill_master_of_key(&channel(&prefix, x));
    let failed_over = Instant::now();
    eprintln!(
        "master {x_master} of {x} killed; {promoted} promoted after {:?}",
        failed_over - killed_at
    );

    // X's clients: `down`, then `up`.
    let mut x_statuses: Vec<(String, Value)> = Vec::new();
    for (name, client) in [("x1", &mut x1), ("x2", &mut x2)] {
        let deadline = failed_over + Duration::from_secs(15);
        let mut deliveries = Vec::new();
        while !(deliveries.contains(&"down".to_string())
            && deliveries.last().map(String::as_str) == Some("up"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = next_frame(client, name, left) else {
                break;
            };
            if frame["type"] == "status" {
                deliveries.push(frame["delivery"].as_str().unwrap_or_default().to_string());
                x_statuses.push((name.to_string(), frame));
            }
        }
    }
    // After the `up`, X works again.
    let mut ignored = Vec::new();
    x1.send("x-after-up", "x-after-up");
    let x_answer = await_frame(&mut x1, "x1", ANSWER_WAIT, &mut ignored, |f| {
        answers(f, "x-after-up")
    });
    let x_heard = await_frame(&mut x2, "x2", ANSWER_WAIT, &mut ignored, |f| {
        f["type"] == "message" && f["text"] == "x-after-up"
    });

    // Y is watched until 5 s after the failover.
    thread::sleep((failed_over + Duration::from_secs(5)).saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Relaxed);
    let heard = bystanders.join().expect("Y's clients failed");
    let (bodies, down_at, up_at) = poller.join().expect("the /readyz poller failed");
    println!(
        "FIGURES cluster master SIGKILL: shard {x_shard}'s /readyz 503 after {:?}, 200 again after {:?} \
         (the replica promoted after {:?}); its rooms' clients saw {:?}, the other rooms' {:?}",
        down_at.map(|at| at - killed_at),
        up_at.map(|at| at - killed_at),
        failed_over - killed_at,
        x_statuses
            .iter()
            .map(|(name, status)| format!("{name}: {}", status["delivery"]))
            .collect::<Vec<_>>(),
        heard.statuses,
    );
    eprintln!(
        "Y: {} sent, statuses {:?}, problems {:?}; X statuses {:?}; X after up: {:?} / {:?}; \
         503 bodies {bodies:?}",
        heard.sent, heard.statuses, heard.problems, x_statuses, x_answer, x_heard
    );
    // A killed master resets its connections: noticed at once, well within
    // the three pings (3 s) that bound a silent death.
    let noticed = down_at.map(|at| at - killed_at);
    assert!(
        noticed.is_some_and(|after| after <= Duration::from_secs(3)),
        "shard {x_shard}'s outage was noticed (a /readyz 503) after {noticed:?}, more than 3 s"
    );

    assert!(
        heard.statuses.is_empty(),
        "the clients of {y} (shard {y_shard}, master {y_master}, never down) were told of \
         shard {x_shard}'s outage: {:?}",
        heard
            .statuses
            .iter()
            .map(|(who, f)| format!("{who}: {f}"))
            .collect::<Vec<_>>()
    );
    assert!(
        heard.problems.is_empty() && heard.sent > 0,
        "the clients of {y} could not talk throughout ({} sent): {:?}",
        heard.sent,
        heard.problems
    );
    for name in ["x1", "x2"] {
        let deliveries: Vec<&str> = x_statuses
            .iter()
            .filter(|(who, _)| who == name)
            .map(|(_, f)| f["delivery"].as_str().unwrap_or_default())
            .collect();
        let down = deliveries.iter().position(|d| *d == "down");
        assert!(
            down.is_some_and(|at| deliveries[at..].contains(&"up")),
            "{name} (in {x}) was not told `down` then `up`: {deliveries:?}"
        );
    }
    let x_answer = x_answer.expect("x-after-up: no answer");
    assert_eq!(
        x_answer["type"], "message",
        "x-after-up refused: {x_answer}"
    );
    assert!(x_heard.is_some(), "x2 did not receive x-after-up");
    let named_x = bodies
        .iter()
        .any(|body| shards_named(body).contains(&x_shard));
    let others: Vec<&String> = bodies
        .iter()
        .filter(|body| shards_named(body).iter().any(|&n| n != x_shard))
        .collect();
    assert!(
        named_x && others.is_empty(),
        "/readyz while shard {x_shard} was down should name `cluster shard {x_shard}` and no \
         other shard; its 503 bodies: {bodies:?}"
    );
}

/// What the clients of a room whose master stays up saw.
#[derive(Debug, Default)]
struct Bystanders {
    sent: usize,
    /// Every `status` frame, with who got it.
    statuses: Vec<(String, Value)>,
    /// Messages not accepted, or not received by the other client.
    problems: Vec<String>,
}

/// `talker` sends a message every 100 ms, each once the previous one was
/// answered, and `hearer` must receive each, until `stop`; then both are
/// read 500 ms more for late `status` frames.
fn keep_talking(mut talker: Client, mut hearer: Client, stop: &AtomicBool) -> Bystanders {
    let mut seen = Bystanders::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let text = format!("y-{n}");
        n += 1;
        talker.send(&text, &text);
        seen.sent += 1;
        let Some(answer) = await_frame(&mut talker, "y1", ANSWER_WAIT, &mut seen.statuses, |f| {
            answers(f, &text)
        }) else {
            seen.problems
                .push(format!("{text}: no answer within {ANSWER_WAIT:?}"));
            break;
        };
        if answer["type"] == "message" {
            let heard = await_frame(&mut hearer, "y2", ANSWER_WAIT, &mut seen.statuses, |f| {
                f["type"] == "message" && f["text"] == text.as_str()
            });
            if heard.is_none() {
                seen.problems
                    .push(format!("{text}: accepted, never reached y2"));
                break;
            }
        } else {
            seen.problems.push(format!("{text}: refused: {answer}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
    for (name, client) in [("y1", &mut talker), ("y2", &mut hearer)] {
        while let Some(frame) = next_frame(client, name, Duration::from_millis(500)) {
            if frame["type"] == "status" {
                seen.statuses.push((name.to_string(), frame));
            }
        }
    }
    seen
}

#[test]
fn a_room_moved_to_a_master_added_after_start_keeps_its_messages_flowing() {
    let mut cluster = RedisCluster::start();
    let prefix = unique("cnewmaster");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let b = cluster_instance("b", &cluster, &prefix, &[]);
    let new_master = cluster.add_master();
    assert!(
        !cluster.masters().contains(&new_master),
        "the new master has no slot yet"
    );
    let room = "moving";
    let key = channel(&prefix, room);
    let slot = cluster.slot_of(&key);
    let old_master = cluster.master_port_of_slot(slot);

    let limit = Duration::from_secs(90);
    let on_a = Listener::spawn_for(a.client("ra", room), "ra".into(), limit);
    let on_b = Listener::spawn_for(b.client("rb", room), "rb".into(), limit);
    let mut sender = a.client("sender", room);

    // Once 10 messages are out, the room's slot moves to the new master,
    // on a thread of its own; then both instances must be ready within
    // 10 s.
    let sent = Arc::new(AtomicUsize::new(0));
    let mover = {
        let sent = sent.clone();
        let addrs = [a.admin(), b.admin()];
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sent.load(Ordering::Relaxed) < 10 {
                assert!(Instant::now() < deadline, "the stream never reached 10");
                thread::sleep(Duration::from_millis(5));
            }
            let from = cluster.migrate_slot(slot, new_master);
            let ready = wait_all_ready(&addrs, Duration::from_secs(10));
            (cluster, from, ready)
        })
    };
    let stream = send_paced(&mut sender, "m", 40, Duration::from_millis(50), &sent);
    let (cluster, from, ready) = mover.join().expect("the migration failed");
    assert_eq!(from, old_master);
    assert_eq!(cluster.master_port_of_key(&key), new_master);
    eprintln!(
        "slot {slot} moved {old_master} -> {new_master}: {} accepted, {} refused, unanswered \
         {:?}; ready after the move: {ready:?}",
        stream.accepted.len(),
        stream.refused.len(),
        stream.unanswered
    );

    assert!(
        stream.unanswered.is_none(),
        "message {} got no answer within {ANSWER_WAIT:?} (neither its own copy back nor an \
         `unavailable` error) after room {room}'s slot {slot} moved to the new master \
         {new_master}; {} accepted and {} refused before it; /readyz after the move: {ready:?}",
        stream.unanswered.as_deref().unwrap_or_default(),
        stream.accepted.len(),
        stream.refused.len()
    );
    let took = ready.unwrap_or_else(|answers| {
        panic!("not ready within 10 s of the move to {new_master}: {answers}")
    });
    eprintln!("both ready {took:?} after the move");
    let accepted = stream.accepted_set();
    assert_exactly_once_in_order("sender", &stream.received, &accepted);
    for (name, listener) in [("ra", on_a), ("rb", on_b)] {
        let messages = listener.finish(accepted.len());
        assert_exactly_once_in_order(name, &messages, &accepted);
    }

    // Newcomers on both instances get what is sent in the room now.
    let mut fresh = [a.client("fresh-a", room), b.client("fresh-b", room)];
    let mut ignored = Vec::new();
    sender.send("after-the-move", "after-the-move");
    let answer = await_frame(&mut sender, "sender", ANSWER_WAIT, &mut ignored, |f| {
        answers(f, "after-the-move")
    });
    assert!(
        answer.as_ref().is_some_and(|f| f["type"] == "message"),
        "after-the-move was not accepted: {answer:?}"
    );
    for (name, client) in ["fresh-a", "fresh-b"].into_iter().zip(&mut fresh) {
        let heard = await_frame(client, name, ANSWER_WAIT, &mut ignored, |f| {
            f["type"] == "message" && f["text"] == "after-the-move"
        });
        assert!(heard.is_some(), "{name} did not receive after-the-move");
    }
    let mut on_new = cluster.connection_to(new_master);
    common::wait_for("both instances to subscribe on the new master", || {
        shard_numsub(&mut on_new, &key) == 2
    });
}

/// `total_connections_received` of `INFO stats`, summed over `ports`.
fn connections_received(cluster: &RedisCluster, ports: &[u16]) -> u64 {
    ports
        .iter()
        .map(|&port| {
            let info: String = redis::cmd("INFO")
                .arg("stats")
                .query(&mut cluster.connection_to(port))
                .expect("INFO stats");
            info.lines()
                .find_map(|l| l.strip_prefix("total_connections_received:"))
                .unwrap_or_else(|| panic!("no total_connections_received on {port}"))
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn after_a_master_dies_the_publisher_does_not_reconnect_on_every_publish() {
    let mut cluster = RedisCluster::start();
    let prefix = unique("creconnects");
    let a = cluster_instance("a", &cluster, &prefix, &[]);
    let room = "doomed";
    let master = cluster.master_port_of_key(&channel(&prefix, room));
    let mut client = a.client("sender", room);
    let warm = client.send_and_confirm("warm", 1, Duration::ZERO);
    assert_eq!(warm.accepted.len(), 1, "sending works before the kill");

    // SIGKILL, without waiting for the failover: for 3 s the client sends
    // one message after another, each as soon as the previous one is
    // answered.
    cluster.kill(master);
    let survivors = cluster.live_ports();
    let before = connections_received(&cluster, &survivors);
    let started = Instant::now();
    let (mut sent, mut accepted, mut refused) = (0, 0, 0);
    let mut unanswered = None;
    let mut ignored = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let text = format!("m-{sent}");
        client.send(&text, &text);
        sent += 1;
        match await_frame(&mut client, "sender", ANSWER_WAIT, &mut ignored, |f| {
            answers(f, &text)
        }) {
            Some(frame) if frame["type"] == "message" => accepted += 1,
            Some(frame) => {
                assert_eq!(frame["code"], "unavailable", "unexpected refusal: {frame}");
                refused += 1;
            }
            None => {
                unanswered = Some(text);
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let after = connections_received(&cluster, &survivors);
    let opened = after - before;
    eprintln!(
        "master {master} dead: {sent} sent in {elapsed:?} ({accepted} accepted, {refused} \
         refused, unanswered {unanswered:?}); the surviving nodes {survivors:?} received \
         {opened} connections meanwhile"
    );
    assert!(
        accepted + refused > 0,
        "no message got an answer (stuck at {unanswered:?})"
    );
    assert!(
        opened < 150,
        "the surviving nodes received {opened} connections in {elapsed:?} while {sent} messages \
         were sent ({accepted} accepted, {refused} refused): the publisher reconnects at every \
         publish"
    );
}
