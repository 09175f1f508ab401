//! The scenarios, their defaults, and the command line.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Scenario {
    Latency,
    Room,
    Rooms,
    Burst,
    Idle,
    Connect,
    MaxClients,
    Smoke,
    PresenceJoin,
    PresenceIdle,
}

impl Scenario {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "latency" => Scenario::Latency,
            "room" => Scenario::Room,
            "rooms" => Scenario::Rooms,
            "burst" => Scenario::Burst,
            "idle" => Scenario::Idle,
            "connect" => Scenario::Connect,
            "max-clients" => Scenario::MaxClients,
            "smoke" => Scenario::Smoke,
            "presence-join" => Scenario::PresenceJoin,
            "presence-idle" => Scenario::PresenceIdle,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Latency => "latency",
            Scenario::Room => "room",
            Scenario::Rooms => "rooms",
            Scenario::Burst => "burst",
            Scenario::Idle => "idle",
            Scenario::Connect => "connect",
            Scenario::MaxClients => "max-clients",
            Scenario::Smoke => "smoke",
            Scenario::PresenceJoin => "presence-join",
            Scenario::PresenceIdle => "presence-idle",
        }
    }

    /// The presence scenarios: nobody sends; what is measured is joins,
    /// member lists and the cost of keeping them.
    pub fn is_presence(self) -> bool {
        matches!(self, Scenario::PresenceJoin | Scenario::PresenceIdle)
    }
}

/// One scenario's settings. Also handed to every worker process, which
/// derives from it which clients it holds and how they behave.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Opts {
    pub scenario: Scenario,
    pub runs: usize,
    pub clients: usize,
    pub senders: usize,
    /// Messages per second over all senders; `None` is as fast as possible.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub target_redis: Option<String>,
    /// Start a private Redis Cluster and run the instances in cluster mode
    /// (`--redis-cluster <seeds>`) instead of one `redis-server`.
    pub redis_cluster: bool,
    /// Unconfirmed messages a sender may have in flight (as-fast-as-possible
    /// mode). A client-side bound: it feeds no server flag.
    pub window: usize,
    /// Handshakes in flight at once (over all worker processes).
    pub concurrency: usize,
    /// Quiet window measured before sending starts (the `idle` scenario).
    pub idle: Duration,
    /// Clients added per step (`max-clients`).
    pub batch: usize,
    pub drain: Duration,
    /// Rooms the clients are dealt into; with more than one, each room's
    /// clients are all on one instance (see `layout.rs`).
    pub rooms: usize,
    /// Most clients one load-generator process holds (see `pool.rs`).
    pub per_worker: usize,
    pub server_args: Vec<String>,
}

/// Clients per worker process by default: 8,000 sockets stay well under
/// the 20,000 open files a process may hold here, with room to spare for
/// a scenario that asks for more.
const PER_WORKER: usize = 8000;

impl Opts {
    pub fn defaults(scenario: Scenario) -> Self {
        let base = Opts {
            scenario,
            runs: 1,
            clients: 20,
            senders: 2,
            rate: Some(50.0),
            duration: Duration::from_secs(3),
            target_redis: None,
            redis_cluster: false,
            window: 64,
            concurrency: 256,
            idle: Duration::ZERO,
            batch: 500,
            drain: Duration::from_secs(10),
            rooms: 1,
            per_worker: PER_WORKER,
            server_args: Vec::new(),
        };
        let secs = Duration::from_secs;
        match scenario {
            Scenario::Latency => Opts {
                runs: 3,
                clients: 100,
                senders: 1,
                rate: Some(50.0),
                duration: secs(10),
                ..base
            },
            Scenario::Room => Opts {
                runs: 3,
                clients: 1000,
                senders: 20,
                rate: Some(200.0),
                duration: secs(10),
                ..base
            },
            Scenario::Rooms => Opts {
                runs: 3,
                clients: 400,
                senders: 40,
                rooms: 40,
                rate: Some(2000.0),
                duration: secs(10),
                ..base
            },
            Scenario::Burst => Opts {
                runs: 3,
                clients: 200,
                senders: 10,
                rate: None,
                duration: secs(10),
                ..base
            },
            Scenario::Idle => Opts {
                clients: 5000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(10),
                idle: secs(10),
                ..base
            },
            Scenario::Connect => Opts {
                clients: 5000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(2),
                concurrency: 1000,
                ..base
            },
            Scenario::MaxClients => Opts {
                clients: 20_000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(3),
                ..base
            },
            // Two worker processes of 10 clients, so that CI runs the
            // multi-process path too.
            Scenario::Smoke => Opts {
                per_worker: 10,
                ..base
            },
            // Nobody sends: the storm is the load. `drain` bounds the wait
            // for the member lists to settle (without progress).
            Scenario::PresenceJoin => Opts {
                clients: 5000,
                senders: 0,
                rate: None,
                duration: Duration::ZERO,
                // Every join is answered with the whole room's list and
                // announced to the whole room: with 1,000 handshakes in
                // flight on two shared cores some wait past the 30 s
                // connect timeout, and a list can never hold a name that
                // failed to join. 200 keeps the storm a storm.
                concurrency: 200,
                drain: secs(30),
                ..base
            },
            // Two worker processes of 5,000 (--per-worker 8000, as
            // max-clients spreads its clients), and a quiet window.
            Scenario::PresenceIdle => Opts {
                clients: 10_000,
                senders: 0,
                rate: None,
                duration: Duration::ZERO,
                rooms: 100,
                idle: secs(20),
                ..base
            },
        }
    }

