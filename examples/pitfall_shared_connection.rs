//! Pitfall 1: subscribing on the connection that publishes.
//!
//! The first idea of many: one Redis connection per instance, for
//! everything. The instance subscribes to its room's channel on it, and
//! when a client sends a message it publishes on it too. Redis refuses: a
//! connection that has sent `SUBSCRIBE` is in subscribed mode (RESP2, what
//! redis-rs and this server speak), where only (P|S)SUBSCRIBE,
//! (P|S)UNSUBSCRIBE, PING, QUIT and RESET are allowed.
//!
//! redis-rs's typed API makes the mistake hard to write in Rust:
//! `con.as_pubsub()` borrows the connection, so the compiler refuses a
//! `PUBLISH` on it while the subscription lives. The plain commands below
//! are what a client in most other languages lets one write.
//!
//! The real server: `src/broker/redis/subscriber.rs` owns the subscribed
//! connection and does nothing else; `src/broker/redis/publisher.rs`
//! publishes on a connection of its own. So does the minimal example
//! (`examples/minimal_chat.rs`, `connect` in `main`), which the same check
//! runs against.
//!
//! Run by `./scripts/pitfall.sh`, or alone:
//! `cargo run --example pitfall_shared_connection -- --redis redis://127.0.0.1:6379`

mod pitfall_common;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use pitfall_common::{Args, Target, finish, redis_connection, say, title, took};

const ROOM: &str = "pitfall1";

/// The broken instance: one connection, subscribed, then asked to publish.
/// Returns Redis's answer to the `PUBLISH`.
fn broken_publish(redis_url: &str, channel: &str) -> redis::RedisResult<Result<i64, String>> {
    // PITFALL: one connection for everything. The real server opens two:
    // src/broker/redis/subscriber.rs (subscribed) and
    // src/broker/redis/publisher.rs (publishing).
    let mut con = redis_connection(redis_url)?;
    // The instance has a client in the room: it subscribes to its channel.
    redis::cmd("SUBSCRIBE").arg(channel).exec(&mut con)?;
    // A client sends a message: the instance publishes it...
    // PITFALL: ...on the subscribed connection. Redis refuses the command.
    let answer = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(r#"{"text":"hello"}"#)
        .query::<i64>(&mut con);
    Ok(answer.map_err(|e| match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }))
}

/// A working design (the real server, the minimal example): a client's
/// message goes out and comes back through Redis; returns the round trip
/// and what `CLIENT LIST` says of the instance's connections.
fn working(args: &Args, target: &Target) -> Result<(std::time::Duration, Vec<String>), String> {
    let mut alice = target.join(&format!("name=alice&room={ROOM}"), None)?;
    let start = Instant::now();
    alice.send_text("hello", "p1")?;
    let echo = alice.wait_for("message")?;
    let rtt = start.elapsed();
    if echo["cid"] != "p1" {
        return Err(format!("unexpected message back: {echo}"));
    }
    let mut con = redis_connection(&args.redis).map_err(|e| e.to_string())?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    // name=chat:a:pub ... sub=0 ... cmd=evalsha
    let mine = target.connection_names();
    let mut connections: Vec<(String, String)> = list
        .lines()
        .filter_map(|line| {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or("")
                    .to_string()
            };
            let name = field("name");
            let what = match name.strip_prefix(mine)? {
                "sub" => "subscribed, only reads",
                "pub" => "publishes, only that",
                _ => return None,
            };
            let rest = format!(
                "{what:<25} (subscriptions: {}, last command: {})",
                field("sub"),
                field("cmd")
            );
            Some((name, rest))
        })
        .collect();
    connections.sort();
    let width = connections.iter().map(|(name, _)| name.len()).max();
    let width = width.unwrap_or(0).max(12);
    let connections = connections
        .into_iter()
        .map(|(name, rest)| format!("{name:<width$} {rest}"))
        .collect();
    Ok((rtt, connections))
}

/// Runs [`working`] against `target` and prints what it did; `Err` says
/// the symptom.
fn check(args: &Args, target: &Target) -> Result<(), String> {
    match working(args, target) {
        Ok((rtt, connections)) => {
            let mut lines = vec![format!(
                "{}: a client's message went out and came back through Redis in {}",
                target.name(),
                took(rtt)
            )];
            lines.push("its Redis connections (CLIENT LIST):".into());
            lines.extend(connections.iter().map(|c| format!("  {c}")));
            say(target.label(), &lines);
            match connections.len() {
                2.. => Ok(()),
                n => Err(format!("{n} named Redis connections, not two")),
            }
        }
        Err(e) => {
            say(target.label(), &[format!("{} failed: {e}", target.name())]);
            Err(e)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    title(
        1,
        "Subscribing on the connection that publishes",
        "examples/pitfall_shared_connection.rs",
    );
    let channel = format!("pitfall:room:{{{ROOM}}}");
    say(
        "broken",
        &[format!(
            "one Redis connection: SUBSCRIBE {channel}, then PUBLISH on it"
        )],
    );
    let refused = match broken_publish(&args.redis, &channel) {
        Ok(Err(error)) => {
            say("", &[format!("Redis answered: {error}")]);
            Some(error)
        }
        Ok(Ok(n)) => {
            say("", &[format!("Redis accepted the PUBLISH ({n} receivers)")]);
            None
        }
        Err(e) => {
            say("", &[format!("the demo failed before the PUBLISH: {e}")]);
            None
        }
    };
    let worked = match args.real() {
        Ok(real) => check(&args, &real).is_ok(),
        Err(e) => {
            say("working", &[e]);
            false
        }
    };
    let minimal = args.minimal().map(|minimal| {
        check(&args, &minimal).map(|()| {
            "a client's message came back through Redis; it publishes on a connection of its own (examples/minimal_chat.rs)".to_string()
        })
    });
    let broken = refused.is_some();
    let (shown, verdict) = match (refused, worked) {
        (Some(error), true) => (
            true,
            format!(
                "Redis answered: {error}; the real server: publishes on its own connection (src/broker/redis/publisher.rs)"
            ),
        ),
        (None, _) => (
            false,
            "Redis did not refuse the PUBLISH on a subscribed connection".to_string(),
        ),
        (Some(_), false) => (
            false,
            "the real server did not deliver a message through Redis".to_string(),
        ),
    };
    finish(&args, broken, shown, &verdict, minimal)
}
