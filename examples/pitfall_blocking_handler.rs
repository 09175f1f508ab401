//! Pitfall 2: reading the subscription where requests are served.
//!
//! A long-polling chat: the page asks `GET /poll` for the next message of
//! its room, and the handler subscribes and waits for it. Reading a
//! subscription blocks until a message comes, which in a quiet room may be
//! never, and the thread serving the request is stuck there meanwhile. With
//! a few clients waiting, every HTTP worker is stuck: the instance stops
//! answering `/healthz` (its orchestrator kills it), the page, everyone.
//! The same happens in a thread-per-client server whose client thread
//! reads the subscription: that thread stops serving its client.
//!
//! The real server reads its subscription on one thread that does nothing
//! else (`src/broker/redis/subscriber.rs`); request handlers and client
//! threads never wait on Redis Pub/Sub. The minimal example
//! (`examples/minimal_chat.rs`), which the same check runs against, reads
//! it on its main thread and serves HTTP on another (`serve_http`).
//!
//! Run by `./scripts/pitfall.sh`, or alone:
//! `cargo run --example pitfall_blocking_handler -- --redis redis://127.0.0.1:6379`

mod pitfall_common;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use pitfall_common::{
    Args, Target, finish, http_get, redis_connection, say, title, took, wait_subscribers,
};
use tiny_http::{Response, Server};

const ROOM: &str = "pitfall2";
/// HTTP worker threads: as many as the real server has.
const HTTP_WORKERS: usize = 2;
/// How long the demo lets the room stay quiet before sending a message.
const QUIET: Duration = Duration::from_secs(3);

fn channel() -> String {
    format!("pitfall:room:{{{ROOM}}}")
}

/// The broken instance's request handler.
fn handle(request: tiny_http::Request, redis_url: &str) {
    let answer = match request.url() {
        "/healthz" => "ok".to_string(),
        "/" => "<!doctype html><title>chat</title>".to_string(),
        "/poll" => {
            // PITFALL: the handler reads the subscription. get_message()
            // blocks until a message comes on the channel, maybe never, and
            // this worker serves nothing else meanwhile. The real server
            // reads it on its own thread: src/broker/redis/subscriber.rs
            let next = (|| -> redis::RedisResult<String> {
                let mut con = redis::Client::open(redis_url)?.get_connection()?;
                let mut pubsub = con.as_pubsub();
                pubsub.subscribe(channel())?;
                pubsub.get_message()?.get_payload()
            })();
            next.unwrap_or_else(|e| format!("error: {e}"))
        }
        _ => "no page here".to_string(),
    };
    let _ = request.respond(Response::from_string(answer));
}

/// Starts the broken instance: tiny_http and its workers. Returns its
/// address.
fn start_broken(redis_url: &str) -> Result<SocketAddr, String> {
    let server = Arc::new(Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let addr = server.server_addr().to_ip().ok_or("no IP address")?;
    for n in 0..HTTP_WORKERS {
        let server = Arc::clone(&server);
        let redis_url = redis_url.to_string();
        thread::Builder::new()
            .name(format!("http-{n}"))
            .spawn(move || {
                for request in server.incoming_requests() {
                    handle(request, &redis_url);
                }
            })
            .map_err(|e| e.to_string())?;
    }
    Ok(addr)
}

/// What the broken instance did: how long `/healthz` and `/` hung.
struct Hang {
    healthz: Result<(u16, Duration), Duration>,
    page: Result<(u16, Duration), Duration>,
}

fn broken(args: &Args) -> Result<Hang, String> {
    let addr = start_broken(&args.redis)?;
    let mut con = redis_connection(&args.redis).map_err(|e| e.to_string())?;
    // Two clients open the page, which asks for the next message.
    let pollers: Vec<_> = (0..HTTP_WORKERS)
        .map(|_| thread::spawn(move || http_get(addr, "/poll", QUIET * 4)))
        .collect();
    wait_subscribers(&mut con, &channel(), HTTP_WORKERS)?;
    // The orchestrator checks the instance; a third client opens the page.
    let healthz = thread::spawn(move || http_get(addr, "/healthz", QUIET * 4));
    let page = thread::spawn(move || http_get(addr, "/", QUIET * 4));
    // The room stays quiet for a while, then someone says something.
    thread::sleep(QUIET);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel())
        .arg("hello")
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    for poller in pollers {
        let _ = poller.join();
    }
    Ok(Hang {
        healthz: healthz.join().map_err(|_| "healthz probe panicked")?,
        page: page.join().map_err(|_| "page probe panicked")?,
    })
}

