//! Why Redis cannot be used, in words that send the operator to the real
//! problem: a Redis that answered (a wrong password, a database it does
//! not have) is running, and being told to start one would mislead; only a
//! refused connection gets the "start Redis" hint.

use redis::{ErrorKind, RedisError};

use super::tls;

/// What the logs and `/readyz` say when connecting to `url` (shown
/// without its password) failed with `e`. `db` is the database the URL
/// asked for; `option` where the URL was given (`--redis-url / REDIS_URL`
/// or `--redis-cluster / REDIS_CLUSTER`).
pub fn explain(e: &RedisError, url: &str, db: i64, option: &str) -> String {
    // redis-rs answers a WRONGPASS to the AUTH it sends when it connects
    // with an error of its own, without Redis's code.
    if e.kind() == ErrorKind::AuthenticationFailed {
        return format!(
            "{url} refused the login: {e} (check the password, and the user name of an ACL user, \
             in {option})"
        );
    }
    if let Some(code) = e.code() {
        let answer = match e.detail() {
            Some(detail) => format!("{code} {detail}"),
            None => code.to_string(),
        };
        let detail = e.detail().unwrap_or_default();
        return match code {
            "WRONGPASS" => format!(
                "{url} refused the login: {answer} (check the password, and the user name of an ACL \
                 user, in {option})"
            ),
            "NOAUTH" => format!(
                "{url} wants a password: {answer} (give it in {option}: redis://:PASSWORD@HOST:PORT, \
                 or redis://USER:PASSWORD@HOST:PORT for an ACL user)"
            ),
            "NOPERM" => format!(
                "{url} refused a command to this user: {answer} (the ACL user needs the chat's keys, \
                 channels and commands: ACL SETUSER USER on >PASSWORD ~* &* +@all)"
            ),
            "ERR" if detail.starts_with("AUTH") && detail.contains("without any password") => {
                format!(
                    "{url} refused AUTH: {answer} (this Redis has no password: remove the password \
                     from --redis-url, or set one in Redis with requirepass)"
                )
            }
            "ERR" if detail.contains("DB index is out of range") => format!(
                "{url} has no database {db}: {answer} (use a number below the Redis's `databases` \
                 setting, 16 by default: 0 to 15)"
            ),
            _ => format!("{url} answered: {answer}"),
        };
    }
    if let Some((cause, advice)) = tls::cause(&e.to_string()) {
        return format!("{url}: TLS failed, {cause}: {e} ({advice})");
    }
    if e.is_connection_refusal() {
        format!(
            "{url} unreachable: {e} (start Redis with `redis-server`, or run without it: --broker local)"
        )
    } else if e.is_timeout() {
        format!(
            "{url} did not answer in time: {e} (is the host right, and is the port open to this machine?)"
        )
    } else {
        format!("{url} unreachable: {e}")
    }
}

/// The short form a client's `unavailable` error carries: what failed,
/// without the advice meant for the operator.
pub fn for_clients(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("redis refused this server ({code} {detail})"),
        (Some(code), None) => format!("redis refused this server ({code})"),
        _ if e.to_string().contains("sentinel") => {
            // Its words name the sentinels' and the primary's addresses.
            "redis is unreachable (no primary found through the sentinels)".to_string()
        }
        _ => match tls::cause(&e.to_string()) {
            Some((cause, _)) => format!("redis is unreachable (TLS failed, {cause}: {e})"),
            None => format!("redis is unreachable ({e})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, Value};

    /// The error a reply of Redis `-<line>` becomes.
    fn answered(line: &str) -> RedisError {
        let mut parser = redis::Parser::new();
        let value = parser
            .parse_value(format!("-{line}\r\n").as_bytes())
            .unwrap();
        let Value::ServerError(error) = value else {
            panic!("not an error: {value:?}")
        };
        error.into()
    }

    #[test]
    fn what_redis_answered_is_said_without_the_start_redis_hint() {
        let url = "redis://:***@h:6379";
        for (line, says) in [
            (
                "WRONGPASS invalid username-password pair or user is disabled.",
                "refused the login: WRONGPASS invalid",
            ),
            (
                "NOAUTH Authentication required.",
                "wants a password: NOAUTH",
            ),
            (
                "ERR AUTH <password> called without any password configured for the default user.",
                "this Redis has no password",
            ),
            (
                "ERR DB index is out of range",
                "has no database 99: ERR DB index is out of range",
            ),
        ] {
            let text = explain(&answered(line), url, 99, SINGLE);
            assert!(text.contains(says), "{text}");
            assert!(text.starts_with(url), "{text}");
            assert!(!text.contains("start Redis"), "{text}");
        }
    }

    const SINGLE: &str = "--redis-url / REDIS_URL";

    #[test]
    fn a_login_redis_rs_refused_itself_is_told_like_a_wrongpass() {
        let e: RedisError = (
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        )
            .into();
        let text = explain(
            &e,
            "the redis cluster at redis://:***@h:7000",
            0,
            "--redis-cluster / REDIS_CLUSTER",
        );
        assert!(text.contains("refused the login"), "{text}");
        assert!(text.contains("--redis-cluster / REDIS_CLUSTER"), "{text}");
        assert!(!text.contains("start Redis"), "{text}");
    }

    #[test]
    fn only_a_refused_connection_says_to_start_redis() {
        let refused: RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(
            explain(&refused, "redis://h", 0, SINGLE).contains("start Redis with `redis-server`")
        );
        let other: RedisError = (ErrorKind::Io, "broken").into();
        assert!(!explain(&other, "redis://h", 0, SINGLE).contains("start Redis"));
    }

    #[test]
    fn a_tls_failure_names_its_cause_and_what_to_do() {
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e: RedisError = std::io::Error::new(std::io::ErrorKind::InvalidData, untrusted).into();
        let text = explain(&e, "rediss://h:6380", 0, SINGLE);
        assert!(
            text.starts_with("rediss://h:6380: TLS failed, certificate not trusted"),
            "{text}"
        );
        assert!(text.contains("--redis-ca-file"), "{text}");
        assert!(!text.contains("start Redis"), "{text}");
        assert!(for_clients(&e).contains("certificate not trusted"));
    }
}
