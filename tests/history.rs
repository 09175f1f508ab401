//! Verifies that what history sends a client is bounded, and that the
//! rest can be had page by page: a replay after `since` sends at most
//! `--history-replay-max` messages, and no more bytes than the client's
//! buffer holds, says that older ones remain (`notice` `history_more`),
//! and `{"type":"history","before":ID}` pages back through them, each
//! page bounded the same way, until nothing older remains; and that a
//! replay reads from Redis about what the client's buffer holds, not the
//! whole page.

mod common;

use std::time::Duration;

use common::{Client, Instance, RedisServer, unique};
use serde_json::{Value, json};
use tungstenite::Message;

/// Sends `n` messages of `text_len` characters, one at a time, and
/// returns their ids, in order, as the sender got them back.
fn fill(sender: &mut Client, n: usize, text_len: usize) -> Vec<String> {
    (0..n)
        .map(|k| {
            let cid = format!("f{k}");
            let text = format!("{k:04}{}", "x".repeat(text_len.saturating_sub(4)));
            sender.send(&text, &cid);
            loop {
                let frame = sender.recv();
                if frame["type"] == "message" && frame["cid"] == cid.as_str() {
                    break frame["id"].as_str().unwrap().to_string();
                }
                assert_ne!(frame["type"], "error", "{frame}");
            }
        })
        .collect()
}

/// Every frame until the socket is quiet for half a second.
fn frames_until_quiet(client: &mut Client) -> Vec<Value> {
    client.set_read_timeout(Duration::from_millis(500));
    let mut frames = Vec::new();
    loop {
        match client.socket.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if !frame["type"].as_str().unwrap().starts_with("presence") {
                    frames.push(frame);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    client.set_read_timeout(common::TIMEOUT);
    frames
}

fn ids_of(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn ask_before(client: &mut Client, before: &str, limit: usize) -> Value {
    let request = json!({"type": "history", "before": before, "limit": limit});
    client.send_raw(Message::text(request.to_string()));
    loop {
        let frame = client.recv();
        if frame["type"] == "history" {
            return frame;
        }
    }
}

#[test]
fn a_replay_after_since_is_capped_and_older_messages_come_page_by_page() {
    let redis = RedisServer::start();
    let prefix = unique("history-pages");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &prefix,
        &["--history-replay-max", "20", "--history-replay", "5"],
    );
    let mut sender = a.client("ann", "lobby");
    let ids = fill(&mut sender, 50, 20);

    // Back after ids[4]: the newest 20 after it, and word that more remain.
    let mut back = Client::connect(a.ws, &format!("name=bob&room=lobby&since={}", ids[4]));
    let first = frames_until_quiet(&mut back);
    let more = &first[0];
    assert_eq!(more["type"], "notice", "{first:?}");
    assert_eq!(more["code"], "history_more", "{more}");
    assert_eq!(more["before"], ids[30].as_str(), "{more}");
    let replayed: Vec<Value> = first[1..].to_vec();
    assert_eq!(
        ids_of(&replayed),
        ids[30..50],
        "the newest 20, oldest first"
    );

    // Paging back: 20 older, then the 10 between since and those.
    let page = ask_before(&mut back, &ids[30], 20);
    assert_eq!(page["room"], "lobby");
    assert_eq!(
        ids_of(page["messages"].as_array().unwrap()),
        ids[10..30],
        "{page}"
    );
    assert_eq!(page["more"], true);
    let page = ask_before(&mut back, &ids[10], 20);
    assert_eq!(ids_of(page["messages"].as_array().unwrap()), ids[0..10]);
    assert_eq!(page["more"], false, "nothing older: {page}");

    // A limit past --history-replay-max is refused, with its cid.
    let request = json!({"type": "history", "before": ids[10], "limit": 21, "cid": "h1"});
    back.send_raw(Message::text(request.to_string()));
    let refusal = back.recv();
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "bad_request", "{refusal}");
    assert_eq!(refusal["cid"], "h1", "{refusal}");

    // A newcomer gets --history-replay messages, and word of the rest.
    let mut newcomer = Client::connect(a.ws, "name=cy&room=lobby");
    let first = frames_until_quiet(&mut newcomer);
    assert_eq!(first[0]["code"], "history_more", "{first:?}");
    assert_eq!(first[0]["before"], ids[45].as_str());
    assert_eq!(ids_of(&first[1..]), ids[45..50]);
}

#[test]
fn a_replay_is_no_larger_than_the_client_buffer() {
    let redis = RedisServer::start();
    let prefix = unique("history-bytes");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &prefix,
        &[
            "--history-replay-max",
            "100",
            "--client-buffer-bytes",
            "20000",
            "--max-text-chars",
            "2000",
        ],
    );
    let mut sender = a.client("ann", "lobby");
    let ids = fill(&mut sender, 40, 2000);

    let mut back = Client::connect_raw(a.ws, &format!("name=bob&room=lobby&since={}", ids[0]));
    let mut bytes = 0;
    let mut frames = Vec::new();
    back.set_read_timeout(Duration::from_millis(500));
    while let Ok(message) = back.socket.read() {
        if let Message::Text(text) = message {
            bytes += text.len();
            frames.push(serde_json::from_str::<Value>(&text).unwrap());
        }
    }
    assert!(
        bytes <= 20000,
        "the first frames are {bytes} bytes, past --client-buffer-bytes"
    );
    let notice = frames.iter().find(|f| f["type"] == "notice").unwrap();
    assert_eq!(notice["code"], "history_more", "{notice}");
    let replayed: Vec<Value> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .cloned()
        .collect();
    assert!(
        (5..40).contains(&replayed.len()),
        "{} messages",
        replayed.len()
    );
    assert_eq!(ids_of(&replayed).last(), ids.last(), "the newest are kept");
    assert_eq!(notice["before"], replayed[0]["id"]);
}

/// Bytes Redis has written to its clients so far.
fn redis_output_bytes(redis: &RedisServer) -> u64 {
    let mut conn = redis.connection().unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_replay_reads_from_redis_only_about_what_the_client_buffer_holds() {
    let redis = RedisServer::start();
    let prefix = unique("history-read");
    let buffer = 100_000;
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &prefix,
        &[
            "--history-replay-max",
            "200",
            "--client-buffer-bytes",
            &buffer.to_string(),
            "--max-text-chars",
            "2000",
            "--presence",
            "off",
        ],
    );
    let mut sender = a.client("ann", "lobby");
    let ids = fill(&mut sender, 200, 2000);
    drop(sender);
    std::thread::sleep(Duration::from_millis(300));

    // 200 messages of 2 KB are 400 KB in Redis; the client can take 100 KB.
    let before = redis_output_bytes(&redis);
    let mut back = Client::connect_raw(a.ws, &format!("name=bob&room=lobby&since={}", ids[0]));
    back.set_read_timeout(Duration::from_millis(500));
    let mut replayed = 0;
    while let Ok(message) = back.socket.read() {
        if let Message::Text(text) = message
            && text.contains(r#""type":"message""#)
        {
            replayed += 1;
        }
    }
    let read = redis_output_bytes(&redis) - before;
    assert!(replayed > 20, "{replayed} messages replayed");
    assert!(
        read < 2 * buffer,
        "Redis sent {read} bytes for a replay the client's {buffer}-byte buffer cuts to {replayed} messages"
    );
}
