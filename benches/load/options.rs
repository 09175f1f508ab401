//! The scenarios, their defaults, and the command line.

use std::path::PathBuf;
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
    PresenceChurn,
    PresenceCrash,
    Abuse,
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
            "presence-churn" => Scenario::PresenceChurn,
            "presence-crash" => Scenario::PresenceCrash,
            "abuse" => Scenario::Abuse,
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
            Scenario::PresenceChurn => "presence-churn",
            Scenario::PresenceCrash => "presence-crash",
            Scenario::Abuse => "abuse",
        }
    }

    /// The presence scenarios (run by `presence.rs`): what is measured is
    /// joins, member lists and the cost of keeping them. Only
    /// `presence-churn` has a sender (its chat latency, quiet and churning).
    pub fn is_presence(self) -> bool {
        matches!(
            self,
            Scenario::PresenceJoin
                | Scenario::PresenceIdle
                | Scenario::PresenceChurn
                | Scenario::PresenceCrash
        )
    }

    /// The scenarios whose clients keep their room's member list from
    /// their presence frames, checked against who is really there.
    pub fn keeps_member_lists(self) -> bool {
        matches!(
            self,
            Scenario::PresenceJoin | Scenario::PresenceChurn | Scenario::PresenceCrash
        )
    }
}

/// `--auth`: whether the instances check who each client is, and with
/// which kind of key.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Auth {
    /// The server's default: the name in the join query is believed.
    Off,
    /// `--auth token` with an HS256 secret.
    Hs256,
    /// `--auth token` with an ES256 key pair.
    Es256,
}

impl Auth {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Auth::Off,
            "hs256" => Auth::Hs256,
            "es256" => Auth::Es256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Auth::Off => "off",
            Auth::Hs256 => "hs256",
            Auth::Es256 => "es256",
        }
    }
}

/// The keys of one run with `--auth hs256|es256`, made by the parent in a
/// temporary directory (`procs::AuthKeys`): the instances verify with
/// `verify`, the workers mint with `sign` (the same secret file for
/// HS256; for ES256 the private key, whose file stem, the `kid`, is the
/// public key's).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunKeys {
    pub sign: PathBuf,
    pub verify: PathBuf,
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
    /// Joins per second, and as many leaves, over all churning clients
    /// (`presence-churn`).
    pub churn: f64,
    pub server_args: Vec<String>,
    /// `--auth`: off, or the instances run with `--auth token` and every
    /// client sends a token of its own as its first frame.
    pub auth: Auth,
    /// This run's keys (`None` but with `--auth hs256|es256`, and then
    /// only once the parent has made them: see `drive.rs`).
    pub keys: Option<RunKeys>,
    /// `--wrap-a`, `--wrap-b`: a command each instance's command line runs
    /// under (`ip netns exec pc-a`: on another "host"); empty: none.
    pub wrap: [Vec<String>; 2],
    /// `--args-a`, `--args-b`: extra arguments for one instance only,
    /// after `--server-args` (`--host 10.77.0.2 --admin-addr 10.77.0.2:0`).
    pub inst_args: [Vec<String>; 2],
    /// `--fault-cmd`: a shell command (`sh -c`) started when the senders
    /// start; sending goes on for `--duration-s`, then the run waits for
    /// the command to end before it drains (so a partition it makes has
    /// healed by then).
    pub fault_cmd: Option<String>,
}

/// The instances' presence settings, as `--server-args` sets them (else
/// the server's defaults): the load generator checks the clients' lists
/// against them. The last of a repeated flag wins, as in the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PresenceArgs {
    /// `--presence on|off`: off, no presence frame may ever arrive.
    pub on: bool,
    /// `--presence-diff-ms`: at most one `presence_diff` per room per
    /// interval.
    pub diff: Duration,
    /// `--presence-full-list-max`: a room of at most this many members is
    /// sent whole (`full`); a larger one, as each client's window of this
    /// many names.
    pub full_list_max: usize,
    /// `--presence-ttl-ms`: how long a dead instance's members linger.
    pub ttl: Duration,
}

impl PresenceArgs {
    /// The server's defaults (docs/PROTOCOL.md).
    pub const DEFAULT: PresenceArgs = PresenceArgs {
        on: true,
        diff: Duration::from_millis(1000),
        full_list_max: 100,
        ttl: Duration::from_millis(15_000),
    };

