//! Pitfall 4: republishing what came from Redis.
//!
//! Two naive instances, each subscribed to the room's channel on a
//! connection of its own and publishing on another (pitfall 1 avoided).
//! When a message arrives from Redis, each delivers it to its clients, and
//! then, "so that the other instances get it too", publishes it again.
//! But every instance is subscribed, the sender's included: each publish
//! comes back to both instances, which publish it again. One message
//! doubles at every round and never stops; this demo stops it after
//! [`ROUNDS`] rounds.
//!
//! The real server publishes a message once, when its client sends it
//! (`src/session/reader.rs` → `src/broker/redis/publisher.rs`), and only
//! delivers what comes from Redis: the subscriber emits it to the fan-out
//! (`src/broker/redis/subscriber.rs` → `src/delivery/fanout.rs`), which writes to
//! local clients and publishes nothing. So does the minimal example
//! (`examples/minimal_chat.rs`), which the same check runs against.
//!
//! Run by `./scripts/pitfall.sh`, or alone:
//! `cargo run --example pitfall_republish -- --redis redis://127.0.0.1:6379`

mod pitfall_common;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use pitfall_common::{
    Args, Client, Frame, Target, count, count_messages, finish, redis_connection, say, title, took,
    wait_subscribers,
};
use serde_json::{Value, json};

const ROOM: &str = "pitfall4";
/// Where the demo stops the multiplication.
const ROUNDS: u64 = 10;

fn channel() -> String {
    format!("pitfall:room:{{{ROOM}}}")
}

/// Copies delivered, per instance and per round.
type Delivered = Arc<Mutex<Vec<Vec<usize>>>>;

/// One naive instance's subscriber thread.
fn run_instance(instance: usize, redis_url: &str, delivered: &Delivered) -> redis::RedisResult<()> {
    let mut publisher = redis_connection(redis_url)?;
    let mut con = redis_connection(redis_url)?;
    let mut subscription = con.as_pubsub();
    subscription.subscribe(channel())?;
    subscription.set_read_timeout(Some(Duration::from_secs(2)))?;
    loop {
        let payload: String = match subscription.get_message() {
            Ok(message) => message.get_payload()?,
            Err(e) if e.is_timeout() => return Ok(()), // the demo is over
            Err(e) => return Err(e),
        };
        let mut message: Value = serde_json::from_str(&payload).unwrap_or_default();
        // Deliver it to this instance's clients (here: count it).
        let round = message["round"].as_u64().unwrap_or(1);
        let all = {
            let mut delivered = delivered.lock().unwrap();
            delivered[instance][round as usize - 1] += 1;
            delivered[instance].iter().sum::<usize>()
        };
        // DEMO ONLY: without this limit the loop never ends.
        if round >= ROUNDS {
            if all == (1 << ROUNDS) - 1 {
                return Ok(()); // every copy of every round is in
            }
            continue;
        }
        message["round"] = json!(round + 1);
        // PITFALL: publishes again what came from Redis, "so that the other
        // instances get it". They already did, and so does this one: the
        // copy comes back to both. The real server only delivers what it
        // receives: src/broker/redis/subscriber.rs, src/delivery/fanout.rs.
        redis::cmd("PUBLISH")
            .arg(channel())
            .arg(message.to_string())
            .exec(&mut publisher)?;
    }
}

fn broken(args: &Args) -> Result<(Vec<Vec<usize>>, Duration), String> {
    let delivered: Delivered = Arc::new(Mutex::new(vec![vec![0; ROUNDS as usize]; 2]));
    let instances: Vec<_> = (0..2)
        .map(|instance| {
            let (url, delivered) = (args.redis.clone(), Arc::clone(&delivered));
            thread::spawn(move || run_instance(instance, &url, &delivered))
        })
        .collect();
    let mut con = redis_connection(&args.redis).map_err(|e| e.to_string())?;
    wait_subscribers(&mut con, &channel(), 2)?;
    // A client of instance 0 says hello: it is published once.
    let start = Instant::now();
    redis::cmd("PUBLISH")
        .arg(channel())
        .arg(json!({"text": "hello", "round": 1}).to_string())
        .exec(&mut con)
        .map_err(|e| e.to_string())?;
    // Each instance delivers 2^(ROUNDS) - 1 copies in all.
    let expected = (1usize << ROUNDS) - 1;
    let deadline = start + pitfall_common::TIMEOUT;
    let total = |d: &Delivered| d.lock().unwrap().iter().flatten().sum::<usize>();
    while total(&delivered) < 2 * expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    for instance in instances {
        match instance.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("a naive instance failed: {e}")),
            Err(_) => return Err("a naive instance panicked".into()),
        }
    }
    let delivered = delivered.lock().unwrap().clone();
    Ok((delivered, elapsed))
}

