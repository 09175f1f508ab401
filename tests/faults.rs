//! The fault suite: what an instance does when its network to Redis
//! misbehaves. Instance `a` reaches Redis through a fault proxy
//! (`common/fault_proxy.rs`), instance `b` directly; senders and watchers
//! on both stream messages through each fault. Each test asserts how soon
//! `a` notices (a bound), what `/readyz` and the clients see, and that
//! every message accepted before, during and after the fault reaches every
//! client once and in order, none accepted lost. Each prints one `FIGURES`
//! line, the source of docs/OPERATIONS.md's "Failure modes" table.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy, Scope, Select};
use common::{
    Client, Instance, Outcomes, RedisServer, TIMEOUT, assert_exactly_once_in_order, timed_out,
    unique, wait_for,
};
use serde_json::Value;
use tungstenite::Message;

/// The ping interval the instances run with: the default.
const PING: Duration = Duration::from_millis(1000);

/// A chat of two instances: `a` through the proxy, `b` straight to Redis.
struct Chat {
    /// Behind a lock only so that a test can restart it mid-run.
    redis: Mutex<RedisServer>,
    proxy: FaultProxy,
    a: Instance,
    b: Instance,
    room: String,
}

impl Chat {
    fn start(redis: RedisServer, extra_a: &[&str]) -> Self {
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)));
        let prefix = unique("faults");
        let a = Instance::redis_with("a", &proxy.url(), &prefix, extra_a);
        let b = Instance::redis("b", &redis.url(), &prefix);
        a.wait_ready();
        b.wait_ready();
        Chat {
            redis: Mutex::new(redis),
            proxy,
            a,
            b,
            room: unique("room"),
        }
    }

    fn client(&self, on: &Instance, name: &str) -> Client {
        on.client(name, &self.room)
    }
}

/// Every frame a client receives, with when: the messages and the `status`
/// frames, read on a thread of its own.
struct Watcher {
    frames: Arc<Mutex<Vec<(Instant, Value)>>>,
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<()>,
}

impl Watcher {
    fn spawn(mut client: Client, name: String) -> Self {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (frames.clone(), stop.clone());
        client.set_read_timeout(Duration::from_millis(50));
        let handle = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match client.socket.read() {
                    Ok(Message::Text(text)) => {
                        let frame: Value = serde_json::from_str(&text).unwrap();
                        if matches!(frame["type"].as_str(), Some("message" | "status")) {
                            seen.lock().unwrap().push((Instant::now(), frame));
                        }
                    }
                    Ok(_) => {}
                    Err(e) if timed_out(&e) => {}
                    Err(e) => panic!("{name}: connection lost: {e}"),
                }
            }
        });
        Watcher {
            frames,
            stop,
            handle,
        }
    }

    fn messages(&self) -> Vec<Value> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f["type"] == "message")
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// Waits until it has `count` messages, then stops it: its messages
    /// with when each came, and its `status` frames' `delivery`.
    fn finish(self, count: usize, who: &str) -> (Vec<(Instant, Value)>, Vec<String>) {
        wait_for(&format!("{who} to receive {count} messages"), || {
            self.messages().len() >= count
        });
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("watcher failed");
        let frames = self.frames.lock().unwrap();
        let messages = frames
            .iter()
            .filter(|(_, f)| f["type"] == "message")
            .cloned()
            .collect();
        let statuses = frames
            .iter()
            .filter(|(_, f)| f["type"] == "status")
            .map(|(_, f)| f["delivery"].as_str().unwrap_or_default().to_string())
            .collect();
        (messages, statuses)
    }
}

/// The frames of a list of (arrival, frame).
fn frames_of(seen: &[(Instant, Value)]) -> Vec<Value> {
    seen.iter().map(|(_, frame)| frame.clone()).collect()
}

/// What one fault did, for the assertions and the `FIGURES` line.
struct Run {
    /// From the fault to `a`'s first `/readyz` 503 (`None`: never).
    detected: Option<Duration>,
    /// From the fault (or its end) to `a`'s `/readyz` 200 again.
    ready_again: Option<Duration>,
    accepted: usize,
    refused: usize,
    /// `a`'s watcher's `status` frames, in order.
    a_statuses: Vec<String>,
    b_statuses: Vec<String>,
}

