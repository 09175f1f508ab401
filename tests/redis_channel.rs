//! Verifies what travels on the Redis channels: a payload published on a
//! room's channel by any Redis client reaches that room's clients on every
//! instance, a malformed one is logged, counted and skipped without
//! stopping the next; and an instance is subscribed to a room's channel
//! exactly while it has clients there (plus a short linger), so that it
//! receives no message of other rooms.

mod common;

use std::time::Duration;

use common::{Instance, RedisServer, two_instances, unique, wait_for};
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
        .arg(format!("{prefix}:room:{{lobby}}"))
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
    let channel = format!("{prefix}:room:{{lobby}}");
    let junk = [
        // Valid, but of another room than the channel's.
        json!({"type": "message", "id": "1-0", "room": "other", "from": "x", "text": "t", "ts": 1, "instance": "i"}).to_string(),
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
    let mut stored: serde_json::Value = serde_json::from_str(&fields[0].1).unwrap();
    let read_us = stored
        .as_object_mut()
        .unwrap()
        .remove("read_us")
        .expect("the X-ray's read stamp travels with the message");
    assert!(read_us.as_u64().unwrap() / 1000 <= delivered["ts"].as_u64().unwrap() + 1);
    assert_eq!(
        stored, delivered,
        "history holds the delivered frame, plus the X-ray's stamps"
    );
    let last: String = redis::cmd("GET")
        .arg(format!("{prefix}:last-id"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(&last, id);
}

fn numsub(conn: &mut redis::Connection, channel: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(conn)
        .unwrap();
    count
}

#[test]
fn an_instance_subscribes_to_a_room_only_while_it_has_clients_there() {
    let redis = RedisServer::start();
    let prefix = unique("perroom");
    let linger = ["--room-linger-ms", "300"];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &linger);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &linger);
    a.wait_ready();
    b.wait_ready();
    let mut conn = redis.connection().unwrap();
    let kitchen = format!("{prefix}:room:{{kitchen}}");
    assert_eq!(
        numsub(&mut conn, &kitchen),
        0,
        "nobody is in the kitchen yet"
    );

    let mut alice = a.client("alice", "kitchen");
    let _bob = b.client("bob", "garden");
    assert_eq!(numsub(&mut conn, &kitchen), 1, "only a has a client there");
    let mut rooms: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("{prefix}:room:*"))
        .query(&mut conn)
        .unwrap();
    rooms.sort();
    assert_eq!(
        rooms,
        [format!("{prefix}:room:{{garden}}"), kitchen.clone()],
        "PUBSUB CHANNELS reads as the list of rooms"
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

    // Carol joins the kitchen on b: b subscribes before her history is
    // read, and gets the room's messages from then on.
    let mut carol = b.client("carol", "kitchen");
    assert_eq!(numsub(&mut conn, &kitchen), 2);
    assert_eq!(carol.recv_messages(20).len(), 20, "history");
    alice.send("hello carol", "h");
    assert_eq!(carol.recv_messages(1)[0]["text"], "hello carol");
    assert_eq!(b.metric("chat_room_subscriptions"), 2.0);

    // She leaves: after the linger, b lets the room go.
    carol.socket.close(None).unwrap();
    wait_for("b to unsubscribe from the kitchen", || {
        numsub(&mut conn, &kitchen) == 1
    });
    wait_for("b's gauge to follow", || {
        b.metric("chat_room_subscriptions") == 1.0
    });
}

/// The message `scripts/inject.sh` publishes (what run_two.sh and the
/// READMEs tell a student to run) shows in a tab that has the room's
/// history and in one that has none, after what they already show; the
/// old printed command, with id `0-1`, reached Redis's subscribers and was
/// dropped by the tab with history.
#[test]
fn the_injection_script_reaches_tabs_with_and_without_history() {
    let redis = RedisServer::start();
    let prefix = unique("inject-script");
    let (a, b) = two_instances(&redis, &prefix);
    // No history yet when it joins.
    let mut first = a.client("first", "lobby");
    first.send("before", "c1");
    let before = first.recv_messages(1).remove(0);
    // Joins with "before" in its history.
    let mut later = b.client("later", "lobby");
    let history = later.drain_messages(Duration::from_millis(300));
    assert_eq!(common::texts(&history), ["before"]);

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/inject.sh");
    let output = std::process::Command::new(&script)
        .args(["--redis-url", &redis.url(), "--prefix", &prefix])
        .arg("hello from outside")
        .output()
        .expect("scripts/inject.sh runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.contains("redis-cli -u") && said.contains("PUBLISH"),
        "{said}"
    );
    assert!(said.contains("2 instance(s) received it"), "{said}");
    // As the READMEs print it, with no URL: the Redis run_two.sh leaves
    // its URL for (here in a file of this test's own).
    let dir = common::temp_dir("inject-url");
    let url_file = dir.join("run_two.redis-url");
    std::fs::write(&url_file, format!("{}\n", redis.url())).unwrap();
    let plain = std::process::Command::new(&script)
        .args(["--prefix", &prefix, "hello again"])
        .env_remove("REDIS_URL")
        .env("RUN_REDIS_URL_FILE", &url_file)
        .output()
        .expect("scripts/inject.sh runs");
    let said = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success(), "{said}");
    assert!(said.contains("the one of ./scripts/run_two.sh"), "{said}");
    assert!(said.contains("2 instance(s) received it"), "{said}");
    for (who, client) in [("first", &mut first), ("later", &mut later)] {
        let got = client.recv_messages(2);
        assert_eq!(
            common::texts(&got),
            ["hello from outside", "hello again"],
            "{who}"
        );
        let got = got[0].clone();
        assert!(
            common::id_of(&got) > common::id_of(&before),
            "{who}: its id {} sorts after the history's {}",
            got["id"],
            before["id"]
        );
    }
    // And a message sent after it comes after it.
    later.send("after", "c2");
    for client in [&mut first, &mut later] {
        assert_eq!(common::texts(&client.recv_messages(1)), ["after"]);
    }
}
