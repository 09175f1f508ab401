//! Redis Sentinel: where the primary is now.
//!
//! With `--redis-sentinel HOST:PORT,...` and `--redis-sentinel-master
//! NAME`, no link has a fixed address: every time one (re)connects (a
//! command link in [`super::link`], a subscription in
//! [`super::subscriber`]) it asks the sentinels, in turn, `SENTINEL
//! get-master-addr-by-name NAME`, and connects to the address the first
//! one that knows gives. Before the address is used, the node itself is
//! asked `ROLE`: a sentinel that has not heard of a failover yet, or an
//! old primary restarted as an empty master, must not take writes.
//!
//! A failover reaches the links in four ways: the old primary's death
//! breaks them (they reconnect, and ask again); a demoted primary answers
//! writes `READONLY`, which [`super::link`] treats as a broken link;
//! Sentinel itself, when it demotes a primary that still runs, closes its
//! clients (`CLIENT KILL TYPE normal` / `pubsub`); and, for a primary cut
//! off from the sentinels but not from this instance (nothing breaks,
//! nothing is demoted, and it still says `ROLE` master), the sentinels'
//! `+switch-master` event, which [`super::switch_master`] listens for. The
//! subscription's catch-up then reads from the promoted replica's history
//! what it missed.
//!
//! The sentinels are asked in turn, starting with the last one that
//! answered or told of a switch (the order Redis's guidelines for
//! Sentinel clients give): one that has not yet heard of a failover must
//! not send a link back to the old primary.
//!
//! This file is a small resolver of its own rather than redis-rs's
//! `sentinel` feature: it needs one command per sentinel, and its errors
//! must name what is wrong (no sentinel reachable, a master name no
//! sentinel knows, a sentinel password refused), which the operator acts
//! on.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    RedisError,
};

/// How long one sentinel may take to accept a connection and answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(500);

/// The sentinels to ask, the master's name, and how to log in to the data
/// nodes they point at.
#[derive(Clone)]
pub struct Sentinels {
    /// `host:port` of each sentinel, in the order they are asked.
    pub addrs: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// Sentinel's own `AUTH` (`requirepass` in sentinel.conf), if any.
    pub sentinel_user: Option<String>,
    pub sentinel_password: Option<String>,
    /// `AUTH` for the primary (and `SELECT`), from `--redis-user` and
    /// `--redis-password`.
    pub data: RedisConnectionInfo,
    /// Which of `addrs` to ask first: the last that answered, or that told
    /// of a switch. Shared by every clone.
    asked_first: Arc<AtomicUsize>,
}

impl fmt::Debug for Sentinels {
    // No password, ever.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// Parses `HOST:PORT` (a sentinel's address).
pub fn parse_addr(addr: &str) -> Result<(String, u16), String> {
    let refuse = |why: &str| {
        format!("--redis-sentinel {addr:?}: {why}; write HOST:PORT, e.g. 10.0.0.5:26379")
    };
    let (host, port) = addr
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| refuse("no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(refuse("no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((host.to_string(), port)),
        _ => Err(refuse(&format!(
            "port {port:?} is not a number from 1 to 65535"
        ))),
    }
}

impl Sentinels {
    pub fn new(
        addrs: Vec<(String, u16)>,
        master: String,
        sentinel_user: Option<String>,
        sentinel_password: Option<String>,
        data: RedisConnectionInfo,
    ) -> Self {
        Sentinels {
            addrs,
            master,
            sentinel_user,
            sentinel_password,
            data,
            asked_first: Arc::default(),
        }
    }

    /// Makes the sentinel at `index` in `addrs` the first asked.
    pub fn ask_first(&self, index: usize) {
        self.asked_first.store(index, Ordering::Relaxed);
    }

    /// What logs and `/readyz` call the primary (no password).
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .addrs
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        format!(
            "the primary of {:?} (sentinels {})",
            self.master,
            addrs.join(",")
        )
    }

