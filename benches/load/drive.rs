//! One run: start Redis (or a Redis Cluster), the two instances and the
//! workers; connect the
//! clients (for `max-clients`, step by step while the stream is on); send;
//! wait for every expected delivery; close; and turn what was seen into
//! figures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::abuse;
use crate::client::now_ns;
use crate::options::{Opts, Scenario};
use crate::pool::{Batch, FAULT_STATUS, Pool, SENDS_IN_DOUBT, SENDS_REFUSED};
use crate::presence;
use crate::procs::{self, Procs, Sample, clk_tck, metrics};
use crate::report::RunReport;

/// One run; for `abuse`, a quiet one and an attacked one, reported as one.
pub fn run(opts: &Opts, run: usize) -> RunReport {
    if opts.scenario != Scenario::Abuse {
        return run_once(opts, run, false);
    }
    println!("  quiet: the ordinary chat alone");
    let quiet = run_once(opts, run, false);
    println!("  attacked: the same chat, under every attack at once");
    let mut rep = run_once(opts, run, true);
    for name in ["latency p50 (ms)", "latency p99 (ms)"] {
        let (q, a) = (
            quiet.get(name).unwrap_or(f64::NAN),
            rep.get(name).unwrap_or(f64::NAN),
        );
        rep.add(format!("quiet {name}"), q, 3);
        rep.add(format!("attacked/quiet {name}"), a / q, 2);
    }
    // What the attacks made each instance hold at most, over what the
    // same chat held without them.
    for name in ["a", "b"] {
        let peak = rep.get(&format!("{name} RSS peak (MiB)"));
        let quiet_end = quiet.get(&format!("{name}: RSS at end (MiB)"));
        if let (Some(peak), Some(quiet_end)) = (peak, quiet_end) {
            rep.add(
                format!("{name} RSS peak above quiet (MiB)"),
                peak - quiet_end,
                1,
            );
        }
    }
    for what in ["lost", "duplicated", "out of order"] {
        rep.add(
            format!("quiet {what}"),
            quiet.get(what).unwrap_or(f64::NAN),
            0,
        );
    }
    rep
}

