//! The Origin check against cross-site WebSocket hijacking.
//!
//! A browser sends cookies and credentials with a WebSocket handshake to
//! any site, whatever page started it; the `Origin` header is the only sign
//! of who did. Browsers always send it, so a handshake without one comes
//! from a non-browser client (a load tester, a bot), which no hijacking
//! page can use: those are let through.

/// Which pages may open a WebSocket here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// The ports this instance serves its page on (the public one and the
    /// admin listener's): its own page is `http://<host>:<port>`.
    pub page_ports: Vec<u16>,
    /// Extra allowed origins (`https://chat.example.com`), or `*` for any.
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    /// Whether a handshake with this `Origin` and `Host` is accepted.
    ///
    /// Allowed: no `Origin`; an origin whose host and port are the
    /// handshake's `Host` (the page and the WebSocket behind one proxy); an
    /// origin on the same host name as `Host` and on a port this instance
    /// serves its page on; anything in the allowlist.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        let origin = origin.trim_end_matches('/');
        if self
            .allowed
            .iter()
            .any(|allowed| allowed == "*" || allowed.trim_end_matches('/') == origin)
        {
            return true;
        }
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        let Some(host) = host else {
            return false;
        };
        if authority.eq_ignore_ascii_case(host) {
            return true;
        }
        let (origin_host, origin_port) = split_port(authority);
        let (host_name, _) = split_port(host);
        origin_host.eq_ignore_ascii_case(host_name)
            && origin_port.is_some_and(|port| self.page_ports.contains(&port))
    }
}

/// `host:port` into its parts; IPv6 literals keep their brackets.
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => (host, port.parse().ok()),
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> OriginPolicy {
        OriginPolicy {
            page_ports: vec![5000, 25000],
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_instances_own_page_is_allowed() {
        let p = policy(&[]);
        assert!(p.allows(Some("http://127.0.0.1:5000"), Some("127.0.0.1:15000")));
        assert!(
            p.allows(Some("http://127.0.0.1:25000"), Some("127.0.0.1:15000")),
            "the page of the admin listener"
        );
        assert!(!p.allows(Some("http://127.0.0.1:5001"), Some("127.0.0.1:15000")));
        assert!(p.allows(Some("http://localhost:5000"), Some("localhost:15000")));
        assert!(
            p.allows(Some("http://chat.local:8080"), Some("chat.local:8080")),
            "same origin via a proxy"
        );
        assert!(
            p.allows(None, Some("127.0.0.1:15000")),
            "non-browser clients"
        );
        assert!(p.allows(Some("http://[::1]:5000"), Some("[::1]:15000")));
    }

    #[test]
    fn other_pages_are_refused_unless_allowed() {
        let p = policy(&[]);
        assert!(!p.allows(Some("http://evil.example"), Some("127.0.0.1:15000")));
        assert!(!p.allows(Some("http://127.0.0.1:6666"), Some("127.0.0.1:15000")));
        assert!(!p.allows(Some("http://evil.example:5000"), Some("127.0.0.1:15000")));
        assert!(!p.allows(Some("null"), Some("127.0.0.1:15000")));
        assert!(
            policy(&["https://chat.example.com"])
                .allows(Some("https://chat.example.com"), Some("x"))
        );
        assert!(policy(&["*"]).allows(Some("http://anything"), Some("x")));
    }
}
