//! The processes that hold the clients, seen from the parent, and the
//! protocol between them.
//!
//! One process may hold at most 20,000 open files on this machine, and
//! `max-clients` wants 20,000 sockets and more: the clients are spread
//! over worker processes, this same binary started again as
//! `load --worker <config as JSON>`, each holding at most `--per-worker`
//! of them (8,000 by default) on a small tokio runtime (see `worker.rs`).
//! Which clients a worker holds follows from the options alone (see
//! `layout.rs`).
//!
//! The parent writes one [`Command`] per line, as JSON, on each worker's
//! stdin, and reads exactly one [`Reply`] line from its stdout. It sends a
//! command to every worker before it reads the replies, so the workers act
//! at once, and merges the replies: the sums, the latency histograms
//! ([`Hist`]), each message's first and last receiver. A worker's stderr is
//! this process's: its panic shows above the parent's, and a worker that
//! dies (end of its stdout) fails the run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, Command as ProcessCommand, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::churn::ChurnTally;
use crate::layout::Layout;
use crate::members::Seen;
use crate::options::Opts;
use crate::procs::Proc;
use crate::report::{Hist, RunReport};

/// The longest the parent waits for one reply: a hang guard only, as every
/// wait in a worker has its own bound (a batch of handshakes that all time
/// out at 30 s, 256 at a time, is the slowest honest reply).
const REPLY_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What a worker is told at start (its one argument after `--worker`).
#[derive(Serialize, Deserialize)]
pub struct WorkerConfig {
    pub opts: Opts,
    pub index: usize,
    pub ws: [SocketAddr; 2],
    /// The room name (the base of the room names when there are several).
    pub room: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Command {
    /// Connect this worker's clients below `to` not yet connected → `Batch`.
    Connect { to: usize },
    /// Senders start sending; clients connected from now on are late
    /// joiners → `Done`.
    Start,
    /// Senders stop → `Sent`, once every sender of this worker has.
    Stop,
    /// Each sender's total over all workers → `Count` of the deliveries
    /// this worker's clients should get.
    Expect { sent: Vec<u64> },
    /// → `Count` of the distinct deliveries so far.
    Progress,
    /// → `Present`: which of this worker's clients have a connection open.
    Present,
    /// Who is in the room now (a bit per client, over all workers): the
    /// count every view should reach and what `Views` checks them
    /// against. Each client's presence frames count from zero again, and
    /// the time its count became right from `at_ns` (if right already)
    /// → `Done`.
    Mark { present: Vec<u64>, at_ns: u64 },
    /// → `Views`: this worker's clients' views against the last `Mark`.
    Views,
    /// The churn starts at `at_ns` (`CLOCK_MONOTONIC`); messages sent from
    /// then on are the churn phase's → `Done`.
    ChurnStart { at_ns: u64 },
    /// The churn stops: churners away come back → `Count` of those still
    /// away after 40 s at most.
    ChurnStop,
    /// Close every client (15 s at most) → `Tally`; then the worker exits.
    Finish,
}

#[derive(Serialize, Deserialize)]
pub enum Reply {
    /// The worker is up (its first line).
    Ready,
    Done,
    Batch(Batch),
    /// Per sender, what this worker's senders sent (0 for the others').
    Sent(Vec<u64>),
    Count(u64),
    /// A bit per client (all clients; this worker's set).
    Present(Vec<u64>),
    Views(ViewTally),
    Tally(Box<Tally>),
}

/// The clients' views of their room against who is in it (the last
/// `Mark`), and their presence frames since then, summed over workers.
#[derive(Clone, Copy, Default, Debug, Serialize, Deserialize)]
pub struct ViewTally {
    /// Clients with a connection open now (those checked).
    pub clients: usize,
    /// Of those, with a view: those that got a `presence`, those whose
    /// count is right, those whose count and list (or window) are.
    pub with_snapshot: usize,
    pub count_right: usize,
    pub right: usize,
    /// Names missing from, and listed wrongly in, the views (lists or
    /// windows); strangers listed; views of the wrong kind (a whole list
    /// of a large room, a window of a small one, or not at offset 0).
    pub missing: u64,
    pub extra: u64,
    pub strangers: u64,
    pub wrong_mode: usize,
    /// Clients measured (online, not churners): their presence frames and
    /// bytes since the mark, in all and the most one client got.
    pub measured: usize,
    pub frames: u64,
    pub frames_max: u64,
    pub bytes: u64,
    pub bytes_max: u64,
    /// The last time (ns) a client's count became right, over those whose
    /// count is right (0 if none).
    pub right_since_max: u64,
    /// Presence frames received by every client so far: what changes
    /// while the lists settle.
    pub received: u64,
    /// What the online clients' frames were, over their lives.
    pub seen: Seen,
}

impl ViewTally {
    pub fn merge(&mut self, t: ViewTally) {
        self.clients += t.clients;
        self.with_snapshot += t.with_snapshot;
        self.count_right += t.count_right;
        self.right += t.right;
        self.missing += t.missing;
        self.extra += t.extra;
        self.strangers += t.strangers;
        self.wrong_mode += t.wrong_mode;
        self.measured += t.measured;
        self.frames += t.frames;
        self.frames_max = self.frames_max.max(t.frames_max);
        self.bytes += t.bytes;
        self.bytes_max = self.bytes_max.max(t.bytes_max);
        self.right_since_max = self.right_since_max.max(t.right_since_max);
        self.received += t.received;
        self.seen.merge(&t.seen);
    }
}

/// The figure `--presence off` keeps at zero (see `report.rs`).
pub const PRESENCE_FRAMES: &str = "presence frames received (all clients)";
/// Clients whose last `status` frame said `down` when they were closed.
pub const LEFT_DOWN: &str = "clients left with status down";
/// Sends answered `unavailable` (never sent; receivers are not owed them)
/// and `outcome_unknown`: faults of the run, unless `--fault-cmd` makes
/// some expected.
pub const SENDS_REFUSED: &str = "sends refused (unavailable)";
pub const SENDS_IN_DOUBT: &str = "sends in doubt (outcome_unknown)";
/// `--fault-cmd`'s exit status (when there is one).
pub const FAULT_STATUS: &str = "fault command exit status";

/// The outcome of a step of handshakes.
#[derive(Default, Serialize, Deserialize)]
pub struct Batch {
    pub ok: usize,
    pub failed: usize,
    /// Failed with HTTP 503: the instance refused (`--max-clients`, or no
    /// thread to be had).
    pub refused: usize,
    /// Handshake times (µs) of those that connected.
    pub times: Hist,
    /// Failures by their text without digits (ports, ids).
    pub errors: HashMap<String, usize>,
    pub wall: Duration,
    /// With `--auth hs256|es256`: tokens minted, and the µs it took in
    /// all (before each handshake's timer, so in `wall` but not `times`).
    pub minted: u64,
    pub mint_us: u64,
}

impl Batch {
    /// The step's wall time (named after `what`) and handshakes a second.
    pub fn report_rate(&self, what: &str, rep: &mut RunReport) {
        rep.add(format!("{what} wall time (s)"), self.wall.as_secs_f64(), 2);
        rep.add(
            "connects/s",
            self.ok as f64 / self.wall.as_secs_f64().max(1e-9),
            0,
        );
    }