fn run_once(opts: &Opts, run: usize, attacked: bool) -> RunReport {
    let tag = format!("{run}-{}", now_ns());
    // With --auth hs256|es256: this run's keys, for the instances' flags
    // and the workers' tokens (through `opts.keys`); their directory goes
    // at the end of the run.
    let auth_keys = procs::AuthKeys::make(opts.auth);
    let opts = &Opts {
        keys: auth_keys.as_ref().map(|k| k.keys.clone()),
        ..opts.clone()
    };
    // The Redis processes this run started (none with --target-redis), and
    // how the instances reach Redis.
    let (redis, broker): (Vec<procs::Proc>, Vec<String>) = match &opts.target_redis {
        Some(url) => (Vec::new(), vec!["--redis-url".into(), url.clone()]),
        None if opts.redis_cluster => {
            let (nodes, seeds) = procs::start_redis_cluster();
            (nodes, vec!["--redis-cluster".into(), seeds])
        }
        None => {
            // Redis's guidance for a bounded Redis; every key a client
            // can make the server write has a TTL, so can be evicted.
            let capped: &[&str] = if opts.scenario == Scenario::Abuse {
                &[
                    "--maxmemory",
                    "24mb",
                    "--maxmemory-policy",
                    "volatile-lru",
                    "--lazyfree-lazy-eviction",
                    "yes",
                    "--lazyfree-lazy-expire",
                    "yes",
                ]
            } else {
                &[]
            };
            let (p, url) = procs::start_redis(capped);
            (vec![p], vec!["--redis-url".into(), url])
        }
    };
    let prefix = format!("load-{}-{tag}", std::process::id());
    let a = procs::start_instance("a", &broker, &prefix, opts);
    let b = procs::start_instance("b", &broker, &prefix, opts);
    std::thread::sleep(Duration::from_millis(300));
    let ws = [a.ws.unwrap(), b.ws.unwrap()];
    let http = [a.admin.unwrap(), b.admin.unwrap()];
    let room = format!(
        "load{}x{}",
        std::process::id(),
        now_ns() % 1_000_000_000_000
    );
    let mut pool = Pool::spawn(opts, ws, &room);
    let mut list = vec![
        ("a".to_string(), vec![a.pid()], true),
        ("b".to_string(), vec![b.pid()], true),
    ];
    if !redis.is_empty() {
        // A cluster's nodes are summed: its CPU and memory in all.
        let name = if opts.redis_cluster {
            "redis-cluster"
        } else {
            "redis"
        };
        list.push((
            name.to_string(),
            redis.iter().map(|r| r.pid()).collect(),
            false,
        ));
    }
    let mut loadgen = vec![std::process::id()];
    loadgen.extend(pool.pids());
    list.push(("loadgen".to_string(), loadgen, false));
    let procs = Procs { list };
    let attack = attacked.then(|| {
        abuse::start(&abuse::Targets {
            ws,
            http: [a.http.unwrap(), b.http.unwrap()],
            room: room.clone(),
            pids: [a.pid(), b.pid()],
            broker: broker.clone(),
            prefix: prefix.clone(),
        })
    });
    let mut b = b;
    let mut rep = if opts.scenario.is_presence() {
        let target = presence::Target {
            broker: &broker,
            prefix: &prefix,
            room: &room,
        };
        presence::drive(opts, &mut pool, http, &procs, &target, &mut b)
    } else {
        drive(opts, &mut pool, http, &procs)
    };
    if let Some(attack) = attack {
        attack.finish(&mut rep);
    }
    for p in [&a, &b] {
        let tail = p.log_tail();
        let warnings: Vec<_> = tail
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        for l in warnings.iter().rev().take(3).rev() {
            rep.notes.push(format!("{} log: {l}", p.name));
        }
    }
    drop(pool);
    drop(a);
    drop(b);
    drop(redis);
    drop(auth_keys);
    rep
}

