//! Verifies the HTTP side of PROTOCOL.md: the page, `/config.json`,
//! `/healthz`, `/readyz` (200 with Redis up, 503 while it is down) and
//! `/metrics`, whose counters move with the traffic; and that a message
//! sent while Redis is down is answered `unavailable`, never lost silently;
//! and that the HTTP port holds a fixed budget: a head that never ends is
//! closed at `--http-timeout-ms`, and past `--max-http-connections` a
//! connection is refused at once.

mod common;

use common::{Client, Instance, RedisServer, free_port, refused_port, unique, wait_for};

#[test]
fn the_page_and_its_config_are_served() {
    let redis = RedisServer::start();
    let a = Instance::redis("page-a", &redis.url(), &unique("page"));
    let (status, page) = a.get("/");
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") && page.contains("app.js"),
        "not the chat page: {page}"
    );
    assert_eq!(a.get("/app.js").0, 200);
    assert_eq!(a.get("/style.css").0, 200);
    assert_eq!(a.get("/no-such-page").0, 404);

    let (status, body) = a.get("/config.json");
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["instance"], "page-a");
    assert_eq!(config["ws_port"], a.ws.port());
    assert_eq!(config["ws_path"], "/ws");
    assert_eq!(a.get("/healthz").0, 200);
}

#[test]
fn readyz_follows_the_redis_link_and_messages_are_refused_while_it_is_down() {
    let mut redis = RedisServer::start();
    let prefix = unique("ready");
    // A publish cut by the crash is in doubt until the deadline; keep it short.
    let a = Instance::redis_with(
        "ready-a",
        &redis.url(),
        &prefix,
        &["--publish-deadline-ms", "1000"],
    );
    a.wait_ready();
    assert_eq!(a.metric("chat_redis_subscriber_up"), 1.0);
    let mut client = a.client("alice", "lobby");

    redis.kill();
    let status = client.recv();
    assert_eq!(
        (status["type"].as_str(), status["delivery"].as_str()),
        (Some("status"), Some("down")),
        "connected clients are told that sending is paused: {status}"
    );
    wait_for("readyz to turn 503", || a.get("/readyz").0 == 503);
    let (_, reason) = a.admin_get("/readyz");
    assert!(reason.contains("redis"), "503 says why: {reason}");
    client.send("while redis is down", "down-1");
    let reply = client.recv();
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "unavailable");
    assert_eq!(
        reply["cid"], "down-1",
        "the refusal names the message it refuses"
    );
    assert!(a.metric("chat_messages_unavailable_total") >= 1.0);
    assert_eq!(
        a.metric("chat_clients_connected"),
        1.0,
        "clients stay connected"
    );

    redis.restart();
    a.wait_ready();
    let status = client.recv();
    assert_eq!(
        (status["type"].as_str(), status["delivery"].as_str()),
        (Some("status"), Some("up"))
    );
    assert!(a.metric("chat_redis_reconnects_total") >= 1.0);
    // The publisher may still be waiting out its backoff: retry until accepted.
    wait_for("a message to be accepted again", || {
        client.send("redis is back", "up-1");
        let reply = client.recv();
        reply["type"] == "message" && reply["text"] == "redis is back"
    });
}

#[test]
fn an_instance_whose_redis_is_missing_starts_and_says_so() {
    let nowhere = refused_port();
    let nowhere = format!("redis://127.0.0.1:{}", nowhere.port);
    let a = Instance::redis("lonely", &nowhere, &unique("missing"));
    assert_eq!(a.get("/healthz").0, 200, "alive");
    let (status, reason) = a.get("/readyz");
    assert_eq!(status, 503, "not ready: {reason}");
    assert!(
        a.log().contains("redis-server"),
        "the log says how to start Redis:\n{}",
        a.log()
    );

    let mut client = Client::connect(a.ws, "name=alice");
    client.send("hello?", "c1");
    let reply = client.recv();
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
}

#[test]
fn metrics_count_clients_and_messages() {
    let redis = RedisServer::start();
    let prefix = unique("metrics");
    let a = Instance::redis("m-a", &redis.url(), &prefix);
    let b = Instance::redis("m-b", &redis.url(), &prefix);
    a.wait_ready();
    b.wait_ready();
    let (_, text) = a.admin_get("/metrics");
    for name in [
        "chat_clients_connected",
        "chat_messages_received_total",
        "chat_messages_published_total",
        "chat_messages_delivered_total",
        "chat_redis_reconnects_total",
        "chat_slow_clients_dropped_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from:\n{text}"
        );
    }

    let mut alice = a.client("alice", "lobby");
    let mut bob = b.client("bob", "lobby");
    let mut bea = b.client("bea", "lobby");
    assert_eq!(a.metric("chat_clients_connected"), 1.0);
    assert_eq!(b.metric("chat_clients_connected"), 2.0);
    for i in 0..3 {
        alice.send(&format!("m{i}"), &format!("c{i}"));
    }
    alice.recv_messages(3);
    bob.recv_messages(3);
    bea.recv_messages(3);
    assert_eq!(a.metric("chat_messages_received_total"), 3.0);
    assert_eq!(a.metric("chat_messages_published_total"), 3.0);
    assert_eq!(a.metric("chat_messages_delivered_total"), 3.0);
    assert_eq!(b.metric("chat_messages_delivered_total"), 6.0);
    assert_eq!(b.metric("chat_broker_messages_total"), 3.0);
    assert_eq!(b.metric("chat_messages_published_total"), 0.0);
    assert_eq!(
        b.metric("chat_session_threads"),
        2.0,
        "one thread per client: its reader"
    );
}

