//! Verifies in a real headless Chromium that a message typed on the chat page of one instance
//! appears on the page of another instance joined by Redis, that message text is never run as
//! HTML, that the pill, the banner and the conversation tell one story when Redis dies or an
//! instance is SIGKILLed (the tab reconnects through nginx to a survivor and shows what it
//! missed), that the member list and the typing line follow tabs across instances, that the
//! X-ray shows every hop of a message, and that each button of the fault panel does what it
//! says (and that without `--demo-controls` there is no panel and the endpoints refuse).
//! tests/browser/chat.mjs drives the browser; these tests start Redis, the instances and nginx.

mod common;

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::{Instance, RedisServer, unique};

/// How long the whole browser run may take before node is killed.
const NODE_TIMEOUT: Duration = Duration::from_secs(150);
const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("browser")
}

/// Fails (never skips) when the browser tooling is not installed.
fn require_tooling(dir: &Path) {
    assert!(
        dir.join("node_modules").join("playwright-core").is_dir(),
        "{} is missing: run ./scripts/test.sh (which installs it), or `npm ci --prefix tests/browser`",
        dir.join("node_modules").display()
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run ./scripts/test.sh (which installs it), or `apt-get install chromium`"
    );
}

/// Fails (never skips) when nginx is not installed.
fn require_nginx() {
    assert!(
        Path::new("/usr/sbin/nginx").exists(),
        "/usr/sbin/nginx is missing: run ./scripts/test.sh (which installs it), or `apt-get install nginx`"
    );
}

/// A room name unique to this run, in the characters a room may use.
fn unique_room() -> String {
    unique("room").replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
}

/// Reads a child's pipe to the end on a thread of its own.
fn drain(pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut pipe = pipe;
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs tests/browser/chat.mjs with `args`, kills it after [`NODE_TIMEOUT`],
/// prints its output, and panics with all of it unless it exits 0.
fn run_chat_mjs(dir: &Path, args: &[OsString]) {
    let mut child = Command::new("node")
        .arg(dir.join("chat.mjs"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run node: run ./scripts/test.sh, or install Node.js 20+");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());

    let deadline = Instant::now() + NODE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    print!("{stdout}");

    match status {
        Some(status) if status.success() => {}
        Some(status) => panic!(
            "tests/browser/chat.mjs exited with {status}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}"
        ),
        None => panic!(
            "tests/browser/chat.mjs was killed after {NODE_TIMEOUT:?}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}"
        ),
    }
}

/// Runs chat.mjs's `scenario` against instances `a` and `b`, in a room of
/// its own, with the scenario's `extra` options (`("pids", ...)` for
/// `--pids ...`).
fn run_scenario(dir: &Path, scenario: &str, a: &Instance, b: &Instance, extra: &[(&str, String)]) {
    let mut args: Vec<OsString> = vec![
        "--scenario".into(),
        scenario.into(),
        "--a".into(),
        format!("http://{}", a.http).into(),
        "--b".into(),
        format!("http://{}", b.http).into(),
        "--room".into(),
        unique_room().into(),
        "--out".into(),
        dir.join("artifacts").into(),
    ];
    for (name, value) in extra {
        args.push(format!("--{name}").into());
        args.push(value.into());
    }
    run_chat_mjs(dir, &args);
}

/// `--pids`: which process each instance is, for the scenarios that kill one.
fn pids(a: &Instance, b: &Instance) -> String {
    format!("{}={},{}={}", a.id, a.pid(), b.id, b.pid())
}

#[test]
fn a_message_typed_in_one_browser_tab_appears_in_a_tab_on_the_other_instance() {
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser");
    let a = Instance::redis("browser-a", &redis.url(), &prefix);
    let b = Instance::redis("browser-b", &redis.url(), &prefix);
    a.wait_ready();
    b.wait_ready();

    run_scenario(
        &dir,
        "basic",
        &a,
        &b,
        &[("redis-pid", redis.pid().to_string())],
    );
}

#[test]
fn a_tab_whose_instance_is_killed_reconnects_through_nginx_and_shows_what_it_missed() {
    let dir = browser_dir();
    require_tooling(&dir);
    require_nginx();

    let redis = RedisServer::start();
    let prefix = unique("browser-reconnect");
    let start =
        |id: &str| Instance::redis_with(id, &redis.url(), &prefix, &["--public-ws-url", "/ws"]);
    // One of them is SIGKILLed by chat.mjs; dropping it afterwards only reaps it.
    let a = start("browser-a");
    let b = start("browser-b");
    a.wait_ready();
    b.wait_ready();
    let nginx = Nginx::start(&[&a, &b]);

    run_scenario(
        &dir,
        "reconnect",
        &a,
        &b,
        &[
            ("proxy", format!("http://{}", nginx.addr)),
            ("pids", pids(&a, &b)),
        ],
    );
}

#[test]
fn the_member_list_follows_tabs_across_instances_and_shows_who_is_typing() {
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser-presence");
    // chat.mjs SIGKILLs instance a at the end: a short TTL lets its members
    // expire within seconds (dropping it afterwards only reaps it).
    let start =
        |id: &str| Instance::redis_with(id, &redis.url(), &prefix, &["--presence-ttl-ms", "3000"]);
    let a = start("browser-a");
    let b = start("browser-b");
    a.wait_ready();
    b.wait_ready();

    run_scenario(&dir, "presence", &a, &b, &[("pids", pids(&a, &b))]);
}

#[test]
fn the_x_ray_shows_every_hop_and_each_fault_button_does_what_it_says() {
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser-lab");
    // A's small send buffer lets "stall this tab" end in a slow-consumer
    // drop after a few messages; B keeps the default.
    let a = Instance::redis_with(
        "browser-a",
        &redis.url(),
        &prefix,
        &["--demo-controls", "--client-buffer-bytes", "8192"],
    );
    let b = Instance::redis_with("browser-b", &redis.url(), &prefix, &["--demo-controls"]);
    a.wait_ready();
    b.wait_ready();

    run_scenario(&dir, "lab", &a, &b, &[]);
}
