//! The presence scenarios, from the connected processes to their figures.
//!
//! In the scenarios with member lists (join, churn, crash) every client
//! keeps its view of the room from its presence frames (`members.rs`);
//! the parent tells the workers who is in the room (`Mark`) and asks how
//! the views compare (`Views`), every 100 ms while they settle.
//!
//! - `presence-join`: a join storm. Every client connects at once (as in
//!   `connect`), one room, names `c0`, `c1`, ...; Redis's `INFO
//!   commandstats` is read before the storm and once the views have
//!   settled: commands per join. The run fails unless every client's view
//!   is, in the end, the count of all clients and the first W names (or
//!   every name, in a room of at most W).
//! - `presence-idle`: thousands of idle clients in many rooms, each room on
//!   both instances; then a quiet window, in which what presence costs at
//!   rest shows: the instances' CPU, their refreshes, Redis's CPU and
//!   commands, the frames clients get.
//! - `presence-churn`: one large room settles; one sender measures chat
//!   latency, first quiet, then while churners leave and come back (see
//!   `churn.rs`), over every listening client and over the latency probes
//!   (`layout.rs`); what each listening client receives of presence, per
//!   second, in both phases. After the churn every view must settle right.
//! - `presence-crash`: one large room over both instances settles; `b` is
//!   killed; what a's clients receive while b's members expire, and how
//!   long until their counts (and lists) are right.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::now_ns;
use crate::drive;
use crate::layout::Layout;
use crate::options::{Opts, Scenario};
use crate::pool::{Pool, ViewTally};
use crate::procs::{Proc, Procs, RedisCounts, RedisWatch, Sample, clk_tck, metrics};
use crate::report::RunReport;

/// The longest wait for the views to settle, whatever the progress.
const SETTLE_MAX: Duration = Duration::from_secs(300);

/// After the idle clients connected, before the window: their joins
/// (each fanned out to its room) are done by then.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// The figures the verdict reads: clients whose final view is right, and
/// how many should be.
pub const COMPLETE: &str = "clients whose final list is right";
pub const SHOULD: &str = "clients whose final list should be right";

/// Where a run's instances keep presence: `broker` is how they reach
/// Redis (`--redis-url URL` or `--redis-cluster SEEDS`), whose counters
/// are read; `prefix` their `--redis-prefix`; `room` the (first) room.
pub struct Target<'a> {
    pub broker: &'a [String],
    pub prefix: &'a str,
    pub room: &'a str,
}