/// Streams messages from a sender on each instance, with a watcher on
/// each, injects a fault into `a`'s links `after` the start, heals it
/// `hold` later, and checks that every accepted message reached every
/// client once, in order.
fn run_fault(
    chat: &Chat,
    name: &str,
    inject: impl FnOnce(&Chat),
    hold: Duration,
    heal: impl FnOnce(&Chat),
) -> Run {
    const PER_SENDER: usize = 60;
    const PACE: Duration = Duration::from_millis(100);
    let watchers = [
        Watcher::spawn(chat.client(&chat.a, "wa"), "watcher on a".into()),
        Watcher::spawn(chat.client(&chat.b, "wb"), "watcher on b".into()),
    ];
    let senders: Vec<thread::JoinHandle<Outcomes>> = [(&chat.a, "sa"), (&chat.b, "sb")]
        .into_iter()
        .map(|(on, label)| {
            let mut client = chat.client(on, label);
            let label = label.to_string();
            thread::spawn(move || client.send_and_confirm(&label, PER_SENDER, PACE))
        })
        .collect();

    thread::sleep(Duration::from_millis(1500));
    let fault_at = Instant::now();
    inject(chat);
    let mut heal = Some(heal);
    let mut detected = None;
    let mut healed = false;
    let mut ready_again = None;
    let deadline = fault_at + hold + TIMEOUT;
    while Instant::now() < deadline {
        let ready = chat.a.get("/readyz").0 == 200;
        if !ready && detected.is_none() {
            detected = Some(fault_at.elapsed());
        }
        if !healed && fault_at.elapsed() >= hold {
            if let Some(heal) = heal.take() {
                heal(chat);
            }
            healed = true;
        }
        if healed && detected.is_some() && ready {
            ready_again = Some(fault_at.elapsed());
            break;
        }
        if healed && detected.is_none() && fault_at.elapsed() > hold + Duration::from_secs(3) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }

    let mut accepted = HashSet::new();
    let mut refused = 0;
    let mut sent_seen = Vec::new();
    for (n, handle) in senders.into_iter().enumerate() {
        let outcomes = handle.join().expect("a sender failed");
        assert_eq!(
            outcomes.accepted.len() + outcomes.refused.len(),
            PER_SENDER,
            "{name}: one answer per message"
        );
        refused += outcomes.refused.len();
        accepted.extend(outcomes.accepted);
        sent_seen.push((n, outcomes.received));
    }
    let [wa, wb] = watchers;
    let (a_messages, a_statuses) = wa.finish(accepted.len(), "the watcher on a");
    let (b_messages, b_statuses) = wb.finish(accepted.len(), "the watcher on b");
    assert_exactly_once_in_order(
        &format!("{name}: watcher on a"),
        &frames_of(&a_messages),
        &accepted,
    );
    assert_exactly_once_in_order(
        &format!("{name}: watcher on b"),
        &frames_of(&b_messages),
        &accepted,
    );
    for (n, received) in sent_seen {
        // A sender stops reading once its last message came back: what it
        // saw is a prefix, which must hold no duplicate and keep the order.
        let texts: Vec<&str> = received.iter().filter_map(|m| m["text"].as_str()).collect();
        let distinct: HashSet<&&str> = texts.iter().collect();
        assert_eq!(
            distinct.len(),
            texts.len(),
            "{name}: sender {n} got a duplicate"
        );
        assert!(
            received
                .windows(2)
                .all(|pair| common::id_of(&pair[0]) < common::id_of(&pair[1])),
            "{name}: sender {n} got messages out of order"
        );
    }
    Run {
        detected,
        ready_again,
        accepted: accepted.len(),
        refused,
        a_statuses,
        b_statuses,
    }
}

fn ms(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "never".into(), |d| format!("{} ms", d.as_millis()))
}

fn figures(name: &str, run: &Run) {
    println!(
        "FIGURES {name}: detected {}, ready again {}, a's clients saw {:?}, b's {:?}, \
         {} accepted, {} refused unavailable, 0 lost",
        ms(run.detected),
        ms(run.ready_again),
        run.a_statuses,
        run.b_statuses,
        run.accepted,
        run.refused,
    );
}

/// `a` noticed within `bound`, told its clients `down` then `up`, is ready
/// again, and `b`, whose links were fine, told its clients nothing.
fn assert_noticed(name: &str, run: &Run, bound: Duration) {
    let detected = run
        .detected
        .unwrap_or_else(|| panic!("{name}: a's /readyz never said 503"));
    assert!(
        detected <= bound,
        "{name}: noticed after {detected:?}, more than {bound:?}"
    );
    assert!(run.ready_again.is_some(), "{name}: a never ready again");
    assert!(
        run.a_statuses.first().map(String::as_str) == Some("down")
            && run.a_statuses.last().map(String::as_str) == Some("up"),
        "{name}: a's clients saw {:?}, not down ... up",
        run.a_statuses
    );
    assert!(
        run.b_statuses.is_empty(),
        "{name}: b's clients were told {:?} though b's links were fine",
        run.b_statuses
    );
}

