//! Following `+switch-master`: the sentinels' word that the primary moved.
//!
//! Most failovers reach this instance's links on their own (the old
//! primary dies, or is demoted and its clients are killed; see
//! [`super::sentinel`]). One does not: a primary cut off from the
//! sentinels but not from this instance keeps running, keeps saying
//! `ROLE` master, and keeps taking this instance's writes, which nobody
//! else reads once the sentinels have promoted a replica. Only the
//! sentinels know; they say it on their Pub/Sub channel `+switch-master`
//! (`NAME OLD-IP OLD-PORT NEW-IP NEW-PORT`), which this thread listens to
//! on one sentinel at a time, as Redis's guidelines for Sentinel clients
//! advise.
//!
//! On a switch of this instance's master, the command links are
//! distrusted (each opens a fresh connection, asking the sentinels, before
//! its next command) and every subscription not already on the new
//! primary is shut down (its subscriber reconnects and catches up from
//! history, as after any break). The sentinel that told is asked first
//! from then on: it knows.
//!
//! The link to the sentinel is watched like every Redis link: a `PING`
//! after each quiet interval, and a sentinel that does not answer within
//! its timeout is left for the next one.

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::Duration;

use log::{info, warn};
use redis::RedisError;

use super::sentinel::Sentinels;

/// Where a master moved, as a `+switch-master` message says.
#[derive(Debug, PartialEq, Eq)]
pub struct Switch {
    pub master: String,
    pub host: String,
    pub port: u16,
}

impl Switch {
    /// Whether `addr` is the new primary's address (sentinels announce
    /// IP addresses, so a host name never matches, and a link to it is
    /// reconnected: a spare reconnection, never a missed one).
    pub fn is_at(&self, addr: SocketAddr) -> bool {
        addr.port() == self.port && self.host.parse::<IpAddr>() == Ok(addr.ip())
    }
}

/// Reads a `+switch-master` payload: `NAME OLD-IP OLD-PORT NEW-IP
/// NEW-PORT`.
pub fn parse(payload: &str) -> Option<Switch> {
    let fields: Vec<&str> = payload.split_whitespace().collect();
    let [master, _, _, host, port] = fields.as_slice() else {
        return None;
    };
    Some(Switch {
        master: master.to_string(),
        host: host.to_string(),
        port: port.parse().ok()?,
    })
}

/// The `redis-sentinel-watch` thread's body: for the life of the process.
/// `on_switch` is called for each switch of `sentinels.master`.
pub fn follow(sentinels: &Sentinels, interval: Duration, on_switch: impl Fn(&Switch)) {
    // Said once per outage, not at every attempt.
    let mut failing = false;
    loop {
        for (index, (host, port)) in sentinels.addrs.iter().enumerate() {
            let mut subscribed = false;
            let e = listen(sentinels, index, interval, &on_switch, &mut subscribed)
                .expect_err("listening only ends on an error");
            if subscribed || !failing {
                warn!(
                    "redis sentinel {host}:{port}: not listening for +switch-master ({e}); \
                     trying the next sentinel"
                );
            }
            failing = !subscribed;
        }
        thread::sleep(interval);
    }
}

/// Listens to the sentinel at `index` until its link fails.
fn listen(
    sentinels: &Sentinels,
    index: usize,
    interval: Duration,
    on_switch: &impl Fn(&Switch),
    subscribed: &mut bool,
) -> Result<(), RedisError> {
    let (host, port) = &sentinels.addrs[index];
    let mut connection = sentinels.connect(host, *port)?;
    let mut pubsub = connection.as_pubsub();
    pubsub.subscribe("+switch-master")?;
    *subscribed = true;
    pubsub.set_read_timeout(Some(interval))?;
    info!(
        "redis sentinel {host}:{port}: listening for +switch-master of {:?}",
        sentinels.master
    );
    loop {
        match pubsub.get_message() {
            Ok(message) => {
                let payload: String = message.get_payload().unwrap_or_default();
                match parse(&payload) {
                    Some(switch) if switch.master == sentinels.master => {
                        info!(
                            "redis sentinel {host}:{port}: +switch-master: the primary of {:?} \
                             is now {}:{}; every link moves to it",
                            switch.master, switch.host, switch.port
                        );
                        sentinels.ask_first(index);
                        on_switch(&switch);
                    }
                    Some(_) => {}
                    None => warn!(
                        "redis sentinel {host}:{port}: unreadable +switch-master: {payload:?}"
                    ),
                }
            }
            // Quiet for an interval: the sentinel must still answer, within
            // its own timeout.
            Err(e) if e.is_timeout() => {
                pubsub.ping::<redis::Value>()?;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_names_the_master_and_its_new_address() {
        let switch = parse("m 127.0.0.1 6379 10.0.0.7 6380").unwrap();
        assert_eq!(
            switch,
            Switch {
                master: "m".into(),
                host: "10.0.0.7".into(),
                port: 6380
            }
        );
        assert!(switch.is_at("10.0.0.7:6380".parse().unwrap()));
        assert!(!switch.is_at("10.0.0.7:6379".parse().unwrap()));
        assert!(!switch.is_at("127.0.0.1:6380".parse().unwrap()));
        assert_eq!(parse("m 127.0.0.1 6379"), None);
        assert_eq!(parse("m a 1 b port"), None);
    }
}
