//! Counters and gauges behind `GET /metrics`, in the Prometheus text format.
//!
//! Plain atomics: every hot-path update is one relaxed increment, and the
//! exposition reads a consistent-enough snapshot without a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $kind:ident $field:ident: $name:literal, )*) => {
        /// Every number this instance exposes. Field docs are the HELP lines.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $field: metrics!(@type $kind), )*
        }

        impl Metrics {
            /// The Prometheus text exposition of every metric.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let help = concat!($($doc),*).trim();
                    let _ = writeln!(out, "# HELP {} {}", $name, help);
                    let _ = writeln!(out, "# TYPE {} {}", $name, stringify!($kind));
                    let _ = writeln!(out, "{} {}", $name, self.$field.load(Ordering::Relaxed));
                )*
                let threads = process_threads();
                let _ = writeln!(out, "# HELP chat_process_threads OS threads in this process, from /proc.");
                let _ = writeln!(out, "# TYPE chat_process_threads gauge");
                let _ = writeln!(out, "chat_process_threads {threads}");
                out
            }
        }
    };
    (@type counter) => { AtomicU64 };
    (@type gauge) => { AtomicI64 };
}

metrics! {
    /// WebSocket clients connected to this instance now.
    gauge clients_connected: "chat_clients_connected",
    /// Session (reader) threads alive now, one per client, handshakes included.
    gauge session_threads: "chat_session_threads",
    /// WebSocket handshakes completed.
    counter connections_total: "chat_connections_total",
    /// Connections refused (bad handshake, bad query, no thread available).
    counter connections_refused_total: "chat_connections_refused_total",
    /// Message frames received from local clients.
    counter messages_received_total: "chat_messages_received_total",
    /// Client frames refused with an error frame (bad_request, too_large).
    counter messages_rejected_total: "chat_messages_rejected_total",
    /// Messages accepted by the broker (published to Redis).
    counter messages_published_total: "chat_messages_published_total",
    /// Messages refused with `unavailable` because the broker was down.
    counter messages_unavailable_total: "chat_messages_unavailable_total",
    /// Messages answered `outcome_unknown`: Redis never said whether it accepted them.
    counter messages_outcome_unknown_total: "chat_messages_outcome_unknown_total",
    /// Payloads received from the broker (the rooms' channels), but
    /// presence events: messages, and invalid payloads.
    counter broker_messages_total: "chat_broker_messages_total",
    /// Presence events (join, leave, typing) received from the broker.
    counter broker_presence_events_total: "chat_broker_presence_events_total",
    /// Payloads on the Redis channel that were not valid messages and were skipped.
    counter broker_payloads_invalid_total: "chat_broker_payloads_invalid_total",
    /// Frames queued to local clients (one per receiver per message).
    counter messages_delivered_total: "chat_messages_delivered_total",
    /// Deliveries the socket could not take at once: queued in the
    /// client's outbox, finished by a flusher thread.
    counter deliveries_queued_total: "chat_deliveries_queued_total",
    /// History messages replayed to connecting clients.
    counter history_replayed_total: "chat_history_replayed_total",
    /// Clients disconnected because their outbox passed --client-buffer-bytes.
    counter slow_clients_dropped_total: "chat_slow_clients_dropped_total",
    /// Clients disconnected because they stopped answering pings.
    counter idle_clients_dropped_total: "chat_idle_clients_dropped_total",
    /// Frames refused with `rate_limited`.
    counter rate_limited_total: "chat_rate_limited_total",
    /// Clients disconnected for flooding past their rate limit.
    counter flooding_clients_dropped_total: "chat_flooding_clients_dropped_total",
    /// Handshakes refused with 403 because of their Origin.
    counter origin_refused_total: "chat_origin_refused_total",
    /// `--auth token`: connections refused for their token (or its lack),
    /// and connections closed when their token expired.
    counter auth_refused_total: "chat_auth_refused_total",
    counter tokens_expired_total: "chat_tokens_expired_total",
    /// Connections refused with 503 because the instance was at --max-clients.
    counter capacity_refused_total: "chat_capacity_refused_total",
    /// Connections closed for not completing the handshake in time.
    counter handshake_timeouts_total: "chat_handshake_timeouts_total",
    /// Successful reconnections to Redis after the link was lost.
    counter redis_reconnects_total: "chat_redis_reconnects_total",
    /// Subscribed connections found dead (no answer to PING in time) and
    /// closed, to be opened again.
    counter redis_dead_links_total: "chat_redis_dead_links_total",
    /// Messages delivered from history because a room's subscription had
    /// been lost meanwhile (catch-up after an outage or a slot move).
    counter history_caught_up_total: "chat_history_caught_up_total",
    /// Rooms whose channel this instance is subscribed to now (confirmed
    /// by Redis).
    gauge room_subscriptions: "chat_room_subscriptions",
    /// SUBSCRIBE commands sent for a room that gained its first local client.
    counter room_subscriptions_total: "chat_room_subscriptions_total",
    /// Presence liveness refreshes of this instance (one key, every third
    /// of --presence-ttl-ms).
    counter presence_refreshes_total: "chat_presence_refreshes_total",
    /// Presence frames (`presence`, `presence_diff`) handed to local clients.
    counter presence_frames_total: "chat_presence_frames_total",
    /// Members of other (stopped) instances this instance found expired and
    /// removed.
    counter presence_expired_total: "chat_presence_expired_total",
    /// 1 while every Redis subscription (one per cluster shard) is live and
    /// caught up, else 0.
    gauge redis_subscriber_up: "chat_redis_subscriber_up",
    /// 1 while the Redis publishing connection is usable, else 0.
    gauge redis_publisher_up: "chat_redis_publisher_up",
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn get_gauge(gauge: &AtomicI64) -> i64 {
        gauge.load(Ordering::Relaxed)
    }

    pub fn set(gauge: &AtomicI64, value: i64) {
        gauge.store(value, Ordering::Relaxed);
    }

    pub fn up(gauge: &AtomicI64) {
        gauge.fetch_add(1, Ordering::Relaxed);
    }

    pub fn down(gauge: &AtomicI64) {
        gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The process's thread count from `/proc/self/status` (0 where there is
/// no procfs): what `kernel.pid_max` is really spent on.
pub fn process_threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_value() {
        let metrics = Metrics::default();
        Metrics::inc(&metrics.messages_published_total);
        let text = metrics.render();
        assert!(text.contains("# TYPE chat_messages_published_total counter\n"));
        assert!(text.contains("\nchat_messages_published_total 1\n"));
        assert!(text.contains("# HELP chat_clients_connected WebSocket clients connected"));
        assert!(process_threads() >= 1);
    }
}
