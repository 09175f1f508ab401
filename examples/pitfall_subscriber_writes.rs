//! Pitfall 3: the subscriber writing to clients itself, with blocking
//! writes.
//!
//! The naive instance reads its subscription and, for each message, writes
//! it to every client's socket. A socket write blocks when the client's
//! buffers are full, that is when the client stops reading (a tab in the
//! background, a phone in a tunnel). From then on the subscriber waits on
//! that one client: every other client stops receiving, and Redis, which
//! keeps pushing, buffers for the subscriber until its output buffer passes
//! `client-output-buffer-limit pubsub` (32 MiB for 60 s by default; lowered
//! here), then cuts it. Every message published meanwhile is lost: Pub/Sub
//! keeps nothing for a subscriber that is gone.
//!
//! The real server: the subscriber only emits events into a channel
//! (`src/broker/redis/subscriber.rs`); the fan-out (`src/delivery/fanout.rs`) hands
//! each message to every client's outbox, which never blocks
//! (`src/delivery/outbox.rs`); a client whose outbox passes
//! `--client-buffer-bytes` is closed as a slow consumer, alone. The
//! minimal example (`examples/minimal_chat.rs`, `fan_out`), which the same
//! check runs against, hands each message to every client's bounded
//! channel with `try_send` and drops a client whose channel is full.
//!
//! Run by `./scripts/pitfall.sh` (it gives the real server a
//! `--client-buffer-bytes` of 64 KiB), or alone:
//! `cargo run --example pitfall_subscriber_writes -- --redis redis://127.0.0.1:6379`
//! (it lowers that Redis's limit while it runs).

mod pitfall_common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use pitfall_common::{
    Args, Client, Frame, Kind, Target, channel_payload, count, count_messages, finish,
    redis_connection, say, subscribers, title, took, wait_subscribers,
};
use tungstenite::{Message, WebSocket};

const ROOM: &str = "pitfall3";
/// Clients that read everything they are sent.
const READERS: usize = 4;
/// Messages published in [`PUBLISHING`], evenly: 12 MB in 4 s, a very
/// busy room. That much, because on loopback the kernel hides a lot: up
/// to 4 MB in the socket of a client that does not read, and as much
/// between Redis and a subscriber that does not read. A real network
/// hides less, and a real room lasts longer.
const MESSAGES: usize = 6000;
const PUBLISHING: Duration = Duration::from_secs(4);
const TEXT_BYTES: usize = 2000;
/// The demo's Redis limit for Pub/Sub clients: cut at once past 256 KiB
/// waiting in Redis, or after 1 s past 64 KiB. A subscriber that keeps up
/// never has anything waiting there; one that stopped reading passes it
/// as soon as the kernel's buffers are full.
const LIMIT: &str = "pubsub 256kb 64kb 1";

/// The naive instance's clients.
type Clients = Arc<Mutex<Vec<WebSocket<TcpStream>>>>;

/// The naive instance's subscriber thread: returns why it stopped.
fn run_subscriber(redis_url: &str, channel: &str, clients: &Clients) -> redis::RedisResult<()> {
    let mut con = redis::Client::open(redis_url)?.get_connection()?;
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe(channel)?;
    loop {
        let payload: String = pubsub.get_message()?.get_payload()?;
        let mut clients = clients.lock().unwrap();
        // PITFALL: the subscriber writes to each client itself, and a write
        // blocks while that client's socket is full. One client that stops
        // reading stops this loop: every other client waits, and Redis cuts
        // this connection at client-output-buffer-limit pubsub. The real
        // server hands each message to outboxes that never block:
        // src/delivery/fanout.rs, src/delivery/outbox.rs.
        clients.retain_mut(|ws| ws.send(Message::text(payload.clone())).is_ok());
    }
}

/// Starts the naive instance: a WebSocket listener and the subscriber.
/// Returns its address, its clients, and the subscriber's thread.
fn start_naive(
    redis_url: &str,
    channel: &str,
) -> Result<(SocketAddr, Clients, JoinHandle<String>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let clients: Clients = Arc::default();
    let accepted = Arc::clone(&clients);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Ok(ws) = tungstenite::accept(stream) {
                accepted.lock().unwrap().push(ws);
            }
        }
    });
    let (url, channel, subscribed) = (
        redis_url.to_string(),
        channel.to_string(),
        Arc::clone(&clients),
    );
    let subscriber = thread::spawn(move || match run_subscriber(&url, &channel, &subscribed) {
        Ok(()) => "ended".to_string(),
        Err(e) => e.to_string(),
    });
    Ok((addr, clients, subscriber))
}