/// One run of a presence scenario; `b` is instance b (presence-crash
/// kills it).
pub fn drive(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    target: &Target,
    b: &mut Proc,
) -> RunReport {
    let mut rep = RunReport::default();
    let mut redis = match RedisWatch::open(target.broker) {
        Ok(r) => Some(r),
        Err(e) => {
            rep.notes.push(format!("no Redis counters: {e}"));
            None
        }
    };
    // The room's members in Redis: name -> connections by instance.
    let key = format!("{}:presence:{{{}}}", target.prefix, target.room);
    match opts.scenario {
        Scenario::PresenceJoin => {
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
        Scenario::PresenceChurn => churn(opts, pool, http, procs, &mut redis, &mut rep),
        Scenario::PresenceCrash => crash(opts, pool, http, procs, &mut redis, b, &mut rep),
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

/// Every `chat_presence_*` series of an instance (its names change with
/// the server: whatever it has is shown).
fn presence_metrics(http: SocketAddr) -> Vec<(String, f64)> {
    metrics(http)
        .into_iter()
        .filter(|(k, _)| k.starts_with("chat_presence"))
        .collect()
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

/// A bit per client, for clients `0..n` that `keep`.
fn bits(n: usize, keep: impl Fn(usize) -> bool) -> Vec<u64> {
    let mut b = vec![0u64; n.div_ceil(64)];
    for k in (0..n).filter(|&k| keep(k)) {
        b[k / 64] |= 1 << (k % 64);
    }
    b
}

fn ones(bits: &[u64]) -> usize {
    bits.iter().map(|b| b.count_ones() as usize).sum()
}

/// Seconds from `from_ns` to `to_ns` (`CLOCK_MONOTONIC`); NaN for no time.
fn secs_between(from_ns: u64, to_ns: u64) -> f64 {
    if to_ns == 0 {
        f64::NAN
    } else {
        to_ns.saturating_sub(from_ns) as f64 / 1e9
    }
}

/// Polls the views every 100 ms until the `want` clients are online and
/// every view is right; or until `quiet` passed without a presence frame
/// (None: no such limit, as when nothing happens until a TTL runs out);
/// or until `hard`. The last views, and when they were all right.
fn settle(
    pool: &mut Pool,
    want: usize,
    quiet: Option<Duration>,
    hard: Instant,
) -> (ViewTally, Option<Instant>) {
    let mut v = pool.views();
    let mut last = (Instant::now(), v.received);
    loop {
        if v.clients == want && v.right == want {
            return (v, Some(Instant::now()));
        }
        if Instant::now() >= hard {
            return (v, None);
        }
        if v.received != last.1 {
            last = (Instant::now(), v.received);
        } else if quiet.is_some_and(|q| last.0.elapsed() >= q) {
            return (v, None);
        }
        std::thread::sleep(Duration::from_millis(100));
        v = pool.views();
    }
}

/// Why views are not right, for a note.
fn wrong(v: &ViewTally, want: usize) -> String {
    format!(
        "{} of {want} right ({} online, {} with a presence, {} with the right count; names missing {}, \
         listed wrongly {}, strangers {}, views of the wrong kind {})",
        v.right,
        v.clients,
        v.with_snapshot,
        v.count_right,
        v.missing,
        v.extra,
        v.strangers,
        v.wrong_mode
    )
}

/// The views' figures: how many are right, and what their frames held.
fn report_views(v: &ViewTally, rep: &mut RunReport) {
    rep.add("clients checked (online at the check)", v.clients as f64, 0);
    rep.add("clients with a presence frame", v.with_snapshot as f64, 0);
    rep.add("clients whose count is right", v.count_right as f64, 0);
    rep.add(COMPLETE, v.right as f64, 0);
    rep.add("names missing, over all lists", v.missing as f64, 0);
    rep.add("names listed wrongly, over all lists", v.extra as f64, 0);
    rep.add(
        "unknown names listed, over all lists",
        v.strangers as f64,
        0,
    );
    rep.add(
        "lists of the wrong kind (whole, window, offset)",
        v.wrong_mode as f64,
        0,
    );
    let s = &v.seen;
    rep.add(
        "presence snapshots received (over the run)",
        s.snapshots as f64,
        0,
    );
    rep.add(
        "presence_diff frames received (over the run)",
        s.diffs as f64,
        0,
    );
    if s.legacy_events > 0 {
        rep.add(
            "join/leave frames received (old server)",
            s.legacy_events as f64,
            0,
        );
        rep.add("snapshots cut short (more > 0)", s.cut_short as f64, 0);
    }
    rep.add("leaves with reason expired", s.expired as f64, 0);
    rep.add("joins and leaves that changed nothing", s.no_ops as f64, 0);
    for (what, n) in s.anomalies.named() {
        rep.add(format!("protocol: {what}"), n as f64, 0);
    }
}

/// Presence frames and bytes per measured client since the last mark,
/// over `secs` (per second; `secs` of 1 for totals), mean and max.
fn report_frames(v: &ViewTally, phase: &str, secs: f64, unit: &str, rep: &mut RunReport) {
    let n = v.measured.max(1) as f64;
    rep.add(
        format!("{phase}: presence frames per client{unit} (mean)"),
        v.frames as f64 / n / secs,
        2,
    );
    rep.add(
        format!("{phase}: presence frames per client{unit} (max)"),
        v.frames_max as f64 / secs,
        2,
    );
    rep.add(
        format!("{phase}: presence bytes per client{unit} (mean)"),
        v.bytes as f64 / n / secs,
        0,
    );
    rep.add(
        format!("{phase}: presence bytes per client{unit} (max)"),
        v.bytes_max as f64 / secs,
        0,
    );
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
    // Every client should end up in the room.
    pool.mark(&bits(n, |_| true), now_ns());

    // ---- the storm: every handshake at once (at most --concurrency in
    // flight); a client's join is registered before its `welcome`.
    let t0 = Instant::now();
    let t0_ns = now_ns();
    let storm = pool.connect(n);
    let storm_end = Instant::now();
    let s_storm = procs.sample();

    // ---- settle: until every view is right, or no presence frame came
    // for --drain-s, or SETTLE_MAX.
    let (views, settled) = settle(pool, n, Some(opts.drain), storm_end + SETTLE_MAX);
    let settle_end = Instant::now();
    let s_end = procs.sample();
    let redis1 = read(redis, rep);
    let members_in_redis = redis.as_mut().map(|r| r.hlen(key));
    let refreshes1 = counter(http, "chat_presence_refreshes_total");
    let presence = http.map(presence_metrics);

    let t = pool.finish_into(rep);

    // ---- figures
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", storm.ok as f64, 0);
    rep.add("clients failed", storm.failed as f64, 0);
    t.report_clients(rep);
    storm.report_rate("storm", rep);
    rep.add(
        "joins/s (connected / storm wall time)",
        storm.ok as f64 / storm.wall.as_secs_f64().max(1e-9),
        0,
    );
    rep.add(
        "joins/s until every list was right",
        settled.map_or(f64::NAN, |s| n as f64 / (s - t0).as_secs_f64()),
        0,
    );
    storm.report_times(rep);
    rep.add(
        "window W (--presence-full-list-max)",
        opts.presence().full_list_max as f64,
        0,
    );
    rep.add(
        "every count right, s after the storm began",
        if views.count_right == n {
            secs_between(t0_ns, views.right_since_max)
        } else {
            f64::NAN
        },
        2,
    );
    rep.add(
        "every list right, s after the storm began (0.1 s polls)",
        settled.map_or(f64::NAN, |s| (s - t0).as_secs_f64()),
        2,
    );
    rep.add(
        "every list right, s after the storm ended",
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
    rep.add(SHOULD, n as f64, 0);
    report_views(&views, rep);
    report_frames(&views, "storm and settling", 1.0, "", rep);
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
            for (k, v) in &presence[i] {
                rep.add(format!("{name}: {k}"), *v, 0);
            }
        }
    }
    rep.add("storm and settling (s)", (settle_end - t0).as_secs_f64(), 2);
    if settled.is_none() {
        rep.notes.push(format!(
            "the lists did not all settle (no presence frame for {:.1} s, or {} s): {}",
            opts.drain.as_secs_f64(),
            SETTLE_MAX.as_secs(),
            wrong(&views, n)
        ));
    }
    notes(rep, storm.errors, &t);
}

fn churn(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    redis: &mut Option<RedisWatch>,
    rep: &mut RunReport,
) {
    let n = opts.clients;
    let layout = Layout::new(opts);
    let p = opts.presence();
    let batch = pool.connect(n);

    // ---- settle: the room as it is, before anything is measured.
    let present = pool.present();
    pool.mark(&present, now_ns());
    let t_settle = Instant::now();
    // Presence off (the control): no list to wait for.
    let settle = |pool: &mut Pool, want, hard| match p.on {
        true => settle(pool, want, Some(opts.drain), hard),
        false => (pool.views(), Some(Instant::now())),
    };
    let (before, settled) = settle(pool, ones(&present), t_settle + SETTLE_MAX);
    if settled.is_none() {
        rep.notes.push(format!(
            "before the churn, the lists did not all settle: {}",
            wrong(&before, ones(&present))
        ));
    }

    // ---- quiet: the sender on, nobody churns.
    pool.start();
    pool.mark(&present, now_ns());
    let q0 = Instant::now();
    let (s_q0, redis_q0) = (procs.sample(), read(redis, rep));
    std::thread::sleep(opts.idle);
    let quiet = pool.views();
    let quiet_s = q0.elapsed().as_secs_f64();
    let (s_q1, redis_q1) = (procs.sample(), read(redis, rep));

    // ---- churn: the sender still on.
    pool.mark(&present, now_ns());
    let start_ns = now_ns() + 100_000_000;
    pool.churn_start(start_ns);
    let c0 = Instant::now();
    std::thread::sleep(opts.duration + Duration::from_millis(100));
    let churning = pool.views();
    let churn_s = c0.elapsed().as_secs_f64();
    let (s_c1, redis_c1) = (procs.sample(), read(redis, rep));
    let churn_metrics = http.map(presence_metrics);
    let sent = pool.stop();
    let away = pool.churn_stop();
    let sent_total: u64 = sent.iter().sum();
    let (got, expected, drained) = drive::drain_deliveries(pool, opts, &sent);

    // ---- settle again: every churner back, every view right.
    let present_end = pool.present();
    pool.mark(&present_end, now_ns());
    let t_end = Instant::now();
    let (after, settled_end) = settle(pool, n, t_end + SETTLE_MAX);

    let t = pool.finish_into(rep);

    // ---- figures
    let ms = |us: f64| us / 1000.0;
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", batch.ok as f64, 0);
    rep.add("clients failed", batch.failed as f64, 0);
    t.report_clients(rep);
    batch.report_rate("connect", rep);
    batch.report_times(rep);
    rep.add(
        "window W (--presence-full-list-max)",
        p.full_list_max as f64,
        0,
    );
    rep.add(
        "presence_diff interval (ms)",
        p.diff.as_secs_f64() * 1000.0,
        0,
    );
    rep.add("lists right before the quiet phase", before.right as f64, 0);
    rep.add(
        "s until then (0.1 s polls)",
        settled.map_or(f64::NAN, |s| (s - t_settle).as_secs_f64()),
        2,
    );
    rep.add("churners", layout.churners as f64, 0);
    rep.add("churn period (s)", layout.churn_period.as_secs_f64(), 2);
    rep.add(
        "churn: each churner away (s, once a period)",
        layout.churn_away.as_secs_f64(),
        2,
    );
    rep.add(
        "clients measured (online, not churning)",
        churning.measured as f64,
        0,
    );
    rep.add("quiet phase (s)", quiet_s, 1);
    rep.add("churn phase (s)", churn_s, 1);
    let c = &t.churn;
    rep.add("churn: leaves", c.leaves as f64, 0);
    rep.add("churn: joins", c.joins as f64, 0);
    // The first joins come one away-time after the first leaves.
    let (leaves_s, joins_s) = (
        c.leaves as f64 / churn_s,
        c.joins as f64 / (churn_s - layout.churn_away.as_secs_f64()).max(1e-3),
    );
    rep.add("churn: leaves/s", leaves_s, 1);
    rep.add("churn: joins/s (from the first return on)", joins_s, 1);
    rep.add("churn: joins failed", c.failed as f64, 0);
    rep.add("churners back after the churn", c.returns as f64, 0);
    rep.add(
        "churn: join handshake p50 (ms)",
        ms(c.join_times.pct(0.5)),
        2,
    );
    rep.add(
        "churn: join handshake p99 (ms)",
        ms(c.join_times.pct(0.99)),
        2,
    );
    rep.add("churners still away after the churn", away as f64, 0);
    report_frames(&quiet, "quiet", quiet_s, "/s", rep);
    report_frames(&churning, "churn", churn_s, "/s", rep);
    // Coalesced: at most one presence_diff per --presence-diff-ms, and one
    // more for where the window's edges fall.
    rep.add(
        CHURN_FRAMES_ALLOWED,
        churn_s / p.diff.as_secs_f64().max(1e-3) + 1.0,
        0,
    );
    rep.add(CHURN_FRAMES_MAX, churning.frames_max as f64, 0);
    let (q50, q99) = (ms(t.lat_quiet.pct(0.5)), ms(t.lat_quiet.pct(0.99)));
    let (c50, c99) = (ms(t.lat_churn.pct(0.5)), ms(t.lat_churn.pct(0.99)));
    rep.add("quiet: chat latency p50 (ms)", q50, 3);
    rep.add("quiet: chat latency p99 (ms)", q99, 3);
    rep.add("churn: chat latency p50 (ms)", c50, 3);
    rep.add("churn: chat latency p99 (ms)", c99, 3);
    rep.add("chat latency p50, churn / quiet", c50 / q50, 2);
    rep.add(LATENCY_RATIO, c99 / q99, 2);
    let (pq99, pc99) = (
        ms(t.probe_lat_quiet.pct(0.99)),
        ms(t.probe_lat_churn.pct(0.99)),
    );
    rep.add("probes: quiet: chat latency p99 (ms)", pq99, 3);
    rep.add("probes: churn: chat latency p99 (ms)", pc99, 3);
    rep.add(PROBE_LATENCY_RATIO, pc99 / pq99, 2);
    rep.add("messages sent", sent_total as f64, 0);
    rep.add("deliveries expected", t.expected as f64, 0);
    rep.add("deliveries received", (t.unique + t.dup) as f64, 0);
    rep.add("lost", t.lost as f64, 0);
    rep.add("duplicated", t.dup as f64, 0);
    rep.add("out of order", t.ooo as f64, 0);
    rep.add("error frames", t.errors as f64, 0);
    rep.add("send errors", t.send_errors as f64, 0);
    rep.add(SHOULD, if p.on { n as f64 } else { 0.0 }, 0);
    rep.add(
        "every list right, s after the churn (0.1 s polls)",
        settled_end.map_or(f64::NAN, |s| (s - t_end).as_secs_f64()),
        2,
    );
    report_views(&after, rep);
    let quiet_cpu = cpu(procs, &s_q0, &s_q1);
    let churn_cpu = cpu(procs, &s_q1, &s_c1);
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        rep.add(
            format!("{name}: CPU, quiet (ms/s)"),
            1000.0 * quiet_cpu[i] / quiet_s,
            1,
        );
        // From the quiet phase's end: the churn's start (100 ms) is in.
        rep.add(
            format!("{name}: CPU, churn (ms/s)"),
            1000.0 * churn_cpu[i] / churn_s,
            1,
        );
        if *is_instance {
            for (k, v) in &churn_metrics[i.min(1)] {
                rep.add(format!("{name}: {k} (after the churn)"), *v, 0);
            }
        }
    }
    if let (Some(r0), Some(r1), Some(r2)) = (&redis_q0, &redis_q1, &redis_c1) {
        let (dq, dc) = (r1.since(r0), r2.since(r1));
        rep.add("redis: commands/s, quiet", dq.total() as f64 / quiet_s, 1);
        rep.add("redis: commands/s, churn", dc.total() as f64 / churn_s, 1);
        rep.add(
            "redis: CPU, churn (ms/s, INFO cpu)",
            1000.0 * dc.cpu_s / churn_s,
            1,
        );
    }
    if !drained {
        rep.notes.push(format!(
            "drain gave up ({:.1} s without progress, or 120 s) with {got} of {expected} expected deliveries",
            opts.drain.as_secs_f64(),
        ));
    }
    if leaves_s.min(joins_s) < 0.9 * opts.churn {
        rep.notes.push(format!(
            "the churn fell short of --churn {}: {leaves_s:.1} leaves/s and {joins_s:.1} joins/s \
             (joins answered late make churners miss their next leave: join handshake p99 {:.0} ms)",
            opts.churn,
            ms(c.join_times.pct(0.99))
        ));
    }
    if settled_end.is_none() {
        rep.notes.push(format!(
            "after the churn, the lists did not all settle: {}",
            wrong(&after, n)
        ));
    }
    let mut errs: Vec<_> = c.errors.iter().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(*e.1));
    for (e, k) in errs.into_iter().take(3) {
        rep.notes.push(format!("churn join failure x{k}: {e}"));
    }
    notes(rep, batch.errors, &t);
}

/// The figures presence-churn's targets read.
pub const CHURN_FRAMES_ALLOWED: &str =
    "churn: presence frames per client allowed (one per --presence-diff-ms, +1)";
pub const CHURN_FRAMES_MAX: &str = "churn: most presence frames one client got";
pub const LATENCY_RATIO: &str = "chat latency p99, churn / quiet";
pub const PROBE_LATENCY_RATIO: &str = "probes: chat latency p99, churn / quiet";
pub const EXPIRY_S: &str = "kill -> every survivor's count right (s)";
pub const EXPIRY_ALLOWED_S: &str = "allowed: TTL + a third + --presence-diff-ms (s)";

#[allow(clippy::too_many_arguments)]
fn crash(
    opts: &Opts,
    pool: &mut Pool,
    http: [SocketAddr; 2],
    procs: &Procs,
    redis: &mut Option<RedisWatch>,
    b: &mut Proc,
    rep: &mut RunReport,
) {
    let n = opts.clients;
    let layout = Layout::new(opts);
    let p = opts.presence();
    let batch = pool.connect(n);

    // ---- settle: every view right before the kill.
    let present = pool.present();
    pool.mark(&present, now_ns());
    let t_settle = Instant::now();
    let (before, settled) = settle(
        pool,
        ones(&present),
        Some(opts.drain),
        t_settle + SETTLE_MAX,
    );
    if settled.is_none() {
        rep.notes.push(format!(
            "before the kill, the lists did not all settle: {}",
            wrong(&before, ones(&present))
        ));
    }

    // ---- the kill: a's clients should then see b's members go.
    let survivors: Vec<u64> = {
        let on_a = bits(n, |k| layout.instance(k) == 0);
        present.iter().zip(&on_a).map(|(p, a)| p & a).collect()
    };
    let (n_a, n_b) = (ones(&survivors), ones(&present) - ones(&survivors));
    let (s0, redis0) = (procs.sample(), read(redis, rep));
    let a_metrics0 = presence_metrics(http[0]);
    pool.mark(&survivors, now_ns());
    let kill_ns = now_ns();
    let killed = Instant::now();
    b.kill();
    let hard = killed + p.ttl + p.ttl / 3 + opts.drain;
    let (after, expired) = settle(pool, n_a, None, hard);
    // What comes after every view is right (a window's last change, a
    // count) belongs to the expiry too.
    std::thread::sleep(2 * p.diff);
    let tail = pool.views();
    let (s1, redis1) = (procs.sample(), read(redis, rep));
    let a_metrics1 = presence_metrics(http[0]);

    let t = pool.finish_into(rep);

    // ---- figures
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", batch.ok as f64, 0);
    rep.add("clients failed", batch.failed as f64, 0);
    t.report_clients(rep);
    batch.report_rate("connect", rep);
    batch.report_times(rep);
    rep.add(
        "window W (--presence-full-list-max)",
        p.full_list_max as f64,
        0,
    );
    rep.add(
        "presence_diff interval (ms)",
        p.diff.as_secs_f64() * 1000.0,
        0,
    );
    rep.add(
        "presence TTL (ms, --presence-ttl-ms)",
        p.ttl.as_secs_f64() * 1000.0,
        0,
    );
    rep.add("lists right before the kill", before.right as f64, 0);
    rep.add(
        "s until then (0.1 s polls)",
        settled.map_or(f64::NAN, |s| (s - t_settle).as_secs_f64()),
        2,
    );
    rep.add("members on a (survivors)", n_a as f64, 0);
    rep.add("members on b (killed)", n_b as f64, 0);
    rep.add(
        EXPIRY_S,
        if after.count_right == n_a && after.clients == n_a {
            secs_between(kill_ns, after.right_since_max)
        } else {
            f64::NAN
        },
        2,
    );
    rep.add(
        "kill -> every survivor's list right (s, 0.1 s polls)",
        expired.map_or(f64::NAN, |s| (s - killed).as_secs_f64()),
        2,
    );
    rep.add(
        EXPIRY_ALLOWED_S,
        (p.ttl + p.ttl / 3 + p.diff).as_secs_f64(),
        2,
    );
    report_frames(
        &tail,
        &format!(
            "expiry (kill to all right + {:.1} s)",
            (2 * p.diff).as_secs_f64()
        ),
        1.0,
        "",
        rep,
    );
    rep.add(SHOULD, n.div_ceil(2) as f64, 0);
    report_views(&tail, rep);
    let cpu = cpu(procs, &s0, &s1);
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        if i == 1 {
            continue;
        }
        rep.add(format!("{name}: CPU, kill to the end (s)"), cpu[i], 2);
        if *is_instance {
            for (k, v) in &a_metrics1 {
                let v0 = a_metrics0
                    .iter()
                    .find(|(k0, _)| k0 == k)
                    .map_or(0.0, |(_, v0)| *v0);
                rep.add(format!("{name}: {k} since the kill"), v - v0, 0);
            }
        }
    }
    if let (Some(r0), Some(r1)) = (&redis0, &redis1) {
        let d = r1.since(r0);
        rep.add("redis: commands, kill to the end", d.total() as f64, 0);
        rep.add(
            "redis: CPU, kill to the end (ms, INFO cpu)",
            1000.0 * d.cpu_s,
            1,
        );
    }
    if expired.is_none() {
        rep.notes.push(format!(
            "after the kill, the survivors' lists were not all right within the TTL, a third of it \
             and --drain-s ({:.1} s): {}",
            (hard - killed).as_secs_f64(),
            wrong(&after, n_a)
        ));
    }
    rep.notes.push(format!(
        "the {n_b} clients on b were cut by the kill (counted as dropped)"
    ));
    notes(rep, batch.errors, &t);
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
    let present = pool.present();
    pool.mark(&present, now_ns());
    let refreshes0 = counter(http, "chat_presence_refreshes_total");
    let redis0 = read(redis, rep);
    let s0 = procs.sample();
    let t0 = Instant::now();
    std::thread::sleep(opts.idle);
    let s1 = procs.sample();
    let window = t0.elapsed().as_secs_f64();
    let frames = pool.views();
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
    report_frames(&frames, "quiet window", window, "/s", rep);
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
