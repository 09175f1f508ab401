//! How one connection to Redis is opened (every link's, the sentinels'
//! and, through redis-rs's cluster client, every cluster node's): its
//! timeouts, TCP keepalive, login and name. The subscription's socket,
//! which redis-rs does not open, takes the same keepalive
//! ([`super::subscription`]).

use std::time::Duration;

use redis::io::tcp::TcpSettings;
use redis::{Client, Connection, ConnectionInfo, RedisConnectionInfo, RedisError};

/// How long to wait for Redis to accept a connection before calling it
/// unreachable: loopback or LAN Redis answers in microseconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command may take before the link is declared broken.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP keepalive on every Redis socket: a peer that vanished without a
/// reset (a host lost, a NAT entry dropped) is found by the kernel within
/// about 10 + 3 × 5 s even on a connection nobody uses. The watcher's
/// `PING`s ([`super::health`]) find it sooner where it matters.
pub fn tcp_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3)
}

/// Opens a connection to Redis with timeouts, TCP keepalive and a name.
///
/// It sends `AUTH` and `SELECT` itself rather than let redis-rs do it:
/// redis-rs replaces a refused `AUTH`'s answer with "Password
/// authentication failed", and the operator needs Redis's own words
/// (`WRONGPASS`, `ERR AUTH ... without any password configured`), which
/// [`super::explain::explain`] turns into advice.
pub fn connect(info: &ConnectionInfo, name: &str) -> Result<Connection, RedisError> {
    let settings = info.redis_settings();
    let bare = info
        .clone()
        .set_redis_settings(RedisConnectionInfo::default().set_skip_set_lib_name())
        .set_tcp_settings(tcp_settings());
    let mut connection = Client::open(bare)?.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password).query::<()>(&mut connection)?;
    }
    if settings.db() != 0 {
        redis::cmd("SELECT")
            .arg(settings.db())
            .query::<()>(&mut connection)?;
    }
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<()>(&mut connection)?;
    Ok(connection)
}

/// The TCP settings of every command connection (and, through
/// redis-rs's cluster client, of every cluster node's).
pub fn tcp_settings() -> TcpSettings {
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(tcp_keepalive())
}
