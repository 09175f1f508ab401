//! The instances view behind `GET /stats`: each instance reports how it is
//! doing every [`REPORT_EVERY`], through the broker, so that any instance
//! can show the page every instance that is up.
//!
//! A report is a few counters and two rates, read from [`Metrics`]: nothing
//! on a client's path changes for it.

use std::sync::Arc;
use std::thread;

use crate::broker::report::{InstanceReport, REPORT_EVERY};
use crate::broker::{InstanceReports, Readiness};
use crate::clock;
use crate::delivery::hub::Hub;
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;
use crate::sync::{Mutex, lock};

/// This instance's latest report, kept for `/stats` when the broker cannot
/// be asked for the others.
pub struct Stats {
    latest: Mutex<InstanceReport>,
}

/// Counter readings at one report, to turn the next into rates.
#[derive(Clone, Copy)]
struct Reading {
    at_ms: u64,
    published: u64,
    delivered: u64,
}

impl Reading {
    fn now(metrics: &Metrics) -> Self {
        Reading {
            at_ms: clock::mono_millis(),
            published: Metrics::get(&metrics.messages_published_total),
            delivered: Metrics::get(&metrics.messages_delivered_total),
        }
    }
}

fn per_second(count: u64, millis: u64) -> f64 {
    let rate = count as f64 * 1000.0 / millis.max(1) as f64;
    (rate * 10.0).round() / 10.0
}

impl Stats {
    pub fn new(first: InstanceReport) -> Self {
        Stats {
            latest: Mutex::new(first),
        }
    }

    pub fn latest(&self) -> InstanceReport {
        lock(&self.latest).clone()
    }
}

/// What the reporter thread needs.
pub struct Reporter {
    pub instance: String,
    /// Where the reports go (the broker).
    pub reports: Arc<dyn InstanceReports>,
    /// Whether this instance's Redis links work: the report's `redis`.
    pub readiness: Arc<dyn Readiness>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
}

impl Reporter {
    fn report(&self, up_since_ms: u64, previous: Reading) -> (InstanceReport, Reading) {
        let now = Reading::now(&self.metrics);
        let millis = now.at_ms.saturating_sub(previous.at_ms);
        let metrics = &self.metrics;
        let report = InstanceReport {
            instance: self.instance.clone(),
            clients: Metrics::get_gauge(&metrics.clients_connected),
            rooms: self.hub.all_rooms().len(),
            published_per_s: per_second(now.published - previous.published, millis),
            delivered_per_s: per_second(now.delivered - previous.delivered, millis),
            up_since_ms,
            seen_ms: clock::wall_millis(),
            redis: if self.readiness.readiness().is_ok() {
                "up"
            } else {
                "down"
            }
            .to_string(),
            slow_clients_dropped: Metrics::get(&metrics.slow_clients_dropped_total),
            redis_reconnects: Metrics::get(&metrics.redis_reconnects_total),
            history_replayed: Metrics::get(&metrics.history_replayed_total),
        };
        (report, now)
    }

    /// Starts the reporter thread; returns what `/stats` reads.
    pub fn spawn(self, supervisor: &Arc<Supervisor>) -> std::io::Result<Arc<Stats>> {
        let up_since_ms = clock::wall_millis();
        let mut previous = Reading::now(&self.metrics);
        let (first, _) = self.report(up_since_ms, previous);
        let stats = Arc::new(Stats::new(first.clone()));
        let shared = stats.clone();
        supervisor.spawn("stats", move || {
            // The first report goes out at once, so that a page loaded right
            // after the start already lists this instance.
            self.reports.report(&first);
            loop {
                thread::sleep(REPORT_EVERY);
                let (report, now) = self.report(up_since_ms, previous);
                previous = now;
                self.reports.report(&report);
                *lock(&shared.latest) = report;
            }
        })?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_to_one_decimal() {
        assert_eq!(per_second(5, 2000), 2.5);
        assert_eq!(per_second(1, 3000), 0.3);
        assert_eq!(per_second(7, 0), 7000.0, "no division by zero");
    }
}