/// Runs fault `name` on `a`'s connection whose name ends with `suffix`
/// (`:a:sub`, `:a:pub`): `inject` is given its selector.
fn fault_on_connection(
    suffix: &str,
    name: &str,
    inject: impl FnOnce(&Chat, Select),
) -> (Chat, Run) {
    let chat = Chat::start(RedisServer::start(), &[]);
    let connection = Select::name_ends_with(suffix);
    chat.proxy.wait_for(&connection, TIMEOUT);
    let run = run_fault(
        &chat,
        name,
        |chat| inject(chat, connection),
        Duration::ZERO,
        |_| {},
    );
    figures(name, &run);
    (chat, run)
}

#[test]
fn a_blackholed_subscription_is_found_dead_within_three_pings_and_nothing_is_lost() {
    let name = "subscription blackholed";
    let (chat, run) = fault_on_connection(":a:sub", name, |chat, sub| {
        // The link stops carrying bytes, with no reset: as when a NAT
        // entry is dropped. A new connection gets through.
        chat.proxy.inject(sub, Fault::Blackhole, Scope::OpenNow);
    });
    assert_noticed(name, &run, PING * 3 + Duration::from_millis(500));
    assert!(chat.a.metric("chat_redis_dead_links_total") >= 1.0);
    assert_eq!(run.refused, 0, "{name}: the publisher was fine");
}

#[test]
fn a_half_open_subscription_is_found_dead_the_same_way() {
    let name = "subscription half-open";
    let (_chat, run) = fault_on_connection(":a:sub", name, |chat, sub| {
        // Redis sees the connection closed; the instance sees nothing.
        assert_eq!(chat.proxy.half_open(sub), 1);
    });
    assert_noticed(name, &run, PING * 3 + Duration::from_millis(500));
}

#[test]
fn a_blackholed_publisher_answers_every_sender_and_loses_nothing() {
    let name = "publisher blackholed";
    let (_chat, run) = fault_on_connection(":a:pub", name, |chat, publisher| {
        chat.proxy
            .inject(publisher, Fault::Blackhole, Scope::OpenNow);
    });
    // The command timeout (2 s) finds it, or the keepalive's PING.
    let bound = Duration::from_millis(2000) + PING + Duration::from_millis(500);
    assert_noticed(name, &run, bound);
}

#[test]
fn a_partition_of_every_link_refuses_sends_then_catches_up() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "every link blackholed for 4 s";
    let run = run_fault(
        &chat,
        name,
        |chat| {
            // New connections are held too: a partition, until healed.
            chat.proxy
                .inject(Select::All, Fault::Blackhole, Scope::AlsoNew);
        },
        Duration::from_secs(4),
        |chat| chat.proxy.heal(),
    );
    figures(name, &run);
    assert_noticed(name, &run, PING * 3 + Duration::from_millis(500));
}

#[test]
fn two_hundred_ms_of_latency_slows_delivery_but_breaks_nothing() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "200 ms latency on every link";
    let run = run_fault(
        &chat,
        name,
        |chat| {
            chat.proxy.inject(
                Select::All,
                Fault::Latency(Duration::from_millis(200)),
                Scope::AlsoNew,
            );
        },
        Duration::from_secs(3),
        |_| {},
    );
    figures(name, &run);
    assert_eq!(run.detected, None, "{name}: a slow link is not a dead one");
    assert_eq!(chat.a.metric("chat_redis_dead_links_total"), 0.0);
    assert!(run.a_statuses.is_empty(), "{name}: {:?}", run.a_statuses);
    assert_eq!(run.refused, 0);
}

#[test]
fn a_reset_of_every_link_mid_stream_is_noticed_at_once_and_loses_nothing() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "every link reset";
    let run = run_fault(
        &chat,
        name,
        |chat| {
            assert!(chat.proxy.reset(Select::All) >= 2);
        },
        Duration::ZERO,
        |_| {},
    );
    figures(name, &run);
    assert_noticed(name, &run, Duration::from_millis(500));
}

#[test]
fn a_redis_killed_and_restarted_with_aof_loses_no_accepted_message() {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let chat = Chat::start(redis, &[]);
    let name = "redis killed, restarted 1 s later (AOF)";
    let run = run_fault(
        &chat,
        name,
        |chat| chat.redis.lock().unwrap().kill(),
        Duration::from_secs(1),
        // On the same port, with the same append-only file.
        |chat| chat.redis.lock().unwrap().restart(),
    );
    figures(name, &run);
    let detected = run.detected.expect("a's /readyz never said 503");
    assert!(detected <= Duration::from_secs(2), "{detected:?}");
    assert!(run.ready_again.is_some());
    for (who, statuses) in [("a", &run.a_statuses), ("b", &run.b_statuses)] {
        assert_eq!(
            statuses.last().map(String::as_str),
            Some("up"),
            "{who}'s clients saw {statuses:?}"
        );
    }
}

