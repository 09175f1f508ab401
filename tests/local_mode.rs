//! Verifies the starting point the README demonstrates: with `--broker
//! local` an instance works on its own, and two such instances are two
//! separate chats that never see each other's messages.

mod common;

use std::time::Duration;

use common::Instance;

#[test]
fn two_local_instances_do_not_see_each_other() {
    let a = Instance::local("solo-a");
    let b = Instance::local("solo-b");
    assert_eq!(
        a.get("/readyz").0,
        200,
        "local mode needs no Redis to be ready"
    );

    let mut alice = a.client("alice", "lobby");
    let mut ann = a.client("ann", "lobby");
    let mut bob = b.client("bob", "lobby");

    alice.send("only instance a hears this", "c1");
    let own = alice.recv_messages(1).remove(0);
    assert_eq!(own["text"], "only instance a hears this");
    assert_eq!(
        ann.recv_messages(1).remove(0),
        own,
        "same-instance clients do see it"
    );
    bob.expect_silence(Duration::from_millis(500));

    bob.send("and only b hears this", "c2");
    assert_eq!(bob.recv_messages(1)[0]["instance"], "solo-b");
    alice.expect_silence(Duration::from_millis(300));
    ann.expect_silence(Duration::from_millis(100));
}

#[test]
fn a_local_instance_replays_its_recent_history_to_newcomers() {
    let a = Instance::start("solo", &["--broker", "local", "--history-replay", "3"]);
    let mut alice = a.client("alice", "lobby");
    for i in 0..5 {
        alice.send(&format!("m{i}"), &format!("c{i}"));
    }
    alice.recv_messages(5);
    let mut late = a.client("late", "lobby");
    let history = late.recv_messages(3);
    assert_eq!(common::texts(&history), ["m2", "m3", "m4"]);
    late.expect_silence(Duration::from_millis(200));
}
