//! Verifies the scale-out promise: a message sent on any instance reaches
//! every client of its room on every instance, exactly once, the sender
//! included, in one order for all; and rooms stay apart.

mod common;

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use common::{Client, Instance, Listener, RedisServer, id_of, texts, two_instances, unique};

#[test]
fn a_message_sent_on_one_instance_reaches_every_client_on_both_exactly_once() {
    let redis = RedisServer::start();
    let prefix = unique("fanout");
    let (a, b) = two_instances(&redis, &prefix);

    let mut sender = a.client("alice", "lobby");
    let mut others = vec![
        a.client("ann", "lobby"),
        b.client("bob", "lobby"),
        b.client("bea", "lobby"),
    ];
    assert_eq!(sender.welcome["instance"], "a");
    assert_eq!(others[1].welcome["instance"], "b");

    sender.send("hello everyone", "cid-1");
    let own = sender.recv_messages(1).remove(0);
    assert_eq!(own["text"], "hello everyone");
    assert_eq!(own["from"], "alice");
    assert_eq!(own["instance"], "a");
    assert_eq!(own["cid"], "cid-1", "the sender's copy echoes its cid");
    assert_eq!(own["room"], "lobby");
    assert!(own["ts"].as_u64().unwrap() > 1_700_000_000_000);
    for client in &mut others {
        let copy = client.recv_messages(1).remove(0);
        assert_eq!(copy, own, "every receiver gets the same frame");
    }
    // Exactly once: nothing else follows, on any client.
    for client in others.iter_mut().chain([&mut sender]) {
        client.expect_silence(Duration::from_millis(300));
    }
}

#[test]
fn concurrent_senders_on_both_instances_are_seen_in_one_order_by_everyone() {
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 200;
    let redis = RedisServer::start();
    let prefix = unique("order");
    let instances = [
        Instance::redis("a", &redis.url(), &prefix),
        Instance::redis("b", &redis.url(), &prefix),
    ];
    for instance in &instances {
        instance.wait_ready();
    }
    // Receivers that only listen, on both instances.
    let mut listeners: Vec<Client> = (0..4)
        .map(|n| instances[n % 2].client(&format!("listener{n}"), "busy"))
        .collect();
    let senders: Vec<Client> = (0..SENDERS)
        .map(|n| instances[n % 2].client(&format!("sender{n}"), "busy"))
        .collect();

    let handles: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(n, mut sender)| {
            thread::spawn(move || {
                for i in 0..PER_SENDER {
                    sender.send(&format!("s{n}-m{i}"), &format!("s{n}-{i}"));
                }
                // Each sender, too, receives all messages, its own included.
                sender.recv_messages(SENDERS * PER_SENDER)
            })
        })
        .collect();
    let mut orders: Vec<Vec<String>> = handles
        .into_iter()
        .map(|handle| texts(&handle.join().expect("sender thread failed")))
        .collect();
    for listener in &mut listeners {
        orders.push(texts(&listener.recv_messages(SENDERS * PER_SENDER)));
    }

    let reference = &orders[0];
    let distinct: HashSet<&String> = reference.iter().collect();
    assert_eq!(distinct.len(), SENDERS * PER_SENDER, "duplicates or losses");
    for (n, order) in orders.iter().enumerate() {
        assert_eq!(order, reference, "receiver {n} saw a different order");
    }
    // Each sender's own messages keep the order it sent them in.
    for n in 0..SENDERS {
        let own: Vec<&String> = reference
            .iter()
            .filter(|t| t.starts_with(&format!("s{n}-")))
            .collect();
        let expected: Vec<String> = (0..PER_SENDER).map(|i| format!("s{n}-m{i}")).collect();
        assert_eq!(own, expected.iter().collect::<Vec<_>>());
    }
    for listener in &mut listeners {
        listener.expect_silence(Duration::from_millis(200));
    }
}

