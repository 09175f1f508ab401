//! How the broker reaches Redis and what it promises about it, from the
//! configuration: where Redis is, the prefix, the bounds and the timings.

use std::time::Duration;

use redis::{ConnectionInfo, RedisError};

use super::explain;
use super::sentinel::Sentinels;
use super::tls::RedisTls;
use crate::protocol::Limits;
use crate::redis_url::RedisUrl;

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: RedisUrl,
    /// Seed nodes of a Redis Cluster; empty for a single Redis at `url`.
    pub cluster: Vec<RedisUrl>,
    /// Redis Sentinel: the primary is asked of the sentinels at every
    /// (re)connection, instead of `url` (`--redis-sentinel`).
    pub sentinel: Option<Sentinels>,
    /// Replicas that must hold a message before anyone receives it
    /// (`--redis-min-replicas`, `WAIT`); 0: off.
    pub min_replicas: usize,
    /// How long the publisher waits for them (`--redis-min-replicas-timeout-ms`).
    pub replicas_timeout: Duration,
    /// How to speak TLS to Redis: set when the URLs are `rediss://`.
    pub tls: Option<RedisTls>,
    pub prefix: String,
    pub history_len: usize,
    /// How long a room's history (and, in a cluster, its last id) lives
    /// after its last message (`--history-ttl-ms`).
    pub history_ttl: Duration,
    pub max_backoff: Duration,
    /// How long a publish whose outcome is unknown (the link broke while
    /// the command was in flight) is retried before the client is told.
    pub publish_deadline: Duration,
    /// How long a room stays subscribed after its last local client left.
    pub room_linger: Duration,
    /// How long a member stays listed after its instance stops refreshing it.
    pub presence_ttl: Duration,
    /// How often a quiet subscription is pinged (`--redis-ping-ms`): a
    /// link silent for two intervals is dead.
    pub ping_interval: Duration,
    /// What a valid payload on the channel or in history looks like.
    pub limits: Limits,
    /// Bytes of history worth reading for one client: what its buffer
    /// holds (`--client-buffer-bytes`); the rest would be cut anyway.
    pub history_read_bytes: usize,
    /// The instance id, used to name this instance's Redis connections
    /// (`CLIENT LIST` shows `<prefix>:<instance>:pub` and `:sub`).
    pub instance: String,
}

impl RedisSettings {
    /// Whether the chat runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// Where the single Redis is, and how to connect (TLS included).
    pub fn url_info(&self) -> ConnectionInfo {
        self.with_tls(self.url.connection_info())
    }

    /// The Redis Cluster's seed nodes, and how to connect (TLS included).
    pub fn seed_infos(&self) -> Vec<ConnectionInfo> {
        self.cluster
            .iter()
            .map(|seed| self.with_tls(seed.connection_info()))
            .collect()
    }

    fn with_tls(&self, info: &ConnectionInfo) -> ConnectionInfo {
        match &self.tls {
            Some(tls) => tls.apply(info),
            None => info.clone(),
        }
    }

    /// Where Redis is, for logs and probes: without a password.
    pub fn display_url(&self) -> String {
        if let Some(sentinels) = &self.sentinel {
            sentinels.describe()
        } else if self.cluster.is_empty() {
            self.url.to_string()
        } else {
            let seeds: Vec<&str> = self.cluster.iter().map(RedisUrl::redacted).collect();
            format!("the redis cluster at {}", seeds.join(","))
        }
    }

    /// The database the URL names (for the message when Redis has none of
    /// that number).
    pub fn db(&self) -> i64 {
        if let Some(sentinels) = &self.sentinel {
            return sentinels.data.db();
        }
        self.url.connection_info().redis_settings().db()
    }

    /// What the logs and `/readyz` say of a failure to connect.
    pub fn explain(&self, e: &RedisError) -> String {
        let option = if self.sentinel.is_some() {
            "--redis-user / --redis-password (REDIS_USER / REDIS_PASSWORD)"
        } else if self.cluster.is_empty() {
            "--redis-url / REDIS_URL"
        } else {
            "--redis-cluster / REDIS_CLUSTER"
        };
        explain::explain(e, &self.display_url(), self.db(), option)
    }

    /// A `CLIENT SETNAME` name for one of this instance's connections:
    /// Redis allows no spaces or newlines in it.
    pub fn connection_name(&self, role: &str) -> String {
        format!("{}:{}:{role}", self.prefix, self.instance)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect()
    }
}
