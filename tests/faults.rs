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

    /// Its `status` frames' `delivery`, with when they came.
    fn statuses(&self) -> Vec<(Instant, String)> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f["type"] == "status")
            .map(|(at, f)| (*at, f["delivery"].as_str().unwrap_or_default().to_string()))
            .collect()
    }

    /// Waits until it has `count` messages, then stops it.
    fn finish(self, count: usize, who: &str) -> (Vec<Value>, Vec<(Instant, String)>) {
        wait_for(&format!("{who} to receive {count} messages"), || {
            self.messages().len() >= count
        });
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        let Watcher {
            frames,
            stop,
            handle,
        } = self;
        handle.join().expect("watcher failed");
        let stopped = Watcher {
            frames,
            stop,
            handle: thread::spawn(|| {}),
        };
        (stopped.messages(), stopped.statuses())
    }
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
    assert_exactly_once_in_order(&format!("{name}: watcher on a"), &a_messages, &accepted);
    assert_exactly_once_in_order(&format!("{name}: watcher on b"), &b_messages, &accepted);
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
        a_statuses: a_statuses.into_iter().map(|(_, s)| s).collect(),
        b_statuses: b_statuses.into_iter().map(|(_, s)| s).collect(),
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

#[test]
fn a_blackholed_subscription_is_found_dead_within_three_pings_and_nothing_is_lost() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "subscription blackholed";
    let sub = Select::name_ends_with(":a:sub");
    chat.proxy.wait_for(&sub, TIMEOUT);
    let run = run_fault(
        &chat,
        name,
        |chat| {
            // The link stops carrying bytes, with no reset: as when a NAT
            // entry is dropped. A new connection gets through.
            chat.proxy
                .inject(sub.clone(), Fault::Blackhole, Scope::OpenNow);
        },
        Duration::ZERO,
        |_| {},
    );
    figures(name, &run);
    assert_noticed(name, &run, PING * 3 + Duration::from_millis(500));
    assert!(chat.a.metric("chat_redis_dead_links_total") >= 1.0);
    assert_eq!(run.refused, 0, "{name}: the publisher was fine");
}

#[test]
fn a_half_open_subscription_is_found_dead_the_same_way() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "subscription half-open";
    let sub = Select::name_ends_with(":a:sub");
    chat.proxy.wait_for(&sub, TIMEOUT);
    let run = run_fault(
        &chat,
        name,
        |chat| {
            // Redis sees the connection closed; the instance sees nothing.
            assert_eq!(chat.proxy.half_open(sub.clone()), 1);
        },
        Duration::ZERO,
        |_| {},
    );
    figures(name, &run);
    assert_noticed(name, &run, PING * 3 + Duration::from_millis(500));
}

#[test]
fn a_blackholed_publisher_answers_every_sender_and_loses_nothing() {
    let chat = Chat::start(RedisServer::start(), &[]);
    let name = "publisher blackholed";
    let publisher = Select::name_ends_with(":a:pub");
    chat.proxy.wait_for(&publisher, TIMEOUT);
    let run = run_fault(
        &chat,
        name,
        |chat| {
            chat.proxy
                .inject(publisher.clone(), Fault::Blackhole, Scope::OpenNow);
        },
        Duration::ZERO,
        |_| {},
    );
    figures(name, &run);
    // The command timeout (2 s) finds it, or the keepalive's PING.
    assert_noticed(
        name,
        &run,
        Duration::from_millis(2000) + PING + Duration::from_millis(500),
    );
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
