//! Every option of the server, with its documented default and its
//! environment form. Parses and checks; opens nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::auth::Verifier;
use crate::broker::redis::RedisSettings;
use crate::broker::redis::tls::{RedisTls, TlsFiles};
use crate::clock;
use crate::liveness::PingerSettings;
use crate::origin::OriginPolicy;
use crate::per_address::TrustedProxies;
use crate::presence::PresenceSettings;
use crate::protocol::Limits;
use crate::rate_limit::RateLimit;
use crate::redis_url::{RedisUrl, RedisUrlParser};
use crate::session::SessionLimits;

/// A password from the command line or the environment: shown as `***`
/// by `{:?}`, so that a dump of the configuration cannot leak it.
#[derive(Clone)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Password {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Password(s.to_string()))
    }
}

/// Where Redis is when nothing says: `redis://127.0.0.1:6379`.
static DEFAULT_REDIS_URL: std::sync::LazyLock<RedisUrl> = std::sync::LazyLock::new(|| {
    RedisUrl::parse("redis://127.0.0.1:6379").expect("the default Redis URL is valid")
});

/// How far the WebSocket port sits above the HTTP port when `--ws-port` is
/// not given: `--port 5000` and `--port 5001` then use 15000 and 15001, so
/// two instances run side by side with no other flag.
pub const WS_PORT_OFFSET: u16 = 10_000;

/// How far the admin listener's port sits above the HTTP port when
/// `--admin-addr` is not given: 5000 and 5001 then use 25000 and 25001.
pub const ADMIN_PORT_OFFSET: u16 = 20_000;

/// Which broker joins this instance to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// Redis Pub/Sub: every instance sharing the Redis sees every message.
    Redis,
    /// No Redis: this instance is alone, and its clients see only each
    /// other. The starting point the README uses to show the problem.
    Local,
}

/// Who a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// The name the client chooses (or a guest name): the lesson's mode.
    Off,
    /// A signed token (JWT) from the application's backend, sent in the
    /// client's first frame (docs/PROTOCOL.md, "Authentication").
    Token,
}

/// A scale-out WebSocket chat server: instances joined by Redis Pub/Sub.
///
/// The options come in groups, each the settings one part of the server
/// takes as it is ([`Limits`], [`RateLimit`], [`PresenceSettings`],
/// [`PingerSettings`]) or builds its settings from ([`Listen`],
/// [`RedisOptions`], [`HistoryOptions`], [`ClientOptions`],
/// [`AuthOptions`]); `--help` shows them under the same headings.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub listen: Listen,

    #[command(flatten)]
    pub redis: RedisOptions,

    #[command(flatten)]
    pub history: HistoryOptions,

    #[command(flatten)]
    pub presence: PresenceSettings,

    #[command(flatten)]
    pub clients: ClientOptions,

    #[command(flatten)]
    pub content: Limits,

    #[command(flatten)]
    pub rate: RateLimit,

    #[command(flatten)]
    pub liveness: PingerSettings,

    #[command(flatten)]
    pub auth: AuthOptions,

    /// The page's fault panel, a teaching aid: the page on the admin
    /// listener, opened on this machine, may cut this instance's Redis
    /// subscription, pause its delivery and stall a tab
    /// (`POST /demo/...`). Never in production.
    #[arg(long, env = "DEMO_CONTROLS", value_parser = clap::builder::BoolishValueParser::new())]
    pub demo_controls: bool,
}

/// Where the instance listens, and what it calls itself.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Listening")]
pub struct Listen {
    /// Address to listen on (HTTP and WebSocket): an IP address, or a host
    /// name (its first address is used). Use 0.0.0.0 to accept connections
    /// from other machines.
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// HTTP port, the public one: the page, /config.json, /healthz,
    /// /readyz (without details).
    #[arg(long, env = "PORT", default_value_t = 5000)]
    pub port: u16,

    /// WebSocket port [default: PORT + 10000, or 0 when PORT is 0].
    #[arg(long, env = "WS_PORT")]
    pub ws_port: Option<u16>,

    /// The admin listener: /metrics, /stats, /readyz with its details, the
    /// fault panel, and the page with its instances view. `HOST:PORT`, or
    /// `off` [default: 127.0.0.1:PORT + 20000, or 127.0.0.1:0 when PORT
    /// is 0]. It answers anyone who reaches it: keep it on loopback or a
    /// private network (a Kubernetes probe or Prometheus: the pod's
    /// address).
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<String>,

    /// The WebSocket URL the page should use instead of
    /// `ws://<page host>:<ws port>/ws`, behind a reverse proxy: a full URL
    /// (`wss://chat.example.com/ws`) or a path on the page's own host (`/ws`).
    #[arg(long, env = "PUBLIC_WS_URL")]
    pub public_ws_url: Option<String>,

    /// This instance's name, shown on every message it accepts
    /// (default: `<hostname>-<port>`).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// HTTP connections (page, `/config.json`, `/metrics`, ...) served at
    /// once; each holds a thread while it lasts. Past it a connection is
    /// answered 503 at once.
    #[arg(long, env = "MAX_HTTP_CONNECTIONS", default_value_t = 256)]
    pub max_http_connections: usize,