    /// Reads them from the instances' extra arguments (`--flag value` or
    /// `--flag=value`).
    pub fn of(server_args: &[String]) -> Result<PresenceArgs, String> {
        let mut p = PresenceArgs::DEFAULT;
        let mut args = server_args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let known = [
                "--presence",
                "--presence-diff-ms",
                "--presence-full-list-max",
                "--presence-ttl-ms",
            ];
            if !known.contains(&flag) {
                continue;
            }
            let Some(v) = inline.or_else(|| args.next().cloned()) else {
                return Err(format!("--server-args: {flag} needs a value"));
            };
            let ms = |v: &str| {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("--server-args: {flag} {v:?} is not a number"))
            };
            match flag {
                "--presence" => {
                    p.on = match v.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("--server-args: --presence {v:?}: on or off")),
                    }
                }
                "--presence-diff-ms" => p.diff = ms(&v)?,
                "--presence-ttl-ms" => p.ttl = ms(&v)?,
                _ => {
                    p.full_list_max = v.parse().map_err(|_| {
                        format!("--server-args: --presence-full-list-max {v:?} is not a number")
                    })?
                }
            }
        }
        Ok(p)
    }
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
            churn: 100.0,
            server_args: Vec::new(),
            auth: Auth::Off,
            keys: None,
            wrap: [Vec::new(), Vec::new()],
            inst_args: [Vec::new(), Vec::new()],
            fault_cmd: None,
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
            // One room over both instances; a quiet phase (--idle-s) with
            // the sender on, then the churn (--duration-s).
            Scenario::PresenceChurn => Opts {
                clients: 10_000,
                senders: 1,
                rate: Some(10.0),
                duration: secs(30),
                idle: secs(10),
                concurrency: 200,
                drain: secs(30),
                ..base
            },
            // Ordinary chat, with the server's own limits (the load
            // generator's instances otherwise run without rate and
            // per-address limits), and Redis capped as its guidance says.
            Scenario::Abuse => Opts {
                clients: 100,
                senders: 10,
                rate: Some(20.0),
                duration: secs(60),
                server_args: [
                    "--rate-burst",
                    "20",
                    "--rate-per-sec",
                    "10",
                    "--rate-strikes",
                    "20",
                    "--max-clients-per-ip",
                    "100",
                ]
                .map(String::from)
                .to_vec(),
                ..base
            },
            // Nobody sends: the expiry of b's members is the load. `drain`
            // is the wait past the TTL (and a third of it) for the lists.
            Scenario::PresenceCrash => Opts {
                clients: 10_000,
                senders: 0,
                rate: None,
                duration: Duration::ZERO,
                concurrency: 200,
                drain: secs(30),
                ..base
            },
        }
    }

    /// Worker processes that hold the clients: as few as `per_worker` allows.
    pub fn workers(&self) -> usize {
        self.clients.div_ceil(self.per_worker.max(1)).max(1)
    }

    /// The instances' presence settings (checked by `parse_args`).
    pub fn presence(&self) -> PresenceArgs {
        PresenceArgs::of(&self.server_args).unwrap_or(PresenceArgs::DEFAULT)
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
               b, 200 handshakes in flight; nobody sends. Each client keeps what its presence frames
               say: the room's count, and its window (the first W names in byte order, W the server's
               --presence-full-list-max, 100 by default) or, in a room of at most W, the whole list
               (its `presence`, then every `presence_diff` applied in order; a server from before
               presence_diff: its snapshot, then each `join`/`leave`). Waits for every client's list to
               be right (until no presence frame for --drain-s, 30 s by default, or 300 s). Reports
               joins/s (clients over the storm's wall time, and counting the settling), the time until
               every count and every list was right, the presence frames and bytes per client (mean,
               max), whatever in the frames disagreed with the protocol, Redis commands per join (INFO
               commandstats: all calls, those run inside scripts included, and per command).
               The instances run with --presence-max-members max(10000, clients) (a server from before
               lists no more than that in a snapshot).
               (asserted: every client's final count is the number of clients and its list is exactly
               the first W names, or every name; target: >= 890 joins/s, 10x the 89 of before)
  presence-idle
               10000 idle clients in 100 rooms, each room's clients split between a and b (client k
               in room k mod R on instance (k div R) mod 2), held by two worker processes; then a
               quiet window of 20 s (--idle-s). The instances keep the default --presence-ttl-ms
               (15000: a refresh every 5 s) and --max-clients max(5000, clients). Reports, per second
               of the window: each instance's CPU (/proc), the presence refreshes (their metric), and
               Redis's CPU (/proc, and INFO cpu) and commands (INFO commandstats: the calls scripts make
               count too), and the presence frames each client got (mean, max). (no target: a report)
  presence-churn
               10000 members in one room, alternating between a and b (as presence-join); once every
               list is right, 1 sender (client 0) at 10 msg/s for a quiet phase of 10 s (--idle-s), then
               churn for 30 s (--duration-s) with the sender still on: 100 joins and 100 leaves a
               second in all (--churn). The churners are 4 x --churn clients spread over the names and
               the instances (never client 0), each in turn away for a second and present for three
               (at most half the room churns: fewer, faster, in a small room). Reports, per
               non-churning client and per second, the presence frames and bytes received (mean and
               max over the clients), quiet and churning; the joins and leaves done; the chat latency
               p50/p99 quiet and churning and their ratio, over every listening client and over 16
               latency probes held by a load process of their own (apart from the queue of the
               processes that read for thousands); every process's CPU in each phase. After
               the churn every churner comes back and every list must settle (as in presence-join).
               (asserted: no delivery lost, duplicated or reordered, every final list right; targets:
               at most one presence frame per client per --presence-diff-ms, churn p99 within 1.5x of
               quiet). With --server-args \"--presence off\": the control, the same churn with nothing
               to tell (no list checked, no presence frame allowed), for what the churn costs alone
  presence-crash
               10000 members in one room, half on a, half on b; once every list is right, instance b
               is killed (SIGKILL), and its members expire from the lists of a's clients after the
               server's --presence-ttl-ms (15000 by default; e.g. --server-args \"--presence-ttl-ms
               3000\" for a short run). Reports the TTL, the time from the kill until every surviving
               client's count was right (the members on a) and until its list was, and the presence
               frames and bytes each surviving client received from the kill until then and 2
               --presence-diff-ms more (mean, max). (asserted: every survivor's final list is right;
               target: within the TTL and a third of it, plus one --presence-diff-ms)
  abuse        100 ordinary clients in one room over a and b, 10 senders at 20 msg/s in all, for 60 s
               (--duration-s), twice: quiet, then under every attack of issue 18 at once, each from a
               loopback address of its own (127.0.0.66 and up; the ordinary clients on 127.0.0.1):
               300 idle connections held; a room filled with 1,000 of the heaviest messages (2,000
               escaped control characters) and 10 clients joining it with since=0-0 that never read,
               replaced every 35 s (after the server closed them); 5 connections at the rate limit, each
               moving to a new room every 20 heavy messages (ABUSE_REPLAYERS=N and ABUSE_FLOODERS=N
               for a heavier mix, ABUSE_ATTACKS=replay,rooms,... for some attacks only); 10 connections flooding `typing` in the ordinary room (half padded with
               16,000 bytes); 40 clients asking for the X-ray; 300 HTTP request heads that never end;
               every 100 ms a bidi name, a 16,000-byte room and the fault panel from another site.
               The instances run with the server's default limits (rate 20/10 per s, 100 clients per
               address), Redis with --maxmemory 24mb --maxmemory-policy volatile-lru and lazy freeing. Reports the
               ordinary latency quiet and attacked, what each attack got, and the instances' RSS and
               Redis's used_memory every second. (asserted: no ordinary delivery lost, duplicated or
               reordered; targets: attacked p99 within 2x of quiet, RSS and used_memory flat once
               the limits bite: the peak of the attack's second half within 10 % of the first's)

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
  --idle-s I          quiet seconds measured before sending starts (presence-churn: the quiet
                      phase, the sender on and nobody churning, before the churn: 10)
  --batch B           clients added per step (max-clients)
  --drain-s T         longest wait for outstanding deliveries after sending stops (10);
                      presence-join, presence-churn: for the member lists to make progress (30);
                      presence-crash: for the lists, past the TTL and a third of it (30)
  --per-worker N      most clients one load-generator process holds (8000; smoke: 10)
  --churn R           presence-churn: joins per second, and as many leaves, over all churners (100)
  --server-args \"..\" extra arguments for both instances (the current server has no
                      --fanout-window-ms, --client-queue-len or --write-timeout-ms: pass those
                      only to an older build). The load generator reads the presence flags among
                      them, to check what the clients get: --presence on|off (off: any presence
                      frame fails the run; the presence scenarios need it on, but for presence-churn's control), --presence-diff-ms
                      (500), --presence-full-list-max (100: the window W), --presence-ttl-ms (15000)
  --auth off|hs256|es256
                      signed identity (off by default): with hs256 or es256 each run makes its keys in a
                      temporary directory (an HS256 secret of 64 bytes; an ES256 P-256 key pair from
                      `openssl genpkey`), removed at the end of the run, and starts both instances with
                      --auth token and --auth-hs256-secret-file or --auth-public-key-file. Each client
                      mints a token of its own (sub u<k>, name c<k>, exp an hour on) before its
                      handshake is timed, and sends it as its first frame, then waits for its welcome
                      (a churner, a fresh token at each return). Not with abuse, nor with --auth flags
                      in --server-args
  --wrap-a \"CMD\", --wrap-b \"CMD\"
                      run instance a (b) under this command, e.g. \"ip netns exec pc-a\": on another
                      \"host\" (a network namespace; see scripts/run_hosts.sh). The pid sampled is the
                      server's only if CMD execs it (ip netns exec does)
  --args-a \"..\", --args-b \"..\"
                      extra arguments for instance a (b) only, after --server-args, e.g.
                      \"--host 10.77.0.2 --admin-addr 10.77.0.2:0\": where it listens (the clients
                      connect to the addresses of its listening line)
  --fault-cmd \"CMD\"   a shell command (sh -c) started when the senders start, e.g. one that cuts an
                      instance from Redis and heals it; sending lasts --duration-s, then the run
                      waits for CMD to end before draining; CMD failing fails the run. Sends
                      answered `unavailable` or `outcome_unknown` are then counted, not failures
                      (receivers are owed every send not answered so)