/// A working design (the real server, the minimal example) with two
/// clients waiting in a quiet room: the slowest of five `/healthz`.
fn working(target: &Target) -> Result<Duration, String> {
    let mut clients = Vec::new();
    for name in ["alice", "bob"] {
        clients.push(target.join(&format!("name={name}&room={ROOM}"), None)?);
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        match http_get(target.http, "/healthz", QUIET) {
            Ok((200, t)) => slowest = slowest.max(t),
            Ok((status, _)) => return Err(format!("/healthz answered {status}")),
            Err(t) => return Err(format!("/healthz: no answer in {}", took(t))),
        }
    }
    Ok(slowest)
}

fn describe(what: &str, probe: &Result<(u16, Duration), Duration>) -> String {
    match probe {
        Ok((status, t)) => format!("{what} hung {} (answered {status} only then)", took(*t)),
        Err(t) => format!("{what}: no answer at all in {} (gave up)", took(*t)),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    title(
        2,
        "Reading the subscription where requests are served",
        "examples/pitfall_blocking_handler.rs",
    );
    say(
        "broken",
        &[format!(
            "{HTTP_WORKERS} clients wait in GET /poll, whose handler reads the subscription; the room stays quiet {}",
            took(QUIET)
        )],
    );
    let hung = match broken(&args) {
        Ok(hang) => {
            say(
                "",
                &[
                    describe("GET /healthz", &hang.healthz),
                    describe("GET / (a new client)", &hang.page),
                    format!(
                        "both were stuck until a chat message came after {}; a quiet room never wakes them",
                        took(QUIET)
                    ),
                ],
            );
            // Hung: not answered before the message came.
            let stuck = |p: &Result<(u16, Duration), Duration>| match p {
                Ok((_, t)) => *t >= QUIET.mul_f64(0.9),
                Err(_) => true,
            };
            let (Ok((_, hung)) | Err(hung)) = hang.healthz;
            (stuck(&hang.healthz) && stuck(&hang.page)).then_some(hung)
        }
        Err(e) => {
            say("", &[format!("the demo failed: {e}")]);
            None
        }
    };
    let answered = match args.real() {
        Ok(real) => check(&real),
        Err(e) => {
            say("working", &[e]);
            None
        }
    };
    let minimal = args.minimal().map(|minimal| match check(&minimal) {
        Some(slowest) => Ok(format!(
            "/healthz answered in {} with 2 clients waiting: it reads its subscription on a thread of its own (examples/minimal_chat.rs)",
            took(slowest)
        )),
        None => Err("/healthz did not answer within 1 s with 2 clients waiting".to_string()),
    });
    let broken = hung.is_some();
    let (shown, verdict) = match (hung, answered) {
        (Some(hang), Some(slowest)) => (
            true,
            format!(
                "/healthz hung {}; the real server answered in {}: its subscriber reads on its own thread (src/broker/redis/subscriber.rs)",
                took(hang),
                took(slowest)
            ),
        ),
        (None, _) => (
            false,
            "the broken instance kept answering /healthz".to_string(),
        ),
        (_, None) => (
            false,
            "the real server did not answer /healthz within 1 s".to_string(),
        ),
    };
    finish(&args, broken, shown, &verdict, minimal)
}

/// Runs [`working`] against `target` and prints what it did: the slowest
/// `/healthz`, when all five answered within 1 s.
fn check(target: &Target) -> Option<Duration> {
    match working(target) {
        Ok(slowest) => {
            say(
                target.label(),
                &[format!(
                    "{}, 2 clients waiting in a quiet room: GET /healthz answered in {} (slowest of 5)",
                    target.name(),
                    took(slowest)
                )],
            );
            (slowest < Duration::from_secs(1)).then_some(slowest)
        }
        Err(e) => {
            say(target.label(), &[format!("{} failed: {e}", target.name())]);
            None
        }
    }
}
