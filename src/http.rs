//! The HTTP side, served by tiny_http on two listeners.
//!
//! - The public port: the chat page, `/config.json`, `/healthz` and
//!   `/readyz`, which says ready or not and never why: the why names the
//!   Redis host, port, database and user.
//! - The admin listener (`--admin-addr`, loopback by default), for the
//!   operator and the lesson: the same page, with its instances view and,
//!   with `--demo-controls`, its fault panel (`POST /demo/...`);
//!   `/metrics`, `/stats` and `/readyz` with its reasons. Kubernetes
//!   probes and Prometheus expect such a port; Centrifugo serves its admin
//!   the same way.
//!
//! [`route`] is a pure function from a request to a [`Reply`], so every
//! route is unit-tested without a socket; [`serve`] is the thin loop that
//! feeds it from tiny_http.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use serde::Serialize;

use crate::broker::Broker;
use crate::broker::report::InstanceReport;
use crate::clock;
use crate::delivery::hub::Hub;
use crate::demo::{self, DemoControls};
use crate::metrics::Metrics;
use crate::stats::Stats;
use crate::supervisor::Supervisor;

/// A row of [`PAGE_FILES`]: `client/<file>`, served at `/<file>`.
macro_rules! client_file {
    ($file:literal, $content_type:expr) => {
        (
            concat!("/", $file),
            $content_type,
            include_str!(concat!("../client/", $file)),
        )
    };
}

/// The page, embedded so the binary serves it from any directory: each
/// file's path, content type and text (`/` serves `/index.html`). The
/// scripts are ES modules that `app.js` loads, so a new file under
/// `client/` needs a row here; the test `every_file_the_page_loads_is_served`
/// follows the page's references and fails if one is missing.
const PAGE_FILES: &[(&str, &str, &str)] = &[
    client_file!("index.html", HTML),
    client_file!("style.css", CSS),
    client_file!("app.js", JS),
    client_file!("js/dom.js", JS),
    client_file!("js/format.js", JS),
    client_file!("js/session.js", JS),
    client_file!("js/state.js", JS),
    client_file!("js/xray.js", JS),
    client_file!("js/conversation.js", JS),
    client_file!("js/presence.js", JS),
    client_file!("js/lab.js", JS),
    client_file!("js/token.js", JS),
    client_file!("js/socket.js", JS),
    client_file!("js/page.js", JS),
];
const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The embedded page file at `path`, if there is one.
fn page_file(path: &str) -> Option<Reply> {
    let path = if path == "/" { "/index.html" } else { path };
    PAGE_FILES
        .iter()
        .find(|(file, _, _)| *file == path)
        .map(|&(_, content_type, body)| Reply::new(200, content_type, body))
}

/// Which of the two listeners a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--port`: anyone on the network.
    Public,
    /// `--admin-addr`: the operator, and this machine's lesson page.
    Admin,
}

/// What the HTTP handlers read.
pub struct HttpState {
    pub instance: String,
    pub ws_port: u16,
    pub ws_path: &'static str,
    pub public_ws_url: Option<String>,
    pub http_port: u16,
    pub broker: Arc<dyn Broker>,
    pub supervisor: Arc<Supervisor>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub stats: Arc<Stats>,
    pub demo: Arc<DemoControls>,
    /// `--presence on|off`: the page shows the member list only when on.
    pub presence: bool,
    /// `--auth token`: the page sends a token first.
    pub auth: bool,
    /// `--auth-token-url`: where the page gets a fresh token.
    pub auth_token_url: Option<String>,
}

/// `GET /config.json`: how the page finds its WebSocket.
#[derive(Debug, Serialize)]
struct PageConfig<'a> {
    instance: &'a str,
    ws_port: u16,
    ws_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_url: Option<&'a str>,
    /// The page was served by the admin listener: it shows the instances
    /// view (`/stats` is there).
    admin: bool,
    /// The page shows its fault panel (`--demo-controls`, on the admin
    /// listener).
    demo_controls: bool,
    /// What the fault panel's requests carry: only for a page of this
    /// machine loaded straight from this instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    demo_token: Option<&'a str>,
    /// The page shows who is here, and who is typing (`--presence`).
    presence: bool,
    /// `"token"`: the page sends a token in its first frame; `"off"`.
    auth: &'a str,
    /// Where the page gets a fresh token (`--auth-token-url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token_url: Option<&'a str>,
}

