//! Where each client goes: its room, its instance, the worker process that
//! holds it, and whether it sends. A pure function of the options, so the
//! parent and every worker agree without telling each other.
//!
//! Client `k` is in room `k mod rooms`; sender `j` is client `j`. With one
//! room the clients alternate between the instances (`k mod 2`); with
//! several, a room's clients are all on one instance and the rooms
//! alternate (`room mod 2`), so that every delivery is same-instance;
//! except in `presence-idle`, where every room has members on both
//! instances: client `k` is on `(k div rooms) mod 2`.
//! Worker `w` of `W` holds the clients with `k mod W == w`.
//!
//! In `presence-churn`, the last [`PROBES`] clients that neither send nor
//! churn are held by a process of their own (worker `W`): they measure
//! chat latency as the server gives it, apart from the queue of the
//! processes that read for thousands of clients at once (every presence
//! tick, each of them has a frame to read for every client it holds).
//!
//! In `presence-churn`, churner `q` of `Q` is client
//! `base + q * stride` (or the next one, so that churners alternate
//! between the instances), `base` the first client past the senders: the
//! churners are spread over the room's names, hence over its name order
//! too, as real comings and goings are.

use std::time::Duration;

use crate::options::{Opts, Scenario};

/// How long a churner stays away: longer than two `presence_diff`
/// intervals at the default 500 ms, so that most of its leaves and joins
/// are seen as such and do not cancel out within one interval.
const CHURN_AWAY: Duration = Duration::from_secs(1);

/// A churner's cycle: away `CHURN_AWAY`, present the rest. Present three
/// times as long as away, so that a join slow to be answered (seconds, on
/// a busy machine) does not make it miss its next leave, and the churn
/// keeps its rate.
const CHURN_PERIOD: Duration = Duration::from_secs(4);

/// Clients in the latency probes' own process (presence-churn).
pub const PROBES: usize = 16;

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub clients: usize,
    pub senders: usize,
    pub rooms: usize,
    pub workers: usize,
    /// Each room's clients alternate between the instances (presence-idle).
    pub spread: bool,
    /// Each client keeps its room's member list from its presence frames
    /// (presence-join, -churn, -crash).
    pub member_lists: bool,
    /// The instances' `--presence-full-list-max`: the size of a client's
    /// window, and the largest room sent whole.
    pub presence_window: usize,
    /// Churning clients (presence-churn; else 0).
    pub churners: usize,
    /// Clients between one churner and the next (at least 2).
    churn_stride: usize,
    /// Each churner's cycle: a leave, `churn_away` away, a join, the rest
    /// of the period present. Churner `q`'s leaves are `q / churners` of a
    /// period after the churn's start, and every period after that: leaves
    /// (and joins) are spread evenly, `churners / churn_period` a second.
    pub churn_period: Duration,
    pub churn_away: Duration,
    /// Latency probes (presence-churn; else 0): the clients from
    /// `probe_from` on that neither send nor churn.
    pub probes: usize,
    probe_from: usize,
}

impl Layout {
    pub fn new(opts: &Opts) -> Self {
        let senders = opts.senders.min(opts.clients);
        // Churners enough for --churn leaves (and joins) a second, each
        // leaving once a CHURN_PERIOD; never more than half the clients
        // past the senders (then each cycles faster, away a quarter of its
        // period all the same).
        let base = senders.max(1);
        let room = opts.clients.saturating_sub(base + 1) / 2;
        let (churners, churn_period) =
            if opts.scenario == Scenario::PresenceChurn && opts.churn > 0.0 {
                let wanted = (opts.churn * CHURN_PERIOD.as_secs_f64()).round() as usize;
                let q = wanted.max(1).min(room);
                (q, Duration::from_secs_f64(q as f64 / opts.churn))
            } else {
                (0, Duration::ZERO)
            };
        let churn_away =
            churn_period.mul_f64(CHURN_AWAY.as_secs_f64() / CHURN_PERIOD.as_secs_f64());
        let mut layout = Layout {
            clients: opts.clients,
            senders,
            rooms: opts.rooms.max(1),
            workers: opts.workers(),
            spread: opts.scenario == Scenario::PresenceIdle,
            member_lists: opts.scenario.keeps_member_lists(),
            presence_window: opts.presence().full_list_max,
            churners,
            churn_stride: opts
                .clients
                .saturating_sub(base + 1)
                .checked_div(churners)
                .unwrap_or(0),
            churn_period,
            churn_away,
            probes: 0,
            probe_from: opts.clients,
        };
        if opts.scenario == Scenario::PresenceChurn {
            while layout.probes < PROBES && layout.probe_from > base + 1 {
                layout.probe_from -= 1;
                if layout.churner(layout.probe_from).is_none() {
                    layout.probes += 1;
                }
            }
        }
        layout
    }

