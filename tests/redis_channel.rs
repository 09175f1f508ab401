//! Verifies what travels on the Redis channel: a payload published there by
//! any Redis client reaches the clients of every instance, and a malformed
//! one is logged, counted and skipped without stopping the next.

mod common;

use std::time::Duration;

use common::{Instance, RedisServer, two_instances, unique};
use serde_json::json;

#[test]
fn a_payload_published_with_a_plain_redis_client_reaches_every_instance() {
    let redis = RedisServer::start();
    let prefix = unique("inject");
    let (a, b) = two_instances(&redis, &prefix);
    let mut on_a = a.client("alice", "lobby");
    let mut on_b = b.client("bob", "lobby");

    let payload = json!({
        "type": "message", "id": "9999999999999-0", "room": "lobby",
        "from": "redis-cli", "text": "hello from outside", "ts": 9999999999999u64,
        "instance": "outside",
    });
    let mut conn = redis.connection().unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(format!("{prefix}:messages"))
        .arg(payload.to_string())
        .query(&mut conn)
        .unwrap();
    assert_eq!(receivers, 2, "both instances are subscribed");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.recv_messages(1).remove(0), payload);
    }
}

#[test]
fn a_malformed_payload_is_skipped_and_the_next_valid_one_still_arrives() {
    let redis = RedisServer::start();
    let prefix = unique("malformed");
    let a = Instance::redis("a", &redis.url(), &prefix);
    a.wait_ready();
    let mut client = a.client("alice", "lobby");
    let mut conn = redis.connection().unwrap();
    let channel = format!("{prefix}:messages");
    let junk = [
        "not json at all".to_string(),
        "{}".to_string(),
        json!({"type": "message", "room": "lobby", "text": "no id"}).to_string(),
        json!({"type": "message", "id": "1-0", "room": "lobby", "from": "x", "text": 5, "ts": 1, "instance": "i"}).to_string(),
        json!({"type": "message", "id": "1-0", "room": "bad room!", "from": "x", "text": "t", "ts": 1, "instance": "i"}).to_string(),
        json!({"type": "shout", "id": "1-0"}).to_string(),
        json!({"type": "message", "id": "1-0", "room": "lobby", "from": "x", "text": "t", "ts": "soon", "instance": "i"}).to_string(),
        json!({"type": "message", "id": "1-0", "room": "lobby", "from": "x", "text": "huge".repeat(1_000_000), "ts": 1, "instance": "i"}).to_string(),
        format!(r#"{{"type":"message","id":"1-0","room":"lobby","from":"x","text":"t","ts":1,"instance":"i","x":{}{}}}"#, "[".repeat(5000), "]".repeat(5000)),
    ];
    for payload in &junk {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query(&mut conn)
            .unwrap();
    }
    let valid = json!({
        "type": "message", "id": "2-0", "room": "lobby", "from": "x",
        "text": "still alive", "ts": 2, "instance": "i",
    });
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(valid.to_string())
        .query(&mut conn)
        .unwrap();

    assert_eq!(client.recv_messages(1).remove(0), valid);
    client.expect_silence(Duration::from_millis(200));
    assert_eq!(
        a.metric("chat_broker_payloads_invalid_total"),
        junk.len() as f64
    );
    assert!(
        a.log().contains("payload on"),
        "skipped payloads are logged:\n{}",
        a.log()
    );
}

#[test]
fn what_the_server_writes_to_redis_is_the_documented_frame_and_history() {
    let redis = RedisServer::start();
    let prefix = unique("layout");
    let a = Instance::redis("a", &redis.url(), &prefix);
    a.wait_ready();
    let mut client = a.client("alice", "kitchen");
    client.send("tea?", "t1");
    let delivered = client.recv_messages(1).remove(0);

    let mut conn = redis.connection().unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:history:kitchen"))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert_eq!(entries.len(), 1);
    let (id, fields) = &entries[0];
    assert_eq!(
        id,
        delivered["id"].as_str().unwrap(),
        "the stream id is the message id"
    );
    assert_eq!(fields[0].0, "m");
    let stored: serde_json::Value = serde_json::from_str(&fields[0].1).unwrap();
    assert_eq!(
        stored, delivered,
        "history holds exactly the delivered frame"
    );
    let last: String = redis::cmd("GET")
        .arg(format!("{prefix}:last-id"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(&last, id);
}
