//! A worker process (`load --worker <config>`): holds its share of the
//! clients on a small tokio runtime and answers the parent's commands (see
//! `pool.rs` for the protocol) until `Finish`, or until its stdin closes.
//!
//! Its runtime has two threads when it is the only worker, as the single
//! process load generator had, and one when there are several, so the load
//! generator's thread count stays small beside the servers'.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pubsub_chat::auth::{KeySources, SigningKey};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::churn::{self, Phase};
use crate::client::{self, ClientStats, PerMessage, Shared};

/// How long the senders' last sends may take to be answered once they
/// stop: the server's `--publish-deadline-ms` (10 s by default), and a
/// margin.
const ANSWER_DEADLINE: Duration = Duration::from_secs(11);
use crate::layout::Layout;
use crate::members::Expected;
use crate::options::Auth;
use crate::pool::{Batch, Command, Reply, Tally, ViewTally, WorkerConfig};
use crate::report::Hist;

/// A connect failure's text without its digits (ports, ids, counts), so
/// that like failures group together.
pub fn error_key(e: &str) -> String {
    e.chars()
        .filter(|c| !c.is_ascii_digit())
        .take(160)
        .collect()
}

pub fn main(config: &str) -> ExitCode {
    let config: WorkerConfig = match serde_json::from_str(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("load worker: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Each client is a socket.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let opts = &config.opts;
    let layout = Layout::new(opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if layout.workers == 1 { 2 } else { 1 })
        .max_blocking_threads(2)
        .thread_name(format!("load-worker-{}", config.index))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (churn_tx, churn_rx) = watch::channel(Phase::Waiting);
    let shared = Arc::new(Shared {
        ws: config.ws,
        rooms: (0..layout.rooms)
            .map(|r| layout.room_name(&config.room, r))
            .collect(),
        layout,
        conn_sem: Semaphore::new(opts.concurrency.div_ceil(layout.workers).max(1)),
        conn_tx,
        shutdown: shutdown_rx,
        start: start_rx,
        stop: stop_rx,
        rate_per_sender: opts.rate.map(|r| r / layout.senders.max(1) as f64),
        window: opts.window,
        sending: AtomicBool::new(false),
        sent: (0..layout.senders).map(|_| AtomicU64::new(0)).collect(),
        answered: (0..layout.senders).map(|_| AtomicU64::new(0)).collect(),
        refused: (0..layout.senders).map(|_| AtomicU64::new(0)).collect(),
        in_doubt: (0..layout.senders).map(|_| AtomicU64::new(0)).collect(),
        unique: AtomicU64::new(0),
        total: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        live: AtomicUsize::new(0),
        active_senders: AtomicUsize::new(0),
        per_message: (0..layout.senders).map(|_| PerMessage::new()).collect(),
        target: AtomicU64::new(u64::MAX),
        split_ns: AtomicU64::new(u64::MAX),
        churn: churn_rx,
        churned: churn::Counters::default(),
        signing: opts.keys.as_ref().map(|keys| match opts.auth {
            Auth::Es256 => SigningKey::PrivateKeyFile(keys.sign.clone()),
            _ => SigningKey::Secret(KeySources {
                secret_file: Some(keys.sign.clone()),
                ..KeySources::default()
            }),
        }),
        mint_ns: AtomicU64::new(0),
        minted: AtomicU64::new(0),
    });
    // This worker's clients, in order, and how many of them have been
    // started.
    let mine: Vec<(usize, Arc<Mutex<ClientStats>>)> = (0..layout.clients)
        .filter(|&k| layout.worker(k) == config.index)
        .map(|k| (k, Arc::new(Mutex::new(ClientStats::new(k, &layout)))))
        .collect();
    let mut started = 0;
    let mut sent: Vec<u64> = vec![0; layout.senders];
    // Every client in name order (the room's list), and who should be in
    // the room: for the views' check.
    let by_name = if layout.member_lists {
        layout.by_name()
    } else {
        Vec::new()
    };
    let mut expected: Option<Expected> = None;

    let mut out = std::io::stdout().lock();
    let mut reply = |r: Reply| {
        let line = serde_json::to_string(&r).expect("reply as JSON");
        // The parent gone is the end of this worker.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(1);
        }
    };
    reply(Reply::Ready);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let cmd: Command = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("load worker: bad command {line:?}: {e}"));
        match cmd {
            Command::Connect { to } => {
                let from = started;
                while started < mine.len() && mine[started].0 < to {
                    started += 1;
                }
                let batch = rt.block_on(async {
                    let t0 = Instant::now();
                    for (k, stats) in &mine[from..started] {
                        match layout.churner(*k) {
                            Some(q) => {
                                tokio::spawn(churn::churner(*k, q, shared.clone(), stats.clone()))
                            }
                            None => tokio::spawn(client::client(*k, shared.clone(), stats.clone())),
                        };
                    }
                    let mut b = Batch::default();
                    let mut times = Vec::new();
                    for _ in from..started {
                        match conn_rx.recv().await.expect("clients report") {
                            Ok(us) => {
                                b.ok += 1;
                                times.push(us.min(u32::MAX as u64) as u32);
                            }
                            Err(e) => {
                                b.failed += 1;
                                if e.contains("HTTP error: 503") {
                                    b.refused += 1;
                                }
                                *b.errors.entry(error_key(&e)).or_default() += 1;
                            }
                        }
                    }
                    b.times = Hist::of(times);
                    b.wall = t0.elapsed();
                    b.mint_us = shared.mint_ns.swap(0, Ordering::SeqCst) / 1000;
                    b.minted = shared.minted.swap(0, Ordering::SeqCst);
                    b
                });
                reply(Reply::Batch(batch));
            }
            Command::Start => {
                shared.sending.store(true, Ordering::SeqCst);
                let _ = start_tx.send(true);
                reply(Reply::Done);
            }
            Command::Stop => {
                let _ = stop_tx.send(true);
                rt.block_on(async {
                    while shared.active_senders.load(Ordering::SeqCst) > 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    // Every send answered (its own copy, or a refusal),
                    // so that a refusal still on its way is not counted
                    // as owed: at most the server's publish deadline.
                    let deadline = tokio::time::Instant::now() + ANSWER_DEADLINE;
                    while shared.unanswered() > 0 && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                });
                // What receivers are owed: not a send refused `unavailable`
                // (it never reached Redis), nor one answered
                // `outcome_unknown` (it may have; if it did, it arrives,
                // and can hide at most as many losses: the report shows
                // how many there were).
                reply(Reply::Sent(
                    (0..shared.sent.len())
                        .map(|j| {
                            let load = |counters: &[AtomicU64]| counters[j].load(Ordering::SeqCst);
                            load(&shared.sent)
                                .saturating_sub(load(&shared.refused))
                                .saturating_sub(load(&shared.in_doubt))
                        })
                        .collect(),
                ));
            }
            Command::Expect { sent: all } => {
                sent = all;
                let expected = mine
                    .iter()
                    .map(|(_, s)| s.lock().unwrap().expected(&sent))
                    .sum();
                reply(Reply::Count(expected));
            }
            Command::Progress => reply(Reply::Count(shared.unique.load(Ordering::Relaxed))),
            Command::Present => {
                let mut bits = vec![0u64; layout.clients.div_ceil(64)];
                for (k, s) in &mine {
                    if s.lock().unwrap().online {
                        bits[k / 64] |= 1 << (k % 64);
                    }
                }
                reply(Reply::Present(bits));
            }
            Command::Mark { present, at_ns } => {
                let e = Expected::new(present, &by_name, layout.presence_window);
                shared.target.store(e.count as u64, Ordering::SeqCst);
                for (_, s) in &mine {
                    let mut st = s.lock().unwrap();
                    st.mark = (st.presence_frames, st.presence_bytes);
                    let right = st.view.as_ref().and_then(|v| v.count()) == Some(e.count);
                    st.right_since = right.then_some(at_ns);
                }
                expected = Some(e);
                reply(Reply::Done);
            }
            Command::Views => reply(Reply::Views(views(&layout, &mine, expected.as_ref()))),
            Command::ChurnStart { at_ns } => {
                shared.split_ns.store(at_ns, Ordering::SeqCst);
                let _ = churn_tx.send(Phase::On { start_ns: at_ns });
                reply(Reply::Done);
            }
            Command::ChurnStop => {
                let _ = churn_tx.send(Phase::Stopped);
                // Those that ever connected and were not cut by the server
                // come back (a failed join is tried again every second).
                let churners = mine
                    .iter()
                    .filter(|(k, s)| {
                        let st = s.lock().unwrap();
                        layout.churner(*k).is_some() && st.connected && st.ended.is_none()
                    })
                    .count();
                let deadline = Instant::now() + Duration::from_secs(40);
                let online = || shared.churned.online.load(Ordering::SeqCst);
                while online() < churners && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                reply(Reply::Count(churners.saturating_sub(online()) as u64));
            }
            Command::Finish => {
                let _ = shutdown_tx.send(true);
                let deadline = Instant::now() + Duration::from_secs(15);
                while shared.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut t = tally(&shared, &mine, &sent);
                t.unclosed = shared.live.load(Ordering::SeqCst);
                reply(Reply::Tally(Box::new(t)));
                break;
            }
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    ExitCode::SUCCESS
}

/// This worker's clients' views against `expected` (who is in the room),
/// and their presence frames since the last mark.
fn views(
    layout: &Layout,
    mine: &[(usize, Arc<Mutex<ClientStats>>)],
    expected: Option<&Expected>,
) -> ViewTally {
    let mut t = ViewTally::default();
    for (k, s) in mine {
        let st = s.lock().unwrap();
        t.received += st.presence_frames;
        if !st.online {
            continue;
        }
        t.clients += 1;
        if layout.churner(*k).is_none() {
            let frames = st.presence_frames - st.mark.0;
            let bytes = st.presence_bytes - st.mark.1;
            t.measured += 1;
            t.frames += frames;
            t.frames_max = t.frames_max.max(frames);
            t.bytes += bytes;
            t.bytes_max = t.bytes_max.max(bytes);
        }
        let (Some(view), Some(e)) = (st.view.as_ref(), expected) else {
            continue;
        };
        t.seen.merge(&view.seen);
        t.with_snapshot += usize::from(view.has_snapshot());
        let c = view.check(e);
        t.count_right += usize::from(c.count_right);
        t.right += usize::from(c.right);
        t.missing += c.missing as u64;
        t.extra += c.extra as u64;
        t.strangers += c.strangers as u64;
        t.wrong_mode += usize::from(c.wrong_mode);
        if c.count_right
            && let Some(at) = st.right_since
        {
            t.right_since_max = t.right_since_max.max(at);
        }
    }
    t
}

/// Sums what this worker's clients saw.
fn tally(shared: &Shared, mine: &[(usize, Arc<Mutex<ClientStats>>)], sent: &[u64]) -> Tally {
    let mut t = Tally::default();
    let (mut lat_same, mut lat_cross) = (Vec::new(), Vec::new());
    let (mut lat_quiet, mut lat_churn) = (Vec::new(), Vec::new());
    let mut ended: HashMap<String, usize> = HashMap::new();
    for (_, s) in mine {
        let mut st = s.lock().unwrap();
        if !st.connected {
            continue;
        }
        let exp = st.expected(sent);
        let u = st.unique();
        t.expected += exp;
        t.lost += exp.saturating_sub(u);
        t.unique += u;
        t.dup += st.dup;
        t.ooo += st.ooo;
        t.errors += st.errors;
        t.foreign += st.foreign;
        t.misrouted += st.misrouted;
        if st.silent() {
            t.silent += 1;
        }
        if let Some(why) = &st.ended {
            t.dropped += 1;
            *ended.entry(error_key(why)).or_default() += 1;
        } else {
            t.per_inst[st.inst] += 1;
        }
        lat_same.append(&mut st.lat_same);
        lat_cross.append(&mut st.lat_cross);
        lat_quiet.append(&mut st.lat_quiet);
        lat_churn.append(&mut st.lat_churn);
        t.presence_frames += st.presence_frames;
        t.presence_bytes += st.presence_bytes;
        t.presence_frames_max = t.presence_frames_max.max(st.presence_frames);
        t.presence_bytes_max = t.presence_bytes_max.max(st.presence_bytes);
        if st.status_down > 0 {
            t.saw_down[st.inst] += 1;
        }
        if st.down_now {
            t.left_down[st.inst] += 1;
        }
    }
    t.lat_same = Hist::of(lat_same);
    t.lat_cross = Hist::of(lat_cross);
    t.lat_quiet = Hist::of(lat_quiet);
    t.lat_churn = Hist::of(lat_churn);
    t.churn = shared.churned.tally();
    t.ended = ended;
    t.send_errors = shared.send_errors.load(Ordering::SeqCst);
    let sum = |counters: &[AtomicU64]| counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    t.refused = sum(&shared.refused);
    t.in_doubt = sum(&shared.in_doubt);
    t.first_error = shared.first_error.lock().unwrap().clone();
    t.per_message = shared
        .per_message
        .iter()
        .zip(sent)
        .map(|(pm, &s)| pm.seen(s))
        .collect();
    t
}
