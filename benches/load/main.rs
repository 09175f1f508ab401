//! Load generator and benchmark for pubsub-chat.
//!
//! ```sh
//! cargo bench --bench load -- <scenario> [--runs N] [--clients N] [--senders S]
//!     [--rooms R] [--rate R|max] [--duration-s D] [--target-redis URL]
//!     [--concurrency C] [--window W] [--idle-s I] [--batch B] [--drain-s T]
//!     [--per-worker N] [--churn R] [--server-args "..."] [--redis-cluster]
//!     [--auth off|hs256|es256] [--wrap-a CMD] [--wrap-b CMD] [--args-a ".."]
//!     [--args-b ".."] [--fault-cmd CMD]
//! PUBSUB_CHAT_BIN=/path/to/older/pubsub-chat cargo bench --bench load -- <scenario>
//! ```
//!
//! Scenarios: `latency`, `room`, `rooms`, `burst`, `idle`, `connect`,
//! `max-clients`, `smoke`, `presence-join`, `presence-idle`,
//! `presence-churn`, `presence-crash`, `abuse` (see `options::usage()`). Each run
//! starts its own
//! `redis-server` (unless `--target-redis` names one; with
//! `--redis-cluster`, a private six-node Redis Cluster) and two instances,
//! `a` and `b`, of the server binary (`PUBSUB_CHAT_BIN`, or this package's
//! own); clients are spread over them, in one fresh room or, with
//! `--rooms`, in several (`rooms`: each room on one instance).
//!
//! Every text carries `<sender>:<seq>:<send time in ns>`, so each receiver
//! measures end-to-end latency and checks each sender of its room for
//! loss, duplicates and reordering. Every client counts the presence
//! frames it gets (none may come with `--server-args "--presence off"`);
//! in the scenarios with member lists (`presence-join`, `-churn`,
//! `-crash`) each keeps its room's count and list (or window) from them,
//! checked against who is really there. The instances' presence flags are
//! read from `--server-args`, to know what the clients should get.
//!
//! With `--auth hs256` or `--auth es256` (off by default) each run makes
//! its keys in a temporary directory (removed at its end) and starts both
//! instances with `--auth token` and the verification key; every client
//! mints a token of its own (sub `u<k>`, its name, an hour to live) with
//! `pubsub_chat::auth::mint` before its handshake is timed, and sends it
//! as its first frame (a churner, at each return): the handshake time is
//! then what a signed identity costs the server.
//!
//! Across hosts (`scripts/run_hosts.sh`): `--wrap-a "ip netns exec pc-a"`
//! starts instance a in a network namespace of its own (likewise b), and
//! `--args-a "--host 10.77.0.2 --admin-addr 10.77.0.2:0"` has it listen on
//! that host's address, where the clients (in the load generator's
//! namespace) reach it. `--fault-cmd CMD` runs a shell command as the
//! senders start (a partition and its heal); the run waits for it before
//! draining. Every client counts its `status` frames: the report says, per
//! instance, how many clients were told `down`, and a client left `down`
//! at the end fails the run.
//!
//! This is a test tool, not the server: the clients are async (tokio) and
//! held by a few worker processes (this binary again, `--worker`) with one
//! or two threads each, so that thousands of connections take few threads
//! and leave the machine's thread budget (`kernel.pid_max`) to the servers,
//! and no process holds more sockets than its open-file limit allows.
//!
//! Layout:
//! - `options.rs`: the scenarios, their defaults, the command line.
//! - `layout.rs`: which room, instance and worker each client has, who sends.
//! - `procs.rs`: redis-server (or the Redis Cluster's nodes), the instances
//!   (and `PUBSUB_CHAT_BIN`), a run's `--auth` keys, child clean-up, `/proc`
//!   samples and `/metrics`.
//! - `pool.rs`: the worker processes seen from the parent, and the protocol.
//! - `worker.rs`: a worker process: its runtime and its commands.
//! - `client.rs`: one client: connect, send stamped texts, check deliveries,
//!   count presence frames.
//! - `members.rs`: a client's view of its room's members, from its
//!   `presence` and `presence_diff` frames (or an older server's `join` and
//!   `leave`), what in them disagrees with the protocol, and the check
//!   against who is in the room.
//! - `churn.rs`: a churning client: its leaves and joins on a schedule.
//! - `drive.rs`: one run, from starting the processes to its figures.
//! - `presence.rs`: the presence scenarios' runs (a join storm and the
//!   member lists it leaves; idle clients and what presence costs at rest,
//!   Redis's `INFO` included; churn in a large room, what it costs each
//!   client and the chat's latency; an instance killed, and its members'
//!   expiry as the other's clients see it).
//! - `abuse.rs`: the `abuse` scenario's attacks, each from a loopback
//!   address of its own, and the watch on the instances' RSS and Redis's
//!   memory.
//! - `report.rs`: figures, percentiles, medians, targets, the verdict.
//! - `tests/common/process.rs` (shared with the integration tests): free
//!   ports, temporary directories, HTTP GET, the redis-server and instance
//!   command lines, the listening line.
//! - `tests/common/cluster_process.rs` (shared with the integration tests):
//!   a cluster node's command line, `redis-cli --cluster create`, the wait
//!   until every slot is served; a connection to a node (the presence
//!   scenarios read `INFO` with it).
//!
//! Exit status: non-zero on any lost, duplicated, reordered or misrouted
//! delivery (for `smoke`, also on any failed or dropped client; for
//! `presence-join`, `-churn` and `-crash`, on any client whose final count
//! and list are not who is in the room; with `--presence off`, on any
//! presence frame). Missing a latency or throughput target is reported
//! ("target met: no"), not a failure.

