//! Verifies the fault panel's endpoints (`--demo-controls`): each does what
//! it says and the server recovers the ordinary way (a cut subscription
//! comes back and catches up; a pause delays delivery, in order; a stalled
//! client is dropped as a slow consumer while its neighbours get
//! everything); without the flag they refuse; and `/stats` lists every
//! instance that is up.

mod common;

use std::time::{Duration, Instant};

use common::{
    Client, Instance, RedisServer, http_get_with, http_post, http_post_with, texts, unique,
    wait_for,
};
use serde_json::Value;
use tungstenite::Message;

fn demo_pair(redis: &RedisServer, extra: &[&str]) -> (Instance, Instance) {
    let prefix = unique("demo");
    let mut args = vec!["--demo-controls"];
    args.extend_from_slice(extra);
    let a = Instance::redis_with("a", &redis.url(), &prefix, &args);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &args);
    a.wait_ready();
    b.wait_ready();
    (a, b)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The next frame of type `kind`; the messages before it go to `messages`.
fn next_of(client: &mut Client, kind: &str, messages: &mut Vec<Value>) -> Value {
    loop {
        let frame = client.recv();
        if frame["type"] == kind {
            return frame;
        }
        if frame["type"] == "message" {
            messages.push(frame);
        }
    }
}

#[test]
fn without_the_flag_the_controls_refuse_and_the_page_is_told_to_hide_them() {
    let redis = RedisServer::start();
    let a = Instance::redis("a", &redis.url(), &unique("nodemo"));
    a.wait_ready();
    for path in [
        "/demo/cut-subscription",
        "/demo/pause-delivery?seconds=2",
        "/demo/stall-reading?client=c1&seconds=2",
    ] {
        let (status, body) = http_post(a.admin(), path);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("--demo-controls"), "{body}");
    }
    let (_, config) = a.admin_get("/config.json");
    assert_eq!(json(&config)["demo_controls"], false);
    let (status, stats) = a.admin_get("/stats");
    assert_eq!(status, 200);
    assert_eq!(json(&stats)["demo_controls"], false);
}

#[test]
fn cutting_the_subscription_reports_down_then_up_and_catches_up() {
    let redis = RedisServer::start();
    let (a, b) = demo_pair(&redis, &[]);
    let (_, config) = a.admin_get("/config.json");
    assert_eq!(json(&config)["demo_controls"], true);
    let mut reader = a.client("ann", "lobby");
    let mut writer = b.client("bob", "lobby");
    let reconnects = a.metric("chat_redis_reconnects_total");

    // Without `seconds`, it reconnects at once.
    let (status, body) = b.demo_post("/demo/cut-subscription");
    assert_eq!(status, 200, "{body}");
    let mut ignored = Vec::new();
    assert_eq!(
        next_of(&mut writer, "status", &mut ignored)["delivery"],
        "down"
    );
    assert_eq!(
        next_of(&mut writer, "status", &mut ignored)["delivery"],
        "up"
    );

    let (status, body) = a.demo_post("/demo/cut-subscription?seconds=2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ok"], true);
    let cut_at = Instant::now();
    let mut got = Vec::new();
    let down = next_of(&mut reader, "status", &mut got);
    assert_eq!(down["delivery"], "down", "{down}");
    assert_eq!(
        a.get("/readyz").0,
        503,
        "a is not ready while its subscription is cut"
    );
    // Sent while a's subscription is held down: ann gets it from the
    // catch-up, exactly once.
    writer.send("during the cut", "d1");
    let up = next_of(&mut reader, "status", &mut got);
    assert_eq!(up["delivery"], "up", "{up}");
    assert!(
        cut_at.elapsed() >= Duration::from_millis(1500),
        "the subscription stayed away as long as asked"
    );
    assert_eq!(texts(&got), ["during the cut"], "caught up before `up`");
    assert!(a.log().contains("cut on purpose"), "the log says why");
    writer.send("after the cut", "d2");
    got.extend(reader.drain_messages(Duration::from_millis(800)));
    assert_eq!(texts(&got), ["during the cut", "after the cut"]);
    assert!(a.metric("chat_redis_reconnects_total") > reconnects);
}

