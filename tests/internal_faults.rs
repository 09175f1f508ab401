//! Verifies what happens when the server's own code fails (a panic,
//! injected with `CHAT_FAULTS` into a debug build): a session that panics
//! leaks no slot, hub entry or gauge and its client is told 1011 while
//! everyone else goes on; a dead fan-out thread makes `/readyz` answer 503
//! with the cause, closes every client with 1011 and exits with status 70,
//! so that a supervisor restarts the instance.

mod common;

use std::time::Duration;

use common::{Client, Instance, RedisServer, TIMEOUT, unique, wait_for};
use tungstenite::Message;

/// The text that sets off an armed fault (`src/faults.rs`).
const TRIGGER: &str = "panic!";

fn armed_instance(id: &str, redis: &RedisServer, faults: &str) -> Instance {
    let prefix = unique(id);
    let instance = Instance::start_with_env(
        id,
        &["--redis-url", &redis.url(), "--redis-prefix", &prefix],
        &[("CHAT_FAULTS", faults)],
    );
    instance.wait_ready();
    instance
}

/// Reads until the server's Close frame; returns its code.
fn close_code(client: &mut Client) -> u16 {
    loop {
        match client.socket.read() {
            Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
            Ok(Message::Close(None)) => panic!("a Close frame without a code"),
            Ok(_) => continue,
            Err(e) => panic!("the connection ended without a Close frame: {e}"),
        }
    }
}

#[test]
fn a_session_that_panics_leaks_nothing_and_its_client_gets_1011() {
    let redis = RedisServer::start();
    let a = armed_instance("panicky", &redis, "reader");
    let mut bystander = a.client("bystander", "lobby");
    let mut victim = a.client("victim", "lobby");
    assert_eq!(a.metric("chat_clients_connected"), 2.0);

    victim.send(TRIGGER, "p1");
    assert_eq!(close_code(&mut victim), 1011, "internal error");

    a.wait_metric("chat_clients_connected", 1.0);
    a.wait_metric("chat_session_threads", 1.0);
    a.wait_metric("chat_hub_members", 1.0);
    assert_eq!(
        a.get("/readyz").0,
        200,
        "one client's panic is not the instance's"
    );
    bystander.send("still here", "b1");
    let echoed = bystander.recv_messages(1);
    assert_eq!(echoed[0]["text"], "still here");
    let mut newcomer = a.client("newcomer", "lobby");
    bystander.send("welcome", "b2");
    assert_eq!(newcomer.recv_messages(2)[1]["text"], "welcome");
    assert!(a.log().contains("its session panicked"), "{}", a.log());
}

#[test]
fn a_dead_fan_out_makes_the_instance_unready_then_exit_70() {
    let redis = RedisServer::start();
    let mut a = armed_instance("doomed", &redis, "fan-out");
    let mut alice = a.client("alice", "lobby");
    let mut bob = a.client("bob", "lobby");
    alice.send(TRIGGER, "p1");

    // Bob does not read yet, so the instance waits out the close grace
    // for him: long enough to see it answer its probes.
    let mut reason = String::new();
    wait_for("/readyz to answer 503 with the cause", || {
        let (status, body) = a.admin_get("/readyz");
        reason = body;
        status == 503
    });
    assert!(
        reason.contains("internal thread fan-out died"),
        "/readyz says: {reason}"
    );
    assert_eq!(close_code(&mut bob), 1011);
    assert_eq!(close_code(&mut alice), 1011);
    let status = a.wait_exit(TIMEOUT + Duration::from_secs(5));
    assert_eq!(status.code(), Some(70), "{}", a.log());
    assert!(
        a.log().contains("internal thread fan-out died"),
        "{}",
        a.log()
    );
}
