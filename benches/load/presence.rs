//! The presence scenarios, from the connected processes to their figures.
//!
//! - `presence-join`: a join storm. Every client connects at once (as in
//!   `connect`), one room, names `c0`, `c1`, ...; each keeps its member
//!   list (its `presence` snapshot, then the `join`s and `leave`s it gets,
//!   see `client.rs`). Redis's `INFO commandstats` is read before the
//!   storm and once the lists have settled: commands per join. The run
//!   fails unless every client's list is, in the end, exactly every name.
//! - `presence-idle`: thousands of idle clients in many rooms, each room on
//!   both instances; then a quiet window, in which what presence costs at
//!   rest shows: the instances' CPU, their refreshes, Redis's CPU and
//!   commands.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::options::{Opts, Scenario};
use crate::pool::{ListTally, Pool};
use crate::procs::{Procs, RedisCounts, RedisWatch, Sample, clk_tck, metrics};
use crate::report::RunReport;

/// The longest wait for the member lists to settle after the storm,
/// whatever the progress.
const SETTLE_MAX: Duration = Duration::from_secs(120);

/// After the idle clients connected, before the window: their joins
/// (each fanned out to its room) are done by then.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// The figure presence-join's verdict reads.
pub const COMPLETE: &str = "clients whose final list is complete";

/// Where a run's instances keep presence: `broker` is how they reach
/// Redis (`--redis-url URL` or `--redis-cluster SEEDS`), whose counters
/// are read; `prefix` their `--redis-prefix`; `room` the (first) room.
pub struct Target<'a> {
    pub broker: &'a [String],
    pub prefix: &'a str,
    pub room: &'a str,
}

/// One run of a presence scenario.
pub fn drive(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    target: &Target,
) -> RunReport {
    let mut rep = RunReport::default();
    let mut redis = match RedisWatch::open(target.broker) {
        Ok(r) => Some(r),
        Err(e) => {
            rep.notes.push(format!("no Redis counters: {e}"));
            None
        }
    };
    match opts.scenario {
        Scenario::PresenceJoin => {
            // The room's members in Redis: name -> connections by instance.
            let key = format!("{}:presence:{{{}}}", target.prefix, target.room);
            join_storm(opts, pool, http, procs, &mut redis, &key, &mut rep);
            if let Some(r) = redis.as_mut() {
                // Once every client has closed: 0 unless a leave went
                // missing.
                std::thread::sleep(Duration::from_millis(500));
                rep.add(
                    "redis: members left in the room's hash after closing",
                    r.hlen(&key) as f64,
                    0,
                );
            }
        }
        _ => idle(opts, pool, http, procs, &mut redis, &mut rep),
    }
    rep
}

/// A counter of each instance's `/metrics` (NaN when it cannot be read).
fn counter(http: [SocketAddr; 2], key: &str) -> [f64; 2] {
    http.map(|h| {
        metrics(h)
            .into_iter()
            .find(|(k, _)| k == key)
            .map_or(f64::NAN, |(_, v)| v)
    })
}

fn read(redis: &mut Option<RedisWatch>, rep: &mut RunReport) -> Option<RedisCounts> {
    match redis.as_mut()?.read() {
        Ok(c) => Some(c),
        Err(e) => {
            rep.notes.push(format!("Redis counters: {e}"));
            None
        }
    }
}

/// CPU seconds of each sampled process between two samples.
fn cpu(procs: &Procs, before: &[Sample], after: &[Sample]) -> Vec<f64> {
    let tck = clk_tck();
    (0..procs.list.len())
        .map(|i| after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / tck)
        .collect()
}