#[test]
fn a_pause_holds_delivery_then_everything_arrives_in_order() {
    let redis = RedisServer::start();
    let (a, b) = demo_pair(&redis, &[]);
    let mut reader = a.client("ann", "lobby");
    let mut writer = b.client("bob", "lobby");

    let (status, body) = a.demo_post("/demo/pause-delivery?seconds=2");
    assert_eq!(status, 200, "{body}");
    let (_, stats) = a.admin_get("/stats");
    assert!(
        json(&stats)["local"]["delivery_paused_until_ms"].is_u64(),
        "{stats}"
    );
    let paused_at = Instant::now();
    for n in 0..3 {
        writer.send(&format!("p{n}"), &format!("p{n}"));
    }
    // b is not paused: its own client has them at once.
    assert_eq!(texts(&writer.recv_messages(3)), ["p0", "p1", "p2"]);
    reader.expect_silence(Duration::from_millis(1000));
    let got = reader.recv_messages(3);
    assert!(
        paused_at.elapsed() >= Duration::from_millis(1500),
        "delivered before the pause ended"
    );
    assert_eq!(texts(&got), ["p0", "p1", "p2"]);
}

#[test]
fn a_stalled_client_is_dropped_as_a_slow_consumer_and_its_neighbours_get_everything() {
    let redis = RedisServer::start();
    let (a, b) = demo_pair(&redis, &["--client-buffer-bytes", "4096"]);
    let mut stalled = a.client("sam", "lobby");
    let mut neighbour = a.client("nat", "lobby");
    let mut writer = b.client("bob", "lobby");
    let id = stalled.welcome["client"].as_str().unwrap().to_string();

    let (status, body) = a.demo_post(&format!("/demo/stall-reading?client={id}&seconds=30"));
    assert_eq!(status, 200, "{body}");
    let text = "x".repeat(300);
    for n in 0..30 {
        writer.send(&format!("{n} {text}"), &format!("s{n}"));
    }
    let got = neighbour.recv_messages(30);
    assert_eq!(got[29]["cid"], "s29", "the neighbour is not held up");
    // The stalled client gets what fit, then the Close frame.
    let close = loop {
        match stalled.socket.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no Close frame: {e}"),
        }
    };
    let close = close.expect("a Close frame with a code");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason, "slow consumer: send buffer full");
    wait_for("the slow consumer to be counted", || {
        a.metric("chat_slow_clients_dropped_total") == 1.0
    });
}

#[test]
fn a_short_stall_delivers_what_waited_in_order() {
    let redis = RedisServer::start();
    let (a, b) = demo_pair(&redis, &[]);
    let mut stalled = a.client("sam", "lobby");
    let mut writer = b.client("bob", "lobby");
    let id = stalled.welcome["client"].as_str().unwrap().to_string();

    let (status, body) = a.demo_post(&format!("/demo/stall-reading?client={id}&seconds=2"));
    assert_eq!(status, 200, "{body}");
    for n in 0..5 {
        writer.send(&format!("w{n}"), &format!("w{n}"));
    }
    stalled.expect_silence(Duration::from_millis(1000));
    assert_eq!(
        texts(&stalled.recv_messages(5)),
        ["w0", "w1", "w2", "w3", "w4"]
    );
}

