//! `pubsub-chat check-redis`: does the Redis these options name answer?
//! One connection opened the way the instance opens its own (TLS, login,
//! Sentinel, cluster seeds), one `PING`, and the answer in the words the
//! instance's log would use. The scripts ask it before they start
//! instances on a `REDIS_URL` they were given, so that the password stays
//! in the environment and no shell code speaks RESP.

use redis::ConnectionLike;

use super::RedisSettings;
use super::cluster::Topology;
use super::connect::{CONNECT_TIMEOUT, connect};

/// Where Redis is, without its password, if it answers `PING`; else why
/// not, explained.
pub fn check(settings: &RedisSettings) -> Result<String, String> {
    let shown = settings.display_url();
    let explained = |e: redis::RedisError| settings.explain(&e);
    if settings.is_cluster() {
        let topology = Topology::discover(settings.seed_infos(), CONNECT_TIMEOUT).map_err(|e| {
            format!(
                "cannot read the cluster's slots from any --redis-cluster node: {}",
                explained(e)
            )
        })?;
        return Ok(format!("{shown} ({} shards)", topology.shards()));
    }
    let info = match &settings.sentinel {
        Some(sentinels) => sentinels
            .resolve()
            .map_err(|e| format!("redis sentinel: {e}"))?,
        None => settings.url_info(),
    };
    let mut connection = connect(&info, &settings.connection_name("check")).map_err(explained)?;
    let pong: String = redis::cmd("PING")
        .query(&mut connection as &mut dyn ConnectionLike)
        .map_err(explained)?;
    if pong != "PONG" {
        return Err(format!("{shown} answered PING with {pong:?}"));
    }
    Ok(shown)
}
