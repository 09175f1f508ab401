//! Verifies that nothing accepted is lost: history and `since` (exact
//! resume, truncated, malformed, future), a subscriber connection cut again
//! and again, and a Redis crash with AOF persistence mid-stream.

mod common;

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use common::{
    Client, Instance, Listener, Outcomes, RedisServer, assert_exactly_once_in_order, texts,
    two_instances, unique, wait_for,
};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn since_resumes_exactly_after_the_given_id_then_goes_live() {
    let redis = RedisServer::start();
    let a = Instance::redis("since", &redis.url(), &unique("since"));
    a.wait_ready();
    let mut alice = a.client("alice", "lobby");
    for i in 0..6 {
        alice.send(&format!("m{i}"), &format!("c{i}"));
    }
    let sent = alice.recv_messages(6);
    let since = sent[2]["id"].as_str().unwrap();

    let mut back = Client::connect(a.ws, &format!("name=bob&room=lobby&since={since}"));
    assert_eq!(texts(&back.recv_messages(3)), ["m3", "m4", "m5"]);
    back.expect_silence(Duration::from_millis(200));
    alice.send("live", "live");
    assert_eq!(
        back.recv_messages(1)[0]["text"],
        "live",
        "live messages follow the replay"
    );
    back.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_since_older_than_history_gets_a_truncation_notice_and_what_is_left() {
    // Small stream nodes let `MAXLEN ~` trim at a fine grain.
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "2"]);
    let a = Instance::redis_with(
        "trim",
        &redis.url(),
        &unique("trim"),
        &["--history-len", "4"],
    );
    a.wait_ready();
    let mut alice = a.client("alice", "lobby");
    for i in 0..12 {
        alice.send(&format!("m{i}"), &format!("c{i}"));
    }
    let sent = alice.recv_messages(12);
    let first = sent[0]["id"].as_str().unwrap();

    let mut late = Client::connect(a.ws, &format!("name=late&room=lobby&since={first}"));
    let notice = late.recv();
    assert_eq!(notice["type"], "notice");
    assert_eq!(notice["code"], "history_truncated");
    let mut kept = Vec::new();
    loop {
        let message = late.recv();
        assert_eq!(message["type"], "message");
        let last = message["text"] == "m11";
        kept.push(message);
        if last {
            break;
        }
    }
    assert!(
        kept.len() < 12 && kept.len() >= 4,
        "history holds about 4: {} kept",
        kept.len()
    );
    assert!(
        common::id_of(&kept[0]) > common::id_of(&sent[0]),
        "the first message is gone"
    );
    late.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_malformed_since_is_a_bad_request() {
    let a = Instance::local("bad-since");
    let mut client = Client::connect_raw(a.ws, "name=x&since=yesterday");
    let error = client.recv();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "bad_request");
    assert!(
        error["message"].as_str().unwrap().contains("since"),
        "{error}"
    );
    match client.socket.read() {
        Ok(Message::Close(Some(close))) => assert_eq!(close.code, CloseCode::Policy),
        other => panic!("expected a close 1008, got {other:?}"),
    }
}

#[test]
fn a_future_since_replays_nothing_and_live_messages_still_arrive() {
    let redis = RedisServer::start();
    let a = Instance::redis("future", &redis.url(), &unique("future"));
    a.wait_ready();
    let mut alice = a.client("alice", "lobby");
    alice.send("before", "b");
    alice.recv_messages(1);
    let mut future = Client::connect(a.ws, "name=f&room=lobby&since=99999999999999-0");
    future.expect_silence(Duration::from_millis(200));
    alice.send("after", "a");
    assert_eq!(future.recv_messages(1)[0]["text"], "after");
}

/// Kills one instance's subscriber connection (by its `CLIENT SETNAME`).
fn kill_subscriber(redis: &RedisServer, name: &str) -> bool {
    let mut conn = redis.connection().unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    let Some(id) = list
        .lines()
        .find(|line| line.split(' ').any(|field| field == format!("name={name}")))
        .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
    else {
        return false;
    };
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut conn)
        .unwrap();
    killed == 1
}

/// Listeners and confirming senders spread over two instances, in room
/// lobby: the load every fault test runs under.
struct Traffic {
    listeners: Vec<Listener>,
    senders: Vec<thread::JoinHandle<Outcomes>>,
}

impl Traffic {
    fn start(
        a: &Instance,
        b: &Instance,
        senders: usize,
        per_sender: usize,
        pace: Duration,
    ) -> Self {
        let on = |n: usize| if n.is_multiple_of(2) { a } else { b };
        let listeners = (0..4)
            .map(|n| {
                Listener::spawn(
                    on(n).client(&format!("l{n}"), "lobby"),
                    format!("listener {n} on {}", on(n).id),
                )
            })
            .collect();
        let senders = (0..senders)
            .map(|n| {
                let mut client = on(n).client(&format!("s{n}"), "lobby");
                thread::spawn(move || client.send_and_confirm(&format!("s{n}"), per_sender, pace))
            })
            .collect();
        Traffic { listeners, senders }
    }

    /// Waits for every sender, checks that each listener got exactly the
    /// accepted messages, each once, in id order; returns (accepted,
    /// refused, the `ts` of every accepted message).
    fn finish(self, per_sender: usize) -> (HashSet<String>, HashSet<String>, Vec<u64>) {
        let mut accepted = HashSet::new();
        let mut refused = HashSet::new();
        for handle in self.senders {
            let outcomes = handle.join().expect("sender failed");
            assert_eq!(
                outcomes.accepted.len() + outcomes.refused.len(),
                per_sender,
                "one outcome each"
            );
            accepted.extend(outcomes.accepted);
            refused.extend(outcomes.refused);
        }
        assert!(accepted.is_disjoint(&refused));
        let mut times = Vec::new();
        for (n, listener) in self.listeners.into_iter().enumerate() {
            let messages = listener.finish(accepted.len());
            assert_exactly_once_in_order(&format!("listener {n}"), &messages, &accepted);
            times = messages.iter().filter_map(|m| m["ts"].as_u64()).collect();
        }
        (accepted, refused, times)
    }
}

