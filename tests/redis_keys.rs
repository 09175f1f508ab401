//! Verifies that Redis does not grow for ever: every key the server
//! writes for a room or a message lives a bounded time (the history
//! `--history-ttl-ms` after the room's last message, a message's
//! idempotency key a little past the publish deadline, an emptied room's
//! presence counter a few minutes), and only a few keys, one per chat or
//! one per live instance, have no TTL; and that a crashed instance's
//! presence leaves even the rooms nobody visits again.

mod common;

use std::thread;
use std::time::Duration;

use common::{Instance, RedisServer, unique, wait_for};

/// Every key under `prefix`, with its TTL in ms (-1: none).
fn keys_and_ttls(redis: &RedisServer, prefix: &str) -> Vec<(String, i64)> {
    let mut conn = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap();
    keys.into_iter()
        .map(|key| {
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
            (key, ttl)
        })
        .collect()
}

#[test]
fn abandoned_rooms_leave_no_key_behind_and_no_key_of_a_room_lives_for_ever() {
    let redis = RedisServer::start();
    let prefix = unique("keys");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &prefix,
        &["--history-ttl-ms", "2000", "--publish-deadline-ms", "1000"],
    );
    a.wait_ready();
    // Twenty rooms with ordinary traffic, then everyone leaves.
    {
        let mut clients: Vec<_> = (0..20)
            .map(|n| a.client(&format!("u{n}"), &format!("room{n}")))
            .collect();
        for (n, client) in clients.iter_mut().enumerate() {
            client.send_and_confirm(&format!("r{n}"), 3, Duration::ZERO);
        }
    }
    thread::sleep(Duration::from_millis(500));
    // The only keys without a TTL: one per chat, or one per live instance.
    let per_chat = [
        format!("{prefix}:last-id"),
        format!("{prefix}:instances"),
        format!("{prefix}:presence-instances"),
    ];
    for (key, ttl) in keys_and_ttls(&redis, &prefix) {
        if ttl == -1 {
            assert!(per_chat.contains(&key), "{key} has no TTL");
        } else if key.contains(":accepted:") {
            assert!(ttl <= 31_000, "{key} kept {ttl} ms, past the deadline");
        }
    }
    // Once their TTL is past, the rooms' history is gone.
    wait_for("the abandoned rooms' history to expire", || {
        !keys_and_ttls(&redis, &prefix)
            .iter()
            .any(|(key, _)| key.contains(":history:"))
    });
    let left: Vec<String> = keys_and_ttls(&redis, &prefix)
        .into_iter()
        .filter(|(key, _)| key.contains("room"))
        .map(|(key, ttl)| format!("{key} ({ttl} ms)"))
        .collect();
    assert!(
        left.iter()
            .all(|key| key.contains(":presence-seq:") || key.contains(":accepted:")),
        "only keys on their way out remain of the rooms: {left:?}"
    );
}

#[test]
fn a_crashed_instances_presence_leaves_rooms_nobody_visits_again() {
    let redis = RedisServer::start();
    let prefix = unique("crash-keys");
    let ttl = ["--presence-ttl-ms", "1000"];
    let mut a = Instance::redis_with("a", &redis.url(), &prefix, &ttl);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &ttl);
    a.wait_ready();
    b.wait_ready();
    // Ten rooms on a alone: b never has a client in them.
    let _clients: Vec<_> = (0..10)
        .map(|n| a.client(&format!("u{n}"), &format!("quiet{n}")))
        .collect();
    let held = |key: &str| {
        keys_and_ttls(&redis, &prefix)
            .into_iter()
            .filter(|(name, _)| name.contains(key))
            .collect::<Vec<_>>()
    };
    wait_for("a's members to be written", || {
        held(":presence:{quiet").len() == 10 && held(":presence-rooms:a").len() == 1
    });

    a.kill();
    // b's refresh finds a's entry expired and removes what a held.
    wait_for("a's presence to leave the rooms nobody visits", || {
        held(":presence:{quiet").is_empty()
            && held(":presence-rooms:a").is_empty()
            && held(":presence-cleaning:a").is_empty()
    });
    let mut conn = redis.connection().unwrap();
    let alive: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:presence-instances"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(alive, vec!["b".to_string()], "a is forgotten");
    // What is left of the rooms is on its way out.
    for (key, ttl) in held(":presence-seq:{quiet") {
        assert!(
            (0..=10 * 60 * 1000).contains(&ttl),
            "{key} kept with TTL {ttl} ms"
        );
    }
}
