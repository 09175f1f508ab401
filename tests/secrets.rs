//! A Redis password stays secret, and a Redis that cannot be used is
//! reported for what it is: a run with a password greps every log line,
//! HTTP body and frame for it; an ACL user (`redis://user:pass@`) carries
//! messages between instances; each bad configuration (wrong, missing or
//! unwanted password, database out of range, bad URL, `#insecure` in a
//! `rediss://` URL, no Redis at all)
//! gets a message that names the real problem; `--host` takes a host name.

mod common;

use std::time::Duration;

use common::{Instance, RedisServer, TIMEOUT, refused_port, run_to_exit, unique, wait_for};

/// A password no log line or body could contain by chance.
fn password() -> String {
    format!("Sekr1t-{}-pw", std::process::id())
}

/// Waits until a line of the instance's log contains every one of `parts`,
/// and returns that line.
fn wait_log_line(instance: &Instance, parts: &[&str]) -> String {
    let mut found = String::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(line) = instance
            .log()
            .lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
        {
            found.push_str(line);
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line of {} contains all of {parts:?}; the log:\n{}",
            instance.id,
            instance.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `/readyz` to answer 503 and returns its body.
fn wait_not_ready(instance: &Instance) -> String {
    let mut body = String::new();
    wait_for(
        &format!("{} to answer /readyz with 503", instance.id),
        || {
            let (status, text) = instance.admin_get("/readyz");
            body = text;
            status == 503
        },
    );
    body
}

#[test]
fn a_redis_password_appears_in_no_log_line_no_http_body_and_no_frame() {
    let password = password();
    let mut redis = RedisServer::start_with_password(&password);
    let shown = format!("redis://:***@127.0.0.1:{}", redis.port);
    let mut a = Instance::redis("a", &redis.url(), &unique("secrets"));
    a.wait_ready();
    let mut seen = Vec::new();
    for path in ["/", "/config.json", "/healthz", "/readyz", "/nowhere"] {
        let (status, body) = a.get(path);
        seen.push(format!("GET {path} -> {status}: {body}"));
    }
    for path in ["/readyz", "/metrics", "/stats"] {
        let (status, body) = a.admin_get(path);
        seen.push(format!("GET admin {path} -> {status}: {body}"));
    }
    let mut alice = a.client("alice", "lobby");
    seen.push(alice.welcome.to_string());
    alice.send("hello", "c1");
    let own = alice.recv();
    assert_eq!(own["type"], "message", "{own}");
    seen.push(own.to_string());

    // Redis goes away: the probe's 503, the ERROR lines of both
    // connections, and the refusal a client gets.
    redis.kill();
    let not_ready = wait_not_ready(&a);
    assert!(
        not_ready.contains(&shown),
        "/readyz should name Redis as {shown}: {not_ready}"
    );
    seen.push(format!("GET /readyz -> 503: {not_ready}"));
    wait_log_line(&a, &["ERROR", "redis subscriber 0", &shown]);
    loop {
        alice.send("while down", "c2");
        let frame = alice.recv();
        seen.push(frame.to_string());
        if frame["type"] == "error" && frame["cid"] == "c2" {
            break;
        }
    }
    wait_log_line(&a, &["ERROR", "redis publisher", &shown]);
    seen.push(format!("GET /metrics -> {}", a.admin_get("/metrics").1));

    // Back again, then stopped: the lifecycle lines too.
    redis.restart();
    a.wait_ready();
    wait_log_line(&a, &["INFO", "redis subscriber 0: connected to", &shown]);
    a.terminate();

    let log = a.log();
    let leaks: Vec<&str> = log
        .lines()
        .chain(seen.iter().map(String::as_str))
        .filter(|line| line.contains(&password))
        .collect();
    assert!(
        leaks.is_empty(),
        "the password shows in:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn an_acl_user_with_a_password_carries_messages_between_instances() {
    let redis = RedisServer::start();
    let password = password();
    redis.add_acl_user("chat", &password);
    let url = format!("redis://chat:{password}@127.0.0.1:{}", redis.port);
    let prefix = unique("acl");
    let a = Instance::redis("a", &url, &prefix);
    let b = Instance::redis("b", &url, &prefix);
    a.wait_ready();
    b.wait_ready();
    let mut alice = a.client("alice", "lobby");
    let mut bob = b.client("bob", "lobby");
    alice.send("hello through an ACL user", "c1");
    let got = bob.recv_messages(1);
    assert_eq!(got[0]["text"], "hello through an ACL user");
    assert_eq!(got[0]["instance"], "a");
    let shown = format!("redis://chat:***@127.0.0.1:{}", redis.port);
    wait_log_line(&a, &["redis subscriber 0: connected to", &shown]);
    for instance in [&a, &b] {
        assert!(
            !instance.log().contains(&password),
            "the password shows in the log of {}",
            instance.id
        );
    }
}

/// Starts an instance on `url`, waits for its subscriber's ERROR line
/// naming `answer`, and checks that the line, and `/readyz`, say what
/// Redis answered, without sending the user to start a Redis.
fn assert_reported(url: &str, answer: &str, advice: &str) {
    let a = Instance::redis("a", url, &unique("bad-redis"));
    let line = wait_log_line(&a, &["ERROR", "redis subscriber 0", answer]);
    assert!(line.contains(advice), "{line:?} should say {advice:?}");
    assert!(
        !line.contains("start Redis"),
        "a Redis that answered is running; do not tell the user to start one: {line}"
    );
    let publisher = wait_log_line(&a, &["ERROR", "redis publisher", answer]);
    assert!(!publisher.contains("start Redis"), "{publisher}");
    let body = wait_not_ready(&a);
    assert!(
        body.contains(answer),
        "/readyz should say {answer:?}: {body}"
    );
}

#[test]
fn a_wrong_password_is_reported_as_wrongpass() {
    let redis = RedisServer::start_with_password(&password());
    let url = format!("redis://:not-the-password@127.0.0.1:{}", redis.port);
    assert_reported(
        &url,
        "WRONGPASS invalid username-password pair",
        "check the password",
    );
}

#[test]
fn a_missing_password_is_reported_as_noauth() {
    let redis = RedisServer::start_with_password(&password());
    let url = format!("redis://127.0.0.1:{}", redis.port);
    assert_reported(&url, "NOAUTH Authentication required", "redis://:PASSWORD@");
}

#[test]
fn a_password_redis_does_not_want_is_reported_as_a_refused_auth() {
    let redis = RedisServer::start();
    let url = format!("redis://:{}@127.0.0.1:{}", password(), redis.port);
    assert_reported(
        &url,
        "ERR AUTH <password> called without any password configured",
        "remove the password",
    );
}

#[test]
fn a_database_out_of_range_is_reported_as_such() {
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/99", redis.port);
    assert_reported(&url, "ERR DB index is out of range", "database 99");
}

#[test]
fn a_refused_connection_still_says_how_to_start_redis() {
    let nowhere = refused_port();
    let url = format!("redis://127.0.0.1:{}", nowhere.port);
    let a = Instance::redis("a", &url, &unique("no-redis"));
    let line = wait_log_line(&a, &["ERROR", "redis subscriber 0", "refused"]);
    assert!(
        line.contains("start Redis with `redis-server`"),
        "a refused connection should say how to start Redis: {line}"
    );
}

/// Runs the binary with `--redis-url url`, checks that it refused to
/// start, naming what is wrong, and returns what it wrote.
fn refused_url(url: &str) -> String {
    let (status, stderr) = run_to_exit("a", &["--redis-url", url], TIMEOUT);
    assert!(!status.success(), "{url} was accepted:\n{stderr}");
    assert!(
        !stderr.contains("InvalidClientConfig"),
        "{url}: say what is wrong, not the client library's error kind:\n{stderr}"
    );
    stderr
}

/// [`refused_url`], and the refusal shows a valid URL.
fn refused_url_with_example(url: &str) -> String {
    let stderr = refused_url(url);
    assert!(
        stderr.contains("redis://127.0.0.1:6379"),
        "{url}: show a valid URL:\n{stderr}"
    );
    stderr
}

#[test]
fn a_redis_url_with_another_scheme_is_refused_naming_the_scheme() {
    let stderr = refused_url_with_example("http://127.0.0.1:6379");
    assert!(stderr.contains("scheme http://"), "{stderr}");
}

#[test]
fn a_redis_url_with_a_port_out_of_range_is_refused_naming_the_port() {
    let stderr = refused_url_with_example("redis://127.0.0.1:70000");
    assert!(stderr.contains("port 70000"), "{stderr}");
}

#[test]
fn a_redis_url_without_a_scheme_is_refused_saying_so() {
    let stderr = refused_url_with_example("127.0.0.1:6379");
    assert!(stderr.contains("no scheme"), "{stderr}");
}

#[test]
fn a_tls_redis_url_that_skips_checks_is_refused_naming_the_option() {
    // TLS itself is tests/redis_tls.rs's; skipping the certificate's check
    // is an option of its own, warned at start, never a URL's fragment.
    let stderr = refused_url("rediss://:secret-tls-pw@127.0.0.1:6380/#insecure");
    assert!(stderr.contains("--redis-tls-insecure"), "{stderr}");
    assert!(
        !stderr.contains("secret-tls-pw"),
        "the refusal shows the password:\n{stderr}"
    );
}

#[test]
fn a_bad_url_shows_no_password_either() {
    let stderr = refused_url_with_example("http://:bad-url-secret@127.0.0.1:6379");
    assert!(!stderr.contains("bad-url-secret"), "{stderr}");
}

#[test]
fn host_localhost_serves() {
    let a = Instance::start("a", &["--broker", "local", "--host", "localhost"]);
    assert!(a.http.ip().is_loopback(), "bound {}", a.http);
    assert_eq!(a.get("/healthz").0, 200);
    let mut alice = a.client("alice", "lobby");
    alice.send("hello", "c1");
    assert_eq!(alice.recv_messages(1)[0]["text"], "hello");
}

#[test]
fn the_scripts_redis_check_never_puts_a_password_on_a_command_line() {
    // scripts/lib.sh's provide_redis asks the binary (`check-redis`)
    // whether $REDIS_URL answers, with the URL in its environment. A BIN
    // that writes down its arguments, then runs the real binary, sees
    // the command line (`ps` shows those to every user of the machine).
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;

    let password = password();
    let redis = RedisServer::start_with_password(&password);
    let dir = common::temp_dir("argv");
    let argv_log = dir.join("argv.log");
    let wrapper = dir.join("pubsub-chat");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            argv_log.display(),
            env!("CARGO_BIN_EXE_pubsub-chat")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib.sh");
    let output = Command::new("bash")
        .arg("-c")
        .arg("source \"$1\"; choose_redis; provide_redis test; printf 'shown=%s\\n' \"$REDIS_SHOWN\"")
        .arg("_")
        .arg(&lib)
        .env("REDIS_URL", redis.url())
        .env("BIN", &wrapper)
        .env("TMP_DIR", &*dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("shown=redis://:***@127.0.0.1:{}", redis.port)),
        "{stdout}"
    );
    assert!(!stdout.contains(&password), "{stdout}");
    let started = std::fs::read_to_string(&argv_log).unwrap_or_default();
    assert_eq!(started.trim(), "check-redis", "the check ran: {started:?}");

    let wrong = Command::new(env!("CARGO_BIN_EXE_pubsub-chat"))
        .arg("check-redis")
        .env(
            "REDIS_URL",
            format!("redis://:wrong-{password}@127.0.0.1:{}", redis.port),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success(),
        "a wrong password answers: {stderr}"
    );
    assert!(stderr.contains("WRONGPASS"), "{stderr}");
    assert!(!stderr.contains(&password), "{stderr}");
}