/// Who a request comes from, as far as the answer depends on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Caller<'a> {
    /// The connection's peer address.
    pub peer: Option<IpAddr>,
    /// `Host`.
    pub host: Option<&'a str>,
    /// `Origin`: the page that sent it, if a browser says.
    pub origin: Option<&'a str>,
    /// `X-Demo-Token`.
    pub demo_token: Option<&'a str>,
    /// It names a proxy (`Forwarded`, `X-Forwarded-*`, `Via`): its real
    /// origin is elsewhere.
    pub proxied: bool,
}

impl Caller<'_> {
    /// On this machine, and not through a proxy on it.
    fn is_local_and_straight(&self) -> bool {
        self.peer.is_some_and(|peer| peer.is_loopback()) && !self.proxied
    }

    /// Reads what matters from a request's headers.
    fn of(request: &tiny_http::Request) -> Caller<'_> {
        let header = |name: &'static str| {
            request
                .headers()
                .iter()
                .find(|header| header.field.equiv(name))
                .map(|header| header.value.as_str())
        };
        let proxied = request.headers().iter().any(|header| {
            let field = header.field.as_str().as_str().to_ascii_lowercase();
            field == "forwarded" || field == "via" || field.starts_with("x-forwarded-")
        });
        Caller {
            peer: request.remote_addr().map(|addr| addr.ip()),
            host: header("Host"),
            origin: header("Origin"),
            demo_token: header("X-Demo-Token"),
            proxied,
        }
    }
}

/// `GET /stats`: the page's instances view.
#[derive(Debug, Serialize)]
struct StatsReply<'a> {
    /// The instance that answered.
    instance: &'a str,
    at_ms: u64,
    demo_controls: bool,
    /// Every instance that reported lately (through Redis), by name.
    instances: Vec<InstanceReport>,
    /// Set when the others could not be read: only this one is listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    local: LocalStats,
}

#[derive(Debug, Serialize)]
struct LocalStats {
    /// Until when `/demo/pause-delivery` holds delivery, if it does.
    delivery_paused_until_ms: Option<u64>,
}

/// An HTTP answer, before tiny_http sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            content_type,
            body: body.into(),
        }
    }

    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply::new(status, "text/plain; charset=utf-8", body)
    }
}

/// Answers one request that came to `listener`.
pub fn route(
    method: &str,
    url: &str,
    caller: &Caller<'_>,
    state: &HttpState,
    listener: Listener,
) -> Reply {
    let path = url.split(['?', '#']).next().unwrap_or("/");
    let admin_only = path.starts_with("/demo/") || path == "/metrics" || path == "/stats";
    match listener {
        Listener::Public if admin_only => Reply::text(
            404,
            format!(
                "{path} is not served on the public port: it is on the instance's admin \
                 listener (--admin-addr)\n"
            ),
        ),
        Listener::Admin if path.starts_with("/demo/") => handle_demo(method, url, caller, state),
        _ => handle(method, path, caller, state, listener),
    }
}

