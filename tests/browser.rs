//! Verifies in a real headless Chromium that a message typed on the chat page of one instance
//! appears on the page of another instance joined by Redis, that message text is never run as
//! HTML, that the pill, the banner and the conversation tell one story when Redis dies or an
//! instance is SIGKILLed (the tab reconnects through nginx to a survivor and shows what it
//! missed), that the member list and the typing line follow tabs across instances (with the
//! join and leave lines of a small room), that in a large room the page shows the count and a
//! window of the first members, asks for more when its list is scrolled to the bottom and
//! follows members leaving, that the X-ray shows every hop of a message, and that each button
//! of the fault panel does what it says (and that without `--demo-controls` there is no panel
//! and the endpoints refuse), and that with `--auth token` a tab whose sign-in expires gets a new
//! token and reconnects without losing a message, while a tab that refreshes its token in time
//! is never closed. tests/browser/chat.mjs drives the browser; these tests start Redis, the
//! instances, nginx, (for the large room) the other members and (with `--auth token`) the
//! application's token endpoint.

mod common;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::{Client, Instance, RedisServer, temp_dir, timed_out, unique};
use pubsub_chat::auth::{Claims, KeySources, SigningKey, mint};

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
}

/// Who the token endpoint knows: its session cookie's value, and what
/// its tokens say.
struct Account {
    session: &'static str,
    sub: &'static str,
    name: &'static str,
    /// How long each token from `/token` lasts.
    ttl_s: u64,
    /// How long the first token (`/initial`) lasts: longer, so that a
    /// slow page load on a busy machine still connects with it.
    initial_ttl_s: u64,
    /// `/token` answers 500 to this many of its first requests.
    fail_first: usize,
    /// `/token` answers JSON `{"token": ...}` (else the token as text).
    json: bool,
}

