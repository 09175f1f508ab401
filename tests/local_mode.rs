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
    let sent = alice.recv_messages(5);
    let mut late = a.client("late", "lobby");
    // Older ones remain: the newcomer is told where they start.
    let more = late.recv();
    assert_eq!(more["code"], "history_more", "{more}");
    assert_eq!(more["before"], sent[2]["id"]);
    let history = late.recv_messages(3);
    assert_eq!(common::texts(&history), ["m2", "m3", "m4"]);
    late.expect_silence(Duration::from_millis(200));
}

/// An instance started the way a newcomer might, with `--port 0` and no
/// `--instance-id`, killed on drop.
struct Unnamed {
    child: std::process::Child,
    http: std::net::SocketAddr,
    ws: std::net::SocketAddr,
}

impl Unnamed {
    fn start() -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pubsub-chat"))
            .args(["--broker", "local", "--port", "0", "--ws-port", "0"])
            .env_remove("INSTANCE_ID")
            .env_remove("PORT")
            .env_remove("WS_PORT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start pubsub-chat");
        let addr_rx =
            common::process::watch_stderr(child.stderr.take().unwrap(), "unnamed".into(), |_| {});
        let Ok(common::process::Listening { http, ws, .. }) = addr_rx.recv_timeout(common::TIMEOUT)
        else {
            let _ = child.kill();
            panic!("an instance on --port 0 did not start");
        };
        Unnamed { child, http, ws }
    }

    /// The instance's name, as `/config.json` and a `welcome` give it.
    fn names(&self) -> (String, String) {
        let (status, body) = common::http_get(self.http, "/config.json");
        assert_eq!(status, 200, "{body}");
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        let client = common::Client::connect(self.ws, "name=n&room=lobby");
        (
            config["instance"].as_str().unwrap().to_string(),
            client.welcome["instance"].as_str().unwrap().to_string(),
        )
    }
}

impl Drop for Unnamed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn instances_on_port_0_are_named_after_the_port_they_got() {
    let a = Unnamed::start();
    let b = Unnamed::start();
    let (a_config, a_welcome) = a.names();
    let (b_config, b_welcome) = b.names();
    assert_eq!(a_config, a_welcome);
    assert_eq!(b_config, b_welcome);
    assert_ne!(a_config, b_config, "two instances on --port 0 share a name");
    let suffix = format!("-{}", a.http.port());
    assert!(
        a_config.ends_with(&suffix),
        "{a_config} is not named after its port {}",
        a.http.port()
    );
}
