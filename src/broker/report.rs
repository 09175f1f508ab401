//! One instance's report for the instances view (`/stats`): what the
//! broker carries between instances ([`super::InstanceReports`]), and how
//! often. The reporter thread that makes them is in [`crate::stats`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often an instance reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// A report older than this is an instance that is gone (three missed).
pub const STALE_AFTER_MS: u64 = 3 * REPORT_EVERY.as_millis() as u64;

/// One instance, as it last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub instance: String,
    pub clients: i64,
    pub rooms: usize,
    /// Messages its clients sent (accepted by the broker), per second.
    pub published_per_s: f64,
    /// Frames it handed to its clients' sockets, per second.
    pub delivered_per_s: f64,
    pub up_since_ms: u64,
    pub seen_ms: u64,
    /// `"up"` or `"down"`: its link to Redis, as it sees it.
    pub redis: String,
    /// Counters a fault makes move.
    pub slow_clients_dropped: u64,
    pub redis_reconnects: u64,
    pub history_replayed: u64,
}
