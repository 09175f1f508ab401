//! The publishing connection: shared by this instance's reader threads,
//! it runs the accept script and reads history. Opened lazily, reopened
//! after a failure no sooner than the backoff allows, so that a dead Redis
//! costs clients no waiting: they are told `unavailable` at once.
//!
//! With a Redis Cluster it is redis-rs's cluster connection, which routes
//! each command to the master of its keys' slot, follows `MOVED`, and
//! finds the new master after a failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use log::{error, info};
use redis::cluster::ClusterClient;
use redis::{ConnectionInfo, ConnectionLike, ErrorKind, RedisError, ServerErrorKind};

use super::{RedisSettings, connect, explain};
use crate::backoff::Backoff;
use crate::broker::Unavailable;
use crate::metrics::Metrics;
use crate::sync::{Mutex, lock};

/// Why a command on the publishing connection failed.
#[derive(Debug)]
pub enum Failure {
    /// It certainly had no effect: Redis was not reached, or refused it.
    Refused(String),
    /// The link broke while it was in flight: it may have run.
    Unknown(String),
    /// A Redis Cluster redirected it (`MOVED`, `ASK`, `TRYAGAIN` while a
    /// slot moves): it did not run, and may be tried again at once.
    Redirected(String),
}

impl Failure {
    pub fn into_unavailable(self) -> Unavailable {
        match self {
            Failure::Refused(reason) | Failure::Unknown(reason) | Failure::Redirected(reason) => {
                Unavailable(reason)
            }
        }
    }
}

/// The connection and what is known of its health.
struct Link {
    connection: Option<Box<dyn ConnectionLike + Send>>,
    retry_at: Instant,
    backoff: Backoff,
    last_error: Option<String>,
    /// [`Publisher::link_breaks`] when the connection was opened.
    opened_after_breaks: u64,
}

/// What the publisher connects to.
#[derive(Clone)]
enum Target {
    Single(ConnectionInfo),
    Cluster(ClusterClient),
}

pub struct Publisher {
    target: Target,
    /// Its connection's name's last part (`pub`).
    role: &'static str,
    settings: RedisSettings,
    metrics: Arc<Metrics>,
    link: Mutex<Link>,
    /// How many times a subscriber saw its link to Redis break, shared by
    /// every connection of this instance. A connection opened before the
    /// last break is not trusted: Redis may be gone, and a command written
    /// to it would end "outcome unknown" where a fresh connection, refused,
    /// says for sure that nothing was sent.
    link_breaks: Arc<AtomicU64>,
}

impl Publisher {
    /// A publisher to one Redis.
    pub fn single(info: ConnectionInfo, settings: RedisSettings, metrics: Arc<Metrics>) -> Self {
        Self::new(Target::Single(info), settings, metrics)
    }

    /// A publisher to a Redis Cluster.
    pub fn cluster(client: ClusterClient, settings: RedisSettings, metrics: Arc<Metrics>) -> Self {
        Self::new(Target::Cluster(client), settings, metrics)
    }

    fn new(target: Target, settings: RedisSettings, metrics: Arc<Metrics>) -> Self {
        Publisher {
            role: "pub",
            link: Mutex::new(Link {
                connection: None,
                retry_at: Instant::now(),
                backoff: Backoff::new(settings.max_backoff),
                last_error: None,
                opened_after_breaks: 0,
            }),
            target,
            settings,
            metrics,
            link_breaks: Arc::default(),
        }
    }

    /// The counter the subscribers add to when their link breaks (see
    /// `link_breaks`); the siblings share it.
    pub fn link_breaks(&self) -> Arc<AtomicU64> {
        self.link_breaks.clone()
    }

    /// A second publisher to the same Redis, on a connection of its own
    /// named `role`: work that must not queue behind the sessions' (the
    /// presence refresh) gets it.
    pub fn sibling(&self, role: &'static str) -> Self {
        let mut sibling = Self::new(
            self.target.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        );
        sibling.role = role;
        sibling.link_breaks = self.link_breaks.clone();
        sibling
    }

    fn connect(&self) -> Result<Box<dyn ConnectionLike + Send>, RedisError> {
        Ok(match &self.target {
            Target::Single(info) => {
                Box::new(connect(info, &self.settings.connection_name(self.role))?)
            }
            Target::Cluster(client) => Box::new(client.get_connection()?),
        })
    }

    /// Runs `command` on the publishing connection, (re)connecting first if
    /// needed. A broken link drops the connection, so the next call starts
    /// from a fresh one; between failures, calls fail fast until the
    /// backoff has passed.
    pub fn run<T>(
        &self,
        command: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>,
    ) -> Result<T, Failure> {
        let mut link = lock(&self.link);
        let breaks = self.link_breaks.load(Ordering::Relaxed);
        if link.connection.is_some() && link.opened_after_breaks != breaks {
            link.connection = None;
        }
        if link.connection.is_none() {
            if Instant::now() < link.retry_at {
                let reason = link.last_error.clone().unwrap_or_default();
                return Err(Failure::Refused(format!("{reason}; retrying")));
            }
            match self.connect() {
                Ok(connection) => {
                    if link.last_error.take().is_some() {
                        info!(
                            "redis publisher ({}): reconnected to {}",
                            self.role,
                            self.settings.display_url()
                        );
                        Metrics::inc(&self.metrics.redis_reconnects_total);
                    }
                    link.backoff.reset();
                    link.connection = Some(connection);
                    link.opened_after_breaks = breaks;
                    Metrics::set(&self.metrics.redis_publisher_up, 1);
                }
                Err(e) => return Err(Failure::Refused(self.link_broken(&mut link, e))),
            }
        }
        let connection = link.connection.as_mut().expect("connected above");
        command(connection.as_mut()).map_err(|e| {
            if matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain
                )
            ) {
                Failure::Redirected(format!("the cluster is moving this room's slot ({e})"))
            } else if e.is_connection_refusal() && matches!(self.target, Target::Cluster(_)) {
                // The master of this room's slot died and has no successor
                // yet: nothing reached Redis, so certainly not accepted.
                // The next command opens a fresh cluster connection, which
                // reads the slots again and finds the promoted replica; the
                // other shards are fine, so no backoff.
                link.connection = None;
                Failure::Refused(format!("redis is unreachable ({e})"))
            } else if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
            {
                Failure::Unknown(self.link_broken(&mut link, e))
            } else {
                Failure::Refused(format!("redis refused the command: {e}"))
            }
        })
    }

    /// Whether the connection is down now (it is reopened lazily).
    pub fn is_down(&self) -> bool {
        lock(&self.link).connection.is_none()
    }

    fn link_broken(&self, link: &mut Link, e: RedisError) -> String {
        let reason = explain::for_clients(&e);
        if link.last_error.is_none()
            || (e.code().is_some() && link.last_error.as_ref() != Some(&reason))
        {
            // Once per outage, and again when Redis answers something new
            // (it came back with another password).
            error!(
                "redis publisher ({}): {}; messages are refused as unavailable until it is back",
                self.role,
                self.settings.explain(&e)
            );
        }
        link.connection = None;
        link.retry_at = Instant::now() + link.backoff.next_delay();
        link.last_error = Some(reason.clone());
        Metrics::set(&self.metrics.redis_publisher_up, 0);
        reason
    }
}