/// Answers a `GET` or `HEAD` of `path` (the URL without its query).
///
/// `/config.json` uses the caller's `Host` to tell a page loaded straight
/// from this instance (which must use the instance's own WebSocket port)
/// from one loaded through a proxy (which gets `--public-ws-url`), and
/// gives the fault panel's token only to a page of this machine, loaded
/// straight from the admin listener.
fn handle(
    method: &str,
    path: &str,
    caller: &Caller<'_>,
    state: &HttpState,
    listener: Listener,
) -> Reply {
    let host = caller.host;
    let admin = listener == Listener::Admin;
    if method != "GET" && method != "HEAD" {
        return Reply::text(405, "only GET and HEAD are served here\n");
    }
    if let Some(file) = page_file(path) {
        return file;
    }
    match path {
        "/config.json" => {
            let config = PageConfig {
                instance: &state.instance,
                ws_port: state.ws_port,
                ws_path: state.ws_path,
                ws_url: state
                    .public_ws_url
                    .as_deref()
                    .filter(|_| !admin && !is_direct(host, state.http_port)),
                admin,
                demo_controls: admin && state.demo.enabled(),
                demo_token: (admin && state.demo.enabled() && caller.is_local_and_straight())
                    .then(|| state.demo.token()),
                presence: state.presence,
                auth: if state.auth { "token" } else { "off" },
                auth_token_url: state.auth_token_url.as_deref(),
            };
            let body = serde_json::to_vec(&config).expect("page config always serializes");
            Reply::new(200, "application/json", body)
        }
        "/healthz" => Reply::text(200, "ok\n"),
        "/stats" => stats(state),
        "/readyz" => match state
            .supervisor
            .readiness()
            .and_then(|()| state.broker.readiness())
        {
            Ok(()) => Reply::text(200, "ready\n"),
            Err(reason) if admin => Reply::text(503, format!("not ready: {reason}\n")),
            Err(_) => Reply::text(
                503,
                "not ready: this instance cannot deliver right now; its admin listener's \
                 /readyz says why\n",
            ),
        },
        "/metrics" => {
            let mut body = state.metrics.render();
            body.push_str(
                "# HELP chat_hub_members Clients registered in the hub, over all rooms.\n",
            );
            body.push_str("# TYPE chat_hub_members gauge\n");
            body.push_str(&format!("chat_hub_members {}\n", state.hub.len()));
            Reply::new(200, "text/plain; version=0.0.4; charset=utf-8", body)
        }
        _ => Reply::text(404, format!("no page at {path}\n")),
    }
}

/// `GET /stats`: every instance that is up, as the broker knows them; this
/// one alone when the broker cannot be asked.
fn stats(state: &HttpState) -> Reply {
    let (instances, error) = match state.broker.instances() {
        Ok(instances) if !instances.is_empty() => (instances, None),
        Ok(_) => (vec![state.stats.latest()], None),
        Err(e) => (vec![state.stats.latest()], Some(e.to_string())),
    };
    let reply = StatsReply {
        instance: &state.instance,
        at_ms: clock::wall_millis(),
        demo_controls: state.demo.enabled(),
        instances,
        error,
        local: LocalStats {
            delivery_paused_until_ms: state.demo.delivery_paused_until(),
        },
    };
    let body = serde_json::to_vec(&reply).expect("stats always serialize");
    Reply::new(200, "application/json", body)
}

