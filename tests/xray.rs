//! Verifies the message X-ray (`trace=1`): a traced client on another
//! instance gets every hop of a message's path, in order, each stamped;
//! history comes stamped `via: "history"`; a traced client in a room big
//! enough to be sharded over the deliverers keeps its order; a client
//! that did not ask gets exactly the frame it always got; past
//! `--max-traced-clients` a client that asks is told no and gets plain
//! frames; and a message that waited in a stalled tab's outbox is stamped
//! "written" when it left the outbox, its wait a hop of its own.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, Instance, RedisServer, two_instances, unique};
use serde_json::{Value, json};
use tungstenite::Message;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn send_typed(client: &mut Client, text: &str, cid: &str, typed_us: u64) {
    let frame = json!({"type": "message", "text": text, "cid": cid, "typed_us": typed_us});
    client.send_raw(Message::text(frame.to_string()));
}

fn stamp(trace: &Value, field: &str) -> u64 {
    trace[field]
        .as_u64()
        .unwrap_or_else(|| panic!("trace has no {field}: {trace}"))
}

/// The hops, checked in the order a message travels them. Redis stamps in
/// whole milliseconds, so its hop may read up to 1 ms before the read.
fn assert_hops_in_order(trace: &Value, typed_us: u64, shown_us: u64) {
    let read = stamp(trace, "read_us");
    let accepted = stamp(trace, "accepted_ms") * 1000;
    let received = stamp(trace, "received_us");
    let queued = stamp(trace, "queued_us");
    let sent = stamp(trace, "sent_us");
    assert!(typed_us <= read, "typed {typed_us} after read {read}");
    assert!(
        read <= accepted + 1000,
        "read {read} after accepted {accepted}"
    );
    assert!(
        accepted <= received,
        "accepted {accepted} after received {received}"
    );
    assert!(read <= received, "read {read} after received {received}");
    assert!(
        received <= queued,
        "received {received} after queued {queued}"
    );
    assert!(queued <= sent, "queued {queued} after sent {sent}");
    assert!(sent <= shown_us, "sent {sent} after shown {shown_us}");
}

#[test]
fn a_traced_client_on_another_instance_sees_every_hop_and_others_get_the_plain_frame() {
    let redis = RedisServer::start();
    let prefix = unique("xray");
    let (a, b) = two_instances(&redis, &prefix);

    let mut sender = a.client("ann", "lobby");
    let mut traced = Client::connect(b.ws, "name=bob&room=lobby&trace=1");
    let mut plain = b.client("bea", "lobby");

    let typed_us = now_us();
    send_typed(&mut sender, "look at my path", "x1", typed_us);
    let seen = traced.recv_messages(1).remove(0);
    let shown_us = now_us();
    let trace = &seen["trace"];
    assert_eq!(
        trace["typed_us"], typed_us,
        "the sender's stamp travels: {seen}"
    );
    assert_eq!(trace["read_by"], "a");
    assert_eq!(trace["received_by"], "b");
    assert_eq!(trace["via"], "pubsub");
    assert_eq!(
        stamp(trace, "accepted_ms"),
        seen["ts"].as_u64().unwrap(),
        "Redis's hop is the id's time"
    );
    assert_hops_in_order(trace, typed_us, shown_us);

    let mut expected = seen.clone();
    expected.as_object_mut().unwrap().remove("trace");
    let plain_copy = plain.recv_messages(1).remove(0);
    assert_eq!(plain_copy, expected, "no trace, nothing else changed");
    assert_eq!(
        sender.recv_messages(1).remove(0),
        expected,
        "the untraced sender gets the plain frame too"
    );

    // History (the first frames) comes stamped as such.
    let mut late = Client::connect(b.ws, "name=cy&room=lobby&trace=1");
    let history = late.drain_messages(Duration::from_millis(500));
    assert_eq!(history.len(), 1, "{history:?}");
    let trace = &history[0]["trace"];
    assert_eq!(trace["via"], "history");
    assert_eq!(trace["received_by"], "b");
    assert_eq!(trace["typed_us"], typed_us);
    assert!(stamp(trace, "received_us") <= stamp(trace, "queued_us"));
    assert_eq!(
        stamp(trace, "queued_us"),
        stamp(trace, "sent_us"),
        "history's first frames are written as they are made"
    );
}

#[test]
fn a_traced_client_in_a_sharded_room_keeps_its_order_and_its_stamps() {
    // 40 clients on b: past the size (32) at which a room's deliveries are
    // spread over the deliverer threads.
    let redis = RedisServer::start();
    let prefix = unique("xray-shard");
    let a = Instance::redis("a", &redis.url(), &prefix);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &["--delivery-threads", "3"]);
    a.wait_ready();
    b.wait_ready();
    let mut crowd: Vec<Client> = (0..38).map(|n| b.client(&format!("p{n}"), "big")).collect();
    let mut traced: Vec<Client> = (0..2)
        .map(|n| Client::connect(b.ws, &format!("name=t{n}&room=big&trace=1")))
        .collect();
    let mut sender = a.client("ann", "big");
    for n in 0..30 {
        send_typed(&mut sender, &format!("m{n}"), &format!("c{n}"), now_us());
    }
    for client in &mut traced {
        let got = client.recv_messages(30);
        let texts: Vec<_> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
        let expected: Vec<_> = (0..30).map(|n| format!("m{n}")).collect();
        assert_eq!(texts, expected, "in order");
        for message in &got {
            assert_eq!(message["trace"]["received_by"], "b", "{message}");
            let trace = &message["trace"];
            assert!(stamp(trace, "received_us") <= stamp(trace, "queued_us"));
            assert!(stamp(trace, "queued_us") <= stamp(trace, "sent_us"));
        }
    }
    for client in crowd.iter_mut().take(5) {
        let got = client.recv_messages(30);
        assert!(got.iter().all(|m| m.get("trace").is_none()));
        assert_eq!(got[29]["text"], "m29");
    }
}

