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

use tokio::sync::{Semaphore, mpsc, watch};

use crate::client::{self, ClientStats, PerMessage, Shared};
use crate::layout::Layout;
use crate::pool::{Batch, Command, ListTally, Reply, Tally, WorkerConfig};
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
        unique: AtomicU64::new(0),
        total: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        live: AtomicUsize::new(0),
        active_senders: AtomicUsize::new(0),
        per_message: (0..layout.senders).map(|_| PerMessage::new()).collect(),
    });
    // This worker's clients, in order, and how many of them have been
    // started.
    let mine: Vec<(usize, Arc<Mutex<ClientStats>>)> = (0..layout.clients)
        .filter(|&k| layout.worker(k) == config.index)
        .map(|k| (k, Arc::new(Mutex::new(ClientStats::new(k, &layout)))))
        .collect();
    let mut started = 0;
    let mut sent: Vec<u64> = vec![0; layout.senders];

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
                        tokio::spawn(client::client(*k, shared.clone(), stats.clone()));
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
                });
                reply(Reply::Sent(
                    shared
                        .sent
                        .iter()
                        .map(|s| s.load(Ordering::SeqCst))
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
            Command::Lists => reply(Reply::Lists(lists(&layout, &mine))),
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

/// The member lists of this worker's clients that are connected now.
fn lists(layout: &Layout, mine: &[(usize, Arc<Mutex<ClientStats>>)]) -> ListTally {
    let mut t = ListTally::default();
    for (_, s) in mine {
        let st = s.lock().unwrap();
        let Some(list) = st.members.as_ref() else {
            continue;
        };
        if !st.connected || st.ended.is_some() {
            continue;
        }
        t.clients += 1;
        if list.snapshots > 0 {
            t.with_snapshot += 1;
        }
        if list.complete(layout.clients) {
            t.complete += 1;
        }
        t.listed += (list.count + list.strangers.len()) as u64;
        t.missing += (layout.clients - list.count) as u64;
        t.strangers += list.strangers.len() as u64;
        t.snapshots += list.snapshots;
        t.cut_short += list.cut_short;
        t.joins += list.joins;
        t.leaves += list.leaves;
        t.expired += list.expired;
        t.no_ops += list.no_ops;
    }
    t
}

/// Sums what this worker's clients saw.
fn tally(shared: &Shared, mine: &[(usize, Arc<Mutex<ClientStats>>)], sent: &[u64]) -> Tally {
    let mut t = Tally::default();
    let (mut lat_same, mut lat_cross) = (Vec::new(), Vec::new());
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
    }
    t.lat_same = Hist::of(lat_same);
    t.lat_cross = Hist::of(lat_cross);
    t.ended = ended;
    t.send_errors = shared.send_errors.load(Ordering::SeqCst);
    t.first_error = shared.first_error.lock().unwrap().clone();
    t.per_message = shared
        .per_message
        .iter()
        .zip(sent)
        .map(|(pm, &s)| pm.seen(s))
        .collect();
    t
}