/// `POST /demo/...` on the admin listener, the fault panel: refused (403)
/// unless the instance runs with `--demo-controls` and the caller is this
/// instance's page on this machine (see [`crate::demo`]).
fn handle_demo(method: &str, url: &str, caller: &Caller<'_>, state: &HttpState) -> Reply {
    if !state.demo.enabled() {
        return Reply::text(
            403,
            "demo controls are off: start the instance with --demo-controls (or DEMO_CONTROLS=1)\n",
        );
    }
    if !caller.peer.is_some_and(|peer| peer.is_loopback()) {
        return Reply::text(403, "demo controls answer loopback clients only\n");
    }
    if method != "POST" {
        return Reply::text(405, "demo controls are POST requests\n");
    }
    if caller.proxied {
        return Reply::text(
            403,
            "demo controls do not answer through a proxy (Forwarded, X-Forwarded-*, Via): \
             open the page straight from the instance's port\n",
        );
    }
    if let Some(origin) = caller.origin
        && caller
            .host
            .is_none_or(|host| origin != format!("http://{host}"))
    {
        return Reply::text(
            403,
            format!("demo controls answer this instance's own page, not another site ({origin})\n"),
        );
    }
    if caller.demo_token != Some(state.demo.token()) {
        return Reply::text(
            403,
            "demo controls need the X-Demo-Token header: the token the instance printed at \
             start (the page gets it from /config.json)\n",
        );
    }
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    let seconds = |default: u64| match param("seconds") {
        None => Ok(default),
        Some(text) => match text.parse::<u64>() {
            Ok(n) if (1..=demo::MAX_SECONDS).contains(&n) => Ok(n),
            _ => Err(Reply::text(
                400,
                format!(
                    "seconds must be a whole number from 1 to {}, not {text:?}\n",
                    demo::MAX_SECONDS
                ),
            )),
        },
    };
    let done = |message: String| {
        let body = serde_json::json!({"ok": true, "message": message}).to_string();
        Reply::new(200, "application/json", body)
    };
    match path {
        "/demo/cut-subscription" => {
            // Without `seconds`, the subscriber reconnects at once.
            match seconds(0).map(|n| state.broker.cut_subscription(Duration::from_secs(n))) {
                Ok(Ok(message)) => {
                    warn!("demo control: {message}");
                    done(message)
                }
                Ok(Err(message)) => Reply::text(409, format!("{message}\n")),
                Err(reply) => reply,
            }
        }
        "/demo/pause-delivery" => match seconds(5) {
            Ok(n) => {
                state.demo.pause_delivery(n);
                done(format!(
                    "delivery on {} is paused for {n} s: messages wait in order, then arrive",
                    state.instance
                ))
            }
            Err(reply) => reply,
        },
        "/demo/stall-reading" => {
            let n = match seconds(10) {
                Ok(n) => n,
                Err(reply) => return reply,
            };
            let Some(client) = param("client")
                .as_deref()
                .map(|id| id.strip_prefix('c').unwrap_or(id))
                .and_then(|id| id.parse::<u64>().ok())
            else {
                return Reply::text(
                    400,
                    "client must be a client id from the welcome frame, like c12\n",
                );
            };
            match state.demo.stall_reading(&state.hub, client, n) {
                demo::Stall::Started => done(format!(
                    "c{client}'s socket is not written to for {n} s, as if the tab had stopped \
                     reading: its frames wait in its outbox, and past the limit it is dropped \
                     as a slow consumer"
                )),
                demo::Stall::NoSuchClient => {
                    Reply::text(404, format!("no client c{client} on {}\n", state.instance))
                }
                demo::Stall::TooMany => Reply::text(
                    429,
                    format!(
                        "{} stalls are in progress on {}: wait for one to end\n",
                        demo::MAX_STALLS,
                        state.instance
                    ),
                ),
            }
        }
        _ => Reply::text(404, format!("no demo control at {path}\n")),
    }
}

/// Whether a request came straight to this instance's HTTP port rather
/// than through a proxy: its `Host` names that port.
fn is_direct(host: Option<&str>, http_port: u16) -> bool {
    host.and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        == Some(http_port)
}