fn drive(opts: &Opts, pool: &mut Pool, http: [SocketAddr; 2], procs: &Procs) -> RunReport {
    let mut rep = RunReport::default();
    let tck = clk_tck();
    let base = procs.sample();
    let n = opts.clients;
    let senders = opts.senders.min(n);

    // ---- connect (and, for max-clients, keep adding while sending)
    let mut all = Batch::default();
    let mut idle: Option<(Duration, Vec<Sample>, Vec<Sample>)> = None;
    // Each process's CPU once every client is connected (not max-clients,
    // whose clients join while the stream is on).
    let mut connect_cpu: Option<Vec<Sample>> = None;
    let (send_start, window_base, groups_base);
    let mut fault: Option<std::process::Child> = None;
    if opts.scenario == Scenario::MaxClients {
        println!(
            "  {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
            "clients",
            "failed",
            "batch s",
            "p50 ms",
            "p99 ms",
            "a RSS MiB",
            "b RSS MiB",
            "a thr",
            "b thr"
        );
        let mut next = 0;
        let mut started = None;
        let mut wb = None;
        while next < n {
            let to = (next + opts.batch).min(n);
            let b = pool.connect(to);
            next = to;
            let failed = b.failed;
            let s = procs.sample();
            println!(
                "  {:>7} {:>7} {:>9.2} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>9} {:>9}",
                all.ok + b.ok,
                all.failed + b.failed,
                b.wall.as_secs_f64(),
                b.times.pct(0.5) / 1000.0,
                b.times.pct(0.99) / 1000.0,
                s[0].rss_kib as f64 / 1024.0,
                s[1].rss_kib as f64 / 1024.0,
                s[0].threads,
                s[1].threads
            );
            for (e, c) in &b.errors {
                println!("          {c} x {e}");
            }
            all.merge(b);
            if started.is_none() {
                wb = Some((procs.sample(), procs.groups()));
                started = Some(Instant::now());
                pool.start();
            }
            if failed > 0 {
                rep.notes.push(format!(
                    "stopped adding clients at the first failure ({} connected)",
                    all.ok
                ));
                break;
            }
        }
        send_start = started.expect("one batch at least");
        (window_base, groups_base) = wb.expect("one batch at least");
        std::thread::sleep(opts.duration);
    } else {
        all.merge(pool.connect(n));
        connect_cpu = Some(procs.sample());
        if !opts.idle.is_zero() {
            std::thread::sleep(Duration::from_secs(2));
            let before = procs.sample();
            std::thread::sleep(opts.idle);
            idle = Some((opts.idle, before, procs.sample()));
        } else {
            std::thread::sleep(Duration::from_millis(300));
        }
        (window_base, groups_base) = (procs.sample(), procs.groups());
        send_start = Instant::now();
        pool.start();
        fault = opts.fault_cmd.as_deref().map(start_fault);
        std::thread::sleep(opts.duration);
    }
    let send_end = Instant::now();
    let sent = pool.stop();
    let sent_total: u64 = sent.iter().sum();
    // --fault-cmd: whatever it broke is mended before the drain.
    if let Some(child) = fault {
        let status = finish_fault(child);
        println!(
            "  --fault-cmd ended {:.1} s after sending started ({status})",
            send_start.elapsed().as_secs_f64()
        );
        // Killed by a signal: 128, as a shell says.
        rep.add(FAULT_STATUS, f64::from(status.code().unwrap_or(128)), 0);
    }

    // ---- drain: wait for every expected delivery.
    let (got, expected, drained) = drain_deliveries(pool, opts, &sent);
    let window_end = Instant::now();
    let window_samples = procs.sample();
    let groups_end = procs.groups();
    let counters: Vec<Vec<(String, f64)>> = http.iter().map(|h| metrics(*h)).collect();

    // ---- close every client
    let t = pool.finish_into(&mut rep);

    // ---- figures
    let mut lat_all = t.lat_same.clone();
    lat_all.merge(&t.lat_cross);
    let (first, last) = t.first_and_last();

    let ms = |us: f64| us / 1000.0;
    rep.add("clients requested", n as f64, 0);
    rep.add("clients connected", all.ok as f64, 0);
    rep.add("clients failed", all.failed as f64, 0);
    if opts.scenario == Scenario::MaxClients {
        rep.add("clients refused (HTTP 503)", all.refused as f64, 0);
    }
    t.report_clients(&mut rep);
    if opts.rooms > 1 {
        rep.add("rooms", opts.rooms as f64, 0);
    }
    all.report_rate("connect", &mut rep);
    all.report_times(&mut rep);
    if let Some(after) = &connect_cpu {
        // What the handshakes cost each process (with --auth, the tokens'
        // verification on the instances, their minting in the loadgen).
        for (i, (name, _, _)) in procs.list.iter().enumerate() {
            let cpu = after[i].cpu_ticks.saturating_sub(base[i].cpu_ticks) as f64 / tck;
            rep.add(format!("{name}: CPU during connect (s)"), cpu, 2);
        }
    }
    if let Some((dur, before, after)) = &idle {
        rep.add("idle window (s)", dur.as_secs_f64(), 1);
        for (i, (name, _, _)) in procs.list.iter().enumerate() {
            let cpu = after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / tck;
            rep.add(format!("{name}: CPU during idle (s)"), cpu, 2);
            rep.add(
                format!("{name}: CPU during idle (%)"),
                100.0 * cpu / dur.as_secs_f64(),
                2,
            );
        }
    }
    let window = window_end - send_start;
    rep.add("senders", senders as f64, 0);
    rep.add("sending time (s)", (send_end - send_start).as_secs_f64(), 2);
    rep.add("messages sent", sent_total as f64, 0);
    rep.add(
        "send rate (msg/s)",
        sent_total as f64 / (send_end - send_start).as_secs_f64(),
        0,
    );
    rep.add("deliveries expected", t.expected as f64, 0);
    rep.add("deliveries received", (t.unique + t.dup) as f64, 0);
    rep.add("lost", t.lost as f64, 0);
    rep.add("duplicated", t.dup as f64, 0);
    rep.add("out of order", t.ooo as f64, 0);
    if opts.rooms > 1 {
        rep.add("delivered to another room", t.misrouted as f64, 0);
    }
    rep.add("error frames", t.errors as f64, 0);
    rep.add("send errors", t.send_errors as f64, 0);
    rep.add(SENDS_REFUSED, t.refused as f64, 0);
    rep.add(SENDS_IN_DOUBT, t.in_doubt as f64, 0);
    t.report_presence(&mut rep);
    t.report_status(&mut rep);
    if t.foreign > 0 {
        rep.add("unrecognised messages", t.foreign as f64, 0);
    }
    if t.silent > 0 && opts.scenario == Scenario::MaxClients {
        rep.add("clients that received nothing", t.silent as f64, 0);
    }
    rep.add("drain time (s)", (window_end - send_end).as_secs_f64(), 3);
    rep.add("measured window (s)", window.as_secs_f64(), 2);
    rep.add(
        "deliveries/s",
        (t.unique + t.dup) as f64 / window.as_secs_f64(),
        0,
    );
    rep.add("latency p50 (ms)", ms(lat_all.pct(0.5)), 3);
    rep.add("latency p90 (ms)", ms(lat_all.pct(0.9)), 3);
    rep.add("latency p99 (ms)", ms(lat_all.pct(0.99)), 3);
    rep.add("latency max (ms)", ms(lat_all.pct(1.0)), 3);
    rep.add("cross-instance p50 (ms)", ms(t.lat_cross.pct(0.5)), 3);
    rep.add("cross-instance p99 (ms)", ms(t.lat_cross.pct(0.99)), 3);
    rep.add("same-instance p50 (ms)", ms(t.lat_same.pct(0.5)), 3);
    rep.add("same-instance p99 (ms)", ms(t.lat_same.pct(0.99)), 3);
    rep.add("first receiver p50 (ms)", ms(first.pct(0.5)), 3);
    rep.add("first receiver p99 (ms)", ms(first.pct(0.99)), 3);
    rep.add("whole room has it p50 (ms)", ms(last.pct(0.5)), 3);
    rep.add("whole room has it p99 (ms)", ms(last.pct(0.99)), 3);
    for (i, (name, _, is_instance)) in procs.list.iter().enumerate() {
        let (b0, w0, w1) = (base[i], window_base[i], window_samples[i]);
        rep.add(
            format!("{name}: RSS before clients (MiB)"),
            b0.rss_kib as f64 / 1024.0,
            1,
        );
        rep.add(
            format!("{name}: RSS at end (MiB)"),
            w1.rss_kib as f64 / 1024.0,
            1,
        );
        rep.add(
            format!("{name}: threads before clients"),
            b0.threads as f64,
            0,
        );
        rep.add(format!("{name}: threads at end"), w1.threads as f64, 0);
        if *is_instance {
            let clients = t.per_inst[i].max(1) as f64;
            rep.add(
                format!("{name}: RSS per client (KiB)"),
                w1.rss_kib.saturating_sub(b0.rss_kib) as f64 / clients,
                1,
            );
        }
        let cpu = w1.cpu_ticks.saturating_sub(w0.cpu_ticks) as f64 / tck;
        let sys = w1.sys_ticks.saturating_sub(w0.sys_ticks) as f64 / tck;
        rep.add(format!("{name}: CPU in window (s)"), cpu, 2);
        rep.add(
            format!("{name}: CPU in window (%)"),
            100.0 * cpu / window.as_secs_f64(),
            1,
        );
        rep.add(
            format!("{name}: kernel share of CPU (%)"),
            100.0 * sys / cpu.max(1e-9),
            0,
        );
    }
    for (i, (g0, g1)) in groups_base.iter().zip(&groups_end).enumerate() {
        let inst = ["a", "b"][i];
        let mut switches = 0;
        let mut names: Vec<&String> = g1.0.keys().collect();
        names.sort();
        for name in names {
            let (c1, v1, n1) = g1.0[name];
            let (c0, v0, n0) = g0.0.get(name).copied().unwrap_or_default();
            switches += (v1 + n1).saturating_sub(v0 + n0);
            // Per-thread times are only tick-accurate, so thousands of
            // client threads with a few ms each add up to nothing: only the
            // one subscriber thread is shown, the rest is "other threads".
            if name == "redis-sub" {
                let sub = c1.saturating_sub(c0) as f64 / tck;
                let total = window_samples[i]
                    .cpu_ticks
                    .saturating_sub(window_base[i].cpu_ticks) as f64
                    / tck;
                rep.add(format!("{inst}: CPU of the redis-sub thread (s)"), sub, 2);
                rep.add(
                    format!("{inst}: CPU of all other threads (s)"),
                    (total - sub).max(0.0),
                    2,
                );
            }
        }
        rep.add(
            format!("{inst}: context switches/s"),
            switches as f64 / window.as_secs_f64(),
            0,
        );
    }
    let mut keys = vec![
        "chat_messages_received_total",
        "chat_messages_published_total",
        // Payloads this instance received from Redis: with per-room
        // subscriptions, only those of rooms it has clients in.
        "chat_broker_messages_total",
        "chat_room_subscriptions",
        "chat_messages_delivered_total",
        "chat_slow_clients_dropped_total",
        "chat_rate_limited_total",
        "chat_idle_clients_dropped_total",
        "chat_redis_reconnects_total",
    ];
    if opts.scenario == Scenario::MaxClients {
        keys.extend([
            "chat_connections_refused_total",
            "chat_capacity_refused_total",
        ]);
    }
    for (i, c) in counters.iter().enumerate() {
        let inst = ["a", "b"][i];
        for key in &keys {
            if let Some((_, v)) = c.iter().find(|(k, _)| k == key) {
                rep.add(format!("{inst}: {key}"), *v, 0);
            }
        }
    }
    if !drained {
        rep.notes.push(format!(
            "drain gave up ({:.1} s without progress, or 120 s) with {got} of {expected} expected deliveries",
            opts.drain.as_secs_f64(),
        ));
    }
    let mut errs: Vec<_> = all.errors.into_iter().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(e.1));
    for (e, c) in errs.into_iter().take(5) {
        rep.notes.push(format!("connect failure x{c}: {e}"));
    }
    for (e, c) in t.ended {
        rep.notes.push(format!("client ended x{c}: {e}"));
    }
    if let Some(e) = t.first_error {
        rep.notes.push(format!("first error: {e}"));
    }
    rep
}