    /// Asks each sentinel in turn where the primary is, and checks that
    /// the node answers `ROLE` master. The error names every sentinel's
    /// failure.
    pub fn resolve(&self) -> Result<ConnectionInfo, RedisError> {
        let mut failures = Vec::new();
        let mut unknown = 0;
        let first = self.asked_first.load(Ordering::Relaxed);
        let in_turn = (0..self.addrs.len()).map(|i| (first + i) % self.addrs.len());
        for index in in_turn {
            let (host, port) = &self.addrs[index];
            match self.ask(host, *port) {
                Ok(Some((primary_host, primary_port))) => {
                    self.ask_first(index);
                    return self.checked(&primary_host, primary_port, host, *port);
                }
                Ok(None) => {
                    unknown += 1;
                    failures.push(format!(
                        "{host}:{port} knows no master named {:?}",
                        self.master
                    ));
                }
                Err(e) => failures.push(format!("{host}:{port}: {e}")),
            }
        }
        let why = if unknown == self.addrs.len() {
            format!(
                "no sentinel monitors a master named {:?} (check --redis-sentinel-master against \
                 `sentinel monitor NAME ...` in sentinel.conf)",
                self.master
            )
        } else if unknown == 0 {
            "no sentinel answered".to_string()
        } else {
            "no sentinel gave the primary's address".to_string()
        };
        Err(std::io::Error::other(format!("{why}: {}", failures.join("; "))).into())
    }

    /// Whether a resolve failure is a configuration error (no sentinel
    /// knows the name): worth stopping the start for.
    pub fn is_unknown_master(e: &RedisError) -> bool {
        e.to_string()
            .contains("no sentinel monitors a master named")
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel: `None` if it
    /// does not know the name.
    fn ask(&self, host: &str, port: u16) -> Result<Option<(String, u16)>, RedisError> {
        let mut connection = self.connect(host, port)?;
        let answer: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query(&mut connection)?;
        Ok(answer)
    }

    /// A connection to the sentinel at `host:port`, logged in, with
    /// timeouts.
    pub fn connect(&self, host: &str, port: u16) -> Result<Connection, RedisError> {
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(password) = &self.sentinel_password {
            settings = settings.set_password(password.clone());
        }
        if let Some(user) = &self.sentinel_user {
            settings = settings.set_username(user.clone());
        }
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()?
            .set_redis_settings(settings);
        let connection = Client::open(info)?.get_connection_with_timeout(SENTINEL_TIMEOUT)?;
        connection.set_read_timeout(Some(SENTINEL_TIMEOUT))?;
        connection.set_write_timeout(Some(SENTINEL_TIMEOUT))?;
        Ok(connection)
    }

    /// The primary's connection info, once the node says it is a master.
    fn checked(
        &self,
        host: &str,
        port: u16,
        sentinel_host: &str,
        sentinel_port: u16,
    ) -> Result<ConnectionInfo, RedisError> {
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()?
            .set_redis_settings(self.data.clone());
        let mut connection = super::connect::connect(&info, "sentinel-role-check")?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut connection)?;
        let role = match role.first() {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(redis::Value::SimpleString(text)) => text.clone(),
            _ => String::new(),
        };
        if role != "master" {
            return Err(std::io::Error::other(format!(
                "sentinel {sentinel_host}:{sentinel_port} names {host}:{port} as the primary of \
                 {:?}, but it is a {role} (a failover under way?)",
                self.master
            ))
            .into());
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_address_is_host_and_port() {
        assert_eq!(
            parse_addr("10.0.0.5:26379").unwrap(),
            ("10.0.0.5".to_string(), 26379)
        );
        assert_eq!(
            parse_addr("[::1]:26379").unwrap(),
            ("::1".to_string(), 26379)
        );
        assert!(parse_addr("10.0.0.5").unwrap_err().contains("no port"));
        assert!(parse_addr(":26379").unwrap_err().contains("no host"));
        assert!(parse_addr("h:0").unwrap_err().contains("1 to 65535"));
    }

    #[test]
    fn no_sentinel_reachable_is_said_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sentinels = Sentinels::new(
            vec![("127.0.0.1".into(), port)],
            "m".into(),
            None,
            Some("secret".into()),
            RedisConnectionInfo::default(),
        );
        let e = sentinels.resolve().unwrap_err().to_string();
        assert!(e.contains("no sentinel answered"), "{e}");
        assert!(!format!("{sentinels:?}").contains("secret"));
    }
}
