//! Verifies that the public port and the clients learn nothing private
//! (defect 7 of issue 18): `/metrics`, `/stats`, detailed readiness and
//! the fault panel are served on the admin listener (`--admin-addr`,
//! loopback by default), and what the public port and the `status` frames
//! say of a Redis link that is down names no host, port, database or user.

mod common;

use common::{Client, Instance, free_port, http_post, unique, wait_for};

/// The private details of the Redis URL the instance is given.
const USER: &str = "watcher";
const DATABASE: &str = "/3";

#[test]
fn the_public_port_and_the_clients_learn_nothing_private_and_the_admin_listener_has_it_all() {
    let port = free_port();
    let url = format!("redis://{USER}:a-password@127.0.0.1:{port}{DATABASE}");
    let a = Instance::start(
        "admin-a",
        &[
            "--broker",
            "redis",
            "--redis-url",
            &url,
            "--redis-prefix",
            &unique("admin"),
            "--demo-controls",
        ],
    );
    let private = [port.to_string(), USER.to_string(), DATABASE.to_string()];
    let leaks = |text: &str| -> Vec<String> {
        private
            .iter()
            .filter(|detail| text.contains(detail.as_str()))
            .cloned()
            .collect()
    };

    // The admin listener is on loopback, on a port of its own.
    let admin = a.admin();
    assert!(admin.ip().is_loopback(), "admin listener on {admin}");
    assert_ne!(admin.port(), a.http.port());

    // Public port: readiness without details; the private endpoints are not there.
    let (status, body) = a.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        leaks(&body).is_empty(),
        "public /readyz leaks {:?}: {body}",
        leaks(&body)
    );
    for path in ["/metrics", "/stats"] {
        let (status, body) = a.get(path);
        assert_eq!(status, 404, "public GET {path}: {body}");
        assert!(body.contains("admin"), "the 404 says where it is: {body}");
    }
    for path in ["/demo/cut-subscription", "/demo/pause-delivery?seconds=1"] {
        let (status, body) = http_post(a.http, path);
        assert_eq!(status, 404, "public POST {path}: {body}");
    }
    let (_, config) = a.get("/config.json");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        (config["admin"].as_bool(), config["demo_controls"].as_bool()),
        (Some(false), Some(false)),
        "the public page shows no instances view and no fault panel: {config}"
    );

    // A client is told that sending is paused, not where Redis is.
    let mut client = Client::connect(a.ws, "name=alice&room=lobby");
    let status = loop {
        let frame = client.recv();
        if frame["type"] == "status" {
            break frame;
        }
    };
    assert_eq!(status["delivery"], "down", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        leaks(message).is_empty(),
        "the status frame leaks {:?}: {status}",
        leaks(message)
    );

    // The admin listener: everything, with details.
    let (status, body) = a.admin_get("/readyz");
    assert_eq!(status, 503);
    assert!(
        body.contains(&port.to_string()),
        "admin /readyz names the Redis it cannot reach: {body}"
    );
    wait_for("metrics on the admin listener", || {
        a.admin_get("/metrics")
            .1
            .contains("chat_clients_connected 1")
    });
    let (status, stats) = a.admin_get("/stats");
    assert_eq!(status, 200, "{stats}");
    let (_, config) = a.admin_get("/config.json");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        (config["admin"].as_bool(), config["demo_controls"].as_bool()),
        (Some(true), Some(true)),
        "the admin page has the instances view and the fault panel: {config}"
    );
    assert!(config["demo_token"].is_string(), "{config}");
    let (status, page) = a.admin_get("/");
    assert!(
        status == 200 && page.contains("app.js"),
        "the page on the admin listener"
    );
}

#[test]
fn admin_addr_off_serves_no_admin_listener() {
    let a = Instance::start("admin-off", &["--broker", "local", "--admin-addr", "off"]);
    assert_eq!(a.admin, None, "{}", a.log());
    assert_eq!(a.get("/metrics").0, 404);
}