    /// Worker processes that hold the clients: as few as `per_worker` allows.
    pub fn workers(&self) -> usize {
        self.clients.div_ceil(self.per_worker.max(1)).max(1)
    }
}

pub fn usage() -> &'static str {
    "usage: cargo bench --bench load -- <scenario> [options]

scenarios (defaults):
  latency      100 clients, 1 sender, 50 msg/s, 10 s, 3 runs   (target: cross-instance p50 < 1 ms, p99 < 2 ms)
  room         1000 clients, 20 senders, 200 msg/s, 10 s, 3 runs (target: nothing lost, p99 < 100 ms)
  rooms        400 clients in 40 rooms of 10, each room on one instance (rooms alternate a, b), one sender
               per room, 2000 msg/s in all (50/s each), 10 s, 3 runs (target: nothing lost, p50 < 1.5 ms);
               --rooms R alone keeps that shape: 10 R clients, R senders (e.g. --rooms 200: 2000 clients,
               200 senders at 10 msg/s each)
  burst        200 clients, 10 senders, as fast as possible, 10 s, 3 runs (target: >= 300,000 deliveries/s, nothing lost)
  idle         5000 clients, 10 s quiet window, then 1 sender at 10 msg/s for 10 s (target: <= 20 KiB RSS per client, idle CPU ~ 0)
  connect      5000 connections, 1000 handshakes in flight, then 1 sender at 10 msg/s for 2 s (target: no failure)
  max-clients  add clients in batches of 500 until the first failure or 20,000, 1 sender at 10 msg/s throughout
               (target: every client held, every delivery of the stream arrives)
  smoke        20 clients, 2 senders, 50 msg/s, 3 s, 1 run, two worker processes (for CI)
  presence-join
               a join storm: 5000 clients with distinct names into one room, alternating between a and
               b, 200 handshakes in flight; nobody sends. Reports the storm's wall time
               and connects/s, Redis commands per join (INFO commandstats before the storm and once
               the lists have settled: all calls, those run inside scripts included, and per
               command), and whether every client's member list (its `presence` snapshot, then the
               `join`/`leave` events it got, applied idempotently) is the set of all 5000 names,
               waiting for the events to settle (until no progress for --drain-s, 30 s by default,
               or 300 s). The instances run with --presence-max-members max(10000, clients), so
               that a snapshot can list everyone (the default, 1000, would cut it short).
               (target, asserted: every client's final list is complete)
  presence-idle
               10000 idle clients in 100 rooms, each room's clients split between a and b (client k
               in room k mod R on instance (k div R) mod 2), held by two worker processes; then a
               quiet window of 20 s (--idle-s). The instances keep the default --presence-ttl-ms
               (15000: a refresh every 5 s) and --max-clients max(5000, clients). Reports, per second
               of the window: each instance's CPU (/proc), the presence refreshes (their metric), and
               Redis's CPU (/proc, and INFO cpu) and commands (INFO commandstats: the calls scripts make
               count too). (no target: a report)