#[test]
fn ids_increase_in_acceptance_order_across_instances() {
    let redis = RedisServer::start();
    let prefix = unique("ids");
    let (a, b) = two_instances(&redis, &prefix);
    let mut on_a = a.client("x", "lobby");
    let mut on_b = b.client("y", "lobby");
    let mut ids = Vec::new();
    for i in 0..20 {
        let sender = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        sender.send(&format!("m{i}"), &format!("c{i}"));
        let message = on_a.recv_messages(1).remove(0);
        on_b.recv_messages(1);
        let id: Vec<u64> = message["id"]
            .as_str()
            .unwrap()
            .split('-')
            .map(|p| p.parse().unwrap())
            .collect();
        ids.push((id[0], id[1]));
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
}

#[test]
fn a_message_reaches_no_client_of_another_room_on_either_instance() {
    let redis = RedisServer::start();
    let prefix = unique("rooms");
    let (a, b) = two_instances(&redis, &prefix);
    let mut red_a = a.client("ra", "red");
    let mut red_b = b.client("rb", "red");
    let mut blue_a = a.client("ba", "blue");
    let mut blue_b = b.client("bb", "blue");

    red_a.send("for red only", "r1");
    blue_b.send("for blue only", "b1");
    for red in [&mut red_a, &mut red_b] {
        let got = red.recv_messages(1).remove(0);
        assert_eq!(
            (got["text"].as_str(), got["room"].as_str()),
            (Some("for red only"), Some("red"))
        );
    }
    for blue in [&mut blue_a, &mut blue_b] {
        let got = blue.recv_messages(1).remove(0);
        assert_eq!(
            (got["text"].as_str(), got["room"].as_str()),
            (Some("for blue only"), Some("blue"))
        );
    }
    for client in [&mut red_a, &mut red_b, &mut blue_a, &mut blue_b] {
        client.expect_silence(Duration::from_millis(300));
    }
}

/// A room crosses the size at which the fan-out shares its sends with
/// deliverer threads (32 local clients), both ways, again and again, while
/// a stream flows: a client's messages must never be sent by two threads
/// at once, or out of order.
#[test]
fn a_room_that_grows_past_the_shard_size_and_shrinks_keeps_one_order() {
    const STEADY: usize = 28;
    const SENDERS: usize = 3;
    const PER_SENDER: usize = 300;
    let redis = RedisServer::start();
    let prefix = unique("shards");
    let a = Instance::redis_with(
        "shards",
        &redis.url(),
        &prefix,
        &["--delivery-threads", "3"],
    );
    a.wait_ready();
    let listeners: Vec<Listener> = (0..STEADY)
        .map(|n| Listener::spawn(a.client(&format!("steady{n}"), "big"), format!("steady{n}")))
        .collect();
    let senders: Vec<Client> = (0..SENDERS)
        .map(|n| a.client(&format!("sender{n}"), "big"))
        .collect();
    let streams: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(n, mut sender)| {
            thread::spawn(move || {
                for i in 0..PER_SENDER {
                    sender.send(&format!("s{n}-m{i}"), &format!("s{n}-{i}"));
                    // About a second of stream, while the visitors churn.
                    thread::sleep(Duration::from_millis(3));
                }
                sender.recv_messages(SENDERS * PER_SENDER)
            })
        })
        .collect();
    // Clients that come and go in tens, taking the room over and under 32.
    let ws = a.ws;
    let churn = thread::spawn(move || {
        let mut seen = 0;
        for round in 0..4 {
            let mut visitors: Vec<Client> = (0..10)
                .map(|n| Client::connect(ws, &format!("name=visitor{round}-{n}&room=big")))
                .collect();
            thread::sleep(Duration::from_millis(150));
            for visitor in &mut visitors {
                let got = visitor.drain_messages(Duration::from_millis(50));
                assert!(
                    got.windows(2).all(|pair| id_of(&pair[0]) < id_of(&pair[1])),
                    "a visitor saw ids out of order or twice"
                );
                seen += got.len();
            }
        }
        seen
    });
    let mut orders: Vec<Vec<String>> = streams
        .into_iter()
        .map(|stream| texts(&stream.join().expect("sender failed")))
        .collect();
    for listener in listeners {
        orders.push(texts(&listener.finish(SENDERS * PER_SENDER)));
    }
    let visitors_saw = churn.join().expect("a visitor failed");
    assert!(visitors_saw > 0, "the visitors took part in the stream");
    let reference = &orders[0];
    let distinct: HashSet<&String> = reference.iter().collect();
    assert_eq!(distinct.len(), SENDERS * PER_SENDER, "duplicates or losses");
    for (n, order) in orders.iter().enumerate() {
        assert_eq!(order, reference, "receiver {n} saw a different order");
    }
    assert_eq!(a.metric("chat_slow_clients_dropped_total"), 0.0);
}