fn join_storm(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    redis: &mut Option<RedisWatch>,
    key: &str,
    rep: &mut RunReport,
) {
    let n = opts.clients;
    let refreshes0 = counter(http, "chat_presence_refreshes_total");
    let redis0 = read(redis, rep);
    let s0 = procs.sample();

    // ---- the storm: every handshake at once (at most --concurrency in
    // flight); a client's join is registered before its `welcome`.
    let t0 = Instant::now();
    let storm = pool.connect(n);
    let storm_end = Instant::now();
    let s_storm = procs.sample();

    // ---- settle: until every list is complete, or no event arrived for
    // --drain-s, or SETTLE_MAX.
    let hard = storm_end + SETTLE_MAX;
    let mut lists: ListTally = pool.lists();
    let mut last = (Instant::now(), lists.events());
    let mut settled = None;
    loop {
        if lists.complete == n {
            settled = Some(Instant::now());
            break;
        }
        if Instant::now() >= hard {
            break;
        }
        if lists.events() != last.1 {
            last = (Instant::now(), lists.events());
        } else if last.0.elapsed() >= opts.drain {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        lists = pool.lists();
    }
    let settle_end = Instant::now();
    let s_end = procs.sample();
    let redis1 = read(redis, rep);
    let members_in_redis = redis.as_mut().map(|r| r.hlen(key));
    let refreshes1 = counter(http, "chat_presence_refreshes_total");
    let expired = counter(http, "chat_presence_expired_total");

    let t = pool.finish_into(rep);

    // ---- figures
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", storm.ok as f64, 0);
    rep.add("clients failed", storm.failed as f64, 0);
    t.report_clients(rep);
    storm.report_rate("storm", rep);
    storm.report_times(rep);
    rep.add(
        "lists complete, s after the storm began",
        settled.map_or(f64::NAN, |s| (s - t0).as_secs_f64()),
        2,
    );
    rep.add(
        "lists complete, s after the storm ended",
        settled.map_or(f64::NAN, |s| (s - storm_end).as_secs_f64()),
        2,
    );
    if let Some(m) = members_in_redis {
        rep.add(
            "redis: members in the room's hash at the check",
            m as f64,
            0,
        );
    }
    rep.add(
        "clients checked (connected at the end)",
        lists.clients as f64,
        0,
    );
    rep.add(
        "clients with a presence snapshot",
        lists.with_snapshot as f64,
        0,
    );
    rep.add(COMPLETE, lists.complete as f64, 0);
    rep.add(
        "clients whose final list is incomplete",
        (n - lists.complete.min(n)) as f64,
        0,
    );
    rep.add("names missing, over all lists", lists.missing as f64, 0);
    rep.add(
        "unknown names listed, over all lists",
        lists.strangers as f64,
        0,
    );
    rep.add("snapshots cut short (more > 0)", lists.cut_short as f64, 0);
    rep.add("presence snapshots received", lists.snapshots as f64, 0);
    rep.add("join events received", lists.joins as f64, 0);
    rep.add("leave events received", lists.leaves as f64, 0);
    rep.add("leave events with reason expired", lists.expired as f64, 0);
    rep.add("events that changed nothing", lists.no_ops as f64, 0);
    rep.add(
        "join events per client",
        lists.joins as f64 / lists.clients.max(1) as f64,
        1,
    );
    if let (Some(r0), Some(r1)) = (&redis0, &redis1) {
        let d = r1.since(r0);
        let joins = n.max(1) as f64;
        rep.add("redis: commands, storm and settling", d.total() as f64, 0);
        rep.add("redis: commands per join", d.total() as f64 / joins, 2);
        let mut by_calls: Vec<(&String, &u64)> = d.calls.iter().collect();
        by_calls.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (command, calls) in by_calls {
            rep.add(
                format!("redis: {command} per join"),
                *calls as f64 / joins,
                3,
            );
        }
        rep.add(
            "redis: CPU per join (µs, INFO cpu)",
            1e6 * d.cpu_s / joins,
            1,
        );
    }
    let storm_cpu = cpu(procs, &s0, &s_storm);
    let all_cpu = cpu(procs, &s0, &s_end);
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        rep.add(format!("{name}: CPU during the storm (s)"), storm_cpu[i], 2);
        rep.add(
            format!("{name}: CPU, storm and settling (s)"),
            all_cpu[i],
            2,
        );
        rep.add(
            format!("{name}: RSS at end (MiB)"),
            s_end[i].rss_kib as f64 / 1024.0,
            1,
        );
        if *is_instance {
            let i = i.min(1);
            rep.add(
                format!("{name}: presence refreshes, storm and settling"),
                refreshes1[i] - refreshes0[i],
                0,
            );
            rep.add(
                format!("{name}: chat_presence_expired_total"),
                expired[i],
                0,
            );
        }
    }
    rep.add("storm and settling (s)", (settle_end - t0).as_secs_f64(), 2);
    if settled.is_none() {
        rep.notes.push(format!(
            "the lists did not all complete: gave up after {:.1} s without an event (or {} s); {} of {n} complete",
            opts.drain.as_secs_f64(),
            SETTLE_MAX.as_secs(),
            lists.complete
        ));
    }
    notes(rep, storm.errors, &t);
}

