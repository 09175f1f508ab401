//! Verifies in a real headless Chromium that a message typed on the chat page of one instance
//! appears on the page of another instance joined by Redis, that message text is never run as
//! HTML, that the pill, the banner and the conversation tell one story when Redis dies or an
//! instance is SIGKILLed (the tab reconnects through nginx to a survivor and shows what it
//! missed), that the member list and the typing line follow tabs across instances (with the
//! join and leave lines of a small room), that in a large room the page shows the count and a
//! window of the first members, asks for more when its list is scrolled to the bottom and
//! follows members leaving, that the X-ray shows every hop of a message, and that each button
//! of the fault panel does what it says (and that without `--demo-controls` there is no panel
//! and the endpoints refuse). tests/browser/chat.mjs drives the browser; these tests start
//! Redis, the instances, nginx and (for the large room) the other members.

mod common;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::{Client, Instance, RedisServer, temp_dir, timed_out, unique};

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
    run_scenario_in(dir, scenario, &unique_room(), a, b, extra);
}

/// [`run_scenario`] in `room`.
fn run_scenario_in(
    dir: &Path,
    scenario: &str,
    room: &str,
    a: &Instance,
    b: &Instance,
    extra: &[(&str, String)],
) {
    // The lab's instances view and fault panel are on the page the admin
    // listener serves; every other scenario uses the public page.
    let page = |instance: &Instance| match scenario {
        "lab" => format!("http://{}", instance.admin()),
        _ => format!("http://{}", instance.http),
    };
    let mut args: Vec<OsString> = vec![
        "--scenario".into(),
        scenario.into(),
        "--a".into(),
        page(a).into(),
        "--b".into(),
        page(b).into(),
        "--room".into(),
        room.into(),
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
fn a_tab_offered_part_of_a_long_history_loads_the_rest_when_scrolled_to_the_top() {
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser-older");
    let a = Instance::redis("browser-a", &redis.url(), &prefix);
    let b = Instance::redis("browser-b", &redis.url(), &prefix);
    a.wait_ready();
    b.wait_ready();
    let room = unique_room();
    let total = 60;
    let mut filler = a.client("filler", &room);
    let outcomes = filler.send_and_confirm("old", total, Duration::ZERO);
    assert_eq!(outcomes.accepted.len(), total);

    run_scenario_in(
        &dir,
        "older-history",
        &room,
        &a,
        &b,
        &[("count", total.to_string())],
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
fn with_presence_off_the_page_chats_without_a_member_list_or_typing() {
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser-presence-off");
    let start = |id: &str| Instance::redis_with(id, &redis.url(), &prefix, &["--presence", "off"]);
    let a = start("browser-a");
    let b = start("browser-b");
    a.wait_ready();
    b.wait_ready();

    run_scenario(&dir, "presence-off", &a, &b, &[]);
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

/// Members of the large room that are not browsers: plain WebSocket
/// clients, read by a thread of their own (so that none is dropped as a
/// slow or silent client while node runs), each closed once its name is a
/// line of the leave file (chat.mjs writes it when it wants them gone).
struct Bots {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<String>>>,
}

impl Bots {
    fn hold(mut bots: Vec<(String, Client)>, leave_file: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            for (_, bot) in &bots {
                bot.set_read_timeout(Duration::from_millis(1));
            }
            let mut problems = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let leave = std::fs::read_to_string(&leave_file).unwrap_or_default();
                let leaving: HashSet<&str> = leave.lines().collect();
                bots.retain_mut(|(name, bot)| {
                    if leaving.contains(name.as_str()) {
                        // A Close, then the socket drops: the server sees
                        // the member leave.
                        let _ = bot.socket.close(None);
                        let _ = bot.socket.flush();
                        return false;
                    }
                    loop {
                        match bot.socket.read() {
                            Ok(_) => continue,
                            Err(e) if timed_out(&e) => return true,
                            Err(e) => {
                                problems.push(format!("{name} lost its connection: {e}"));
                                return false;
                            }
                        }
                    }
                });
                thread::sleep(Duration::from_millis(20));
            }
            problems
        });
        Bots {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops reading and panics if a bot lost its connection unasked.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let problems = self.thread.take().unwrap().join().unwrap();
        assert!(problems.is_empty(), "bots: {}", problems.join("; "));
    }
}

impl Drop for Bots {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn a_large_room_shows_its_count_and_a_window_that_grows_when_the_list_is_scrolled() {
    const BOTS: usize = 30;
    const WINDOW: usize = 5;
    let dir = browser_dir();
    require_tooling(&dir);

    let redis = RedisServer::start();
    let prefix = unique("browser-large-room");
    // More than WINDOW members make a room large: its clients get the count
    // and a window of WINDOW members, not every name.
    let window = WINDOW.to_string();
    let start = |id: &str| {
        Instance::redis_with(
            id,
            &redis.url(),
            &prefix,
            &["--presence-full-list-max", &window],
        )
    };
    let a = start("browser-a");
    let b = start("browser-b");
    a.wait_ready();
    b.wait_ready();

    // bot00..bot29, every other one on each instance; they all sort after
    // the page's "alice".
    let room = unique_room();
    let names: Vec<String> = (0..BOTS).map(|i| format!("bot{i:02}")).collect();
    let bots = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let instance = if i % 2 == 0 { &a } else { &b };
            (name.clone(), instance.client(name, &room))
        })
        .collect();
    let files = temp_dir("browser-large-room");
    let leave_file = files.join("leave");
    let bots = Bots::hold(bots, leave_file.clone());

    run_scenario_in(
        &dir,
        "large-room",
        &room,
        &a,
        &b,
        &[
            ("count", (BOTS + 1).to_string()),
            ("window", window.clone()),
            ("bots", names.join(",")),
            ("leave-file", leave_file.display().to_string()),
        ],
    );
    bots.finish();
    let _ = std::fs::remove_dir_all(&files);
}