    /// How long the handshakes took.
    pub fn report_times(&self, rep: &mut RunReport) {
        let ms = |us: f64| us / 1000.0;
        rep.add("connect p50 (ms)", ms(self.times.pct(0.5)), 2);
        rep.add("connect p99 (ms)", ms(self.times.pct(0.99)), 2);
        rep.add(
            "connect max (ms)",
            ms(self.times.max().unwrap_or(0) as f64),
            2,
        );
        if self.minted > 0 {
            rep.add(
                "token mint mean (µs)",
                self.mint_us as f64 / self.minted as f64,
                1,
            );
        }
    }

    pub fn merge(&mut self, b: Batch) {
        self.ok += b.ok;
        self.failed += b.failed;
        self.refused += b.refused;
        self.times.merge(&b.times);
        for (e, c) in b.errors {
            *self.errors.entry(e).or_default() += c;
        }
        self.wall += b.wall;
        self.minted += b.minted;
        self.mint_us += b.mint_us;
    }
}

/// What a worker's clients saw, summed over them, once they are closed.
#[derive(Default, Serialize, Deserialize)]
pub struct Tally {
    pub expected: u64,
    pub unique: u64,
    pub lost: u64,
    pub dup: u64,
    pub ooo: u64,
    pub errors: u64,
    pub foreign: u64,
    pub misrouted: u64,
    /// Clients whose connection ended before they were closed.
    pub dropped: usize,
    /// Clients still connected at the end, per instance.
    pub per_inst: [usize; 2],
    /// Clients that heard none of their room's senders.
    pub silent: usize,
    pub lat_same: Hist,
    pub lat_cross: Hist,
    /// Why clients ended, by the text without digits.
    pub ended: HashMap<String, usize>,
    pub send_errors: u64,
    /// Sends refused `unavailable`, and answered `outcome_unknown`.
    pub refused: u64,
    pub in_doubt: u64,
    /// Clients that did not close within 15 s.
    pub unclosed: usize,
    pub first_error: Option<String>,
    /// Per sender: (seq, sent, first receiver, last receiver), in ns, for
    /// the messages this worker's clients got.
    pub per_message: Vec<Vec<(u64, u64, u64, u64)>>,
    /// Presence frames (and bytes) the clients received over the run, in
    /// all and the most one client got.
    pub presence_frames: u64,
    pub presence_bytes: u64,
    pub presence_frames_max: u64,
    pub presence_bytes_max: u64,
    /// Latencies of the messages sent before the churn, and during it
    /// (presence-churn).
    pub lat_quiet: Hist,
    pub lat_churn: Hist,
    /// The same, for the latency probes alone (presence-churn).
    pub probe_lat_quiet: Hist,
    pub probe_lat_churn: Hist,
    pub churn: ChurnTally,
    /// Per instance: clients that got a `status` `down`, and clients whose
    /// last `status` was `down` when they were closed.
    pub saw_down: [usize; 2],
    pub left_down: [usize; 2],
}

impl Tally {
    /// Where the clients were at the end: dropped during the run, or still
    /// on each instance.
    pub fn report_clients(&self, rep: &mut RunReport) {
        rep.add("clients dropped during run", self.dropped as f64, 0);
        rep.add("clients on a at end", self.per_inst[0] as f64, 0);
        rep.add("clients on b at end", self.per_inst[1] as f64, 0);
    }