    /// Milliseconds an HTTP connection may wait for the client's next
    /// bytes (a request head, or the next request on a kept-alive
    /// connection); past it, it is closed and its thread given back.
    #[arg(long = "http-timeout-ms", env = "HTTP_TIMEOUT_MS", value_name = "HTTP_TIMEOUT_MS", default_value = "10000", value_parser = clock::millis)]
    pub http_timeout: Duration,
}

/// Which broker, where Redis is, and how the instance talks to it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Redis")]
pub struct RedisOptions {
    /// `redis` joins instances through Redis; `local` runs one isolated
    /// instance with no Redis.
    #[arg(long, env = "BROKER", value_enum, default_value_t = BrokerKind::Redis)]
    pub broker: BrokerKind,

    /// Where Redis is: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, or
    /// `rediss://...` for TLS (Redis's certificate checked against the
    /// system's root CAs, or --redis-ca-file). The password is never shown
    /// (logs and probes print `:***@`) [default: redis://127.0.0.1:6379].
    #[arg(long = "redis-url", env = "REDIS_URL", value_name = "REDIS_URL", value_parser = RedisUrlParser)]
    pub url: Option<RedisUrl>,

    /// Redis Sentinel (comma-separated `HOST:PORT` of the sentinels),
    /// instead of --redis-url: every connection asks them, in turn, where
    /// the primary of --redis-sentinel-master is, so that it follows a
    /// failover [default: none].
    #[arg(
        long = "redis-sentinel",
        env = "REDIS_SENTINEL",
        value_name = "REDIS_SENTINEL",
        value_delimiter = ','
    )]
    pub sentinel: Vec<String>,

    /// The name the sentinels monitor the primary under (`sentinel
    /// monitor NAME ...` in sentinel.conf); required with --redis-sentinel.
    #[arg(
        long = "redis-sentinel-master",
        env = "REDIS_SENTINEL_MASTER",
        value_name = "REDIS_SENTINEL_MASTER"
    )]
    pub sentinel_master: Option<String>,

    /// The sentinels' own password (`requirepass` in sentinel.conf), if
    /// they have one [default: none].
    #[arg(
        long = "redis-sentinel-password",
        env = "REDIS_SENTINEL_PASSWORD",
        value_name = "REDIS_SENTINEL_PASSWORD",
        hide_env_values = true
    )]
    pub sentinel_password: Option<Password>,

    /// The sentinels' ACL user, with --redis-sentinel-password [default: none].
    #[arg(
        long = "redis-sentinel-user",
        env = "REDIS_SENTINEL_USER",
        value_name = "REDIS_SENTINEL_USER"
    )]
    pub sentinel_user: Option<String>,

    /// With --redis-sentinel: the password of the primary and replicas
    /// (with --redis-url, it goes in the URL) [default: none].
    #[arg(
        long = "redis-password",
        env = "REDIS_PASSWORD",
        value_name = "REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<Password>,

    /// With --redis-sentinel: the ACL user of the primary and replicas,
    /// with --redis-password [default: the default user].
    #[arg(long = "redis-user", env = "REDIS_USER", value_name = "REDIS_USER")]
    pub user: Option<String>,

    /// Replicas that must hold a message (Redis `WAIT`) before it is
    /// published to anyone, the sender's own copy (its receipt) included;
    /// if fewer confirm within --redis-min-replicas-timeout-ms, the sender
    /// gets `outcome_unknown`. 0: off (Redis's asynchronous replication:
    /// a failover may lose the last acknowledged messages).
    #[arg(
        long = "redis-min-replicas",
        env = "REDIS_MIN_REPLICAS",
        value_name = "REDIS_MIN_REPLICAS",
        default_value_t = 0
    )]
    pub min_replicas: usize,

    /// How long the publisher waits for --redis-min-replicas replicas, in
    /// milliseconds (each publish of the instance waits behind it).
    #[arg(long = "redis-min-replicas-timeout-ms", env = "REDIS_MIN_REPLICAS_TIMEOUT_MS", value_name = "REDIS_MIN_REPLICAS_TIMEOUT_MS", default_value = "500", value_parser = clock::millis)]
    pub min_replicas_timeout: Duration,

    /// Seed nodes of a Redis Cluster (comma-separated `redis://HOST:PORT`,
    /// or all `rediss://` for TLS): cluster mode, with sharded Pub/Sub,
    /// instead of `--redis-url`.
    #[arg(long = "redis-cluster", env = "REDIS_CLUSTER", value_name = "REDIS_CLUSTER", value_delimiter = ',', value_parser = RedisUrlParser)]
    pub cluster: Vec<RedisUrl>,

    /// `rediss://`: a PEM file of the CA (or CAs) that signed Redis's
    /// certificate, for a Redis with a private CA. Only these CAs are then
    /// trusted [default: the system's root CAs].
    #[arg(
        long = "redis-ca-file",
        env = "REDIS_CA_FILE",
        value_name = "REDIS_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,

    /// `rediss://` to a Redis that wants a client certificate (mutual TLS,
    /// `tls-auth-clients yes`): this server's certificate (PEM), with
    /// --redis-client-key-file [default: none].
    #[arg(
        long = "redis-client-cert-file",
        env = "REDIS_CLIENT_CERT_FILE",
        value_name = "REDIS_CLIENT_CERT_FILE"
    )]
    pub client_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --redis-client-cert-file [default: none].
    #[arg(
        long = "redis-client-key-file",
        env = "REDIS_CLIENT_KEY_FILE",
        value_name = "REDIS_CLIENT_KEY_FILE"
    )]
    pub client_key_file: Option<PathBuf>,

    /// `rediss://` without checking Redis's certificate: anyone on the way
    /// can read and change the traffic, password included. For a test
    /// only; warned at every start [default: off].
    #[arg(long = "redis-tls-insecure", env = "REDIS_TLS_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub tls_insecure: bool,

    /// Prefix of every Redis key and channel this server uses, so that
    /// several chats (or test runs) can share one Redis.
    #[arg(
        long = "redis-prefix",
        env = "REDIS_PREFIX",
        value_name = "REDIS_PREFIX",
        default_value = "chat"
    )]
    pub prefix: String,

    /// Milliseconds a room stays subscribed after its last local client
    /// left, so that a page reload does not unsubscribe and subscribe again.
    #[arg(long = "room-linger-ms", env = "ROOM_LINGER_MS", value_name = "ROOM_LINGER_MS", default_value = "5000", value_parser = clock::millis)]
    pub room_linger: Duration,

    /// Milliseconds a message whose publish broke mid-flight is retried
    /// (idempotently) before its sender is told `unavailable`.
    #[arg(long = "publish-deadline-ms", env = "PUBLISH_DEADLINE_MS", value_name = "PUBLISH_DEADLINE_MS", default_value = "10000", value_parser = clock::millis)]
    pub publish_deadline: Duration,

    /// Longest wait between two attempts to reach Redis, in milliseconds.
    #[arg(long = "redis-max-backoff-ms", env = "REDIS_MAX_BACKOFF_MS", value_name = "REDIS_MAX_BACKOFF_MS", default_value = "5000", value_parser = clock::millis)]
    pub max_backoff: Duration,

    /// Milliseconds between two PINGs on a quiet Redis link: a subscription
    /// silent for two of these (PING unanswered) is dead and reconnected,
    /// so a dead link is found within three. Must exceed the round trip to
    /// Redis.
    #[arg(long = "redis-ping-ms", env = "REDIS_PING_MS", value_name = "REDIS_PING_MS", default_value = "1000", value_parser = clock::millis)]
    pub ping: Duration,
}