mod abuse;
mod churn;
mod client;
#[path = "../../tests/common/cluster_process.rs"]
mod cluster_process;
mod drive;
mod layout;
mod members;
mod options;
mod pool;
mod presence;
#[path = "../../tests/common/process.rs"]
mod process;
mod procs;
mod report;
mod worker;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--worker") {
        let config = args.next().unwrap_or_default();
        return worker::main(&config);
    }
    let opts = match options::parse_args(first.into_iter().chain(args)) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    procs::install_signal_handler();
    // The servers inherit the raised limit (each client is a socket there);
    // the workers raise their own.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let bin = procs::server_bin();
    if !bin.is_file() {
        eprintln!("load: no server binary at {}", bin.display());
        return ExitCode::from(2);
    }

    let workers = opts.workers();
    let sending = if opts.scenario.is_presence() {
        // Nobody sends (but presence-churn's one sender): the joins, the
        // churn, the expiry (or the quiet) are the load.
        let p = opts.presence();
        match opts.scenario {
            options::Scenario::PresenceJoin => format!(
                "join storm, {} handshakes in flight, lists settle within --drain-s {:.0} s, window {}",
                opts.concurrency,
                opts.drain.as_secs_f64(),
                p.full_list_max
            ),
            options::Scenario::PresenceChurn => format!(
                "{} sender(s) at {} msg/s, quiet {:.1} s then churn {:.1} s at {} joins/s and as \
                 many leaves, diffs every {} ms, window {}",
                opts.senders,
                opts.rate.map_or("max".to_string(), |r| r.to_string()),
                opts.idle.as_secs_f64(),
                opts.duration.as_secs_f64(),
                opts.churn,
                p.diff.as_millis(),
                p.full_list_max
            ),
            options::Scenario::PresenceCrash => format!(
                "b killed once the lists settle, TTL {} ms, diffs every {} ms, window {}",
                p.ttl.as_millis(),
                p.diff.as_millis(),
                p.full_list_max
            ),
            _ => format!("idle, quiet window {:.1} s", opts.idle.as_secs_f64()),
        }
    } else {
        format!(
            "senders {} | rate {} | duration {:.1} s",
            opts.senders,
            opts.rate
                .map_or("as fast as possible".to_string(), |r| format!("{r} msg/s")),
            opts.duration.as_secs_f64()
        )
    };
    println!(
        "pubsub-chat load: scenario {} | runs {} | clients {}{} | {sending}{}{}{}{}",
        opts.scenario.name(),
        opts.runs,
        opts.clients,
        if opts.rooms > 1 {
            format!(" in {} rooms", opts.rooms)
        } else {
            String::new()
        },
        if workers > 1 {
            format!(" | {workers} load processes")
        } else {
            String::new()
        },
        match &opts.target_redis {
            Some(u) => format!(" | redis {u}"),
            None if opts.redis_cluster => " | private Redis Cluster (3 masters, 3 replicas)".into(),
            None => String::new(),
        },
        if opts.server_args.is_empty() {
            String::new()
        } else {
            format!(" | server args {:?}", opts.server_args)
        },
        if opts.auth == options::Auth::Off {
            String::new()
        } else {
            format!(" | auth {} (--auth token)", opts.auth.name())
        }
    );
    println!("server binary: {}", bin.display());

    let mut reports = Vec::new();
    for run in 1..=opts.runs {
        let rep = drive::run(&opts, run);
        report::print_run(run, opts.runs, &rep);
        reports.push(rep);
    }
    report::summarize(&opts, &reports)
}