/// A client that reads everything, counting messages, until `stop`.
struct Reader {
    got: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

fn spawn_reader(mut client: Client, stop: &Arc<AtomicBool>, last: &Arc<Mutex<Instant>>) -> Reader {
    let got = Arc::new(AtomicUsize::new(0));
    let (counter, stop, last) = (Arc::clone(&got), Arc::clone(stop), Arc::clone(last));
    client.set_timeout(Duration::from_millis(100));
    let thread = thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match client.next() {
                Frame::Json(v) if v["type"] == "message" => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap() = Instant::now();
                }
                Frame::Json(_) | Frame::Quiet => {}
                Frame::Close(_) | Frame::Gone(_) => return,
            }
        }
    });
    Reader { got, thread }
}

/// Publishes the [`MESSAGES`], paced; returns when publishing ended, and
/// the first message that a subscriber of the start missed (`PUBLISH`
/// answered fewer receivers: Redis had cut one). The naive instance and
/// the real server have one subscriber on the channel; the minimal
/// example, whose instances share one channel, has two.
fn publish_all(
    redis_url: &str,
    channel: &str,
    room: &str,
) -> Result<(Instant, Option<(usize, Instant)>), String> {
    let mut con = redis_connection(redis_url).map_err(|e| e.to_string())?;
    let text = "x".repeat(TEXT_BYTES);
    let subscribed = subscribers(&mut con, channel).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut first_unheard = None;
    for seq in 0..MESSAGES {
        let due = start + PUBLISHING.mul_f64(seq as f64 / MESSAGES as f64);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let receivers: usize = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(channel_payload(room, seq + 1, &text))
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        if receivers < subscribed && first_unheard.is_none() {
            first_unheard = Some((seq + 1, Instant::now()));
        }
    }
    Ok((Instant::now(), first_unheard))
}

/// Reader counts: the smallest and the largest.
fn min_max(readers: &[Reader]) -> (usize, usize) {
    let counts = readers.iter().map(|r| r.got.load(Ordering::Relaxed));
    (counts.clone().min().unwrap_or(0), counts.max().unwrap_or(0))
}

/// What the naive instance did.
struct Broken {
    /// Messages every reader had when publishing ended.
    stalled_at: usize,
    /// How long the readers had received nothing when publishing ended.
    silent: Duration,
    /// When PUBLISH first reached nobody: Redis had cut the subscriber
    /// (the naive instance's only one).
    cut_at: Option<(usize, Duration)>,
    /// Messages the readers had in the end (the fewest, the most).
    delivered: (usize, usize),
    subscriber_end: String,
}

