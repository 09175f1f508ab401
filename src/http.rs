//! The HTTP side, served by tiny_http: the chat page, `/config.json`,
//! `/healthz`, `/readyz` and `/metrics`.
//!
//! [`handle`] is a pure function from a method and path to a [`Reply`], so
//! every route is unit-tested without a socket; [`serve`] is the thin loop
//! that feeds it from tiny_http.

use std::sync::Arc;

use log::{debug, warn};
use serde::Serialize;

use crate::broker::Broker;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;

/// The page, embedded so the binary serves it from any directory.
const INDEX_HTML: &str = include_str!("../client/index.html");
const APP_JS: &str = include_str!("../client/app.js");
const STYLE_CSS: &str = include_str!("../client/style.css");

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
}

/// `GET /config.json`: how the page finds its WebSocket.
#[derive(Debug, Serialize)]
struct PageConfig<'a> {
    instance: &'a str,
    ws_port: u16,
    ws_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_url: Option<&'a str>,
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

/// Answers one request.
///
/// `host` is the request's `Host` header: `/config.json` uses it to tell a
/// page loaded straight from this instance (which must use the instance's
/// own WebSocket port) from one loaded through a proxy (which gets
/// `--public-ws-url`).
pub fn handle(method: &str, url: &str, host: Option<&str>, state: &HttpState) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::text(405, "only GET and HEAD are served here\n");
    }
    let path = url.split(['?', '#']).next().unwrap_or("/");
    match path {
        "/" | "/index.html" => Reply::new(200, "text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => Reply::new(200, "text/javascript; charset=utf-8", APP_JS),
        "/style.css" => Reply::new(200, "text/css; charset=utf-8", STYLE_CSS),
        "/config.json" => {
            let config = PageConfig {
                instance: &state.instance,
                ws_port: state.ws_port,
                ws_path: state.ws_path,
                ws_url: state
                    .public_ws_url
                    .as_deref()
                    .filter(|_| !is_direct(host, state.http_port)),
            };
            let body = serde_json::to_vec(&config).expect("page config always serializes");
            Reply::new(200, "application/json", body)
        }
        "/healthz" => Reply::text(200, "ok\n"),
        "/readyz" => match state
            .supervisor
            .readiness()
            .and_then(|()| state.broker.readiness())
        {
            Ok(()) => Reply::text(200, "ready\n"),
            Err(reason) => Reply::text(503, format!("not ready: {reason}\n")),
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

/// Whether a request came straight to this instance's HTTP port rather
/// than through a proxy: its `Host` names that port.
fn is_direct(host: Option<&str>, http_port: u16) -> bool {
    host.and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        == Some(http_port)
}

/// The body of an HTTP worker thread: answers requests until the server is
/// unblocked at shutdown.
pub fn serve(server: &tiny_http::Server, state: &HttpState) {
    while let Ok(request) = server.recv() {
        let method = request.method().as_str().to_string();
        let host = request
            .headers()
            .iter()
            .find(|header| header.field.equiv("Host"))
            .map(|header| header.value.as_str().to_string());
        let reply = handle(&method, request.url(), host.as_deref(), state);
        debug!("http {method} {} -> {}", request.url(), reply.status);
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
    use crate::hub::Hub;

    fn state() -> HttpState {
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
        }
    }

    #[test]
    fn config_json_tells_the_page_where_the_websocket_is() {
        let config = |host| {
            let reply = handle("GET", "/config.json", host, &state());
            assert_eq!(reply.status, 200);
            serde_json::from_slice::<serde_json::Value>(&reply.body).unwrap()
        };
        let direct = serde_json::json!({"instance": "a1", "ws_port": 15000, "ws_path": "/ws"});
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
        let page = handle("GET", "/?name=x", None, &state);
        assert_eq!(
            (page.status, page.content_type),
            (200, "text/html; charset=utf-8")
        );
        assert_eq!(handle("GET", "/healthz", None, &state).status, 200);
        assert_eq!(handle("GET", "/readyz", None, &state).status, 200);
        assert_eq!(handle("GET", "/nope", None, &state).status, 404);
        assert_eq!(handle("POST", "/", None, &state).status, 405);
        let metrics = String::from_utf8(handle("GET", "/metrics", None, &state).body).unwrap();
        assert!(metrics.contains("chat_clients_connected 0"));
        assert!(metrics.contains("\nchat_hub_members 0\n"));
    }
}