/// Each room's history: what Redis keeps, and what a joining client gets.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "History")]
pub struct HistoryOptions {
    /// Messages kept per room in history (approximate: Redis trims in
    /// whole blocks).
    #[arg(
        long = "history-len",
        env = "HISTORY_LEN",
        value_name = "HISTORY_LEN",
        default_value_t = 1000
    )]
    pub len: usize,

    /// Milliseconds a room's history lives in Redis after its last message
    /// (every message renews it): a room nobody writes to is forgotten.
    /// Default: 7 days.
    #[arg(id = "history_ttl", long = "history-ttl-ms", env = "HISTORY_TTL_MS", value_name = "HISTORY_TTL_MS", default_value = "604800000", value_parser = clock::millis)]
    pub ttl: Duration,

    /// Messages of history sent to a client that connects without `since`.
    #[arg(
        long = "history-replay",
        env = "HISTORY_REPLAY",
        value_name = "HISTORY_REPLAY",
        default_value_t = 50
    )]
    pub replay: usize,

    /// Most messages of history sent at once: to a client that connects
    /// with `since` (the most recent ones; it is told older ones remain),
    /// and in answer to one `history` request. Also bounded in bytes by
    /// `--client-buffer-bytes`.
    #[arg(
        long = "history-replay-max",
        env = "HISTORY_REPLAY_MAX",
        value_name = "HISTORY_REPLAY_MAX",
        default_value_t = 200
    )]
    pub replay_max: usize,
}

/// How many clients, from where, and what each may cost the instance.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Clients")]
pub struct ClientOptions {
    /// Clients (including handshakes in progress) this instance holds at
    /// most; past it, connections get HTTP 503. Each costs one thread.
    #[arg(long, env = "MAX_CLIENTS", default_value_t = 5000)]
    pub max_clients: usize,

    /// WebSocket clients one address may have on this instance (0: no
    /// bound); past it, the handshake is answered 429. Behind a trusted
    /// proxy, the address it forwards counts.
    #[arg(long, env = "MAX_CLIENTS_PER_IP", default_value_t = 100)]
    pub max_clients_per_ip: usize,