#[test]
fn a_client_that_joined_before_redis_existed_is_told_when_sending_works() {
    let port = free_port();
    let a = Instance::redis(
        "early",
        &format!("redis://127.0.0.1:{port}"),
        &unique("early"),
    );
    let mut client = Client::connect(a.ws, "name=early");
    let history = client.recv();
    assert_eq!(
        (history["type"].as_str(), history["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "history cannot be read: {history}"
    );
    let status = client.recv();
    assert_eq!(
        (status["type"].as_str(), status["delivery"].as_str()),
        (Some("status"), Some("down")),
        "joined while Redis is missing: {status}"
    );
    let _redis = RedisServer::start_on(port);
    a.wait_ready();
    let status = client.recv();
    assert_eq!(
        (status["type"].as_str(), status["delivery"].as_str()),
        (Some("status"), Some("up")),
        "the page must learn it can send: {status}"
    );
}

#[test]
fn many_browser_connections_at_once_are_all_answered() {
    // A browser keeps its connections open (keep-alive) and opens several at
    // once for a page's files; tabs add theirs. Every one must be answered,
    // whatever the others do.
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let a = Instance::local("many");
    // Connections that came and went leave idle threads behind in
    // tiny_http's pool, as a page load does.
    for _ in 0..2 {
        assert_eq!(a.get("/healthz").0, 200);
    }
    let mut sockets: Vec<TcpStream> = (0..12)
        .map(|_| {
            let socket = TcpStream::connect(a.http).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            socket
        })
        .collect();
    for socket in &mut sockets {
        write!(
            socket,
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n",
            a.http
        )
        .unwrap();
    }
    let started = Instant::now();
    let unanswered: Vec<usize> = sockets
        .iter_mut()
        .enumerate()
        .filter_map(|(n, socket)| {
            let mut head = [0u8; 12];
            let answered =
                socket.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200");
            (!answered).then_some(n)
        })
        .collect();
    assert!(
        unanswered.is_empty(),
        "connections {unanswered:?} of 12 got no answer within {:?}",
        started.elapsed()
    );
}

/// The threads of process `pid` (Linux: `/proc/<pid>/task`).
fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

#[test]
fn heads_that_never_end_are_closed_and_past_the_cap_connections_are_refused_at_once() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let a = Instance::start(
        "http-budget",
        &[
            "--broker",
            "local",
            "--max-http-connections",
            "20",
            "--http-timeout-ms",
            "1000",
        ],
    );
    assert_eq!(a.get("/healthz").0, 200);
    let before = threads_of(a.pid());
    // 60 connections: past the cap, a 503 comes at once, unasked.
    let started = Instant::now();
    let sockets: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(a.http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (mut held, mut refused) = (Vec::new(), 0);
    for mut socket in sockets {
        socket.set_nonblocking(true).unwrap();
        let mut answer = [0u8; 12];
        match socket.read(&mut answer) {
            Ok(n) => {
                assert!(
                    answer[..n].starts_with(b"HTTP/1.1 503"),
                    "{:?}",
                    &answer[..n]
                );
                refused += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                held.push(socket);
            }
        }
    }
    assert_eq!((held.len(), refused), (20, 40), "20 held, the rest refused");
    // The held ones send a request head but for its last line, as a
    // slowloris does: each is closed at the timeout, without an answer.
    for socket in &mut held {
        socket.set_nonblocking(false).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(socket, "GET /healthz HTTP/1.1\r\nHost: {}\r\n", a.http).unwrap();
    }
    for socket in &mut held {
        let mut answer = Vec::new();
        socket
            .read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("expected the server to close it: {e}"));
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "every connection ended within the timeout: {:?}",
        started.elapsed()
    );
    // Their threads are given back, and the port serves again.
    wait_for("the connections' threads to end", || {
        threads_of(a.pid()) <= before + 4
    });
    assert_eq!(a.get("/healthz").0, 200);
}

#[test]
fn one_address_holds_at_most_max_clients_per_ip_http_connections() {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::Duration;

    // Loopback is not a trusted proxy here: it counts as one client.
    let a = Instance::start(
        "http-per-ip",
        &[
            "--broker",
            "local",
            "--max-clients-per-ip",
            "5",
            "--trusted-proxies",
            "10.9.9.9",
            "--http-timeout-ms",
            "1000",
        ],
    );
    let sockets: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(a.http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut answers = Vec::new();
    for mut socket in sockets {
        socket.set_nonblocking(true).unwrap();
        let mut answer = [0u8; 12];
        answers.push(match socket.read(&mut answer) {
            Ok(n) => String::from_utf8_lossy(&answer[..n]).to_string(),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                "held".to_string()
            }
        });
    }
    let held = answers.iter().filter(|a| *a == "held").count();
    let crowded = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .count();
    assert_eq!((held, crowded), (5, 3), "{answers:?}");
    // Once they are closed (the timeout), the address is served again.
    wait_for("the held connections to end", || a.get("/healthz").0 == 200);
}
