//! A Redis URL as the operator gives it (`--redis-url`, `--redis-cluster`):
//! checked at start, with a message that names the wrong part and shows a
//! valid URL, and shown everywhere without its password.
//!
//! [`redact`] is the one place a URL is made fit to show: [`RedisUrl`]'s
//! `Display` and `Debug` both go through it, so a log line, a `/readyz`
//! body or a `{:?}` of the whole configuration cannot leak the password.
//! The secret itself only leaves through [`RedisUrl::connection_info`],
//! which goes to the Redis client and nowhere else.

use std::fmt;
use std::str::FromStr;

use redis::{ConnectionInfo, IntoConnectionInfo};

/// Valid URLs, for the messages that refuse one.
pub const EXAMPLES: &str = "redis://127.0.0.1:6379 (with a password: redis://:PASSWORD@127.0.0.1:6379; \
     an ACL user: redis://USER:PASSWORD@127.0.0.1:6379; database 2: redis://127.0.0.1:6379/2; \
     TLS: rediss://:PASSWORD@redis.example.com:6380)";

/// A URL with its password replaced by `***`: `redis://:***@host:6379`,
/// `redis://user:***@host`. A user part with no `:` is shown as `***` too:
/// `redis-cli` reads `redis://WORD@host` as a password.
///
/// The user part runs to the URL's last `@`, so a password holding an `@`
/// or a `/` that was not percent-encoded is hidden whole all the same.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // No scheme: whatever precedes an `@` may be a secret.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        };
    };
    match rest.rsplit_once('@') {
        None => url.to_string(),
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
    }
}

/// A checked Redis URL. Shows (`Display`, `Debug`) without its password.
#[derive(Clone)]
pub struct RedisUrl {
    info: ConnectionInfo,
    shown: String,
}

impl RedisUrl {
    /// Checks `url`: scheme `redis://` (or `rediss://`, TLS), a host, a
    /// port from 1 to 65535, a database number, a password with any user
    /// name.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let shown = redact(url);
        let refuse = |what: String| format!("--redis-url {shown}: {what}; a valid one: {EXAMPLES}");
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(refuse("no scheme: it must start with redis://".into()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "redis" | "valkey" | "rediss" | "valkeys" => {}
            "unix" | "redis+unix" | "valkey+unix" => {
                return Err(refuse(
                    "Unix sockets are not supported (the subscriber speaks TCP): use redis://HOST:PORT"
                        .into(),
                ));
            }
            other => {
                return Err(refuse(format!(
                    "scheme {other}:// is not Redis's: use redis://"
                )));
            }
        }
        if url.ends_with("#insecure") {
            // redis-rs would skip checking the certificate, unannounced.
            return Err(refuse(
                "#insecure is not read here: to skip checking Redis's certificate (a test only), \
                 give --redis-tls-insecure"
                    .into(),
            ));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (user_info, host_port) = match rest.rsplit_once('@') {
            Some((user_info, _)) => {
                let after = &rest[user_info.len() + 1..];
                (
                    Some(user_info),
                    after.split(['/', '?', '#']).next().unwrap_or_default(),
                )
            }
            None => (None, authority),
        };
        if let Some(user_info) = user_info
            && !user_info.contains(':')
        {
            return Err(refuse(
                "a user name with no password (USER@) is not sent to Redis: write the password after \
                 a colon, redis://:PASSWORD@HOST (or redis://USER:PASSWORD@HOST for an ACL user)"
                    .into(),
            ));
        }
        let (host, port) = split_host_port(host_port);
        if host.is_empty() {
            return Err(refuse("no host: write one after redis://".into()));
        }
        if let Some(port) = port {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ if port.chars().all(|c| c.is_ascii_digit()) && !port.is_empty() => {
                    return Err(refuse(format!("port {port} is out of range (1 to 65535)")));
                }
                _ => return Err(refuse(format!("port {port:?} is not a number"))),
            }
        }
        let info = url.into_connection_info().map_err(|e| {
            // The client library's words, without the URL (it does not
            // repeat it) and without its error kind.
            let why = e.detail().map_or_else(
                || {
                    e.to_string()
                        .split(" - ")
                        .next()
                        .unwrap_or_default()
                        .to_string()
                },
                str::to_string,
            );
            refuse(why.to_lowercase())
        })?;
        if info.redis_settings().db() < 0 {
            return Err(refuse("the database number must be 0 or more".into()));
        }
        Ok(RedisUrl { info, shown })
    }

    /// Where and how to connect, password included: for the Redis client
    /// only.
    pub fn connection_info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The URL without its password.
    pub fn redacted(&self) -> &str {
        &self.shown
    }

    /// Whether it speaks TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        matches!(self.info.addr(), redis::ConnectionAddr::TcpTls { .. })
    }
}