options:
  --runs N            runs (the summary shows the median of each figure)
  --clients N         clients (max-clients: the target, reached in batches)
  --senders S         sending clients (sender j is client j; spread over both instances)
  --rooms R           rooms the clients are dealt into (client k in room k mod R); with R > 1 each
                      room's clients are all on one instance, rooms alternating between a and b
  --rate R|max        messages per second over all senders, or as fast as possible
  --duration-s D      seconds of sending (max-clients: after the last batch)
  --target-redis URL  use this Redis instead of starting a private redis-server
  --redis-cluster     start a private Redis Cluster (6 nodes: 3 masters with a replica each, loopback,
                      redis-cli --cluster create) and run both instances with --redis-cluster <masters>
                      (sharded Pub/Sub); takes no value
  --concurrency C     handshakes in flight at once (over all worker processes)
  --window W          unconfirmed messages per sender in as-fast-as-possible mode (64); a bound
                      of the load generator's own, not a server flag
  --idle-s I          quiet seconds measured before sending starts
  --batch B           clients added per step (max-clients)
  --drain-s T         longest wait for outstanding deliveries after sending stops (10);
                      presence-join: for the member lists to make progress (30)
  --per-worker N      most clients one load-generator process holds (8000; smoke: 10)
  --server-args \"..\" extra arguments for both instances (the current server has no
                      --fanout-window-ms, --client-queue-len or --write-timeout-ms: pass those
                      only to an older build)

environment:
  PUBSUB_CHAT_BIN     the server binary to measure (default: this package's release build)

The clients are held by worker processes (this binary again, `--worker`), at most --per-worker
each: one process may hold at most 20,000 open files here.

Exit status is non-zero on any lost, duplicated or reordered delivery (smoke: also on any
failed or dropped client; presence-join: on any client whose final member list is not the
set of all names); a missed latency or throughput target is only reported."
}

/// The options of this run, or `None` when there is nothing to run (help,
/// or no scenario: `cargo bench` and `cargo test --benches` run every bench).
pub fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>, String> {
    let mut args = args.peekable();
    let mut scenario = None;
    let mut flags: Vec<(String, String)> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" | "--nocapture" | "--quiet" => {}
            // The one flag without a value.
            "--redis-cluster" => flags.push((arg.clone(), String::new())),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            flag if flag.starts_with("--") => {
                let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                flags.push((flag.to_string(), value));
            }
            name => {
                if scenario.is_some() {
                    return Err(format!("unexpected argument {name:?}"));
                }
                scenario = Some(
                    Scenario::parse(name).ok_or_else(|| format!("unknown scenario {name:?}"))?,
                );
            }
        }
    }
    let Some(scenario) = scenario else {
        println!("{}", usage());
        return Ok(None);
    };
    let mut o = Opts::defaults(scenario);
    let given = |name: &str| flags.iter().any(|(f, _)| f == name);
    // `rooms` is rooms of 10 with one sender each: --rooms alone keeps it so.
    let rooms_shape = scenario == Scenario::Rooms && given("--rooms");
    let (clients_given, senders_given) = (given("--clients"), given("--senders"));
    let num = |flag: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{flag}: {v:?} is not a number"))
    };
    for (flag, v) in flags {
        match flag.as_str() {
            "--runs" => o.runs = (num(&flag, &v)? as usize).max(1),
            "--clients" => o.clients = (num(&flag, &v)? as usize).max(1),
            "--senders" => o.senders = num(&flag, &v)? as usize,
            "--rooms" => o.rooms = (num(&flag, &v)? as usize).max(1),
            "--rate" => {
                o.rate = if v == "max" || v == "burst" {
                    None
                } else {
                    Some(num(&flag, &v)?).filter(|r| *r > 0.0)
                }
            }
            "--duration-s" => o.duration = Duration::from_secs_f64(num(&flag, &v)?),
            "--target-redis" => o.target_redis = Some(v),
            "--redis-cluster" => o.redis_cluster = true,
            "--concurrency" => o.concurrency = (num(&flag, &v)? as usize).max(1),
            "--window" => o.window = (num(&flag, &v)? as usize).max(1),
            "--idle-s" => o.idle = Duration::from_secs_f64(num(&flag, &v)?),
            "--batch" => o.batch = (num(&flag, &v)? as usize).max(1),
            "--drain-s" => o.drain = Duration::from_secs_f64(num(&flag, &v)?),
            "--per-worker" => o.per_worker = (num(&flag, &v)? as usize).max(1),
            "--server-args" => o.server_args = v.split_whitespace().map(String::from).collect(),
            other => return Err(format!("unknown option {other}\n\n{}", usage())),
        }
    }
    if rooms_shape && !clients_given {
        o.clients = o.rooms * 10;
    }
    if rooms_shape && !senders_given {
        o.senders = o.rooms;
    }
    if o.redis_cluster && o.target_redis.is_some() {
        return Err(
            "--redis-cluster starts its own cluster: it does not go with --target-redis".into(),
        );
    }
    if scenario.is_presence() {
        // Nobody sends; presence-join is one room by definition.
        o.senders = 0;
        if scenario == Scenario::PresenceJoin {
            o.rooms = 1;
        }
    }
    o.senders = o.senders.min(o.clients);
    o.rooms = o.rooms.min(o.clients);
    Ok(Some(o))
}