    /// Proxies whose `X-Forwarded-For` is believed (addresses or networks,
    /// comma-separated): a client behind them counts by the address they
    /// forward, not theirs.
    #[arg(
        long,
        env = "TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.1,::1"
    )]
    pub trusted_proxies: Vec<String>,

    /// Page origins allowed to open a WebSocket besides this instance's own
    /// page (comma-separated, e.g. `https://chat.example.com`), or `*` for any.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Largest WebSocket message a client may send, in bytes; larger frames
    /// are refused before they are buffered.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Bytes a client's outbox may hold while its socket cannot take them
    /// (the client does not read); past it, the client is closed as a slow
    /// consumer (1008). Bytes are shared between clients, so this bounds
    /// how far one may fall behind, more than memory.
    #[arg(long, env = "CLIENT_BUFFER_BYTES", default_value_t = 1024 * 1024)]
    pub client_buffer_bytes: usize,

    /// Clients of this instance that may have the X-ray (`trace=1`) at
    /// once: each costs a frame serialized for it alone, for every message.
    /// Past it a client is accepted without the X-ray and told so; 0 turns
    /// the X-ray off.
    #[arg(long, env = "MAX_TRACED_CLIENTS", default_value_t = 16)]
    pub max_traced_clients: usize,

    /// Milliseconds a new connection has to complete its WebSocket
    /// handshake.
    #[arg(long = "handshake-timeout-ms", env = "HANDSHAKE_TIMEOUT_MS", value_name = "HANDSHAKE_TIMEOUT_MS", default_value = "5000", value_parser = clock::millis)]
    pub handshake_timeout: Duration,

    /// Milliseconds a closing connection is given, after the server's Close
    /// frame, to answer and hang up before it is cut.
    #[arg(long = "close-grace-ms", env = "CLOSE_GRACE_MS", value_name = "CLOSE_GRACE_MS", default_value = "1000", value_parser = clock::millis)]
    pub close_grace: Duration,

    /// Threads that send messages to local clients: the fan-out and its
    /// deliverers, each taking a share of a big room [default: the number
    /// of CPUs].
    #[arg(long, env = "DELIVERY_THREADS")]
    pub delivery_threads: Option<usize>,
}

/// Who clients are: the name each chooses, or a signed token.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthOptions {
    /// Who clients are: `off`, the name each chooses; `token`, a signed
    /// token (JWT) from the application's backend, in the client's first
    /// frame.
    #[arg(
        long = "auth",
        env = "AUTH",
        value_name = "AUTH",
        value_enum,
        default_value = "off"
    )]
    pub mode: AuthMode,

    /// `--auth token`: a file holding the HS256 secret (at least 32
    /// bytes). Or set AUTH_HS256_SECRET to the secret itself; never an
    /// option, which `ps` would show.
    #[arg(
        long = "auth-hs256-secret-file",
        env = "AUTH_HS256_SECRET_FILE",
        value_name = "AUTH_HS256_SECRET_FILE"
    )]
    pub hs256_secret_file: Option<PathBuf>,

    /// `--auth token`: RS256 or ES256 public keys (PEM), comma-separated;
    /// each is named, for a token's `kid`, by its file's stem.
    #[arg(
        long = "auth-public-key-file",
        env = "AUTH_PUBLIC_KEY_FILE",
        value_name = "AUTH_PUBLIC_KEY_FILE",
        value_delimiter = ','
    )]
    pub public_key_file: Vec<PathBuf>,

    /// `--auth token`: the longest token accepted, in bytes; longer ones
    /// are refused before they are decoded.
    #[arg(
        long = "auth-max-token-bytes",
        env = "AUTH_MAX_TOKEN_BYTES",
        value_name = "AUTH_MAX_TOKEN_BYTES",
        default_value_t = 4096
    )]
    pub max_token_bytes: usize,

    /// `--auth token`: where the page gets a fresh token for its user
    /// (your application's endpoint, called with the user's cookies:
    /// it answers the token as text or `{"token": ...}`). Without it the
    /// page asks its user to paste one.
    #[arg(
        long = "auth-token-url",
        env = "AUTH_TOKEN_URL",
        value_name = "AUTH_TOKEN_URL"
    )]
    pub token_url: Option<String>,
}

/// Milliseconds, for the bounds the options are checked against.
const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

impl Config {
    /// The WebSocket port, derived from `--port` unless given.
    pub fn ws_port(&self) -> Result<u16, String> {
        match (self.listen.ws_port, self.listen.port) {
            (Some(port), _) => Ok(port),
            (None, 0) => Ok(0),
            (None, port) => port.checked_add(WS_PORT_OFFSET).ok_or_else(|| {
                format!(
                    "--port {port} leaves no room for the WebSocket port (port + {WS_PORT_OFFSET}); set --ws-port"
                )
            }),
        }
    }