#[test]
fn a_subscriber_cut_again_and_again_catches_up_without_loss_or_duplicates() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 250;
    let redis = RedisServer::start();
    let prefix = unique("cut");
    let (a, b) = two_instances(&redis, &prefix);
    let traffic = Traffic::start(&a, &b, SENDERS, PER_SENDER, Duration::from_millis(4));

    let sub_name = format!("{prefix}:b:sub");
    let mut kills = 0;
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while kills < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "found b's subscriber {sub_name} to kill only {kills} times"
        );
        thread::sleep(Duration::from_millis(150));
        wait_for("b to resubscribe", || {
            b.metric("chat_redis_subscriber_up") == 1.0
        });
        if kill_subscriber(&redis, &sub_name) {
            kills += 1;
        }
    }

    let (accepted, refused, _) = traffic.finish(PER_SENDER);
    assert!(
        refused.is_empty(),
        "the publisher was never cut: {refused:?}"
    );
    assert_eq!(accepted.len(), SENDERS * PER_SENDER);
    assert!(b.metric("chat_redis_reconnects_total") >= 5.0);
    assert_eq!(
        a.metric("chat_redis_reconnects_total"),
        0.0,
        "only b's subscriber was cut"
    );
    println!(
        "subscriber cut: {kills} kills, {} sent, {} accepted, each delivered once to 4 listeners",
        SENDERS * PER_SENDER,
        accepted.len()
    );
}

#[test]
fn a_redis_crash_with_aof_loses_no_accepted_message_and_refuses_the_rest() {
    // 300 messages 10 ms apart: 3 s of traffic for crashes that end after
    // about 1.2 s, so that messages are sent before, during and after them.
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 300;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let prefix = unique("crash");
    let (a, b) = two_instances(&redis, &prefix);
    let traffic = Traffic::start(&a, &b, SENDERS, PER_SENDER, Duration::from_millis(10));

    let first_crash = now_millis();
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(300));
        redis.kill();
        thread::sleep(Duration::from_millis(300));
        redis.restart();
    }
    let last_restart = now_millis();

    let (accepted, refused, times) = traffic.finish(PER_SENDER);
    // The crashes fell in the middle of the traffic: messages were accepted
    // before the first and after the last, and some were refused.
    assert!(
        times.iter().any(|&ts| ts < first_crash),
        "no message was accepted before the first crash"
    );
    assert!(
        times.iter().any(|&ts| ts > last_restart),
        "no message was accepted after the last restart: the traffic ended before the crashes did"
    );
    assert!(
        !refused.is_empty(),
        "no message was refused: no send met Redis down"
    );
    // No client was dropped: a listener or sender whose connection closed
    // would have panicked above.
    assert_eq!(
        a.metric("chat_connections_total") + b.metric("chat_connections_total"),
        8.0
    );
    println!(
        "redis crash: {} sent, {} accepted, {} refused unavailable, each accepted delivered once to 4 listeners",
        SENDERS * PER_SENDER,
        accepted.len(),
        refused.len()
    );
}

/// Milliseconds since the Unix epoch, the clock of a message's `ts` (Redis
/// runs on this machine).
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Sends a signal (`STOP`, `CONT`) to a process.
fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

#[test]
fn a_publish_whose_outcome_stays_unknown_is_answered_outcome_unknown() {
    let redis = RedisServer::start();
    let a = Instance::redis_with(
        "doubt",
        &redis.url(),
        &unique("doubt"),
        &["--publish-deadline-ms", "300"],
    );
    a.wait_ready();
    let mut alice = a.client("alice", "lobby");
    alice.send("first", "d0");
    assert_eq!(alice.recv_messages(1)[0]["cid"], "d0");

    // A frozen Redis takes the accept script and never answers: the
    // instance cannot know whether it ran.
    signal(redis.pid(), "STOP");
    alice.send("in doubt", "d1");
    let error = loop {
        let frame = alice.recv();
        if frame["type"] != "status" {
            break frame;
        }
    };
    signal(redis.pid(), "CONT");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "outcome_unknown", "{error}");
    assert_eq!(error["cid"], "d1", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("may or may not have been sent"),
        "{message}"
    );

    // Whether Redis ran it when it woke up depends on where it stopped
    // reading; either way the client goes on, and sees it at most once.
    // (Sends are refused as unavailable until the publisher reconnects.)
    let mut in_doubt = 0;
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    'resend: for n in 0.. {
        assert!(std::time::Instant::now() < deadline, "never sent again");
        let cid = format!("after-{n}");
        alice.send("after", &cid);
        loop {
            let frame = alice.recv();
            let own = frame["cid"] == cid.as_str();
            match frame["type"].as_str() {
                Some("message") if own => break 'resend,
                Some("message") if frame["cid"] == "d1" => in_doubt += 1,
                Some("error") if own && frame["code"] == "unavailable" => break,
                Some("status") => {}
                _ => panic!("unexpected frame {frame}"),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(in_doubt <= 1, "the message in doubt came {in_doubt} times");
    assert_eq!(a.metric("chat_messages_outcome_unknown_total"), 1.0);
}