/// Drains what `client` has received within `quiet`: the `status` frames'
/// `delivery`, in order.
fn statuses_of(client: &mut Client, quiet: Duration) -> Vec<String> {
    client.set_read_timeout(quiet);
    let mut statuses = Vec::new();
    loop {
        match client.socket.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "status" {
                    statuses.push(frame["delivery"].as_str().unwrap_or_default().to_string());
                }
            }
            Ok(_) => {}
            Err(e) if timed_out(&e) => break,
            Err(e) => panic!("connection lost while reading statuses: {e}"),
        }
    }
    client.set_read_timeout(TIMEOUT);
    statuses
}

/// Sends one message and waits for its one answer: `accepted` (its own
/// copy came back), or the `code` of the error that answered it.
fn answer_to(client: &mut Client, cid: &str) -> String {
    client.send(cid, cid);
    loop {
        let frame = client.recv();
        match frame["type"].as_str() {
            Some("message") if frame["cid"] == cid => return "accepted".into(),
            Some("error") if frame["cid"] == cid => {
                return frame["code"].as_str().unwrap_or_default().to_string();
            }
            _ => {}
        }
    }
}

#[test]
fn clients_told_down_while_the_publisher_waits_out_its_backoff_hear_up_and_can_send() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)));
    let prefix = unique("backoff");
    // The production default: after a failure the publisher waits up to
    // 5 s before it tries again.
    let a = Instance::redis_with(
        "a",
        &proxy.url(),
        &prefix,
        &["--redis-max-backoff-ms", "5000"],
    );
    a.wait_ready();
    let room = unique("room");
    let mut sender = a.client("sender", &room);

    // The publishing connection alone loses Redis for 6 s (new ones too)
    // while a client keeps sending: every attempt fails, and the backoff
    // grows. The subscription stays up throughout.
    let publisher = Select::name_ends_with(":a:pub");
    proxy.wait_for(&publisher, TIMEOUT);
    proxy.inject(publisher, Fault::Blackhole, Scope::AlsoNew);
    let lost = Instant::now();
    let mut answers = Vec::new();
    while lost.elapsed() < Duration::from_secs(6) {
        answers.push(answer_to(&mut sender, &format!("away-{}", answers.len())));
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        answers.iter().all(|answer| answer != "accepted"),
        "the publisher was blackholed: {answers:?}"
    );
    proxy.heal();
    let back = Instant::now();

    // 30 clients join in the 3 s after Redis answers again, some while the
    // publisher still waits out its backoff.
    let mut joined: Vec<(String, Client)> = (0..30)
        .map(|n| {
            thread::sleep(Duration::from_millis(100));
            let name = format!("j{n}");
            let client = a.client(&name, &room);
            (name, client)
        })
        .collect();
    // The publisher is back within the backoff's cap (5 s) after its last
    // failure, and a keepalive round (1 s): 9 s leaves a margin for a busy
    // machine.
    thread::sleep((back + Duration::from_secs(9)).saturating_duration_since(Instant::now()));
    let mut told_down = 0;
    for (name, client) in &mut joined {
        let statuses = statuses_of(client, Duration::from_millis(100));
        if statuses.iter().any(|s| s == "down") {
            told_down += 1;
            assert_eq!(
                statuses.last().map(String::as_str),
                Some("up"),
                "{name} was told {statuses:?}: a `down` never followed by `up`"
            );
        }
    }
    // Whatever it was told, each can send now: `up` means a send is tried.
    for (name, client) in &mut joined {
        let outcome = client.send_and_confirm(name, 1, Duration::ZERO);
        assert_eq!(outcome.accepted.len(), 1, "{name}: its send was refused");
    }
    println!(
        "FIGURES publisher backoff: {told_down} of 30 clients joining in the 3 s after the publisher's link came back were told down; every one of them up later; every send after accepted"
    );
}