/// `host:port`, `[v6]:port`, `host` → (host, port if written).
fn split_host_port(host_port: &str) -> (&str, Option<&str>) {
    if let Some(v6) = host_port.strip_prefix('[') {
        return match v6.split_once(']') {
            Some((host, rest)) => (host, rest.strip_prefix(':')),
            None => (v6, None),
        };
    }
    match host_port.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_port, None),
    }
}

impl FromStr for RedisUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        RedisUrl::parse(url)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.shown)
    }
}

/// clap's parser for a [`RedisUrl`]: clap's own would repeat the refused
/// value, password and all, in its message.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisUrlParser;

impl clap::builder::TypedValueParser for RedisUrlParser {
    type Value = RedisUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<RedisUrl, clap::Error> {
        let refuse = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{message}\n"),
            )
            .with_cmd(cmd)
        };
        let url = value.to_str().ok_or_else(|| {
            refuse(format!(
                "a Redis URL must be UTF-8; a valid one: {EXAMPLES}"
            ))
        })?;
        RedisUrl::parse(url).map_err(refuse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_replaced_and_the_rest_kept() {
        assert_eq!(redact("redis://:pw@host:6379"), "redis://:***@host:6379");
        assert_eq!(redact("redis://user:pw@host/2"), "redis://user:***@host/2");
        assert_eq!(redact("redis://pw@host"), "redis://***@host");
        assert_eq!(redact("redis://:p@ss/w@host"), "redis://:***@host");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("pw@host:6379"), "***@host:6379");
    }

    #[test]
    fn display_and_debug_show_no_password() {
        let url = RedisUrl::parse("redis://chat:hunter2@127.0.0.1:6379/1").unwrap();
        assert_eq!(url.to_string(), "redis://chat:***@127.0.0.1:6379/1");
        assert!(!format!("{url:?}").contains("hunter2"));
        let settings = url.connection_info().redis_settings();
        assert_eq!(settings.password(), Some("hunter2"));
        assert_eq!(settings.username(), Some("chat"));
        assert_eq!(settings.db(), 1);
    }

    fn refusal(url: &str) -> String {
        let e = RedisUrl::parse(url).expect_err(url);
        assert!(!e.contains("InvalidClientConfig"), "{e}");
        assert!(!e.contains("secret"), "the refusal shows the password: {e}");
        e
    }

    #[test]
    fn another_scheme_is_named_with_a_valid_example() {
        let e = refusal("http://:secret@127.0.0.1:6379");
        assert!(e.contains("scheme http:// is not Redis's"), "{e}");
        assert!(e.contains("redis://127.0.0.1:6379"), "{e}");
    }

    #[test]
    fn a_port_out_of_range_is_named() {
        let e = refusal("redis://:secret@127.0.0.1:70000");
        assert!(e.contains("port 70000 is out of range"), "{e}");
        assert!(refusal("redis://127.0.0.1:0").contains("port 0 is out of range"));
        assert!(refusal("redis://127.0.0.1:x").contains("port \"x\" is not a number"));
    }

    #[test]
    fn a_url_without_a_scheme_is_told_to_start_with_redis() {
        let e = refusal("127.0.0.1:6379");
        assert!(e.contains("no scheme: it must start with redis://"), "{e}");
        let e = refusal("secret@127.0.0.1:6379");
        assert!(e.contains("no scheme"), "{e}");
    }

    #[test]
    fn tls_urls_are_taken_and_insecure_only_as_an_option() {
        let url = RedisUrl::parse("rediss://:secret@redis.example.com:6380/1").unwrap();
        assert!(url.is_tls());
        assert_eq!(url.to_string(), "rediss://:***@redis.example.com:6380/1");
        assert!(!RedisUrl::parse("redis://127.0.0.1").unwrap().is_tls());
        let e = refusal("rediss://:secret@redis.example.com:6380/#insecure");
        assert!(e.contains("--redis-tls-insecure"), "{e}");
    }

    #[test]
    fn other_mistakes_are_named() {
        assert!(refusal("redis://:secret@/0").contains("no host"));
        assert!(refusal("redis://secret@127.0.0.1").contains("user name with no password"));
        assert!(refusal("redis+unix:///tmp/redis.sock").contains("Unix sockets"));
        assert!(refusal("redis://127.0.0.1:6379/x").contains("invalid database number"));
        assert!(refusal("redis://0.0.0.0:6379").contains("wildcard"));
    }

    #[test]
    fn good_urls_pass() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://localhost",
            "redis://:pw@redis.internal:6379/3",
            "redis://user:p%40ss@[::1]:6379",
            "REDIS://127.0.0.1",
            "rediss://user:pw@redis.example.com:6380",
        ] {
            RedisUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}