/// `--fault-cmd`, started with `sh -c` as the senders start (its output
/// goes to this process's).
fn start_fault(cmd: &str) -> std::process::Child {
    println!("  --fault-cmd started with the senders: {cmd}");
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start --fault-cmd {cmd:?}: {e}"))
}

/// Waits for `--fault-cmd` to end.
fn finish_fault(mut child: std::process::Child) -> std::process::ExitStatus {
    child
        .wait()
        .unwrap_or_else(|e| panic!("cannot wait for --fault-cmd: {e}"))
}

/// Waits for every delivery the clients should get, given what each
/// sender sent: what has not arrived after `--drain-s` without progress
/// (or after 120 s) is lost. (received, expected, all arrived).
pub fn drain_deliveries(pool: &mut Pool, opts: &Opts, sent: &[u64]) -> (u64, u64, bool) {
    let expected = pool.expect(sent);
    let hard_deadline = Instant::now() + Duration::from_secs(120);
    let mut got = pool.progress();
    let mut last_progress = (Instant::now(), got);
    while got < expected && Instant::now() < hard_deadline {
        if got != last_progress.1 {
            last_progress = (Instant::now(), got);
        } else if last_progress.0.elapsed() >= opts.drain {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        got = pool.progress();
    }
    (got, expected, got >= expected)
}