fn idle(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    redis: &mut Option<RedisWatch>,
    rep: &mut RunReport,
) {
    let n = opts.clients;
    let b = pool.connect(n);
    std::thread::sleep(IDLE_SETTLE);

    // ---- the quiet window
    let refreshes0 = counter(http, "chat_presence_refreshes_total");
    let redis0 = read(redis, rep);
    let s0 = procs.sample();
    let t0 = Instant::now();
    std::thread::sleep(opts.idle);
    let s1 = procs.sample();
    let window = t0.elapsed().as_secs_f64();
    let redis1 = read(redis, rep);
    let refreshes1 = counter(http, "chat_presence_refreshes_total");
    let expired = counter(http, "chat_presence_expired_total");

    let t = pool.finish_into(rep);

    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", b.ok as f64, 0);
    rep.add("clients failed", b.failed as f64, 0);
    t.report_clients(rep);
    rep.add("rooms (each on both instances)", opts.rooms as f64, 0);
    b.report_rate("connect", rep);
    rep.add("quiet window (s)", window, 1);
    let cpu = cpu(procs, &s0, &s1);
    let mut refreshes = 0.0;
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        rep.add(format!("{name}: CPU in window (s)"), cpu[i], 3);
        rep.add(
            format!("{name}: CPU per second (ms/s)"),
            1000.0 * cpu[i] / window,
            2,
        );
        rep.add(
            format!("{name}: RSS at end (MiB)"),
            s1[i].rss_kib as f64 / 1024.0,
            1,
        );
        if *is_instance {
            let i = i.min(1);
            let r = refreshes1[i] - refreshes0[i];
            refreshes += r;
            rep.add(format!("{name}: presence refreshes in window"), r, 0);
            rep.add(format!("{name}: presence refreshes/s"), r / window, 2);
            rep.add(
                format!("{name}: chat_presence_expired_total"),
                expired[i],
                0,
            );
        }
    }
    if let (Some(r0), Some(r1)) = (&redis0, &redis1) {
        let d = r1.since(r0);
        rep.add(
            "redis: CPU per second (ms/s, INFO cpu)",
            1000.0 * d.cpu_s / window,
            2,
        );
        rep.add("redis: commands in window", d.total() as f64, 0);
        rep.add("redis: commands/s", d.total() as f64 / window, 1);
        rep.add(
            "redis: commands per refresh",
            d.total() as f64 / refreshes.max(1.0),
            1,
        );
        let mut by_calls: Vec<(&String, &u64)> = d.calls.iter().collect();
        by_calls.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (command, calls) in by_calls {
            rep.add(format!("redis: {command}/s"), *calls as f64 / window, 1);
        }
    }
    notes(rep, b.errors, &t);
}

fn notes(
    rep: &mut RunReport,
    errors: std::collections::HashMap<String, usize>,
    t: &crate::pool::Tally,
) {
    let mut errs: Vec<_> = errors.into_iter().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(e.1));
    for (e, c) in errs.into_iter().take(5) {
        rep.notes.push(format!("connect failure x{c}: {e}"));
    }
    for (e, c) in &t.ended {
        rep.notes.push(format!("client ended x{c}: {e}"));
    }
    if let Some(e) = &t.first_error {
        rep.notes.push(format!("first error: {e}"));
    }
}