/// Fills `room`'s history with `count` messages of `chars` characters,
/// straight into Redis (as the accept script would have).
fn fill_history(redis: &RedisServer, prefix: &str, room: &str, count: usize, chars: usize) {
    let mut conn = redis.connection().unwrap();
    let text = "x".repeat(chars);
    let mut pipe = redis::pipe();
    for n in 1..=count {
        let id = format!("{n}-0");
        let frame = serde_json::json!({
            "type": "message", "id": id, "ts": n, "room": room, "from": "filler",
            "text": text, "instance": "filler",
        });
        pipe.cmd("XADD")
            .arg(format!("{prefix}:history:{room}"))
            .arg(&id)
            .arg("m")
            .arg(frame.to_string())
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
}

#[test]
fn a_large_history_read_does_not_hold_up_a_send_on_the_same_instance() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)));
    let prefix = unique("history");
    // Replays large enough to take all of it (the defaults send at most
    // 200 messages and 1 MiB to a client).
    let a = Instance::redis_with(
        "a",
        &proxy.url(),
        &prefix,
        &[
            "--history-replay-max",
            "1100",
            "--client-buffer-bytes",
            "4194304",
        ],
    );
    a.wait_ready();
    // 1,100 messages of 1,900 characters: about 2 MB of history.
    let big = unique("big");
    fill_history(&redis, &prefix, &big, 1100, 1900);
    let mut sender = a.client("sender", &unique("small"));
    // Every link of a's at 1 MB/s: reading that history takes seconds.
    proxy.inject(Select::All, Fault::Bandwidth(1_000_000), Scope::AlsoNew);

    let ws = a.ws;
    let joins: Vec<thread::JoinHandle<Duration>> = (0..3)
        .map(|n| {
            let big = big.clone();
            thread::spawn(move || {
                let started = Instant::now();
                let mut client = Client::connect(ws, &format!("name=j{n}&room={big}&since=0-0"));
                let history = client.drain_messages(Duration::from_millis(1000));
                assert_eq!(history.len(), 1100, "j{n}: the whole history");
                started.elapsed() - Duration::from_millis(1000)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let mut round_trips = Vec::new();
    for n in 0..10 {
        let started = Instant::now();
        let outcome = sender.send_and_confirm(&format!("m{n}"), 1, Duration::ZERO);
        assert_eq!(outcome.accepted.len(), 1);
        round_trips.push(started.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    let join_times: Vec<Duration> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    let slowest_send = *round_trips.iter().max().unwrap();
    println!(
        "FIGURES history read: joins with since=0-0 took {join_times:?}; the sends meanwhile: slowest {slowest_send:?}, all {round_trips:?}"
    );
    assert!(
        join_times.iter().all(|t| *t > Duration::from_millis(1500)),
        "the history reads were in flight for seconds: {join_times:?}"
    );
    assert!(
        slowest_send < Duration::from_millis(500),
        "a send waited {slowest_send:?} behind other clients' history reads"
    );
}

#[test]
fn a_room_subscribed_for_its_first_client_does_not_hold_up_the_other_rooms() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)));
    let prefix = unique("newrooms");
    let a = Instance::redis("a", &proxy.url(), &prefix);
    let b = Instance::redis("b", &redis.url(), &prefix);
    a.wait_ready();
    b.wait_ready();
    let room = unique("busy");
    let listener = a.client("listener", &room);
    let mut sender = b.client("sender", &room);
    // Every history read of a's is slow (500 ms each way): joins pay it,
    // and nobody else must.
    proxy.inject(
        Select::name_ends_with("history"),
        Fault::Latency(Duration::from_millis(500)),
        Scope::AlsoNew,
    );
    let watcher = Watcher::spawn(listener, "listener on a".into());
    let ws = a.ws;
    let prefix_rooms = unique("new");
    let joins = thread::spawn(move || {
        for n in 0..5 {
            let _ = Client::connect(ws, &format!("name=n{n}&room={prefix_rooms}-{n}"));
        }
    });
    let mut sent_at = Vec::new();
    for n in 0..30 {
        sent_at.push(Instant::now());
        sender.send(&format!("t{n}"), &format!("t{n}"));
        thread::sleep(Duration::from_millis(100));
    }
    joins.join().unwrap();
    let (messages, _) = watcher.finish(30, "the listener on a");
    let delays: Vec<Duration> = messages
        .iter()
        .map(|(arrived, frame)| {
            let n: usize = frame["text"].as_str().unwrap()[1..].parse().unwrap();
            arrived.saturating_duration_since(sent_at[n])
        })
        .collect();
    let slowest = *delays.iter().max().unwrap();
    println!(
        "FIGURES new rooms: 5 rooms subscribed for their first client on a, each join's history read 1 s away; \
         the busy room's 30 messages reached a's listener in at most {slowest:?}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a message waited {slowest:?} while other rooms were subscribed: {delays:?}"
    );
}