/// The application's token endpoint, as the page's `--auth-token-url`
/// sees it: `GET /token` answers a fresh token for the user its `session`
/// cookie names (the page asks with credentials; the answer allows the
/// page's origin with credentials). `GET /initial?user=<session>` is the
/// application's sign-in, which hands a page its first token (chat.mjs
/// puts it in the page's `#token=`). Every `/token` request is recorded.
struct TokenServer {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    /// Each `/token` request: the session it named, and the status answered.
    requests: Arc<Mutex<Vec<(String, u16)>>>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl TokenServer {
    fn start(secret_file: PathBuf, accounts: Vec<Account>) -> Self {
        let server =
            tiny_http::Server::http("127.0.0.1:0").expect("cannot start the token endpoint");
        let addr = server.server_addr().to_ip().expect("an IP address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stopping, log) = (stop.clone(), requests.clone());
        let thread = thread::spawn(move || {
            let signing = SigningKey::Secret(KeySources {
                secret_file: Some(secret_file),
                ..KeySources::default()
            });
            let mint_for = |account: &Account, ttl_s: u64| {
                let claims = Claims {
                    sub: account.sub.into(),
                    name: Some(account.name.into()),
                    exp: now_s() + ttl_s,
                    nbf: None,
                    rooms: None,
                };
                mint(&claims, &signing, true).expect("minting a token")
            };
            let mut asked: HashMap<&str, usize> = HashMap::new();
            while !stopping.load(Ordering::Relaxed) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let header = |name: &'static str| {
                    request
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.as_str().to_string())
                };
                let origin = header("Origin");
                let cookie = header("Cookie").unwrap_or_default();
                let session = cookie
                    .split(';')
                    .find_map(|c| c.trim().strip_prefix("session="))
                    .unwrap_or("")
                    .to_string();
                let url = request.url().to_string();
                let (status, body) = if let Some(user) = url.strip_prefix("/initial?user=") {
                    match accounts.iter().find(|a| a.session == user) {
                        Some(account) => (200, mint_for(account, account.initial_ttl_s)),
                        None => (404, format!("no account {user:?}")),
                    }
                } else if url == "/token" {
                    let answer = match accounts.iter().find(|a| a.session == session) {
                        None => (401, "not signed in".to_string()),
                        Some(account) => {
                            let n = asked.entry(account.session).or_default();
                            *n += 1;
                            if *n <= account.fail_first {
                                (500, "the token service is down".to_string())
                            } else if account.json {
                                let token = mint_for(account, account.ttl_s);
                                (200, serde_json::json!({ "token": token }).to_string())
                            } else {
                                (200, mint_for(account, account.ttl_s))
                            }
                        }
                    };
                    log.lock().unwrap().push((session, answer.0));
                    answer
                } else {
                    (404, "not found".to_string())
                };
                // The page's origin, with credentials (its cookie); every
                // answer carries it, failures too, so that the page reads
                // the status instead of a CORS error.
                let headers = [
                    (
                        "Access-Control-Allow-Origin",
                        origin.as_deref().unwrap_or("*"),
                    ),
                    (
                        "Access-Control-Allow-Credentials",
                        if origin.is_some() { "true" } else { "false" },
                    ),
                    ("Vary", "Origin"),
                    ("Cache-Control", "no-store"),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ];
                let mut response = tiny_http::Response::from_string(body).with_status_code(status);
                for (name, value) in headers {
                    response.add_header(
                        tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap(),
                    );
                }
                let _ = request.respond(response);
            }
        });
        TokenServer {
            addr,
            stop,
            thread: Some(thread),
            requests,
        }
    }

    /// The `/token` requests so far: (session, status).
    fn requests(&self) -> Vec<(String, u16)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn token_expiry_reconnects_with_a_new_token_and_loses_nothing() {
    let dir = browser_dir();
    require_tooling(&dir);

    let keys = temp_dir("browser-auth");
    let secret = keys.join("hs1.key");
    std::fs::write(&secret, "0123456789abcdefghijklmnopqrstuvwxyzABCD").unwrap();
    // alice: a first token of 10 s, then 6 s ones, and the endpoint fails
    // her first request (the refresh before her first token expires), so
    // that the server closes her at its exp; then it works. twin: the
    // same tokens, refreshed in time; a user of her own who shares
    // alice's display name. bob: one long token.
    let tokens = TokenServer::start(
        secret.clone(),
        vec![
            Account {
                session: "alice",
                sub: "u-alice",
                name: "alice",
                ttl_s: 6,
                initial_ttl_s: 10,
                fail_first: 1,
                json: true,
            },
            Account {
                session: "twin",
                sub: "u-twin",
                name: "alice",
                ttl_s: 6,
                initial_ttl_s: 10,
                fail_first: 0,
                json: false,
            },
            Account {
                session: "bob",
                sub: "u-bob",
                name: "bob",
                ttl_s: 600,
                initial_ttl_s: 600,
                fail_first: 0,
                json: true,
            },
        ],
    );
    let token_url = format!("http://{}/token", tokens.addr);

    let redis = RedisServer::start();
    let prefix = unique("browser-auth");
    let secret_arg = secret.display().to_string();
    let start = |id: &str| {
        Instance::redis_with(
            id,
            &redis.url(),
            &prefix,
            &[
                "--auth",
                "token",
                "--auth-hs256-secret-file",
                &secret_arg,
                "--auth-token-url",
                &token_url,
            ],
        )
    };
    let a = start("browser-a");
    let b = start("browser-b");
    a.wait_ready();
    b.wait_ready();

    run_scenario(
        &dir,
        "token",
        &a,
        &b,
        &[("token-server", format!("http://{}", tokens.addr))],
    );

    // What the endpoint saw: alice's first request failed (the refresh),
    // the next one (after the 4401) and later refreshes worked; twin's
    // all worked; bob, with a long token, asked for none.
    let requests = tokens.requests();
    let of = |session: &str| -> Vec<u16> {
        requests
            .iter()
            .filter(|(s, _)| s == session)
            .map(|&(_, status)| status)
            .collect()
    };
    let alice = of("alice");
    assert!(
        alice.len() >= 2 && alice[0] == 500 && alice[1..].iter().all(|&s| s == 200),
        "alice's /token requests answered {alice:?}: want a 500, then only 200s"
    );
    let twin = of("twin");
    assert!(
        !twin.is_empty() && twin.iter().all(|&s| s == 200),
        "twin's /token requests answered {twin:?}: want at least one, all 200"
    );
    assert!(of("bob").is_empty(), "bob asked for a token: {requests:?}");
    assert!(
        requests.iter().all(|(s, _)| !s.is_empty()),
        "a /token request came without its session cookie: {requests:?}"
    );
    assert!(
        a.metric("chat_tokens_expired_total") >= 1.0,
        "instance a closed no connection for an expired token"
    );
    assert_eq!(
        b.metric("chat_tokens_expired_total"),
        0.0,
        "instance b closed a connection for an expired token: twin's refresh did not keep it"
    );
    drop(tokens);
}
