//! A churning client (`presence-churn`): present, then away, then back,
//! over and over, so that the room sees `--churn` joins and as many leaves
//! a second while the others listen.
//!
//! Churner `q` of `Q` leaves at `start + q/Q * period + n * period` (see
//! `Layout::churn_period`): over all churners the leaves are spread evenly
//! in time, `Q / period` a second. It comes back `Layout::churn_away`
//! after it left, with the same name, on the same instance: a new
//! connection, with its own `presence` (and history, which it does not
//! check). When the churn stops, every churner away comes back at once and
//! stays (those joins are counted apart from the churn's).
//!
//! A leave is a polite close (the server sees the member go with reason
//! `left`); a join is a new handshake, timed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, CONNECT_TIMEOUT, ClientStats, Shared, now_ns};
use crate::report::Hist;
use crate::worker::error_key;

/// Where the churn is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// Not started: churners stay.
    Waiting,
    /// Started at `start_ns` (`CLOCK_MONOTONIC`, the same in every
    /// worker).
    On { start_ns: u64 },
    /// Over: churners away come back, and all stay.
    Stopped,
}

/// What one worker's churners did.
#[derive(Default)]
pub struct Counters {
    /// Joins while the churn is on, and those once it is over.
    pub joins: AtomicU64,
    pub returns: AtomicU64,
    pub leaves: AtomicU64,
    pub failed: AtomicU64,
    /// Churners with a connection open now.
    pub online: AtomicUsize,
    /// Handshake times of the joins (µs), and the failures by text.
    pub join_us: Mutex<Vec<u32>>,
    pub errors: Mutex<HashMap<String, usize>>,
}

impl Counters {
    pub fn tally(&self) -> ChurnTally {
        ChurnTally {
            joins: self.joins.load(Ordering::SeqCst),
            returns: self.returns.load(Ordering::SeqCst),
            leaves: self.leaves.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            join_times: Hist::of(self.join_us.lock().unwrap().clone()),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

/// What the churners did, over workers.
#[derive(Default, Serialize, Deserialize)]
pub struct ChurnTally {
    pub joins: u64,
    pub returns: u64,
    pub leaves: u64,
    pub failed: u64,
    pub join_times: Hist,
    pub errors: HashMap<String, usize>,
}

impl ChurnTally {
    pub fn merge(&mut self, t: ChurnTally) {
        self.joins += t.joins;
        self.returns += t.returns;
        self.leaves += t.leaves;
        self.failed += t.failed;
        self.join_times.merge(&t.join_times);
        for (e, c) in t.errors {
            *self.errors.entry(e).or_default() += c;
        }
    }
}

/// The tokio instant of a `CLOCK_MONOTONIC` time in ns.
fn instant_of(ns: u64) -> Instant {
    Instant::now() + Duration::from_nanos(ns.saturating_sub(now_ns()))
}

/// Resolves at churner `q`'s next leave while the churn is on; never
/// once it is over.
async fn next_leave(phase: &mut watch::Receiver<Phase>, q: usize, shared: &Shared) {
    let layout = &shared.layout;
    let period = layout.churn_period.as_nanos() as u64;
    let first = period * q as u64 / layout.churners.max(1) as u64;
    loop {
        let now = *phase.borrow_and_update();
        match now {
            Phase::Waiting => {}
            Phase::Stopped => std::future::pending::<()>().await,
            Phase::On { start_ns } => {
                let t = now_ns();
                let base = start_ns + first;
                let n = if t <= base || period == 0 {
                    0
                } else {
                    (t - base).div_ceil(period)
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(instant_of(base + n * period)) => return,
                    changed = phase.changed() => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                        continue;
                    }
                }
            }
        }
        if phase.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Churner `q`, client `k`: connected as every client first, then leaves
/// and comes back on its schedule until the churn stops, then stays until
/// shutdown.
pub async fn churner(k: usize, q: usize, shared: Arc<Shared>, stats: Arc<Mutex<ClientStats>>) {
    let Some(mut ws) = client::first_connect(k, &shared, &stats).await else {
        return;
    };
    let counters = &shared.churned;
    let away = shared.layout.churn_away;
    let mut phase = shared.churn.clone();
    let mut shutdown = shared.shutdown.clone();
    'present: loop {
        counters.online.fetch_add(1, Ordering::SeqCst);
        let leave = {
            let mut phase = phase.clone();
            let shared = shared.clone();
            async move { next_leave(&mut phase, q, &shared).await }
        };
        let ended = client::session(k, ws, &shared, &stats, false, leave).await;
        counters.online.fetch_sub(1, Ordering::SeqCst);
        if let Some(why) = ended {
            client::lost(k, &shared, &stats, why);
            break;
        }
        if *shutdown.borrow() {
            break;
        }
        counters.leaves.fetch_add(1, Ordering::SeqCst);
        // Away: until its time to come back, or at once when the churn is
        // over; a failed join is tried again a period later (a second
        // later once the churn is over).
        let mut back_at = Instant::now() + away;
        loop {
            if *phase.borrow_and_update() != Phase::Stopped {
                tokio::select! {
                    _ = shutdown.wait_for(|v| *v) => break 'present,
                    _ = tokio::time::sleep_until(back_at) => {}
                    _ = phase.changed() => continue,
                }
            }
            // A fresh token at each return (--auth hs256|es256), minted
            // before the join is timed, as the first connection's.
            let token = client::token(&shared, k);
            let t0 = std::time::Instant::now();
            let joined = match &token {
                Ok(token) => {
                    let connecting = client::connect(&shared, k, token.as_deref());
                    tokio::time::timeout(CONNECT_TIMEOUT, connecting).await
                }
                Err(e) => Ok(Err(e.clone())),
            };
            match joined {
                Ok(Ok(new)) => {
                    if *phase.borrow() == Phase::Stopped {
                        counters.returns.fetch_add(1, Ordering::SeqCst);
                    } else {
                        let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        counters.join_us.lock().unwrap().push(us);
                        counters.joins.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut st = stats.lock().unwrap();
                    if let Some(view) = st.view.as_mut() {
                        view.reset();
                    }
                    st.right_since = None;
                    ws = new;
                    continue 'present;
                }
                failed => {
                    let e = match failed {
                        Ok(Err(e)) => e,
                        _ => "timed out (30 s)".to_string(),
                    };
                    counters.failed.fetch_add(1, Ordering::SeqCst);
                    *counters
                        .errors
                        .lock()
                        .unwrap()
                        .entry(error_key(&e))
                        .or_default() += 1;
                    if *phase.borrow() == Phase::Stopped {
                        tokio::select! {
                            _ = shutdown.wait_for(|v| *v) => break 'present,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    } else {
                        back_at = Instant::now() + shared.layout.churn_period;
                    }
                }
            }
        }
    }
    shared.live.fetch_sub(1, Ordering::SeqCst);
}
