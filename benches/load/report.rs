//! Figures: a run's report, percentiles, the summary (the median of every
//! figure over the runs), the targets and the verdict.

use std::collections::HashMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

use crate::options::{Opts, Scenario};
use crate::pool::{FAULT_STATUS, LEFT_DOWN, PRESENCE_FRAMES, SENDS_IN_DOUBT, SENDS_REFUSED};
use crate::presence;

/// One figure of a run: a name (with its unit) and a value.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub decimals: usize,
}

#[derive(Default)]
pub struct RunReport {
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

impl RunReport {
    pub fn add(&mut self, name: impl Into<String>, value: f64, decimals: usize) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            decimals,
        });
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

/// A multiset of values (µs), as (value, count) in increasing value: what
/// a worker sends of its thousands or millions of latencies, and all that
/// exact percentiles need.
#[derive(Clone, Default, Debug, Serialize, Deserialize)]
pub struct Hist(Vec<(u32, u64)>);

impl Hist {
    pub fn of(mut values: Vec<u32>) -> Self {
        values.sort_unstable();
        let mut h: Vec<(u32, u64)> = Vec::new();
        for v in values {
            match h.last_mut() {
                Some((last, n)) if *last == v => *n += 1,
                _ => h.push((v, 1)),
            }
        }
        Hist(h)
    }

    pub fn merge(&mut self, other: &Hist) {
        let (a, b) = (std::mem::take(&mut self.0), &other.0);
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].0 < b[j].0) {
                out.push(a[i]);
                i += 1;
            } else if i == a.len() || b[j].0 < a[i].0 {
                out.push(b[j]);
                j += 1;
            } else {
                out.push((a[i].0, a[i].1 + b[j].1));
                i += 1;
                j += 1;
            }
        }
        self.0 = out;
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|e| e.1).sum()
    }

    /// The `q` quantile (nearest rank); NaN when empty.
    pub fn pct(&self, q: f64) -> f64 {
        let len = self.len();
        if len == 0 {
            return f64::NAN;
        }
        let rank = ((q * len as f64).ceil() as u64).clamp(1, len);
        let mut seen = 0;
        for &(v, n) in &self.0 {
            seen += n;
            if seen >= rank {
                return v as f64;
            }
        }
        unreachable!("rank is at most len")
    }

    pub fn max(&self) -> Option<u32> {
        self.0.last().map(|e| e.0)
    }
}

