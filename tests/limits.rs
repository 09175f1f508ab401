//! Verifies that every limit gives its documented answer and costs the
//! other users nothing: oversized text and frames, bad names and rooms, the
//! rate limit and flood disconnect, --max-clients, the handshake timeout
//! (slowloris), the ping timeout, the send timeout (a client that keeps
//! talking but never reads), the Origin check, and hostile frames. In
//! each case a well-behaved client on the same instance keeps sending and
//! receiving.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Instance, RedisServer, TIMEOUT, unique, wait_for};
use serde_json::Value;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;

/// A bystander on the same instance: sends one message and gets it back.
fn assert_still_served(bystander: &mut Client, label: &str) {
    bystander.send(label, label);
    loop {
        let frame = bystander.recv();
        if frame["type"] == "message" && frame["cid"] == label {
            return;
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
fn expect_close(client: &mut Client) -> (CloseCode, String) {
    loop {
        match client.socket.read() {
            Ok(Message::Close(Some(frame))) => return (frame.code, frame.reason.to_string()),
            Ok(Message::Close(None)) => panic!("close frame without a code"),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

/// The next frame that is not a chat message.
fn next_non_message(client: &mut Client) -> Value {
    loop {
        let frame = client.recv();
        if frame["type"] != "message" {
            return frame;
        }
    }
}

#[test]
fn oversized_text_is_too_large_and_an_oversized_frame_closes_with_1009() {
    let a = Instance::start(
        "size",
        &[
            "--broker",
            "local",
            "--max-text-chars",
            "10",
            "--max-frame-bytes",
            "1024",
        ],
    );
    let mut bystander = a.client("bystander", "lobby");
    let mut client = a.client("big", "lobby");

    client.send("this is longer than ten", "long-1");
    let error = next_non_message(&mut client);
    assert_eq!(
        (error["code"].as_str(), error["cid"].as_str()),
        (Some("too_large"), Some("long-1"))
    );
    assert_still_served(&mut client, "short");

    let huge = serde_json::json!({"type": "message", "text": "x".repeat(4096)}).to_string();
    client.send_raw(Message::text(huge));
    let (code, _) = expect_close(&mut client);
    assert_eq!(code, CloseCode::Size);
    assert_still_served(&mut bystander, "still here");
}

#[test]
fn bad_names_and_rooms_get_bad_request_and_a_1008_close() {
    let a = Instance::start(
        "names",
        &[
            "--broker",
            "local",
            "--max-name-chars",
            "5",
            "--max-room-chars",
            "6",
        ],
    );
    let mut bystander = a.client("ok", "lobby");
    for query in [
        "name=toolongname",
        "name=a%07b",
        "room=toolongroom",
        "room=no%20space",
        "room=%3Cscript%3E",
    ] {
        let mut client = Client::connect_raw(a.ws, query);
        let error = client.recv();
        assert_eq!(error["code"], "bad_request", "{query}: {error}");
        assert_eq!(expect_close(&mut client).0, CloseCode::Policy, "{query}");
    }
    assert_still_served(&mut bystander, "fine");
}

#[test]
fn a_client_over_its_rate_is_refused_then_disconnected_for_flooding() {
    let a = Instance::start(
        "rate",
        &[
            "--broker",
            "local",
            "--rate-burst",
            "5",
            "--rate-per-sec",
            "1",
            "--rate-strikes",
            "10",
        ],
    );
    let mut bystander = a.client("calm", "lobby");
    let mut flooder = a.client("flood", "lobby");
    for i in 0..5 {
        flooder.send(&format!("m{i}"), &format!("c{i}"));
    }
    assert_eq!(flooder.recv_messages(5).len(), 5, "the burst passes");
    bystander.recv_messages(5);
    flooder.send("one too many", "over-1");
    let error = next_non_message(&mut flooder);
    assert_eq!(
        (error["code"].as_str(), error["cid"].as_str()),
        (Some("rate_limited"), Some("over-1"))
    );

    for i in 0..20 {
        let _ = flooder.socket.send(Message::text(format!(
            r#"{{"type":"message","text":"f{i}"}}"#
        )));
    }
    let (code, reason) = expect_close(&mut flooder);
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("rate limit"), "{reason}");
    assert!(a.metric("chat_rate_limited_total") >= 10.0);
    assert_eq!(a.metric("chat_flooding_clients_dropped_total"), 1.0);
    assert_still_served(&mut bystander, "calm");
}

#[test]
fn past_max_clients_the_handshake_is_refused_with_503() {
    let a = Instance::start("full", &["--broker", "local", "--max-clients", "3"]);
    let mut clients: Vec<Client> = (0..3)
        .map(|n| a.client(&format!("c{n}"), "lobby"))
        .collect();
    let stream = TcpStream::connect(a.ws).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    match tungstenite::client(format!("ws://{}/ws", a.ws), stream) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(a.metric("chat_capacity_refused_total"), 1.0);
    assert!(a.log().contains("instance full"), "{}", a.log());
    assert_still_served(&mut clients[0], "members keep chatting");
    drop(clients.pop());
    a.wait_metric("chat_clients_connected", 2.0);
    a.client("later", "lobby");
}

#[test]
fn slowloris_sockets_are_closed_at_the_handshake_timeout_and_free_their_threads() {
    let a = Instance::start(
        "slow",
        &["--broker", "local", "--handshake-timeout-ms", "500"],
    );
    let baseline = a.metric("chat_process_threads");
    let mut idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(a.ws).unwrap())
        .collect();
    // Some drip a byte now and then: the deadline is for the whole handshake.
    let mut drippers: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(a.ws).unwrap()).collect();
    let mut bystander = a.client("bystander", "lobby");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(700) {
        for stream in &mut drippers {
            let _ = stream.write_all(b"G");
        }
        thread::sleep(Duration::from_millis(100));
    }
    for stream in idle.iter_mut().chain(drippers.iter_mut()) {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        // The server hangs up: end of stream (or a reset), never a wait.
        assert!(
            matches!(stream.read(&mut buf), Ok(0) | Err(_)),
            "a slowloris socket stayed open"
        );
    }
    assert!(a.metric("chat_handshake_timeouts_total") >= 220.0);
    let deadline = Instant::now() + TIMEOUT;
    while a.metric("chat_process_threads") > baseline + 2.0 {
        // Which threads are left says whose they are, if this ever fails.
        assert!(
            Instant::now() < deadline,
            "threads not back to {baseline} + the bystander's two: {}",
            thread_names(a.pid())
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_still_served(&mut bystander, "unbothered");
}

#[test]
fn a_peer_that_stops_answering_pings_is_dropped() {
    let a = Instance::start(
        "ping",
        &[
            "--broker",
            "local",
            "--ping-interval-ms",
            "200",
            "--idle-timeout-ms",
            "700",
        ],
    );
    // This client never reads, so tungstenite never answers the pings.
    let silent = a.client("silent", "lobby");
    // This one reads (and so answers pings) on its own thread.
    let mut alive = a.client("alive", "lobby");
    let reader = thread::spawn(move || {
        let MaybeTlsStream::Plain(stream) = alive.socket.get_ref() else {
            unreachable!()
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let until = Instant::now() + Duration::from_millis(2000);
        let mut pings = 0;
        while Instant::now() < until {
            match alive.socket.read() {
                Ok(Message::Ping(_)) => pings += 1,
                Ok(_) => {}
                Err(tungstenite::Error::Io(_)) => {}
                Err(e) => panic!("the live client was dropped: {e}"),
            }
        }
        (alive, pings)
    });
    wait_for("the silent client to be dropped", || {
        a.metric("chat_idle_clients_dropped_total") == 1.0
    });
    let (mut alive, pings) = reader.join().unwrap();
    assert!(pings >= 2, "the server pings quiet clients ({pings})");
    assert_eq!(a.metric("chat_clients_connected"), 1.0);
    let MaybeTlsStream::Plain(stream) = alive.socket.get_ref() else {
        unreachable!()
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_still_served(&mut alive, "alive");
    drop(silent);
}

/// A WebSocket handshake with one extra request header; the socket on
/// success (kept open), or the HTTP status of the refusal.
fn handshake_with_header(a: &Instance, name: &str, value: &str) -> Result<TcpStream, u16> {
    let stream = TcpStream::connect(a.ws).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let request = tungstenite::http::Request::builder()
        .uri(format!("ws://{}/ws?name=x", a.ws))
        .header("Host", a.ws.to_string())
        .header(name, value)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    match tungstenite::client(request, stream) {
        Ok((socket, _)) => Ok(socket.into_inner()),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake failed oddly: {e}"),
    }
}

fn handshake_with_origin(a: &Instance, origin: &str) -> Result<(), u16> {
    handshake_with_header(a, "Origin", origin).map(drop)
}

/// A WebSocket handshake said to be forwarded for `forwarded_for`.
fn handshake_forwarded_for(a: &Instance, forwarded_for: &str) -> Result<TcpStream, u16> {
    handshake_with_header(a, "X-Forwarded-For", forwarded_for)
}

#[test]
fn one_address_holds_at_most_max_clients_per_ip_the_forwarded_one_behind_a_trusted_proxy() {
    // Loopback is a trusted proxy by default: the forwarded address counts.
    let a = Instance::start(
        "per-ip",
        &["--broker", "local", "--max-clients-per-ip", "2"],
    );
    let first = handshake_forwarded_for(&a, "203.0.113.7").expect("1st from .7");
    let _second = handshake_forwarded_for(&a, "198.51.100.1, 203.0.113.7").expect("2nd from .7");
    assert_eq!(handshake_forwarded_for(&a, "203.0.113.7").err(), Some(429));
    let _other = handshake_forwarded_for(&a, "203.0.113.8").expect("another address");
    drop(first);
    wait_for("the first's place to be given back", || {
        handshake_forwarded_for(&a, "203.0.113.7").is_ok()
    });

    // From a peer that is not a trusted proxy, X-Forwarded-For is the
    // client's own say: ignored, the peer's address counts.
    let b = Instance::start(
        "per-ip-untrusted",
        &[
            "--broker",
            "local",
            "--max-clients-per-ip",
            "2",
            "--trusted-proxies",
            "10.9.9.9",
        ],
    );
    let _x = handshake_forwarded_for(&b, "203.0.113.1").unwrap();
    let _y = handshake_forwarded_for(&b, "203.0.113.2").unwrap();
    assert_eq!(handshake_forwarded_for(&b, "203.0.113.3").err(), Some(429));
}

#[test]
fn cross_site_origins_are_refused_with_403_unless_allowed() {
    let a = Instance::start(
        "origin",
        &[
            "--broker",
            "local",
            "--allowed-origins",
            "https://chat.example.com",
        ],
    );
    let own_page = format!("http://127.0.0.1:{}", a.http.port());
    assert_eq!(handshake_with_origin(&a, &own_page), Ok(()));
    assert_eq!(
        handshake_with_origin(&a, "https://chat.example.com"),
        Ok(())
    );
    assert_eq!(handshake_with_origin(&a, "http://evil.example"), Err(403));
    assert_eq!(handshake_with_origin(&a, "http://127.0.0.1:1"), Err(403));
    assert_eq!(a.metric("chat_origin_refused_total"), 2.0);
}

#[test]
fn hostile_frames_get_their_documented_answers_and_nothing_panics() {
    let a = Instance::start("hostile", &["--broker", "local"]);
    let mut bystander = a.client("bystander", "lobby");
    let mut client = a.client("hostile", "lobby");
    let nested = format!(
        r#"{{"type":"message","text":"x","extra":{}{}}}"#,
        "[".repeat(3000),
        "]".repeat(3000)
    );
    let cases = [
        Message::binary(vec![1u8, 2, 3]),
        Message::text("not json"),
        Message::text(r#"{"type":"shout","text":"x"}"#),
        Message::text(r#"{"type":"message"}"#),
        Message::text(r#"{"text":"no type"}"#),
        Message::text(r#"{"type":"message","text":42}"#),
        Message::text(r#"{"type":"message","text":"x","cid":123456789012345678901234567890}"#),
        Message::text(r#"{"type":"message","text":"x","cid":1e999}"#),
        Message::text(nested),
        Message::text("[]"),
        Message::text("null"),
    ];
    for case in cases {
        let shown = format!("{case:?}").chars().take(60).collect::<String>();
        client.send_raw(case);
        let error = next_non_message(&mut client);
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{shown}"
        );
    }
    assert_still_served(&mut client, "the hostile client itself is still served");

    // A frame that is wrong but carries a valid cid: its error names it.
    for (n, raw) in [
        r#"{"type":"shout","text":"x","cid":"CID"}"#,
        r#"{"type":"message","cid":"CID"}"#,
        r#"{"type":"message","text":42,"cid":"CID"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let cid = format!("bad-{n}");
        client.send_raw(Message::text(raw.replace("CID", &cid)));
        let error = next_non_message(&mut client);
        assert_eq!(error["code"], "bad_request", "{raw}: {error}");
        assert_eq!(error["cid"], cid.as_str(), "{raw}: {error}");
    }

    // Invalid UTF-8 in a text frame: masked frame, opcode text, bytes ff fe.
    let MaybeTlsStream::Plain(stream) = client.socket.get_mut() else {
        unreachable!()
    };
    stream
        .write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe])
        .unwrap();
    assert_eq!(expect_close(&mut client).0, CloseCode::Invalid);
    assert_still_served(&mut bystander, "bystander");
    assert_eq!(a.get("/healthz").0, 200);
}

#[test]
fn a_field_that_a_frame_type_does_not_define_is_refused_by_name() {
    let a = Instance::start("fields", &["--broker", "local"]);
    let mut other = a.client("other", "lobby");
    let mut client = a.client("padder", "lobby");
    let padded_typing = format!(r#"{{"type":"typing","pad":"{}"}}"#, "x".repeat(16_000));
    for (raw, field, cid) in [
        (padded_typing.as_str(), "pad", None),
        (
            r#"{"type":"message","text":"hi","cid":"c7","color":"red"}"#,
            "color",
            Some("c7"),
        ),
        (
            r#"{"type":"members","offset":0,"sort":"name"}"#,
            "sort",
            None,
        ),
        (
            r#"{"type":"history","before":"1-0","page":2}"#,
            "page",
            None,
        ),
    ] {
        client.send_raw(Message::text(raw));
        let error = next_non_message(&mut client);
        assert_eq!(error["code"], "bad_request", "{field}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "the error names {field}: {error}"
        );
        assert_eq!(error["cid"].as_str(), cid, "{error}");
    }
    // Nothing of it reached the room.
    other.expect_silence(Duration::from_millis(500));
    assert_still_served(&mut client, "the client itself is still served");
}

#[test]
fn typing_has_a_bucket_of_its_own_and_a_typing_flood_is_disconnected() {
    let a = Instance::start("typing-flood", &["--broker", "local"]);
    let mut other = a.client("other", "lobby");
    let mut flooder = a.client("flooder", "lobby");
    for _ in 0..200 {
        flooder.send_raw(Message::text(r#"{"type":"typing"}"#));
    }
    let (code, reason) = expect_close(&mut flooder);
    assert_eq!(code, CloseCode::Policy);
    assert_eq!(reason, "rate limit exceeded repeatedly");
    // The room heard of it once (one relayed per 2 s), not 200 times.
    let mut typing = 0;
    other.set_read_timeout(Duration::from_millis(500));
    while let Ok(message) = other.socket.read() {
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            typing += usize::from(frame["type"] == "typing");
        }
    }
    assert_eq!(typing, 1);
    other.set_read_timeout(TIMEOUT);
    assert_still_served(&mut other, "the others are still served");
}

/// A client whose receive buffer is tiny, so that a server writing to it
/// fills up quickly once it stops reading.
fn stalled_client(ws: std::net::SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&ws.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut socket, _) =
        tungstenite::client(format!("ws://{ws}/ws?name=stalled&room=lobby"), stream).unwrap();
    socket.read().unwrap(); // the welcome, then never again
    socket.into_inner()
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_fifty_others_get_all_ten_thousand() {
    const RECEIVERS: usize = 50;
    const MESSAGES: usize = 10_000;
    /// Long enough that 10,000 messages (about 6 MB) overflow what the
    /// kernel's socket buffers can hide.
    const TEXT_CHARS: usize = 600;
    let redis = RedisServer::start();
    let prefix = unique("slowcons");
    let a = Instance::redis_with(
        "slowcons",
        &redis.url(),
        &prefix,
        &["--client-buffer-bytes", "262144"],
    );
    a.wait_ready();
    let stalled = stalled_client(a.ws);
    let receivers: Vec<_> = (0..RECEIVERS)
        .map(|n| {
            let mut client = a.client(&format!("r{n}"), "lobby");
            thread::spawn(move || {
                let messages = client.recv_messages(MESSAGES);
                let texts = common::texts(&messages);
                assert!(
                    texts
                        .iter()
                        .enumerate()
                        .all(|(i, t)| *t == format!("{i:05}-{}", "x".repeat(TEXT_CHARS)))
                );
                messages.len()
            })
        })
        .collect();
    // Published straight on the channel, as fast as Redis takes them: the
    // fan-out, not the accept path, is under test (and a sending client in
    // the room would itself be a consumer that does not read).
    let mut conn = redis.connection().unwrap();
    let channel = format!("{prefix}:room:{{lobby}}");
    let writer = thread::spawn(move || {
        for i in 0..MESSAGES {
            let frame = serde_json::json!({
                "type": "message", "id": format!("1-{i}"), "ts": 1, "room": "lobby", "from": "pusher",
                "text": format!("{i:05}-{}", "x".repeat(TEXT_CHARS)), "instance": "test",
            });
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(frame.to_string())
                .query(&mut conn)
                .unwrap();
        }
    });
    for receiver in receivers {
        assert_eq!(
            receiver.join().expect("a receiver missed messages"),
            MESSAGES
        );
    }
    writer.join().unwrap();
    assert_eq!(
        a.metric("chat_slow_clients_dropped_total"),
        1.0,
        "the stalled client was dropped"
    );
    assert_eq!(
        a.metric("chat_redis_reconnects_total"),
        0.0,
        "redis never cut the subscriber off"
    );
    let mut conn = redis.connection().unwrap();
    let subscribers: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        subscribers.lines().count(),
        1,
        "the one subscription is still there"
    );
    stalled.shutdown(Shutdown::Both).ok();
}

#[test]
fn a_client_that_talks_but_never_reads_is_dropped_at_the_send_timeout() {
    // Its buffer is far larger than what is sent: only the send timeout
    // can let it go.
    let a = Instance::start(
        "stall",
        &[
            "--broker",
            "local",
            "--client-buffer-bytes",
            "67108864",
            "--send-timeout-ms",
            "2000",
            "--ping-interval-ms",
            "500",
        ],
    );
    let mut stalled = tungstenite::WebSocket::from_raw_socket(
        stalled_client(a.ws),
        tungstenite::protocol::Role::Client,
        None,
    );
    let mut sender = a.client("sender", "lobby");
    let bystander = common::Listener::spawn(a.client("bystander", "lobby"), "bystander".into());
    let started = Instant::now();
    let mut sent = 0;
    while a.metric("chat_slow_clients_dropped_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a client that never read was still served after {sent} messages"
        );
        // Pongs nobody asked for: the client looks alive, and reads nothing.
        stalled.send(Message::Pong(Vec::new().into())).unwrap();
        for _ in 0..100 {
            sent += 1;
            sender.send(
                &format!("{sent:05}-{}", "x".repeat(1500)),
                &format!("s{sent}"),
            );
        }
        sender.recv_messages(100);
    }
    let log = a.log();
    assert!(log.contains("nothing read for"), "the log says why: {log}");
    assert_eq!(
        a.metric("chat_slow_clients_dropped_total"),
        1.0,
        "only the stalled one"
    );
    assert_eq!(
        bystander.finish(sent).len(),
        sent,
        "the bystander got every message"
    );
}

#[test]
fn the_send_timeout_is_kept_however_long_the_ping_interval() {
    // Pings every 60 s; a stuck client must still go within a second or
    // two of its 1 s send timeout, not at the next ping round.
    let a = Instance::start(
        "stall-slow-pings",
        &[
            "--broker",
            "local",
            "--client-buffer-bytes",
            "536870912",
            "--send-timeout-ms",
            "1000",
            "--ping-interval-ms",
            "60000",
            "--idle-timeout-ms",
            "120000",
        ],
    );
    let _stalled = stalled_client(a.ws);
    let mut sender = a.client("sender", "lobby");
    let started = Instant::now();
    let mut sent = 0;
    // Until the kernel's buffers are full and its outbox stuck: a few MB.
    while a.metric("chat_slow_clients_dropped_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a client stuck with a 1 s send timeout was still served after {:?} ({sent} messages)",
            started.elapsed()
        );
        for _ in 0..100 {
            sent += 1;
            sender.send(
                &format!("{sent:05}-{}", "x".repeat(1500)),
                &format!("s{sent}"),
            );
        }
        sender.recv_messages(100);
    }
    let log = a.log();
    assert!(
        log.contains("nothing read for"),
        "dropped for its send timeout, not its buffer: {log}"
    );
}

/// The names of process `pid`'s threads, counted: `session x 3, fan-out x 1`.
fn thread_names(pid: u32) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *counts.entry(name.trim().to_string()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(name, n)| format!("{name} x {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
