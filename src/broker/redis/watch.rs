//! Every Redis link is watched, so that a dead one is found within seconds
//! even when nothing tells: a link can stop carrying bytes without a reset
//! (a host lost, a partition, a NAT or conntrack entry dropped, a virtual
//! IP moved), and a socket waiting on it waits for ever.
//!
//! - **Subscriptions** (`redis-watch`): every `--redis-ping-ms` (default
//!   1000), a subscribed connection Redis has been quiet on gets a `PING`
//!   (Redis allows it in subscribed mode, and advises it); one that stayed
//!   silent, `PING` and all, for two intervals is shut down, and its
//!   subscriber reconnects and catches up as after any break. A dead link
//!   is thus found within three intervals. Silence while the subscriber is
//!   busy handing out what it heard is not counted: that is a slow
//!   instance, not a dead link.
//! - **Command connections** (`redis-keepalive`): one idle for an interval
//!   gets a `PING` (with the command timeout, 2 s), so that it is found
//!   dead before a client's message needs it; and one waiting out its
//!   backoff after a failure is reopened when the backoff is over, so that
//!   clients hear `up` without having to send first. (Through a Redis
//!   Cluster client, only the reopening: there a `PING` goes to every
//!   master, and one dead master would fail it for all; the subscriptions
//!   speak for each shard.)
//!
//! Every socket also has TCP keepalive (`link.rs`), and every blocking call
//! a deadline.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::warn;

use super::link::Link;
use super::rooms::RoomSubscriptions;
use crate::metrics::Metrics;

/// The `redis-watch` thread's body: for the life of the process.
pub fn watch_subscriptions(rooms: &RoomSubscriptions, interval: Duration, metrics: &Metrics) {
    loop {
        thread::sleep(interval);
        for (shard, subscription) in rooms.subscriptions() {
            let Some(silence) = subscription.silence() else {
                continue;
            };
            if silence > interval * 2 {
                warn!(
                    "redis subscriber {shard}: nothing from Redis for {} ms, not even an answer \
                     to PING (sent every {} ms): the link is dead; reconnecting",
                    silence.as_millis(),
                    interval.as_millis()
                );
                Metrics::inc(&metrics.redis_dead_links_total);
                subscription.shutdown();
            } else if silence >= interval / 2 {
                subscription.ping();
            }
        }
    }
}

/// The `redis-keepalive` thread's body: for the life of the process.
pub fn keep_alive(links: &[Arc<Link>], interval: Duration) {
    loop {
        thread::sleep(interval);
        for link in links {
            link.keep_alive(interval);
        }
    }
}