pub fn fmt_value(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        return "-".into();
    }
    if decimals == 0 {
        // Thousands separators for counts.
        let n = v.round() as i64;
        let s = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else {
        format!("{v:.decimals$}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

pub fn print_run(run: usize, runs: usize, rep: &RunReport) {
    let width = rep.figures.iter().map(|f| f.name.len()).max().unwrap_or(10);
    println!("\n  run {run}/{runs}");
    println!("  {:-<w$}", "", w = width + 18);
    for f in &rep.figures {
        println!(
            "  {:<width$}  {:>14}",
            f.name,
            fmt_value(f.value, f.decimals)
        );
    }
    for n in &rep.notes {
        println!("  note: {n}");
    }
}

/// Each target: (description, met).
fn targets(opts: &Opts, get: &dyn Fn(&str) -> f64) -> Vec<(String, bool)> {
    let lost = get("lost");
    match opts.scenario {
        Scenario::Abuse => {
            let ratio = get("attacked/quiet latency p99 (ms)");
            let mut t = vec![
                (
                    format!("every ordinary delivery arrives (lost {lost})"),
                    lost == 0.0,
                ),
                (
                    format!(
                        "attacked p99 within 2x of quiet (is {ratio:.2}x: {:.3} ms against {:.3} ms)",
                        get("latency p99 (ms)"),
                        get("quiet latency p99 (ms)")
                    ),
                    ratio <= 2.0,
                ),
            ];
            for what in ["a RSS", "b RSS", "redis used_memory"] {
                let growth = get(&format!("{what} peak growth, 2nd half (%)"));
                t.push((
                    format!(
                        "{what} flat once the limits bite: the second half's peak within 10 % of \
                         the first's (is {growth:+.1} %)"
                    ),
                    growth < 10.0,
                ));
            }
            t
        }
        Scenario::Latency => vec![
            (
                format!(
                    "cross-instance p50 < 1 ms (is {:.3} ms)",
                    get("cross-instance p50 (ms)")
                ),
                get("cross-instance p50 (ms)") < 1.0,
            ),
            (
                format!(
                    "cross-instance p99 < 2 ms (is {:.3} ms)",
                    get("cross-instance p99 (ms)")
                ),
                get("cross-instance p99 (ms)") < 2.0,
            ),
        ],
        Scenario::Room => vec![
            (format!("every delivery arrives (lost {lost})"), lost == 0.0),
            (
                format!("p99 < 100 ms (is {:.3} ms)", get("latency p99 (ms)")),
                get("latency p99 (ms)") < 100.0,
            ),
        ],
        Scenario::Rooms => vec![
            (format!("every delivery arrives (lost {lost})"), lost == 0.0),
            (
                format!("p50 < 1.5 ms (is {:.3} ms)", get("latency p50 (ms)")),
                get("latency p50 (ms)") < 1.5,
            ),
        ],
        Scenario::Burst => vec![
            (
                format!(
                    ">= 300,000 deliveries/s (is {})",
                    fmt_value(get("deliveries/s"), 0)
                ),
                get("deliveries/s") >= 300_000.0,
            ),
            (format!("nothing lost (lost {lost})"), lost == 0.0),
        ],
        Scenario::Idle => {
            let mut t = Vec::new();
            for i in ["a", "b"] {
                let v = get(&format!("{i}: RSS per client (KiB)"));
                t.push((
                    format!("{i}: <= 20 KiB RSS per client (is {v:.1} KiB)"),
                    v <= 20.0,
                ));
            }
            let idle_cpu = get("a: CPU during idle (%)") + get("b: CPU during idle (%)");
            t.push((
                format!("idle CPU ~ 0: a+b < 2% of a core while idle (is {idle_cpu:.2}%)"),
                idle_cpu < 2.0,
            ));
            t
        }
        Scenario::Connect => vec![(
            format!(
                "every connection accepted (failed {})",
                get("clients failed")
            ),
            get("clients failed") == 0.0,
        )],
        Scenario::MaxClients => {
            let held = get("clients on a at end") + get("clients on b at end");
            vec![
                (
                    format!(
                        "{} clients held (held {})",
                        fmt_value(opts.clients as f64, 0),
                        fmt_value(held, 0)
                    ),
                    held >= opts.clients as f64,
                ),
                (
                    format!("every delivery of the stream arrives (lost {lost})"),
                    lost == 0.0,
                ),
            ]
        }
        Scenario::Smoke | Scenario::PresenceIdle => vec![],
        Scenario::PresenceJoin => vec![
            lists_right(get),
            (
                format!(
                    ">= 890 joins/s, 10x the 89 of before (is {})",
                    fmt_value(get("joins/s (connected / storm wall time)"), 0)
                ),
                get("joins/s (connected / storm wall time)") >= 890.0,
            ),
        ],
        Scenario::PresenceChurn if !opts.presence().on => vec![(
            format!(
                "chat latency p99 while churning within 1.5x of quiet (is {:.2}x; at the probes \
                 {:.2}x; the control, presence off)",
                get(presence::LATENCY_RATIO),
                get(presence::PROBE_LATENCY_RATIO)
            ),
            get(presence::LATENCY_RATIO) <= 1.5,
        )],
        Scenario::PresenceChurn => vec![
            lists_right(get),
            (
                format!(
                    "at most one presence frame per client per --presence-diff-ms while churning \
                     (most one client got: {}; allowed {})",
                    fmt_value(get(presence::CHURN_FRAMES_MAX), 0),
                    fmt_value(get(presence::CHURN_FRAMES_ALLOWED), 0)
                ),
                get(presence::CHURN_FRAMES_MAX) <= get(presence::CHURN_FRAMES_ALLOWED),
            ),
            (
                format!(
                    "chat latency p99 while churning within 1.5x of quiet (is {:.2}x; at the \
                     probes {:.2}x)",
                    get(presence::LATENCY_RATIO),
                    get(presence::PROBE_LATENCY_RATIO)
                ),
                get(presence::LATENCY_RATIO) <= 1.5,
            ),
        ],
        Scenario::PresenceCrash => vec![
            lists_right(get),
            (
                format!(
                    "every survivor's count right within the TTL, a third of it and one \
                     --presence-diff-ms (is {:.2} s; allowed {:.2} s)",
                    get(presence::EXPIRY_S),
                    get(presence::EXPIRY_ALLOWED_S)
                ),
                get(presence::EXPIRY_S) <= get(presence::EXPIRY_ALLOWED_S),
            ),
        ],
    }
}

/// The presence scenarios' asserted target, as a line.
fn lists_right(get: &dyn Fn(&str) -> f64) -> (String, bool) {
    (
        format!(
            "every client's final count and list are right ({} of {})",
            fmt_value(get(presence::COMPLETE), 0),
            fmt_value(get(presence::SHOULD), 0)
        ),
        get(presence::COMPLETE) >= get(presence::SHOULD),
    )
}

/// Prints the summary and the targets, and returns the verdict: failure on
/// any lost, duplicated, reordered or misrouted (another room's) delivery
/// (smoke: also on any failed or dropped client, error frame or send
/// error, or nothing sent; the scenarios with member lists: on any client
/// whose final view is not who is in the room; `--presence off`: on any
/// presence frame).
pub fn summarize(opts: &Opts, reports: &[RunReport]) -> ExitCode {
    let names: Vec<(String, usize)> = reports[0]
        .figures
        .iter()
        .map(|f| (f.name.clone(), f.decimals))
        .collect();
    let medians: HashMap<String, f64> = names
        .iter()
        .map(|(n, _)| {
            let vals = reports.iter().filter_map(|r| r.get(n)).collect();
            (n.clone(), median(vals))
        })
        .collect();
    let width = names.iter().map(|(n, _)| n.len()).max().unwrap_or(10);
    println!(
        "\n== summary: {} ({} run{}; median of each figure) ==",
        opts.scenario.name(),
        opts.runs,
        if opts.runs == 1 { "" } else { "s" }
    );
    let mut header = format!("  {:<width$}", "figure");
    for i in 1..=reports.len() {
        header += &format!("  {:>12}", format!("run {i}"));
    }
    header += &format!("  {:>12}", "median");
    println!("{header}");
    println!("  {:-<w$}", "", w = header.len() - 2);
    for (n, dec) in &names {
        let mut line = format!("  {n:<width$}");
        for r in reports {
            line += &format!("  {:>12}", fmt_value(r.get(n).unwrap_or(f64::NAN), *dec));
        }
        line += &format!("  {:>12}", fmt_value(medians[n], *dec));
        println!("{line}");
    }
    let get = |n: &str| medians.get(n).copied().unwrap_or(f64::NAN);
    let t = targets(opts, &get);
    if !t.is_empty() {
        println!("\n  targets (on the medians):");
        for (desc, met) in &t {
            println!(
                "    target met: {:<3}  {desc}",
                if *met { "yes" } else { "no" }
            );
        }
    }

    let mut failures = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let g = |n: &str| r.get(n).unwrap_or(0.0);
        // Counts that must be zero: in every scenario, and in the smoke run
        // (CI's) also every sign of a client in trouble.
        let mut must_be_zero = vec![
            "lost",
            "duplicated",
            "out of order",
            "delivered to another room",
            LEFT_DOWN,
            FAULT_STATUS,
        ];
        if opts.scenario == Scenario::Abuse {
            must_be_zero.extend(["quiet lost", "quiet duplicated", "quiet out of order"]);
        }
        if opts.scenario == Scenario::Smoke {
            must_be_zero.extend([
                "clients failed",
                "clients dropped during run",
                "error frames",
                "send errors",
            ]);
            // A fault run (a partition) expects sends refused while it
            // lasts; receivers are owed only the others.
            if opts.fault_cmd.is_none() {
                must_be_zero.extend([SENDS_REFUSED, SENDS_IN_DOUBT]);
            }
        }
        for what in must_be_zero {
            if g(what) > 0.0 {
                failures.push(format!("run {}: {} {what}", i + 1, fmt_value(g(what), 0)));
            }
        }
        if matches!(opts.scenario, Scenario::Smoke | Scenario::PresenceChurn)
            && g("messages sent") == 0.0
        {
            failures.push(format!("run {}: nothing was sent", i + 1));
        }
        if opts.scenario.keeps_member_lists() && opts.presence().on {
            let (complete, should) = (g(presence::COMPLETE), g(presence::SHOULD));
            if complete < should || should == 0.0 {
                failures.push(format!(
                    "run {}: {} of {} clients' final count and list are not who is in the room",
                    i + 1,
                    fmt_value(should - complete, 0),
                    fmt_value(should, 0)
                ));
            }
        }
        if !opts.presence().on && g(PRESENCE_FRAMES) > 0.0 {
            failures.push(format!(
                "run {}: {} presence frames with --presence off",
                i + 1,
                fmt_value(g(PRESENCE_FRAMES), 0)
            ));
        }
    }
    if failures.is_empty() {
        println!(
            "\nRESULT: PASS ({})",
            match opts.scenario {
                Scenario::PresenceJoin | Scenario::PresenceCrash =>
                    "every client's final count and list are who is in the room",
                Scenario::PresenceChurn if !opts.presence().on =>
                    "no delivery lost, duplicated or reordered; no presence frame (the control)",
                Scenario::PresenceChurn =>
                    "no delivery lost, duplicated or reordered; every final count and list right",
                Scenario::PresenceIdle => "a report: nothing is asserted",
                _ if !opts.presence().on =>
                    "no delivery lost, duplicated or reordered; no presence frame",
                _ => "no delivery lost, duplicated or reordered",
            }
        );
        ExitCode::SUCCESS
    } else {
        println!("\nRESULT: FAIL");
        for f in &failures {
            println!("  {f}");
        }
        ExitCode::FAILURE
    }
}