#[test]
fn bad_requests_to_the_controls_say_what_is_wrong() {
    let redis = RedisServer::start();
    let (a, _b) = demo_pair(&redis, &[]);
    let cases = [
        ("/demo/pause-delivery?seconds=0", 400, "seconds"),
        ("/demo/pause-delivery?seconds=soon", 400, "seconds"),
        ("/demo/stall-reading?client=c999&seconds=2", 404, "c999"),
        ("/demo/stall-reading?seconds=2", 400, "client"),
        ("/demo/reboot", 404, "no demo control"),
    ];
    for (path, code, says) in cases {
        let (status, body) = a.demo_post(path);
        assert_eq!(status, code, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    let (status, _) = a.admin_get("/demo/cut-subscription");
    assert_eq!(status, 405, "a GET does not cut anything");
}

#[test]
fn stats_list_every_instance_that_is_up_with_its_clients() {
    let redis = RedisServer::start();
    let (a, b) = demo_pair(&redis, &[]);
    let _clients = [
        a.client("ann", "lobby"),
        a.client("al", "x"),
        b.client("bob", "lobby"),
    ];
    wait_for("both instances in /stats with their clients", || {
        let (_, body) = b.admin_get("/stats");
        let stats = json(&body);
        let instances = stats["instances"].as_array().cloned().unwrap_or_default();
        let clients = |name: &str| {
            instances
                .iter()
                .find(|i| i["instance"] == name)
                .map(|i| (i["clients"].as_i64().unwrap(), i["rooms"].as_u64().unwrap()))
        };
        stats["instance"] == "b" && clients("a") == Some((2, 2)) && clients("b") == Some((1, 1))
    });
    let (_, body) = a.admin_get("/stats");
    let a_view = json(&body);
    let entry = &a_view["instances"][0];
    assert_eq!(entry["instance"], "a");
    assert_eq!(entry["redis"], "up");
    assert!(entry["published_per_s"].is_number() && entry["delivered_per_s"].is_number());
}

#[test]
fn the_controls_answer_only_the_page_of_this_machine_with_its_token() {
    let redis = RedisServer::start();
    let (a, _b) = demo_pair(&redis, &[]);
    let token = a.demo_token();
    assert!(token.len() >= 32, "a token hard to guess: {token}");
    assert!(a.log().contains(&token), "the instance prints it at start");
    let path = "/demo/pause-delivery?seconds=1";
    let refusals = [
        (vec![], "X-Demo-Token"),
        (vec![("X-Demo-Token", "guess")], "X-Demo-Token"),
        // Another site's page (any site can POST to 127.0.0.1).
        (
            vec![
                ("X-Demo-Token", token.as_str()),
                ("Origin", "https://evil.example"),
            ],
            "another site",
        ),
        // Through a proxy on this machine, every user would be loopback.
        (
            vec![
                ("X-Demo-Token", token.as_str()),
                ("X-Forwarded-For", "203.0.113.7"),
            ],
            "proxy",
        ),
        (
            vec![
                ("X-Demo-Token", token.as_str()),
                ("Forwarded", "for=203.0.113.7"),
            ],
            "proxy",
        ),
        (
            vec![("X-Demo-Token", token.as_str()), ("Via", "1.1 nginx")],
            "proxy",
        ),
    ];
    for (headers, why) in refusals {
        let (status, body) = http_post_with(a.admin(), path, &headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(
            body.contains(why),
            "{headers:?}: the refusal says why: {body}"
        );
    }
    // The page's own origin, with the token: done.
    let own = format!("http://{}", a.admin());
    let (status, body) = http_post_with(
        a.admin(),
        path,
        &[("X-Demo-Token", token.as_str()), ("Origin", own.as_str())],
    );
    assert_eq!(status, 200, "{body}");
    // The token is not given through a proxy either.
    let (_, config) = http_get_with(
        a.admin(),
        "/config.json",
        &[("X-Forwarded-For", "203.0.113.7")],
    );
    assert!(json(&config).get("demo_token").is_none(), "{config}");
    assert_eq!(json(&config)["demo_controls"], true);
}

#[test]
fn stalls_at_once_are_bounded() {
    let redis = RedisServer::start();
    let (a, _b) = demo_pair(&redis, &[]);
    let clients: Vec<Client> = (0..10)
        .map(|n| a.client(&format!("s{n}"), "lobby"))
        .collect();
    let mut answers = Vec::new();
    for client in &clients {
        let id = client.welcome["client"].as_str().unwrap().to_string();
        answers.push(
            a.demo_post(&format!("/demo/stall-reading?client={id}&seconds=5"))
                .0,
        );
    }
    assert_eq!(&answers[..8], &[200; 8], "{answers:?}");
    assert_eq!(&answers[8..], &[429, 429], "{answers:?}");
}
