//! Verifies instance failover: with three instances behind nginx, one is
//! SIGKILLed mid-stream; its clients reconnect through nginx with `since`
//! and end with every accepted message, each once, in order.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::{Client, Instance, Received, RedisServer, assert_exactly_once_in_order, unique};
use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;

/// A client that reconnects through the proxy with `since` whenever its
/// connection drops, as the page does, until it has `expected` messages.
fn follow(
    proxy: SocketAddr,
    name: String,
    mut client: Client,
    expected: usize,
) -> (Vec<Value>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut messages: Vec<Value> = Vec::new();
    let mut reconnects = 0;
    while messages.len() < expected {
        assert!(
            Instant::now() < deadline,
            "{name}: gave up with {} of {expected}",
            messages.len()
        );
        match client.read_message(&name) {
            Received::Message(frame) => messages.push(frame),
            Received::Notice(_) | Received::Nothing => {}
            Received::Lost(_) => {
                // The instance is gone: back through nginx, from the last id.
                thread::sleep(Duration::from_millis(100));
                let since = messages
                    .last()
                    .map(|m| m["id"].as_str().unwrap().to_string());
                let query = match since {
                    Some(since) => format!("name={name}&room=lobby&since={since}"),
                    None => format!("name={name}&room=lobby"),
                };
                client = Client::connect(proxy, &query);
                reconnects += 1;
            }
        }
    }
    let MaybeTlsStream::Plain(stream) = client.socket.get_ref() else {
        unreachable!()
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    client.expect_silence(Duration::from_millis(300));
    (messages, reconnects)
}

#[test]
fn clients_of_a_killed_instance_reconnect_through_nginx_and_miss_nothing() {
    const PER_SENDER: usize = 200;
    let redis = RedisServer::start();
    let prefix = unique("failover");
    let mut instances: Vec<Instance> = ["a", "b", "c"]
        .iter()
        .map(|id| Instance::redis_with(id, &redis.url(), &prefix, &["--public-ws-url", "/ws"]))
        .collect();
    for instance in &instances {
        instance.wait_ready();
    }
    let nginx = Nginx::start(&instances.iter().collect::<Vec<_>>());
    let (_, config) = common::http_get(nginx.addr, "/config.json");
    assert!(config.contains(r#""ws_url":"/ws""#), "{config}");

    // Nine clients through nginx land on all three instances.
    let followers: Vec<(String, Client)> = (0..9)
        .map(|n| {
            let name = format!("f{n}");
            let client = Client::connect(nginx.addr, &format!("name={name}&room=lobby"));
            (name, client)
        })
        .collect();
    let on_victim = followers
        .iter()
        .filter(|(_, c)| c.welcome["instance"] == "c")
        .count();
    assert!(on_victim > 0, "round robin put nobody on c");

    // Senders talk to the survivors directly, so every outcome is known.
    let senders: Vec<_> = (0..2)
        .map(|n| {
            let mut client = instances[n].client(&format!("s{n}"), "lobby");
            thread::spawn(move || {
                client.send_and_confirm(&format!("s{n}"), PER_SENDER, Duration::from_millis(5))
            })
        })
        .collect();
    let total = 2 * PER_SENDER;
    let follower_threads: Vec<_> = followers
        .into_iter()
        .map(|(name, client)| {
            let proxy = nginx.addr;
            thread::spawn(move || follow(proxy, name, client, total))
        })
        .collect();

    thread::sleep(Duration::from_millis(400));
    instances[2].kill();

    let mut accepted = HashSet::new();
    for handle in senders {
        let outcomes = handle.join().expect("sender failed");
        assert!(outcomes.refused.is_empty());
        accepted.extend(outcomes.accepted);
    }
    assert_eq!(accepted.len(), total);
    let mut reconnected = 0;
    for (n, handle) in follower_threads.into_iter().enumerate() {
        let (messages, reconnects) = handle.join().expect("follower failed");
        assert_exactly_once_in_order(&format!("follower {n}"), &messages, &accepted);
        reconnected += reconnects;
    }
    assert!(
        reconnected >= on_victim,
        "the victim's {on_victim} clients reconnected ({reconnected})"
    );
    println!(
        "instance crash: {total} sent and accepted, {on_victim} clients on the killed instance, {reconnected} reconnects, 9 followers each got all {total} once in order"
    );
}