#[test]
fn without_redis_the_x_ray_says_the_message_never_left_the_instance() {
    let solo = Instance::local("solo");
    let mut traced = Client::connect(solo.ws, "name=ann&room=lobby&trace=1");
    let typed_us = now_us();
    send_typed(&mut traced, "alone", "s1", typed_us);
    let seen = traced.recv_messages(1).remove(0);
    let trace = &seen["trace"];
    assert_eq!(trace["via"], "local");
    assert_eq!(trace["read_by"], "solo");
    assert_eq!(trace["received_by"], "solo");
    assert_hops_in_order(trace, typed_us, now_us());
}

#[test]
fn past_max_traced_clients_a_client_asking_for_the_x_ray_is_told_no_and_gets_plain_frames() {
    let solo = Instance::start("solo", &["--broker", "local", "--max-traced-clients", "1"]);
    let mut first = Client::connect(solo.ws, "name=ann&room=lobby&trace=1");
    let mut second = Client::connect(solo.ws, "name=bob&room=lobby&trace=1");
    let refusal = second.recv();
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "trace_refused", "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-traced-clients")),
        "the refusal says which limit: {refusal}"
    );
    assert!(refusal.get("cid").is_none(), "{refusal}");

    send_typed(&mut first, "seen twice", "t1", now_us());
    assert!(first.recv_messages(1)[0].get("trace").is_some());
    let plain = second.recv_messages(1).remove(0);
    assert!(
        plain.get("trace").is_none(),
        "no X-ray past the cap: {plain}"
    );
    assert_eq!(plain["text"], "seen twice");

    // The traced place is given back when its client leaves.
    drop(first);
    solo.wait_metric("chat_clients_connected", 1.0);
    let mut third = Client::connect(solo.ws, "name=cy&room=lobby&trace=1");
    send_typed(&mut second, "now traced", "t2", now_us());
    let seen = third.recv_messages(2);
    assert_eq!(seen[0]["trace"]["via"], "history", "{seen:?}");
    assert_eq!(seen[1]["text"], "now traced");
    assert_eq!(seen[1]["trace"]["via"], "local", "{seen:?}");
}

#[test]
fn a_message_that_waited_in_a_stalled_tabs_outbox_is_stamped_written_when_it_leaves() {
    // "Stall this tab": the server stops writing to the traced client's
    // socket for STALL_S seconds; a message sent meanwhile waits in its
    // outbox.
    const STALL_S: u64 = 3;
    let solo = Instance::start("solo", &["--broker", "local", "--demo-controls"]);
    let mut traced = Client::connect(solo.ws, "name=ann&room=lobby&trace=1");
    let mut sender = solo.client("bob", "lobby");
    let id = traced.welcome["client"].as_str().unwrap().to_string();
    let (status, body) = solo.demo_post(&format!(
        "/demo/stall-reading?client={id}&seconds={STALL_S}"
    ));
    assert_eq!(status, 200, "{body}");
    let stalled_at = now_us();

    let typed_us = now_us();
    send_typed(&mut sender, "waited in the outbox", "w1", typed_us);
    let seen = traced.recv_messages(1).remove(0);
    let shown_us = now_us();
    let trace = &seen["trace"];
    assert_hops_in_order(trace, typed_us, shown_us);
    let received = stamp(trace, "received_us");
    let written = stamp(trace, "sent_us");
    let stall_us = STALL_S * 1_000_000;
    eprintln!(
        "stalled {STALL_S} s: received +{} ms after the stall began, written +{} ms after \
         received, shown +{} ms after written: {trace}",
        received.saturating_sub(stalled_at) / 1000,
        (written - received) / 1000,
        (shown_us - written) / 1000
    );
    assert!(
        written - received >= stall_us * 2 / 3,
        "the wait in the outbox comes before \"written\": written {} ms after received \
         (stall {STALL_S} s): {trace}",
        (written - received) / 1000
    );
    assert!(
        shown_us - written < stall_us / 3,
        "after \"written\" comes only the way to the tab, not the stall: shown {} ms \
         after written: {trace}",
        (shown_us - written) / 1000
    );
    // The outbox wait is a hop of its own: from "queued" (in order, as
    // checked above) to "written".
    let queued = stamp(trace, "queued_us");
    assert!(
        queued - received < stall_us / 3,
        "queued as soon as received, while the tab was stalled: {trace}"
    );
}