    /// The admin listener's address, or `None` with `--admin-addr off`.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.listen.admin_addr.as_deref().map(str::trim) {
            Some("off") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                format!(
                    "--admin-addr must be HOST:PORT (an IP address and a port) or off, not {text:?}"
                )
            }),
            None => {
                let port = match self.listen.port {
                    0 => 0,
                    port => port.checked_add(ADMIN_PORT_OFFSET).ok_or_else(|| {
                        format!(
                            "--port {port} leaves no room for the admin port (port + {ADMIN_PORT_OFFSET}); set --admin-addr"
                        )
                    })?,
                };
                Ok(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
            }
        }
    }

    /// The address to listen on: `--host` itself when it is an IP address,
    /// else the first address the system resolves it to.
    ///
    /// One address, not all of them: each port then has one listener and
    /// one accept thread, and `localhost`, which resolves to 127.0.0.1 and
    /// ::1, is served on whichever the system prefers; browsers and curl
    /// try a name's every address, so they find it.
    pub fn listen_ip(&self) -> Result<IpAddr, String> {
        if let Ok(ip) = self.listen.host.parse::<IpAddr>() {
            return Ok(ip);
        }
        let unresolved = |why: String| {
            format!(
                "--host {}: {why}; give an IP address (127.0.0.1, 0.0.0.0, ::) or a name this machine resolves",
                self.listen.host
            )
        };
        (self.listen.host.as_str(), 0)
            .to_socket_addrs()
            .map_err(|e| unresolved(format!("cannot resolve it ({e})")))?
            .next()
            .map(|addr| addr.ip())
            .ok_or_else(|| unresolved("it resolves to no address".into()))
    }

    /// This instance's name: `--instance-id`, or `<hostname>-<port>`.
    pub fn instance_id(&self) -> String {
        self.instance_id_on(self.listen.port)
    }

    /// This instance's name once its HTTP port is bound: `--instance-id`,
    /// or `<hostname>-<the port bound>`, so that two instances started
    /// with `--port 0` (any free port) do not both become `<hostname>-0`.
    pub fn instance_id_on(&self, http_port: u16) -> String {
        if let Some(id) = &self.listen.instance_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        if host.is_empty() {
            format!("chat-{http_port}")
        } else {
            format!("{host}-{http_port}")
        }
    }

    /// Checks what clap cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        self.ws_port()?;
        if self.admin_addr()?.is_none() && self.demo_controls {
            return Err(
                "--demo-controls needs the admin listener, which serves the fault panel: \
                 drop --admin-addr off"
                    .into(),
            );
        }
        let instance_chars = self.instance_id().chars().count();
        if instance_chars == 0 || instance_chars > 64 {
            return Err("--instance-id must be 1 to 64 characters".into());
        }
        crate::per_address::TrustedProxies::parse(&self.clients.trusted_proxies)?;
        let (clients, content, rate) = (&self.clients, &self.content, &self.rate);
        let (liveness, presence, history) = (&self.liveness, &self.presence, &self.history);
        // Each rule: the values it refuses, and what the operator is told.
        let rules = [
            (
                clients.client_buffer_bytes == 0,
                "--client-buffer-bytes must be at least 1",
            ),
            (
                clients.delivery_threads == Some(0),
                "--delivery-threads must be at least 1",
            ),
            (
                content.max_text_chars == 0
                    || content.max_name_chars == 0
                    || content.max_room_chars == 0,
                "--max-text-chars, --max-name-chars and --max-room-chars must be at least 1",
            ),
            (
                rate.burst == 0
                    || rate.per_second.is_nan()
                    || rate.per_second <= 0.0
                    || rate.strikes == 0,
                "--rate-burst, --rate-per-sec and --rate-strikes must be positive",
            ),
            (clients.max_clients == 0, "--max-clients must be at least 1"),
            (
                self.listen.max_http_connections == 0,
                "--max-http-connections must be at least 1",
            ),
            (
                self.listen.http_timeout < ms(100),
                "--http-timeout-ms must be at least 100",
            ),
            (
                liveness.send_timeout < ms(100),
                "--send-timeout-ms must be at least 100",
            ),
            (
                liveness.interval.is_zero() || liveness.idle_timeout <= liveness.interval,
                "--idle-timeout-ms must be longer than --ping-interval-ms (and both positive)",
            ),
            (
                clients.max_frame_bytes < 64,
                "--max-frame-bytes must be at least 64",
            ),
            (
                !(ms(50)..=ms(60_000)).contains(&self.redis.ping),
                "--redis-ping-ms must be between 50 and 60000",
            ),
            (
                presence.ttl < ms(300),
                "--presence-ttl-ms must be at least 300",
            ),
            (
                !(ms(10)..=ms(60_000)).contains(&presence.diff_interval),
                "--presence-diff-ms must be between 10 and 60000",
            ),
            (
                presence.full_list_max == 0 || presence.full_list_max > presence.max_members,
                "--presence-full-list-max must be at least 1 and at most --presence-max-members",
            ),
            (history.len == 0, "--history-len must be at least 1"),
            (
                history.ttl < ms(1000),
                "--history-ttl-ms must be at least 1000",
            ),
            (
                history.replay_max == 0 || history.replay > history.replay_max,
                "--history-replay-max must be at least 1 and at least --history-replay",
            ),
            (
                self.redis.prefix.is_empty(),
                "--redis-prefix must not be empty",
            ),
        ];
        if let Some((_, why)) = rules.iter().find(|(refused, _)| *refused) {
            return Err(why.to_string());
        }
        self.validate_redis_tls()?;
        self.validate_sentinel()?;
        self.validate_auth()
    }

    /// The URLs this instance connects to: the cluster's seeds, or the
    /// one Redis.
    fn redis_urls(&self) -> Vec<&RedisUrl> {
        if !self.redis.sentinel.is_empty() {
            Vec::new()
        } else if self.redis.cluster.is_empty() {
            vec![self.redis.url.as_ref().unwrap_or(&DEFAULT_REDIS_URL)]
        } else {
            self.redis.cluster.iter().collect()
        }
    }

    /// The single Redis (`--redis-url`, or its default).
    pub fn redis_url(&self) -> RedisUrl {
        self.redis
            .url
            .clone()
            .unwrap_or_else(|| DEFAULT_REDIS_URL.clone())
    }

    fn validate_sentinel(&self) -> Result<(), String> {
        if !(ms(1)..=ms(1500)).contains(&self.redis.min_replicas_timeout) {
            return Err(
                "--redis-min-replicas-timeout-ms must be between 1 and 1500 (a command's own \
                 deadline is 2 s)"
                    .into(),
            );
        }
        if self.redis.min_replicas > 0 && !self.redis.cluster.is_empty() {
            return Err("--redis-min-replicas is not supported with --redis-cluster".into());
        }
        if self.redis.sentinel.is_empty() {
            if self.redis.sentinel_master.is_some()
                || self.redis.sentinel_password.is_some()
                || self.redis.sentinel_user.is_some()
            {
                return Err("--redis-sentinel-master, --redis-sentinel-password and \
                     --redis-sentinel-user go with --redis-sentinel HOST:PORT,..."
                    .into());
            }
            if self.redis.password.is_some() || self.redis.user.is_some() {
                return Err(
                    "--redis-password and --redis-user go with --redis-sentinel; with \
                     --redis-url, write them in the URL: redis://USER:PASSWORD@HOST:PORT"
                        .into(),
                );
            }
            return Ok(());
        }
        if self.redis.url.is_some() {
            return Err(
                "--redis-url and --redis-sentinel are two ways to find Redis: give one \
                 (with Sentinel, the primary's password goes in --redis-password)"
                    .into(),
            );
        }
        if !self.redis.cluster.is_empty() {
            return Err(
                "--redis-cluster and --redis-sentinel are two ways to find Redis: give one".into(),
            );
        }
        for addr in &self.redis.sentinel {
            crate::broker::redis::sentinel::parse_addr(addr)?;
        }
        if self
            .redis
            .sentinel_master
            .as_deref()
            .is_none_or(str::is_empty)
        {
            return Err(
                "--redis-sentinel needs --redis-sentinel-master NAME: the name in \
                 `sentinel monitor NAME HOST PORT QUORUM`"
                    .into(),
            );
        }
        if self.redis.user.is_some() && self.redis.password.is_none() {
            return Err("--redis-user needs --redis-password".into());
        }
        if self.redis.sentinel_user.is_some() && self.redis.sentinel_password.is_none() {
            return Err("--redis-sentinel-user needs --redis-sentinel-password".into());
        }
        if self.redis.ca_file.is_some()
            || self.redis.client_cert_file.is_some()
            || self.redis.client_key_file.is_some()
            || self.redis.tls_insecure
        {
            return Err(
                "TLS is not supported with --redis-sentinel yet: use --redis-url \
                 rediss://... or --redis-cluster"
                    .into(),
            );
        }
        Ok(())
    }

    /// The sentinels to ask, with `--redis-sentinel`.
    pub fn redis_sentinels(&self) -> Option<crate::broker::redis::sentinel::Sentinels> {
        if self.redis.sentinel.is_empty() {
            return None;
        }
        let mut data = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(password) = &self.redis.password {
            data = data.set_password(&password.0);
        }
        if let Some(user) = &self.redis.user {
            data = data.set_username(user);
        }
        Some(crate::broker::redis::sentinel::Sentinels::new(
            self.redis
                .sentinel
                .iter()
                .filter_map(|addr| crate::broker::redis::sentinel::parse_addr(addr).ok())
                .collect(),
            self.redis.sentinel_master.clone().unwrap_or_default(),
            self.redis.sentinel_user.clone(),
            self.redis.sentinel_password.clone().map(|p| p.0),
            data,
        ))
    }

    /// What the Redis broker needs, for instance `instance`; loads the TLS
    /// files (the error names the one that is wrong).
    pub fn redis_settings(&self, instance: &str) -> Result<RedisSettings, String> {
        Ok(RedisSettings {
            url: self.redis_url(),
            sentinel: self.redis_sentinels(),
            min_replicas: self.redis.min_replicas,
            replicas_timeout: self.redis.min_replicas_timeout,
            cluster: self.redis.cluster.clone(),
            tls: if self.redis_tls() {
                Some(RedisTls::load(&self.redis_tls_files())?)
            } else {
                None
            },
            prefix: self.redis.prefix.clone(),
            history_len: self.history.len,
            history_ttl: self.history.ttl,
            max_backoff: self.redis.max_backoff,
            publish_deadline: self.redis.publish_deadline,
            instance: instance.to_string(),
            limits: self.content,
            history_read_bytes: self.clients.client_buffer_bytes,
            room_linger: self.redis.room_linger,
            presence_ttl: self.presence.ttl,
            ping_interval: self.redis.ping,
        })
    }

    /// What every session is held to. `page_ports`: the ports this
    /// instance's own page is served on (the Origin check);
    /// `trusted_proxies`, as parsed once at start; `auth`, the verifier of
    /// `--auth token`.
    pub fn session_limits(
        &self,
        page_ports: Vec<u16>,
        trusted_proxies: TrustedProxies,
        auth: Option<Arc<Verifier>>,
    ) -> SessionLimits {
        SessionLimits {
            content: self.content,
            rate: self.rate,
            origins: OriginPolicy {
                page_ports,
                allowed: self.clients.allowed_origins.clone(),
            },
            max_clients: self.clients.max_clients,
            max_traced_clients: self.clients.max_traced_clients,
            max_clients_per_ip: self.clients.max_clients_per_ip,
            trusted_proxies,
            client_buffer_bytes: self.clients.client_buffer_bytes,
            max_frame_bytes: self.clients.max_frame_bytes,
            history_replay: self.history.replay,
            history_replay_max: self.history.replay_max,
            handshake_timeout: self.clients.handshake_timeout,
            close_grace: self.clients.close_grace,
            auth,
        }
    }

    /// The pinger's timings, and whether tokens expire (`--auth token`).
    pub fn pinger_settings(&self) -> PingerSettings {
        PingerSettings {
            tokens_expire: self.auth.mode == AuthMode::Token,
            ..self.liveness
        }
    }

    /// Whether this instance speaks TLS to Redis (`rediss://`).
    pub fn redis_tls(&self) -> bool {
        self.redis.broker == BrokerKind::Redis && self.redis_urls().iter().any(|url| url.is_tls())
    }

    /// The TLS options, read and checked at start by the broker.
    pub fn redis_tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.redis.ca_file.clone(),
            client_cert_file: self.redis.client_cert_file.clone(),
            client_key_file: self.redis.client_key_file.clone(),
            insecure: self.redis.tls_insecure,
        }
    }

    fn validate_redis_tls(&self) -> Result<(), String> {
        let urls = self.redis_urls();
        if urls.iter().any(|url| url.is_tls()) && !urls.iter().all(|url| url.is_tls()) {
            return Err(
                "--redis-cluster mixes redis:// and rediss:// nodes: a cluster's nodes speak \
                 TLS or not all alike"
                    .into(),
            );
        }
        let options_given = self.redis.ca_file.is_some()
            || self.redis.client_cert_file.is_some()
            || self.redis.client_key_file.is_some()
            || self.redis.tls_insecure;
        if self.redis.broker == BrokerKind::Redis && options_given && !self.redis_tls() {
            return Err(
                "--redis-ca-file, --redis-client-cert-file, --redis-client-key-file and \
                 --redis-tls-insecure take effect only with TLS: write the Redis URL as \
                 rediss://HOST:PORT, or drop them"
                    .into(),
            );
        }
        if self.redis.client_cert_file.is_some() != self.redis.client_key_file.is_some() {
            return Err(
                "--redis-client-cert-file and --redis-client-key-file go together: give both \
                 (mutual TLS), or neither"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        let keys_given = self.auth.hs256_secret_file.is_some()
            || !self.auth.public_key_file.is_empty()
            || self.auth.token_url.is_some();
        if self.auth.mode == AuthMode::Off && keys_given {
            return Err(
                "--auth-hs256-secret-file, --auth-public-key-file and --auth-token-url \
                 take effect only with --auth token: add it, or drop them"
                    .into(),
            );
        }
        // The auth frame's envelope must fit a frame with the token.
        if self.auth.mode == AuthMode::Token
            && (self.auth.max_token_bytes < 64
                || self.auth.max_token_bytes + 64 > self.clients.max_frame_bytes)
        {
            return Err(format!(
                "--auth-max-token-bytes must be at least 64 and at most --max-frame-bytes - 64 ({})",
                self.clients.max_frame_bytes.saturating_sub(64)
            ));
        }
        Ok(())
    }

    /// `--auth token`'s verification keys: the options, and the secret
    /// from the environment.
    pub fn auth_keys(&self) -> crate::auth::KeySources {
        crate::auth::KeySources {
            secret_file: self.auth.hs256_secret_file.clone(),
            secret: std::env::var(crate::auth::SECRET_ENV).ok(),
            public_key_files: self.auth.public_key_file.clone(),
        }
    }

    /// `--delivery-threads`, or one per CPU.
    pub fn delivery_threads(&self) -> usize {
        self.clients.delivery_threads.unwrap_or_else(cpus)
    }
}

/// The CPUs this process may run on (1 if unknown).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("pubsub-chat").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn ws_port_follows_the_http_port() {
        assert_eq!(parse(&["--port", "5001"]).ws_port(), Ok(15001));
        assert_eq!(
            parse(&["--port", "5001", "--ws-port", "7000"]).ws_port(),
            Ok(7000)
        );
        assert_eq!(parse(&["--port", "0"]).ws_port(), Ok(0));
        assert!(parse(&["--port", "60000"]).validate().is_err());
    }

    #[test]
    fn the_configuration_shows_no_redis_password() {
        let config = parse(&[
            "--redis-url",
            "redis://:hunter2@127.0.0.1:6379",
            "--redis-cluster",
            "redis://chat:hunter3@10.0.0.1:7000,redis://chat:hunter3@10.0.0.2:7000",
        ]);
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("redis://:***@127.0.0.1:6379"), "{shown}");
        assert_eq!(config.redis.cluster.len(), 2);
    }

    #[test]
    fn sentinel_options_are_checked_together() {
        let ok = parse(&[
            "--redis-sentinel",
            "127.0.0.1:26379,127.0.0.1:26380",
            "--redis-sentinel-master",
            "m",
            "--redis-password",
            "hunter4",
            "--redis-sentinel-password",
            "hunter5",
        ]);
        ok.validate().unwrap();
        let sentinels = ok.redis_sentinels().unwrap();
        assert_eq!(sentinels.addrs.len(), 2);
        assert_eq!(sentinels.data.password(), Some("hunter4"));
        let shown = format!("{ok:?} {sentinels:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        let refused = |args: &[&str]| parse(args).validate().unwrap_err();
        assert!(
            refused(&["--redis-sentinel", "h:1", "--redis-url", "redis://h:2"])
                .contains("give one")
        );
        assert!(refused(&["--redis-sentinel", "h:1"]).contains("--redis-sentinel-master"));
        assert!(
            refused(&["--redis-sentinel", "h", "--redis-sentinel-master", "m"]).contains("no port")
        );
        assert!(refused(&["--redis-sentinel-master", "m"]).contains("go with --redis-sentinel"));
        assert!(refused(&["--redis-password", "x"]).contains("write them in the URL"));
        assert!(
            refused(&["--redis-min-replicas-timeout-ms", "5000"]).contains("between 1 and 1500")
        );
        parse(&["--redis-min-replicas", "1"]).validate().unwrap();
    }

    #[test]
    fn a_bad_redis_url_is_refused_without_repeating_it() {
        let e = Config::try_parse_from(["pubsub-chat", "--redis-url", "http://:hunter2@h:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheme http:// is not Redis's"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn host_names_are_resolved() {
        assert_eq!(
            parse(&["--host", "0.0.0.0"]).listen_ip(),
            Ok(IpAddr::from([0, 0, 0, 0]))
        );
        assert!(
            parse(&["--host", "localhost"])
                .listen_ip()
                .unwrap()
                .is_loopback()
        );
        let e = parse(&["--host", "no-such-host.invalid"])
            .listen_ip()
            .unwrap_err();
        assert!(e.contains("give an IP address"), "{e}");
    }
    /// The option groups are an internal layout: every flag keeps its name
    /// and its environment variable (the flag's, upper case).
    #[test]
    fn every_option_keeps_its_flag_and_its_environment_name() {
        use clap::CommandFactory;
        let command = Config::command();
        let mut longs = Vec::new();
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(
                env.as_deref(),
                Some(long.to_uppercase().replace('-', "_").as_str()),
                "--{long}'s environment variable"
            );
            longs.push(long.to_string());
        }
        longs.sort();
        let expected = [
            "admin-addr",
            "allowed-origins",
            "auth",
            "auth-hs256-secret-file",
            "auth-max-token-bytes",
            "auth-public-key-file",
            "auth-token-url",
            "broker",
            "client-buffer-bytes",
            "close-grace-ms",
            "delivery-threads",
            "demo-controls",
            "handshake-timeout-ms",
            "history-len",
            "history-replay",
            "history-replay-max",
            "history-ttl-ms",
            "host",
            "http-timeout-ms",
            "idle-timeout-ms",
            "instance-id",
            "max-clients",
            "max-clients-per-ip",
            "max-frame-bytes",
            "max-http-connections",
            "max-name-chars",
            "max-room-chars",
            "max-text-chars",
            "max-traced-clients",
            "ping-interval-ms",
            "port",
            "presence",
            "presence-diff-ms",
            "presence-full-list-max",
            "presence-max-members",
            "presence-ttl-ms",
            "public-ws-url",
            "publish-deadline-ms",
            "rate-burst",
            "rate-per-sec",
            "rate-strikes",
            "redis-ca-file",
            "redis-client-cert-file",
            "redis-client-key-file",
            "redis-cluster",
            "redis-max-backoff-ms",
            "redis-min-replicas",
            "redis-min-replicas-timeout-ms",
            "redis-password",
            "redis-ping-ms",
            "redis-prefix",
            "redis-sentinel",
            "redis-sentinel-master",
            "redis-sentinel-password",
            "redis-sentinel-user",
            "redis-tls-insecure",
            "redis-url",
            "redis-user",
            "room-linger-ms",
            "send-timeout-ms",
            "trusted-proxies",
            "ws-port",
        ];
        assert_eq!(longs, expected);
    }

    #[test]
    fn each_group_takes_its_options() {
        let config = parse(&[
            "--presence",
            "off",
            "--presence-ttl-ms",
            "2000",
            "--history-ttl-ms",
            "3000",
            "--rate-burst",
            "5",
            "--max-room-chars",
            "12",
            "--idle-timeout-ms",
            "90000",
            "--auth",
            "token",
        ]);
        assert!(!config.presence.enabled);
        assert_eq!(config.presence.ttl, ms(2000));
        assert_eq!(config.history.ttl, ms(3000));
        assert_eq!(config.rate.burst, 5);
        assert_eq!(config.content.max_room_chars, 12);
        assert_eq!(config.liveness.idle_timeout, ms(90_000));
        assert!(config.pinger_settings().tokens_expire);
        let defaults = parse(&[]);
        assert!(defaults.presence.enabled);
        assert_eq!(defaults.liveness.interval, ms(30_000));
        assert!(!defaults.pinger_settings().tokens_expire);
        assert_eq!(defaults.content, Limits::default());
    }
}