    fn merge(&mut self, t: Tally) {
        self.expected += t.expected;
        self.unique += t.unique;
        self.lost += t.lost;
        self.dup += t.dup;
        self.ooo += t.ooo;
        self.errors += t.errors;
        self.foreign += t.foreign;
        self.misrouted += t.misrouted;
        self.dropped += t.dropped;
        self.per_inst[0] += t.per_inst[0];
        self.per_inst[1] += t.per_inst[1];
        self.silent += t.silent;
        self.lat_same.merge(&t.lat_same);
        self.lat_cross.merge(&t.lat_cross);
        for (e, c) in t.ended {
            *self.ended.entry(e).or_default() += c;
        }
        self.send_errors += t.send_errors;
        self.refused += t.refused;
        self.in_doubt += t.in_doubt;
        self.unclosed += t.unclosed;
        if self.first_error.is_none() {
            self.first_error = t.first_error;
        }
        if self.per_message.len() < t.per_message.len() {
            self.per_message.resize(t.per_message.len(), Vec::new());
        }
        for (mine, theirs) in self.per_message.iter_mut().zip(t.per_message) {
            mine.extend(theirs);
        }
        self.presence_frames += t.presence_frames;
        self.presence_bytes += t.presence_bytes;
        self.presence_frames_max = self.presence_frames_max.max(t.presence_frames_max);
        self.presence_bytes_max = self.presence_bytes_max.max(t.presence_bytes_max);
        self.lat_quiet.merge(&t.lat_quiet);
        self.lat_churn.merge(&t.lat_churn);
        self.churn.merge(t.churn);
        for i in 0..2 {
            self.saw_down[i] += t.saw_down[i];
            self.left_down[i] += t.left_down[i];
        }
    }

    /// The `status` frames: who was told sending stopped, and who was
    /// never told it works again.
    pub fn report_status(&self, rep: &mut RunReport) {
        rep.add(
            "a: clients that saw status down",
            self.saw_down[0] as f64,
            0,
        );
        rep.add(
            "b: clients that saw status down",
            self.saw_down[1] as f64,
            0,
        );
        rep.add(LEFT_DOWN, (self.left_down[0] + self.left_down[1]) as f64, 0);
    }

