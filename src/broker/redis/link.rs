//! A connection for commands (everything but the subscription): opened
//! lazily, reopened after a failure no sooner than the backoff allows, so
//! that a dead Redis costs clients no waiting: they are told `unavailable`
//! at once. Each kind of work has a link of its own (see [`super`]), so
//! that one never queues behind another.
//!
//! With a Redis Cluster it is redis-rs's cluster connection, which routes
//! each command to the master of its keys' slot, follows `MOVED`, and
//! finds the new master after a failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{error, info};
use redis::cluster::ClusterClient;
use redis::{ConnectionInfo, ConnectionLike, ErrorKind, RedisError, ServerErrorKind};

use super::cluster::Topology;
use super::connect::connect;
use super::health::Health;
use super::sentinel::Sentinels;
use super::{RedisSettings, explain};
use crate::backoff::Backoff;
use crate::broker::Unavailable;
use crate::clock;
use crate::metrics::Metrics;
use crate::sync::{Mutex, lock};

/// Why a command on a link failed.
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
struct State {
    connection: Option<Box<dyn ConnectionLike + Send>>,
    retry_at: Instant,
    backoff: Backoff,
    last_error: Option<String>,
    /// [`Link::link_breaks`] when the connection was opened.
    opened_after_breaks: u64,
    /// In a cluster, when to open a fresh cluster connection after a
    /// master refused one (it died): the fresh one reads the slots again
    /// and finds its successor. Not at every command: under a stream of
    /// publishes that would reconnect to every node each time.
    rebuild_at: Option<Instant>,
    rebuilds: Backoff,
    /// When a master last refused: the rebuilds' backoff starts short
    /// again after a quiet while.
    last_refusal: Option<Instant>,
}

/// What the link connects to.
#[derive(Clone)]
enum Target {
    Single(ConnectionInfo),
    Cluster(ClusterClient),
    /// The current master of one Redis Cluster shard.
    Shard(Arc<Topology>, usize),
    /// The primary Redis Sentinel names, asked at every connection.
    Sentinel(Arc<Sentinels>),
}

pub struct Link {
    target: Target,
    /// Its connection's name's last part (`pub`, `history`, ...).
    role: String,
    settings: RedisSettings,
    metrics: Arc<Metrics>,
    link: Mutex<State>,
    /// When a command last ran ([`clock::mono_millis`]): an idle link is
    /// pinged by the watcher.
    used_at: AtomicU64,
    /// Told when this link breaks and comes back, if clients' ability to
    /// send depends on it (the publishing connection).
    health: Option<Arc<Health>>,
    /// How many times a subscriber saw its link to Redis break, shared by
    /// every connection of this instance. A connection opened before the
    /// last break is not trusted: Redis may be gone, and a command written
    /// to it would end "outcome unknown" where a fresh connection, refused,
    /// says for sure that nothing was sent.
    link_breaks: Arc<AtomicU64>,
}

/// Makes this instance's command connections: all to the same Redis (or
/// cluster), each named for its work, and all distrusted at once when a
/// subscription breaks (see `link_breaks`).
#[derive(Clone)]
pub struct Links {
    target: Target,
    settings: RedisSettings,
    metrics: Arc<Metrics>,
    link_breaks: Arc<AtomicU64>,
}

impl Links {
    /// Links to one Redis.
    pub fn single(info: ConnectionInfo, settings: &RedisSettings, metrics: &Arc<Metrics>) -> Self {
        Self::new(Target::Single(info), settings, metrics)
    }

    /// Links to the primary the sentinels name, asked again at every
    /// (re)connection.
    pub fn sentinel(
        sentinels: Sentinels,
        settings: &RedisSettings,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self::new(Target::Sentinel(Arc::new(sentinels)), settings, metrics)
    }

    /// Links to a Redis Cluster, which route each command by its keys.
    pub fn cluster(
        client: ClusterClient,
        settings: &RedisSettings,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self::new(Target::Cluster(client), settings, metrics)
    }

    fn new(target: Target, settings: &RedisSettings, metrics: &Arc<Metrics>) -> Self {
        Links {
            target,
            settings: settings.clone(),
            metrics: metrics.clone(),
            link_breaks: Arc::default(),
        }
    }

    /// A link on a connection of its own, named `role` (`pub`, `history`,
    /// ...), so that its work never queues behind another's.
    pub fn link(&self, role: &str) -> Link {
        self.make(self.target.clone(), role)
    }

    /// A link to the current master of cluster shard `shard` (its
    /// connection follows the shard through failovers).
    pub fn to_shard(&self, topology: Arc<Topology>, shard: usize, role: &str) -> Link {
        self.make(Target::Shard(topology, shard), role)
    }

    /// A subscription broke, or the sentinels moved the primary: every
    /// link opens a fresh connection before its next command.
    pub fn distrust(&self) {
        self.link_breaks.fetch_add(1, Ordering::Relaxed);
    }

    fn make(&self, target: Target, role: &str) -> Link {
        Link {
            role: role.to_string(),
            link: Mutex::new(State {
                connection: None,
                retry_at: Instant::now(),
                backoff: Backoff::new(self.settings.max_backoff),
                last_error: None,
                opened_after_breaks: 0,
                rebuild_at: None,
                rebuilds: Backoff::new(self.settings.max_backoff),
                last_refusal: None,
            }),
            used_at: AtomicU64::new(clock::mono_millis()),
            health: None,
            target,
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            link_breaks: self.link_breaks.clone(),
        }
    }
}