/// The body of an HTTP worker thread of `listener`: answers requests until
/// the server is unblocked at shutdown.
pub fn serve(server: &tiny_http::Server, state: &HttpState, listener: Listener) {
    while let Ok(request) = server.recv() {
        let method = request.method().as_str().to_string();
        let caller = Caller::of(&request);
        let reply = route(&method, request.url(), &caller, state, listener);
        debug!(
            "http {listener:?} {method} {} -> {}",
            request.url(),
            reply.status
        );
        let header = tiny_http::Header::from_bytes("Content-Type", reply.content_type)
            .expect("content types are valid header values");
        let no_store =
            tiny_http::Header::from_bytes("Cache-Control", "no-store").expect("a valid header");
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            reply.body
        };
        let response = tiny_http::Response::from_data(body)
            .with_status_code(reply.status)
            .with_header(header)
            .with_header(no_store);
        if let Err(e) = request.respond(response) {
            warn!("http: cannot answer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::local::LocalBroker;
    use crate::delivery::hub::Hub;

    fn state_with(demo_controls: bool) -> HttpState {
        let metrics = Arc::new(Metrics::default());
        let (events_tx, _events_rx) = crossbeam_channel::unbounded();
        HttpState {
            instance: "a1".into(),
            ws_port: 15000,
            ws_path: "/ws",
            public_ws_url: Some("/ws".into()),
            http_port: 5000,
            broker: Arc::new(LocalBroker::new(
                events_tx,
                metrics.clone(),
                10,
                "a1".into(),
            )),
            supervisor: Supervisor::new().0,
            metrics,
            hub: Arc::new(Hub::new()),
            stats: Arc::new(Stats::new(InstanceReport {
                instance: "a1".into(),
                clients: 0,
                rooms: 0,
                published_per_s: 0.0,
                delivered_per_s: 0.0,
                up_since_ms: 0,
                seen_ms: 0,
                redis: "up".into(),
                slow_clients_dropped: 0,
                redis_reconnects: 0,
                history_replayed: 0,
            })),
            demo: Arc::new(DemoControls::new(demo_controls)),
            presence: true,
            auth: false,
            auth_token_url: None,
        }
    }

    fn state() -> HttpState {
        state_with(false)
    }

    #[test]
    fn the_demo_controls_answer_only_when_enabled_and_only_loopback_callers() {
        let from = |peer: Option<IpAddr>, token: &str| {
            let token = token.to_string();
            move |state: &HttpState, url: &str| {
                let caller = Caller {
                    peer,
                    demo_token: Some(&token),
                    ..Caller::default()
                };
                route("POST", url, &caller, state, Listener::Admin)
            }
        };
        let loopback = Some(IpAddr::from([127, 0, 0, 1]));
        let off = state_with(false);
        let reply = from(loopback, "")(&off, "/demo/pause-delivery");
        assert_eq!(reply.status, 403);
        assert!(String::from_utf8_lossy(&reply.body).contains("--demo-controls"));

        let on = state_with(true);
        let token = on.demo.token().to_string();
        let elsewhere = Some(IpAddr::from([192, 168, 1, 20]));
        let reply = from(elsewhere, &token)(&on, "/demo/pause-delivery?seconds=1");
        assert_eq!(reply.status, 403, "a caller from another machine");
        assert_eq!(
            from(None, &token)(&on, "/demo/pause-delivery?seconds=1").status,
            403,
            "a caller of unknown address"
        );
        let v6 = Some("::1".parse().unwrap());
        let reply = from(v6, &token)(&on, "/demo/pause-delivery?seconds=1");
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(on.demo.delivery_paused_until().is_some());
        let config = |listener| {
            let reply = route("GET", "/config.json", &Caller::default(), &on, listener);
            serde_json::from_slice::<serde_json::Value>(&reply.body).unwrap()
        };
        assert_eq!(config(Listener::Admin)["demo_controls"], true);
        assert_eq!(
            config(Listener::Public)["demo_controls"],
            false,
            "the public page has no fault panel"
        );
    }

    #[test]
    fn the_public_port_serves_no_private_route_and_no_reason() {
        let state = state_with(true);
        let token = state.demo.token().to_string();
        let local = Caller {
            peer: Some(IpAddr::from([127, 0, 0, 1])),
            demo_token: Some(&token),
            ..Caller::default()
        };
        for (method, path) in [
            ("GET", "/metrics"),
            ("GET", "/stats"),
            ("GET", "/stats?x=1"),
            ("POST", "/demo/pause-delivery?seconds=1"),
            ("POST", "/demo/cut-subscription"),
        ] {
            let public = route(method, path, &local, &state, Listener::Public);
            assert_eq!(public.status, 404, "{method} {path} on the public port");
            // The local broker has no subscription to cut: 409.
            let admin = route(method, path, &local, &state, Listener::Admin);
            assert!(
                [200, 409].contains(&admin.status),
                "{method} {path} on the admin listener: {}",
                admin.status
            );
        }
        let failing = state_with(false);
        failing.supervisor.stop();
        let public = route("GET", "/readyz", &local, &failing, Listener::Public);
        let admin = route("GET", "/readyz", &local, &failing, Listener::Admin);
        assert_eq!((public.status, admin.status), (503, 503));
        let (public, admin) = (
            String::from_utf8(public.body).unwrap(),
            String::from_utf8(admin.body).unwrap(),
        );
        assert!(!public.contains("shutting down"), "{public}");
        assert!(admin.contains("shutting down"), "{admin}");
    }

    #[test]
    fn config_json_tells_the_page_where_the_websocket_is() {
        let config = |host| {
            let caller = Caller {
                host,
                ..Caller::default()
            };
            let reply = route("GET", "/config.json", &caller, &state(), Listener::Public);
            assert_eq!(reply.status, 200);
            serde_json::from_slice::<serde_json::Value>(&reply.body).unwrap()
        };
        let direct = serde_json::json!({
            "instance": "a1", "ws_port": 15000, "ws_path": "/ws", "admin": false,
            "demo_controls": false, "presence": true, "auth": "off"
        });
        assert_eq!(
            config(Some("127.0.0.1:5000")),
            direct,
            "a page served by this instance"
        );
        let mut proxied = direct.clone();
        proxied["ws_url"] = "/ws".into();
        assert_eq!(
            config(Some("chat.example.com")),
            proxied,
            "a page served through a proxy"
        );
        assert_eq!(config(Some("127.0.0.1:8080")), proxied);
    }

    #[test]
    fn page_health_and_unknown_routes() {
        let state = state();
        let get = |path| route("GET", path, &Caller::default(), &state, Listener::Public);
        let page = get("/?name=x");
        assert_eq!(
            (page.status, page.content_type),
            (200, "text/html; charset=utf-8")
        );
        assert_eq!(get("/healthz").status, 200);
        assert_eq!(get("/readyz").status, 200);
        assert_eq!(get("/nope").status, 404);
        assert_eq!(
            route("POST", "/", &Caller::default(), &state, Listener::Public).status,
            405
        );
        let metrics = route(
            "GET",
            "/metrics",
            &Caller::default(),
            &state,
            Listener::Admin,
        );
        let metrics = String::from_utf8(metrics.body).unwrap();
        assert!(metrics.contains("chat_clients_connected 0"));
        assert!(metrics.contains("\nchat_hub_members 0\n"));
    }

    /// Every text between `opener` and the next `close` in `text`.
    fn quoted_after<'a>(text: &'a str, opener: &str, close: char) -> Vec<&'a str> {
        text.match_indices(opener)
            .filter_map(|(at, _)| {
                let rest = &text[at + opener.len()..];
                rest.find(close).map(|end| &rest[..end])
            })
            .collect()
    }

    /// `reference`, read in the file at `from`, as a path from the root.
    fn resolve(from: &str, reference: &str) -> String {
        if reference.starts_with('/') {
            return reference.to_string();
        }
        let mut parts: Vec<&str> = from.split('/').collect();
        parts.pop(); // the referring file's own name
        for part in reference.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                _ => parts.push(part),
            }
        }
        parts.join("/")
    }

    /// Follows the page's references (`src` and `href` in the HTML, every
    /// `'./….js'` in a script: its imports, and the list `app.js` loads):
    /// each must be served with its content type, and
    /// every embedded file must be reached, so the table has no stale rows.
    #[test]
    fn every_file_the_page_loads_is_served() {
        let state = state();
        let mut to_visit = vec!["/index.html".to_string()];
        let mut reached = std::collections::BTreeSet::new();
        while let Some(path) = to_visit.pop() {
            if !reached.insert(path.clone()) {
                continue;
            }
            let reply = route("GET", &path, &Caller::default(), &state, Listener::Public);
            assert_eq!(
                reply.status, 200,
                "the page loads {path}, which is not served"
            );
            let (content_type, references) = if path.ends_with(".html") {
                let html = std::str::from_utf8(&reply.body).unwrap();
                let mut refs = quoted_after(html, " src=\"", '"');
                refs.extend(quoted_after(html, " href=\"", '"'));
                (HTML, refs.into_iter().map(str::to_string).collect())
            } else if path.ends_with(".js") {
                let js = std::str::from_utf8(&reply.body).unwrap();
                let refs = quoted_after(js, "'./", '\'');
                let modules = refs.into_iter().filter(|r| r.ends_with(".js"));
                (JS, modules.map(|r| format!("./{r}")).collect())
            } else {
                (CSS, Vec::new())
            };
            assert_eq!(reply.content_type, content_type, "{path}");
            for reference in references.iter().filter(|r| !r.contains(':')) {
                to_visit.push(resolve(&path, reference));
            }
        }
        assert!(reached.contains("/app.js") && reached.contains("/style.css"));
        for (file, _, _) in PAGE_FILES {
            assert!(
                reached.contains(*file),
                "{file} is embedded but the page never loads it"
            );
        }
    }
}