    /// Whether client `k` is a latency probe.
    pub fn is_probe(&self, k: usize) -> bool {
        self.probes > 0 && k >= self.probe_from && !self.is_sender(k) && self.churner(k).is_none()
    }

    /// Worker processes: `workers`, and the probes' own.
    pub fn processes(&self) -> usize {
        self.workers + usize::from(self.probes > 0)
    }

    /// The probes' process, if there is one.
    pub fn probe_worker(&self) -> Option<usize> {
        (self.probes > 0).then_some(self.workers)
    }

    /// The first churner's client: past every sender (and client 0).
    fn churn_base(&self) -> usize {
        self.senders.max(1)
    }

    /// Churner `q`'s client.
    pub fn churner_client(&self, q: usize) -> usize {
        let k = self.churn_base() + q * self.churn_stride;
        // Churners alternate between a and b (k mod 2), whatever the
        // stride's parity.
        if k % 2 == q % 2 { k } else { k + 1 }
    }

    /// Which churner client `k` is, if it is one.
    pub fn churner(&self, k: usize) -> Option<usize> {
        if self.churners == 0 || k < self.churn_base() {
            return None;
        }
        let q = (k - self.churn_base()) / self.churn_stride;
        (q < self.churners && self.churner_client(q) == k).then_some(q)
    }

    /// Every client, in the byte order of their names: the order of a
    /// room's member list.
    pub fn by_name(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.clients as u32).collect();
        order.sort_by_cached_key(|&k| self.name(k as usize));
        order
    }

    pub fn room(&self, k: usize) -> usize {
        k % self.rooms
    }

    /// 0 for instance a, 1 for b.
    pub fn instance(&self, k: usize) -> usize {
        if self.spread {
            (k / self.rooms) % 2
        } else if self.rooms > 1 {
            self.room(k) % 2
        } else {
            k % 2
        }
    }

    pub fn worker(&self, k: usize) -> usize {
        if self.is_probe(k) {
            self.workers
        } else {
            k % self.workers
        }
    }

    pub fn is_sender(&self, k: usize) -> bool {
        k < self.senders
    }

    /// Whether client `k` is meant to receive sender `j`'s messages: not a
    /// churner, which comes and goes (and gets history again each time).
    pub fn hears(&self, k: usize, j: usize) -> bool {
        j < self.senders && self.room(j) == self.room(k) && self.churner(k).is_none()
    }

    /// Client `k`'s name, distinct over all clients.
    pub fn name(&self, k: usize) -> String {
        format!("c{k}")
    }

    /// The client whose name this is, if it is one of ours.
    pub fn client_of(&self, name: &str) -> Option<usize> {
        let digits = name.strip_prefix('c')?;
        // Digits only, and no leading zero: "c01" or "c+1" is not client 1.
        let canonical = digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if !canonical {
            return None;
        }
        digits.parse().ok().filter(|&k| k < self.clients)
    }

    /// The room's name: `base` itself when there is one room.
    pub fn room_name(&self, base: &str, room: usize) -> String {
        if self.rooms == 1 {
            base.to_string()
        } else {
            format!("{base}r{room}")
        }
    }
}