fn broken(args: &Args) -> Result<Broken, String> {
    let channel = format!("pitfall:room:{{{ROOM}}}");
    let mut con = redis_connection(&args.redis).map_err(|e| e.to_string())?;
    let (addr, clients, subscriber) = start_naive(&args.redis, &channel)?;
    wait_subscribers(&mut con, &channel, 1)?;
    // One client stops reading; four read everything.
    let stuck = Client::connect(addr, "", Some(4096))?;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(Mutex::new(Instant::now()));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(spawn_reader(Client::connect(addr, "", None)?, &stop, &last));
    }
    let deadline = Instant::now() + pitfall_common::TIMEOUT;
    while clients.lock().unwrap().len() < READERS + 1 {
        if Instant::now() > deadline {
            return Err("the naive instance did not accept its clients".into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let (ended, first_unheard) = publish_all(&args.redis, &channel, ROOM)?;
    // Let what is in flight arrive, then look.
    thread::sleep(Duration::from_millis(500));
    let stalled_at = min_max(&readers).1;
    let silent = ended.saturating_duration_since(*last.lock().unwrap());
    // The stuck client goes away: the subscriber's write fails, it goes
    // back to Redis, reads what its socket still held, and finds the
    // connection cut.
    drop(stuck);
    let deadline = Instant::now() + pitfall_common::TIMEOUT;
    while !subscriber.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let subscriber_end = if subscriber.is_finished() {
        subscriber.join().unwrap_or_else(|_| "panicked".into())
    } else {
        "still running".into()
    };
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let delivered = min_max(&readers);
    for reader in readers {
        let _ = reader.thread.join();
    }
    Ok(Broken {
        stalled_at,
        silent,
        cut_at: first_unheard.map(|(seq, at)| (seq, at - start)),
        delivered,
        subscriber_end,
    })
}

/// What a working design (the real server, the minimal example) did.
struct Working {
    delivered: (usize, usize),
    stuck_got: usize,
    stuck_close: Option<(u16, String)>,
    /// The first message a subscriber missed (none: the subscriptions
    /// held).
    unheard: Option<usize>,
}

fn working(args: &Args, target: &Target) -> Result<Working, String> {
    let channel = target.channel(ROOM);
    // The stuck client reads its first frames, then never again.
    let mut stuck = target.join(&format!("name=stuck&room={ROOM}"), Some(4096))?;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(Mutex::new(Instant::now()));
    let mut readers = Vec::new();
    for n in 0..READERS {
        let client = target.join(&format!("name=reader{n}&room={ROOM}"), None)?;
        readers.push(spawn_reader(client, &stop, &last));
    }
    let (_, unheard) = publish_all(&args.redis, &channel, ROOM)?;
    let deadline = Instant::now() + pitfall_common::TIMEOUT;
    while min_max(&readers).0 < MESSAGES && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let delivered = min_max(&readers);
    for reader in readers {
        let _ = reader.thread.join();
    }
    // The stuck client reads at last: what was queued for it, then its
    // Close.
    let (stuck_got, end) = count_messages(&mut stuck, MESSAGES, Duration::from_secs(3));
    let stuck_close = match end {
        Frame::Close(Some((code, reason))) => Some((u16::from(code), reason)),
        _ => None,
    };
    Ok(Working {
        delivered,
        stuck_got,
        stuck_close,
        unheard: unheard.map(|(seq, _)| seq),
    })
}

/// The line of the Redis log about the cut, shortened to what it says of
/// the subscriber (`omem` is what waited for it in Redis, in bytes).
fn redis_log_line(args: &Args) -> Option<String> {
    let log = std::fs::read_to_string(args.redis_log.as_ref()?).ok()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("output buffer limits"))?;
    let field = |key: &str| line.split(' ').find(|kv| kv.starts_with(key)).unwrap_or("");
    let (flags, omem) = (field("flags="), field("omem="));
    let tail = line
        .split(" resp=2 ")
        .nth(1)
        .unwrap_or("")
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
    Some(format!(
        "Redis log: \"Client ... {flags} {} {omem} ... {tail}\"",
        field("sub=")
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    title(
        3,
        "The subscriber writing to clients itself, with blocking writes",
        "examples/pitfall_subscriber_writes.rs",
    );
    let mut con = match redis_connection(&args.redis) {
        Ok(con) => con,
        Err(e) => {
            return finish(
                &args,
                false,
                false,
                &format!("cannot reach Redis: {e}"),
                None,
            );
        }
    };
    let old: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("client-output-buffer-limit")
        .query(&mut con)
        .unwrap_or_default();
    let set = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg(LIMIT)
        .exec(&mut con);
    if let Err(e) = set {
        return finish(
            &args,
            false,
            false,
            &format!("CONFIG SET refused: {e}"),
            None,
        );
    }
    say(
        "setup",
        &[
            format!(
                "Redis: CONFIG SET client-output-buffer-limit \"{LIMIT}\" (default: pubsub 32mb 8mb 60)"
            ),
            format!(
                "{READERS} clients read, 1 client stops reading; {} messages of {} bytes published in {}",
                count(MESSAGES),
                count(TEXT_BYTES),
                took(PUBLISHING)
            ),
        ],
    );
    let broken = broken(&args);
    match &broken {
        Ok(b) => {
            let mut lines = vec![format!(
                "the {READERS} reading clients got {} of {} messages, then nothing for the last {} of publishing",
                count(b.stalled_at),
                count(MESSAGES),
                took(b.silent)
            )];
            match b.cut_at {
                Some((seq, at)) => {
                    lines.push(format!(
                        "Redis cut the subscriber after {}: from message {} on, PUBLISH reached nobody",
                        took(at),
                        count(seq)
                    ));
                    lines.extend(redis_log_line(&args));
                }
                None => lines.push("Redis never cut the subscriber".to_string()),
            }
            lines.push(format!(
                "once the stuck client left: {} of {} delivered, {} LOST (the subscriber then read: {})",
                count(b.delivered.0),
                count(MESSAGES),
                count(MESSAGES - b.delivered.0),
                b.subscriber_end
            ));
            say("broken", &lines);
        }
        Err(e) => say("broken", &[format!("the demo failed: {e}")]),
    }
    let real = args.real().and_then(|real| check(&args, &real));
    let minimal = args.minimal().map(|minimal| check(&args, &minimal));
    if old.len() == 2 {
        let _ = redis::cmd("CONFIG")
            .arg("SET")
            .arg(&old[0])
            .arg(&old[1])
            .exec(&mut con);
    }
    let minimal = minimal.map(|result| match result {
        Ok(w) if healthy(&w) => Ok(format!(
            "{} of {} delivered, the stuck client closed {}, its subscription kept: its subscriber hands messages to bounded channels with try_send (examples/minimal_chat.rs)",
            count(w.delivered.0),
            count(MESSAGES),
            closed(&w),
        )),
        Ok(w) => Err(format!(
            "the readers got {} of {}, its subscription was {}, the stuck client was {}",
            count(w.delivered.0),
            count(MESSAGES),
            if w.unheard.is_none() { "kept" } else { "CUT" },
            match &w.stuck_close {
                Some((code, _)) => format!("closed {code}"),
                None => "NOT closed".to_string(),
            },
        )),
        Err(e) => Err(e),
    });
    let (b, w) = match (broken, real) {
        (Ok(b), Ok(w)) => (b, w),
        (Ok(b), Err(_)) if args.real().is_err() => {
            return finish(&args, stalled_and_lost(&b), false, "", None);
        }
        _ => {
            return finish(
                &args,
                false,
                false,
                "a side of the demo failed (see above)",
                minimal,
            );
        }
    };
    let symptom = stalled_and_lost(&b);
    let summary = format!(
        "one stuck client stalled the others at {} of {}, Redis cut the subscriber, {} lost; the real server: {} of {} delivered, the stuck client closed {}, its subscription kept (src/delivery/fanout.rs, src/delivery/outbox.rs)",
        count(b.stalled_at),
        count(MESSAGES),
        count(MESSAGES - b.delivered.0),
        count(w.delivered.0),
        count(MESSAGES),
        closed(&w),
    );
    let (shown, verdict) = match (symptom, healthy(&w)) {
        (true, true) => (true, summary),
        (false, _) => (
            false,
            format!("the naive subscriber did not stall and lose messages: {summary}"),
        ),
        (true, false) => (
            false,
            format!("the real server showed a symptom: {summary}"),
        ),
    };
    finish(&args, symptom, shown, &verdict, minimal)
}

/// The broken design's symptom: the stuck client stalled the others, Redis
/// cut the subscriber, and messages were lost.
fn stalled_and_lost(b: &Broken) -> bool {
    b.stalled_at < MESSAGES && b.cut_at.is_some() && b.delivered.0 < MESSAGES
}

/// No symptom: every reader got every message, the subscription held, and
/// the stuck client alone was closed as a slow consumer.
fn healthy(w: &Working) -> bool {
    w.delivered.0 == MESSAGES && w.unheard.is_none() && matches!(&w.stuck_close, Some((1008, _)))
}

/// The stuck client's close code, or `never`.
fn closed(w: &Working) -> String {
    w.stuck_close
        .as_ref()
        .map_or("never".to_string(), |(code, _)| code.to_string())
}

/// Runs [`working`] against `target` and prints what it did.
fn check(args: &Args, target: &Target) -> Result<Working, String> {
    let working = working(args, target);
    match &working {
        Ok(w) => {
            // The minimal example's two instances share one channel.
            let (why, subscribers) = match target.kind {
                Kind::Real => ("its outbox passed --client-buffer-bytes", "subscriber"),
                Kind::Minimal => ("its channel was full", "subscribers"),
            };
            let close = match &w.stuck_close {
                Some((code, reason)) => format!("closed {code} \"{reason}\" ({why})"),
                None => "NOT closed".to_string(),
            };
            let subscription = match w.unheard {
                None => format!("every PUBLISH reached its {subscribers}"),
                Some(seq) => format!("Redis CUT a subscriber (message {} missed it)", count(seq)),
            };
            say(
                target.label(),
                &[
                    format!(
                        "{}, same Redis, same limit: the {READERS} reading clients got {} of {}; {subscription}",
                        target.name(),
                        count(w.delivered.0),
                        count(MESSAGES)
                    ),
                    format!(
                        "the stuck client got {}, then was {close}",
                        count(w.stuck_got),
                    ),
                ],
            );
        }
        Err(e) => say(target.label(), &[format!("{} failed: {e}", target.name())]),
    }
    working
}