    /// The presence frames the clients got over the run: what `--presence
    /// off` must keep at zero.
    pub fn report_presence(&self, rep: &mut RunReport) {
        let clients = (self.per_inst[0] + self.per_inst[1] + self.dropped).max(1) as f64;
        rep.add(PRESENCE_FRAMES, self.presence_frames as f64, 0);
        rep.add(
            "presence frames per client (mean)",
            self.presence_frames as f64 / clients,
            1,
        );
        rep.add(
            "presence frames per client (max)",
            self.presence_frames_max as f64,
            0,
        );
        rep.add(
            "presence KiB per client (mean)",
            self.presence_bytes as f64 / clients / 1024.0,
            1,
        );
        rep.add(
            "presence KiB per client (max)",
            self.presence_bytes_max as f64 / 1024.0,
            1,
        );
    }

    /// (first receiver, last receiver) latencies in µs of every message
    /// that reached at least one receiver, over all workers.
    pub fn first_and_last(&self) -> (Hist, Hist) {
        let us = |a: u64, b: u64| (a.saturating_sub(b) / 1000).min(u32::MAX as u64) as u32;
        let (mut first, mut last) = (Vec::new(), Vec::new());
        for seen in &self.per_message {
            let mut by_seq: HashMap<u64, (u64, u64, u64)> = HashMap::new();
            for &(seq, sent, f, l) in seen {
                let e = by_seq.entry(seq).or_insert((sent, f, l));
                e.1 = e.1.min(f);
                e.2 = e.2.max(l);
            }
            for (sent, f, l) in by_seq.into_values() {
                first.push(us(f, sent));
                last.push(us(l, sent));
            }
        }
        (Hist::of(first), Hist::of(last))
    }
}

/// Fields drop in order: the worker's stdin closes (its end) before its
/// process is waited for.
struct Worker {
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    proc: Proc,
}

/// The worker processes of one run; they are killed on drop.
pub struct Pool {
    workers: Vec<Worker>,
    /// The latency probes' worker, if there is one.
    probe_worker: Option<usize>,
}

impl Pool {
    /// Starts `opts.workers()` workers and waits until each is up.
    pub fn spawn(opts: &Opts, ws: [SocketAddr; 2], room: &str) -> Pool {
        let exe = std::env::current_exe().expect("the load generator's own path");
        let mut workers = Vec::new();
        let layout = Layout::new(opts);
        for index in 0..layout.processes() {
            let config = WorkerConfig {
                opts: opts.clone(),
                index,
                ws,
                room: room.to_string(),
            };
            let config = serde_json::to_string(&config).expect("worker config as JSON");
            let mut cmd = ProcessCommand::new(&exe);
            cmd.arg("--worker")
                .arg(config)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut proc = Proc::spawn(&format!("worker {index}"), &mut cmd);
            let stdin = proc.child.stdin.take().expect("piped stdin");
            let stdout = proc.child.stdout.take().expect("piped stdout");
            let (tx, replies) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })
                .expect("cannot start a thread to read a worker");
            workers.push(Worker {
                stdin,
                replies,
                proc,
            });
        }
        let mut pool = Pool {
            workers,
            probe_worker: layout.probe_worker(),
        };
        for (i, w) in pool.workers.iter_mut().enumerate() {
            match receive(i, w) {
                Reply::Ready => {}
                _ => panic!("worker {i}: unexpected first reply"),
            }
        }
        pool
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.proc.pid()).collect()
    }

    fn call(&mut self, cmd: &Command) -> Vec<Reply> {
        let line = serde_json::to_string(cmd).expect("command as JSON");
        for (i, w) in self.workers.iter_mut().enumerate() {
            writeln!(w.stdin, "{line}")
                .and_then(|()| w.stdin.flush())
                .unwrap_or_else(|e| panic!("worker {i}: cannot send {cmd:?}: {e}"));
        }
        self.workers
            .iter_mut()
            .enumerate()
            .map(|(i, w)| receive(i, w))
            .collect()
    }

    /// Connects every client below `to` not connected yet.
    pub fn connect(&mut self, to: usize) -> Batch {
        let t0 = Instant::now();
        let mut all = Batch::default();
        for reply in self.call(&Command::Connect { to }) {
            let Reply::Batch(b) = reply else {
                panic!("a worker did not answer Connect with a Batch")
            };
            all.merge(b);
        }
        // The workers connect at once: the step took as long as it took
        // here.
        all.wall = t0.elapsed();
        all
    }

    pub fn start(&mut self) {
        self.call(&Command::Start);
    }

    /// Stops the senders; what each sent, over all workers.
    pub fn stop(&mut self) -> Vec<u64> {
        let mut sent: Vec<u64> = Vec::new();
        for reply in self.call(&Command::Stop) {
            let Reply::Sent(s) = reply else {
                panic!("a worker did not answer Stop with Sent")
            };
            sent.resize(sent.len().max(s.len()), 0);
            for (total, n) in sent.iter_mut().zip(s) {
                *total += n;
            }
        }
        sent
    }

    fn count(&mut self, cmd: &Command) -> u64 {
        self.call(cmd)
            .into_iter()
            .map(|r| match r {
                Reply::Count(n) => n,
                _ => panic!("a worker did not answer {cmd:?} with a Count"),
            })
            .sum()
    }

    /// Deliveries expected over all workers, given what each sender sent.
    pub fn expect(&mut self, sent: &[u64]) -> u64 {
        self.count(&Command::Expect {
            sent: sent.to_vec(),
        })
    }

    /// Distinct deliveries so far, over all workers.
    pub fn progress(&mut self) -> u64 {
        self.count(&Command::Progress)
    }

    /// Which clients have a connection open, over all workers (a bit
    /// per client).
    pub fn present(&mut self) -> Vec<u64> {
        let mut all: Vec<u64> = Vec::new();
        for reply in self.call(&Command::Present) {
            let Reply::Present(bits) = reply else {
                panic!("a worker did not answer Present with Present")
            };
            all.resize(all.len().max(bits.len()), 0);
            for (a, b) in all.iter_mut().zip(bits) {
                *a |= b;
            }
        }
        all
    }

    /// Tells every worker who is in the room (see `Command::Mark`).
    pub fn mark(&mut self, present: &[u64], at_ns: u64) {
        self.call(&Command::Mark {
            present: present.to_vec(),
            at_ns,
        });
    }

    /// The views against the last mark, over all workers.
    pub fn views(&mut self) -> ViewTally {
        let mut all = ViewTally::default();
        for reply in self.call(&Command::Views) {
            let Reply::Views(t) = reply else {
                panic!("a worker did not answer Views with Views")
            };
            all.merge(t);
        }
        all
    }

    pub fn churn_start(&mut self, at_ns: u64) {
        self.call(&Command::ChurnStart { at_ns });
    }

    /// Stops the churn; churners still away after 40 s.
    pub fn churn_stop(&mut self) -> u64 {
        self.count(&Command::ChurnStop)
    }

    /// Closes every client, noting in `rep` those that would not close;
    /// what they saw, over all workers.
    pub fn finish_into(&mut self, rep: &mut RunReport) -> Tally {
        let t = self.finish();
        if t.unclosed > 0 {
            rep.notes
                .push(format!("{} clients did not close within 15 s", t.unclosed));
        }
        t
    }

    /// Closes every client; what they saw, over all workers.
    pub fn finish(&mut self) -> Tally {
        let mut all = Tally::default();
        for (index, reply) in self.call(&Command::Finish).into_iter().enumerate() {
            let Reply::Tally(t) = reply else {
                panic!("a worker did not answer Finish with a Tally")
            };
            if Some(index) == self.probe_worker {
                all.probe_lat_quiet.merge(&t.lat_quiet);
                all.probe_lat_churn.merge(&t.lat_churn);
            }
            all.merge(*t);
        }
        all
    }
}

fn receive(i: usize, w: &mut Worker) -> Reply {
    let line = match w.replies.recv_timeout(REPLY_TIMEOUT) {
        Ok(line) => line,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = w.proc.child.wait().ok();
            panic!("worker {i} exited ({status:?}); its stderr is above")
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("worker {i} did not answer in {} s", REPLY_TIMEOUT.as_secs())
        }
    };
    serde_json::from_str(&line).unwrap_or_else(|e| {
        let start: String = line.chars().take(200).collect();
        panic!("worker {i}: unreadable reply ({e}): {start}")
    })
}