/// At most this many copies are counted: enough to see a loop.
const COUNTED: usize = 100;

/// A working design (the real server, the minimal example): a client of
/// instance a sends one message; the copies a client of a and a client of
/// b receive within a second.
fn working(target: &Target) -> Result<(usize, usize), String> {
    let mut alice = target.join(&format!("name=alice&room={ROOM}"), None)?;
    let mut bob = target.join_b(&format!("name=bob&room={ROOM}"))?;
    alice.send_text("hello", "p4")?;
    let quiet = Duration::from_secs(1);
    let copies = |client: &mut Client| match count_messages(client, COUNTED, quiet) {
        (n, Frame::Quiet) => Ok(n),
        (_, other) => Err(format!("the connection ended: {}", describe(&other))),
    };
    Ok((copies(&mut alice)?, copies(&mut bob)?))
}

/// Runs [`working`] against `target` and prints what it did; the copies
/// at a's client and at b's.
fn check(target: &Target) -> Option<(usize, usize)> {
    match working(target) {
        Ok((a, b)) => {
            let (copy, end) = if a.max(b) >= COUNTED {
                (
                    "copies",
                    format!("and more still coming (counted up to {COUNTED})"),
                )
            } else {
                ("copy", "and nothing more within 1 s".to_string())
            };
            say(
                target.label(),
                &[format!(
                    "{}, instances a and b: 1 message sent on a → {a} {copy} at a's client, {b} at b's, {end}",
                    target.name()
                )],
            );
            Some((a, b))
        }
        Err(e) => {
            say(target.label(), &[format!("{} failed: {e}", target.name())]);
            None
        }
    }
}

fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Close(close) => format!("closed {close:?}"),
        Frame::Gone(e) => e.clone(),
        _ => "?".into(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    title(
        4,
        "Republishing what came from Redis",
        "examples/pitfall_republish.rs",
    );
    say(
        "broken",
        &["2 instances each publish again every message they receive; 1 message is sent".into()],
    );
    let multiplied = match broken(&args) {
        Ok((delivered, elapsed)) => {
            let per_round: Vec<String> = delivered[0].iter().map(|&n| count(n)).collect();
            let each: Vec<usize> = delivered.iter().map(|rounds| rounds.iter().sum()).collect();
            say(
                "",
                &[
                    format!(
                        "copies per round, at each instance: {}",
                        per_round.join(" → ")
                    ),
                    format!(
                        "after {ROUNDS} rounds ({}): instance 1 delivered {} copies of the one message, instance 2 {}; the demo stopped there",
                        took(elapsed),
                        count(each[0]),
                        count(each[1])
                    ),
                ],
            );
            Some(each[0].min(each[1]))
        }
        Err(e) => {
            say("", &[format!("the demo failed: {e}")]);
            None
        }
    };
    let real = match args.real() {
        Ok(real) => check(&real),
        Err(e) => {
            say("working", &[e]);
            None
        }
    };
    let minimal = args.minimal().map(|minimal| match check(&minimal) {
        Some((1, 1)) => Ok("1 copy at each client: it delivers what Redis sends and never republishes (examples/minimal_chat.rs)".to_string()),
        Some((a, b)) => Err(format!(
            "1 message sent → {a} copies at a's client, {b} at b's{}",
            if a.max(b) >= COUNTED { ", and more still coming" } else { "" }
        )),
        None => Err("it did not deliver the message to both instances' clients".to_string()),
    });
    let (shown, verdict) = match (multiplied, real) {
        (Some(copies), Some((1, 1))) if copies > 1 => (
            true,
            format!(
                "1 message became {} copies at each instance after {ROUNDS} rounds; the real server: 1 copy at each client, it delivers what Redis sends and never republishes (src/delivery/fanout.rs)",
                count(copies)
            ),
        ),
        (Some(copies), _) if copies <= 1 => (false, "the message did not multiply".to_string()),
        _ => (
            false,
            "the real server did not deliver exactly one copy to each client".to_string(),
        ),
    };
    finish(
        &args,
        multiplied.is_some_and(|copies| copies > 1),
        shown,
        &verdict,
        minimal,
    )
}