impl Link {
    /// Reports this link's breaks and recoveries to `health`: sending
    /// depends on it.
    pub fn watched_by(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// What the logs call it: `redis publisher`, `redis history connection`.
    fn label(&self) -> String {
        match self.role.as_str() {
            "pub" => "redis publisher".to_string(),
            role => format!("redis {role} connection"),
        }
    }

    /// Whether this link goes through redis-rs's cluster client.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    fn connect(&self) -> Result<Box<dyn ConnectionLike + Send>, RedisError> {
        let name = self.settings.connection_name(&self.role);
        Ok(match &self.target {
            Target::Single(info) => Box::new(connect(info, &name)?),
            Target::Sentinel(sentinels) => Box::new(connect(&sentinels.resolve()?, &name)?),
            Target::Cluster(client) => Box::new(client.get_connection()?),
            Target::Shard(topology, shard) => {
                let info = topology.master_of_shard(*shard).ok_or_else(|| {
                    RedisError::from(std::io::Error::other(format!(
                        "cluster shard {shard} has no master"
                    )))
                })?;
                Box::new(connect(&info, &name)?)
            }
        })
    }

    /// Runs `command` on the link's connection, (re)connecting first if
    /// needed. A broken link drops the connection, so the next call starts
    /// from a fresh one; between failures, calls fail fast until the
    /// backoff has passed.
    pub fn run<T>(
        &self,
        command: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>,
    ) -> Result<T, Failure> {
        let mut link = lock(&self.link);
        self.used_at.store(clock::mono_millis(), Ordering::Relaxed);
        let breaks = self.link_breaks.load(Ordering::Relaxed);
        if link.connection.is_some() && link.opened_after_breaks != breaks {
            link.connection = None;
        }
        if link.rebuild_at.is_some_and(|at| Instant::now() >= at) {
            link.rebuild_at = None;
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
                            "{}: reconnected to {}",
                            self.label(),
                            self.settings.display_url()
                        );
                        Metrics::inc(&self.metrics.redis_reconnects_total);
                    }
                    link.backoff.reset();
                    link.connection = Some(connection);
                    link.opened_after_breaks = breaks;
                    if let Some(health) = &self.health {
                        health.publisher_up();
                    }
                }
                Err(e) => return Err(Failure::Refused(self.link_broken(&mut link, e, true))),
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
                // The other shards are fine: no backoff for them, but a
                // fresh cluster connection (which finds the successor) no
                // sooner than the rebuilds' backoff allows.
                let now = Instant::now();
                if link
                    .last_refusal
                    .is_some_and(|last| now - last > self.settings.max_backoff * 2)
                {
                    link.rebuilds.reset();
                }
                link.last_refusal = Some(now);
                if link.rebuild_at.is_none() {
                    link.rebuild_at = Some(now + link.rebuilds.next_delay());
                }
                Failure::Refused(format!("redis is unreachable ({e})"))
            } else if matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly)) {
                // A replica now (a failover demoted it): the command did
                // not run. Reconnect, asking the sentinels (or the URL's
                // name) where the primary is now.
                Failure::Refused(self.link_broken(&mut link, e, false))
            } else if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
            {
                Failure::Unknown(self.link_broken(&mut link, e, false))
            } else {
                Failure::Refused(format!("redis refused the command: {e}"))
            }
        })
    }

    /// Sends `PING` if the link has been idle for `idle` (and nobody is
    /// using it now): a dead connection is found before a client's
    /// message needs it, and one in its backoff is reopened once that is
    /// over, so that clients hear `up` without having to send first.
    ///
    /// Through a Redis Cluster client, only the reopening: there a `PING`
    /// goes to every master, and one dead master would fail it for all
    /// (the subscriptions speak for each shard).
    pub fn keep_alive(&self, idle: Duration) {
        let used_at = self.used_at.load(Ordering::Relaxed);
        if clock::mono_millis().saturating_sub(used_at) < idle.as_millis() as u64 {
            return;
        }
        let Ok(link) = self.link.try_lock() else {
            return;
        };
        let down = link.connection.is_none();
        if (down && Instant::now() < link.retry_at) || (!down && self.is_cluster()) {
            return;
        }
        drop(link);
        let _ = if self.is_cluster() {
            self.run(|_| Ok(()))
        } else {
            self.run(|connection| redis::cmd("PING").query::<()>(connection))
        };
    }

    /// The connection failed (`connecting`: it could not even be opened):
    /// dropped, retried after the backoff.
    fn link_broken(&self, link: &mut State, e: RedisError, connecting: bool) -> String {
        let reason = explain::for_clients(&e);
        if link.last_error.is_none()
            || (e.code().is_some() && link.last_error.as_ref() != Some(&reason))
        {
            // Once per outage, and again when Redis answers something new
            // (it came back with another password).
            let consequence = if self.health.is_some() {
                "messages are refused as unavailable until it is back"
            } else {
                "reconnecting"
            };
            error!(
                "{}: {}; {consequence}",
                self.label(),
                self.settings.explain(&e)
            );
        }
        link.connection = None;
        link.retry_at = Instant::now() + link.backoff.next_delay();
        link.last_error = Some(reason.clone());
        if let Some(health) = &self.health {
            // In a cluster, one master's trouble is its shard's: the
            // subscriptions tell it. Only a cluster nobody can connect to
            // stops every room.
            if connecting || !matches!(self.target, Target::Cluster(_)) {
                health.publisher_down(&reason);
            }
        }
        reason
    }
}