Every client counts the `status` frames it gets: the report shows, per instance, how many
clients saw `down`, and how many were left `down` at the end (any such client fails the run).

environment:
  PUBSUB_CHAT_BIN     the server binary to measure (default: this package's release build)

The clients are held by worker processes (this binary again, `--worker`), at most --per-worker
each: one process may hold at most 20,000 open files here.

Exit status is non-zero on any lost, duplicated or reordered delivery (smoke: also on any
failed or dropped client; presence-join, presence-churn, presence-crash: on any client whose
final count and list are not who is in the room; with --presence off: on any presence frame);
a missed latency or throughput target is only reported."
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
            "--churn" => o.churn = num(&flag, &v)?,
            "--server-args" => o.server_args = v.split_whitespace().map(String::from).collect(),
            "--wrap-a" | "--wrap-b" | "--args-a" | "--args-b" => {
                let words = v.split_whitespace().map(String::from).collect();
                let i = usize::from(flag.ends_with('b'));
                if flag.starts_with("--wrap") {
                    o.wrap[i] = words;
                } else {
                    o.inst_args[i] = words;
                }
            }
            "--fault-cmd" => o.fault_cmd = Some(v).filter(|c| !c.trim().is_empty()),
            "--auth" => {
                o.auth =
                    Auth::parse(&v).ok_or_else(|| format!("--auth {v:?}: off, hs256 or es256"))?
            }
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
    if o.auth != Auth::Off {
        if o.server_args
            .iter()
            .any(|a| a == "--auth" || a.starts_with("--auth=") || a.starts_with("--auth-"))
        {
            return Err(
                "--auth hs256|es256 sets the instances' --auth flags: leave them out of --server-args"
                    .into(),
            );
        }
        if scenario == Scenario::Abuse {
            return Err("abuse's attackers send no token: it does not go with --auth".into());
        }
    }
    let presence = PresenceArgs::of(&o.server_args)?;
    if scenario.is_presence() {
        // presence-churn with presence off is its control: the same
        // comings and goings, nothing to tell.
        if !presence.on && scenario != Scenario::PresenceChurn {
            return Err(format!(
                "{} measures presence: it does not go with --presence off",
                scenario.name()
            ));
        }
        // Nobody sends but presence-churn's one sender; the scenarios with
        // member lists are one room by definition.
        o.senders = if scenario == Scenario::PresenceChurn {
            o.senders.max(1)
        } else {
            0
        };
        if scenario.keeps_member_lists() {
            o.rooms = 1;
        }
    }
    o.senders = o.senders.min(o.clients);
    o.rooms = o.rooms.min(o.clients);
    Ok(Some(o))
}
