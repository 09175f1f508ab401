//! Each instance's `/stats` report, kept in Redis so that any instance can
//! list them all: one hash field per instance, written every few seconds
//! on a connection of its own (a report never queues behind the sessions),
//! read back by `/stats`, and forgotten a minute after its instance stops
//! (by whichever instance reads or writes them next: nobody need ask for
//! `/stats` for a stopped instance's report to go).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use log::debug;

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::Unavailable;
use crate::broker::report::{InstanceReport, STALE_AFTER_MS};
use crate::clock;

/// How long a gone instance's last report is kept before it is removed
/// (it is not shown after [`STALE_AFTER_MS`]).
const FORGET_AFTER_MS: u64 = 60_000;

pub struct Reports {
    link: Arc<Link>,
    keys: RedisKeys,
    /// When this instance last removed the reports of gone instances.
    pruned_ms: AtomicU64,
}

impl Reports {
    pub fn new(link: Link, keys: RedisKeys) -> Self {
        Reports {
            link: Arc::new(link),
            keys,
            pruned_ms: AtomicU64::new(0),
        }
    }

    /// The reports' connection (watched when idle).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Stores this instance's report. Best effort: a report lost to an
    /// outage is replaced by the next.
    pub fn store(&self, report: &InstanceReport) {
        let Ok(json) = serde_json::to_string(report) else {
            return;
        };
        let key = self.keys.instances();
        let stored = self.link.run(|connection| {
            redis::cmd("HSET")
                .arg(&key)
                .arg(&report.instance)
                .arg(json)
                .query::<()>(connection)
        });
        if let Err(e) = stored {
            debug!("stats: report not stored: {}", e.into_unavailable());
        }
        let now = clock::wall_millis();
        if now.saturating_sub(self.pruned_ms.load(Ordering::Relaxed)) >= FORGET_AFTER_MS / 2 {
            self.pruned_ms.store(now, Ordering::Relaxed);
            // Reading removes the reports of instances gone a while.
            let _ = self.read();
        }
    }

    /// Every instance that reported lately, by name; removes the reports
    /// of instances gone for longer than [`FORGET_AFTER_MS`].
    pub fn read(&self) -> Result<Vec<InstanceReport>, Unavailable> {
        let key = self.keys.instances();
        let stored: HashMap<String, String> = self
            .link
            .run(|connection| redis::cmd("HGETALL").arg(&key).query(connection))
            .map_err(Failure::into_unavailable)?;
        let now = clock::wall_millis();
        let mut up = Vec::new();
        let mut gone = Vec::new();
        for (instance, json) in stored {
            match serde_json::from_str::<InstanceReport>(&json) {
                Ok(report) if now.saturating_sub(report.seen_ms) <= STALE_AFTER_MS => {
                    up.push(report)
                }
                Ok(report) if now.saturating_sub(report.seen_ms) <= FORGET_AFTER_MS => {}
                _ => gone.push(instance),
            }
        }
        if !gone.is_empty() {
            let _ = self.link.run(|connection| {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&gone)
                    .query::<()>(connection)
            });
        }
        up.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(up)
    }
}
