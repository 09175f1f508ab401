//! Wiring: binds the listeners, starts the broker and the named threads,
//! and hands back a [`RunningServer`] with the real addresses and a way to
//! shut it all down.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{info, warn};

use crate::auth::Verifier;
use crate::broker::local::LocalBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerEvent, EventSender};
use crate::config::{self, AuthMode, BrokerKind, Config};
use crate::delivery::fanout::{self, EVENT_QUEUE, FanoutSettings};
use crate::delivery::flusher::Flusher;
use crate::delivery::hub::Hub;
use crate::demo::DemoControls;
use crate::drain::Drain;
use crate::http::{self, HttpState, Listener};
use crate::liveness;
use crate::metrics::Metrics;
use crate::per_address::TrustedProxies;
use crate::presence::Tracker;
use crate::protocol::CloseReason;
use crate::session::{self, SessionContext, SessionServices, WS_PATH};
use crate::stats::Reporter;
use crate::supervisor::Supervisor;

/// HTTP worker threads: the page and the probes are light, and tiny_http
/// does the socket work on its own threads.
const HTTP_WORKERS: usize = 2;
/// Connections the admin listener serves at once: a probe, a scraper and
/// a lesson page or two; past it, 503 at once.
const ADMIN_MAX_CONNECTIONS: usize = 16;
/// Open files wanted: two per client is never needed (one socket each),
/// but sockets, Redis links and the page all count.
const WANTED_OPEN_FILES: u64 = 65_536;

/// At shutdown, how long a client has to answer its Close before its
/// connection is cut, instead of `--close-grace-ms`: the Close frame goes
/// out at once, and a client that reads answers within milliseconds. One
/// that does not would hold the exit for the whole close grace, which the
/// 2 s an orchestrator allows for stopping cannot spare.
const SHUTDOWN_CLOSE_GRACE: Duration = Duration::from_millis(250);

/// Connections the kernel queues for the accept thread: a connect storm of
/// thousands must wait in the queue, not be refused (std's default is 128).
const ACCEPT_BACKLOG: i32 = 4096;

/// Binds a listening socket with the given backlog (std offers no way to
/// set it).
fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A started instance.
pub struct RunningServer {
    pub instance: String,
    pub http_addr: SocketAddr,
    pub ws_addr: SocketAddr,
    /// Announces the death of an internal thread: the instance must then
    /// exit (see [`crate::supervisor`]).
    pub fatal_rx: Receiver<String>,
    supervisor: Arc<Supervisor>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    flusher: Arc<Flusher>,
    drain: Arc<Drain>,
    http: Arc<tiny_http::Server>,
    admin: Option<Arc<tiny_http::Server>>,
}

/// `pubsub-chat check-redis`: whether the Redis these options name
/// answers `PING`, through a connection opened as the instance's are.
/// Returns where it is, without its password; or why it does not answer.
pub fn check_redis(config: &Config) -> Result<String, String> {
    config.validate()?;
    if config.redis.broker != BrokerKind::Redis {
        return Err("--broker local uses no Redis: there is nothing to check".into());
    }
    crate::broker::redis::check::check(&config.redis_settings(&config.instance_id())?)
}

/// Starts an instance: binds both ports, connects the broker (a missing
/// Redis is logged, retried, and does not stop the start), and starts
/// serving. Returns once the Redis subscription is live or its first
/// attempt failed.
pub fn start(config: &Config) -> Result<RunningServer, String> {
    config.validate()?;
    let verifier = load_verifier(config)?;
    let open_files = raise_open_files_limit();
    check_budgets(
        config.clients.max_clients + config.listen.max_http_connections + ADMIN_MAX_CONNECTIONS,
        open_files,
    );
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(Hub::new());
    let (supervisor, fatal_rx) = Supervisor::new();

    let Listeners {
        http: http_listener,
        ws: ws_listener,
        admin: admin_listener,
    } = Listeners::bind(config)?;
    let http_addr = http_listener.local_addr().map_err(|e| e.to_string())?;
    let ws_addr = ws_listener.local_addr().map_err(|e| e.to_string())?;
    // Named after the port bound, not the one asked for (`--port 0`).
    let instance = config.instance_id_on(http_addr.port());

    // One delivery path for either broker: it emits events, the fan-out
    // thread alone hands them to the hub's clients.
    let (events_tx, events_rx) = crossbeam_channel::bounded::<BrokerEvent>(EVENT_QUEUE);
    let demo = Arc::new(DemoControls::new(config.demo_controls));
    if config.demo_controls {
        warn!(
            "--demo-controls is on: this machine's page can cut this instance's Redis subscription, \
             pause its delivery and stall clients (a teaching aid; never in production); \
             requests carry X-Demo-Token: {}",
            demo.token()
        );
    }
    let flusher = Flusher::start(config::cpus(), &supervisor)
        .map_err(|e| format!("cannot start the flusher threads: {e}"))?;
    let broker = start_broker(config, &instance, events_tx, &metrics, &supervisor)?;

    // The broker first: the presence tracker reads rooms through it, and
    // the fan-out hands the tracker the broker's presence changes (events
    // wait in the channel meanwhile).
    let presence = Arc::new(Tracker::new(
        config.presence,
        hub.clone(),
        broker.clone(),
        metrics.clone(),
    ));
    fanout::spawn_fanout(
        events_rx,
        hub.clone(),
        {
            let presence = presence.clone();
            Box::new(move |change| presence.apply(change))
        },
        metrics.clone(),
        FanoutSettings {
            threads: config.delivery_threads(),
            instance: instance.as_str().into(),
            pause: demo.delivery_pause(),
        },
        &supervisor,
    )
    .map_err(|e| format!("cannot start the fan-out threads: {e}"))?;
    if config.presence.enabled {
        let tracker = presence.clone();
        supervisor
            .spawn("presence-diff", move || tracker.run())
            .map_err(|e| format!("cannot start the presence-diff thread: {e}"))?;
    }

    let stats = Reporter {
        instance: instance.clone(),
        reports: broker.clone(),
        readiness: broker.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
    }
    .spawn(&supervisor)
    .map_err(|e| format!("cannot start the stats thread: {e}"))?;

    // Checked with the configuration; parsed once here for both ports.
    let trusted_proxies = TrustedProxies::parse(&config.clients.trusted_proxies)?;
    let http_server = serve_on(
        http_listener,
        tiny_http::ConnectionLimits {
            max_connections: config.listen.max_http_connections,
            // A proxy's clients all share its address: its own limits
            // apply to them (nginx's limit_conn).
            max_per_address: match config.clients.max_clients_per_ip {
                0 => usize::MAX,
                n => n,
            },
            exempt: {
                let trusted = trusted_proxies.clone();
                Arc::new(move |ip| trusted.contains(ip))
            },
            read_timeout: Some(config.listen.http_timeout),
        },
    )
    .map_err(|e| format!("cannot start the HTTP server: {e}"))?;
    let http_state = Arc::new(HttpState {
        instance: instance.clone(),
        ws_port: ws_addr.port(),
        ws_path: WS_PATH,
        public_ws_url: config.listen.public_ws_url.clone(),
        http_port: http_addr.port(),
        broker: broker.clone(),
        supervisor: supervisor.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
        stats,
        demo,
        presence: config.presence.enabled,
        auth: verifier.is_some(),
        auth_token_url: config.auth.token_url.clone(),
    });
    serve_http(&supervisor, &http_server, &http_state, Listener::Public)?;
    let admin = match admin_listener {
        Some(listener) => {
            let server = serve_on(
                listener,
                tiny_http::ConnectionLimits {
                    max_connections: ADMIN_MAX_CONNECTIONS,
                    max_per_address: usize::MAX,
                    exempt: Arc::new(|_| false),
                    read_timeout: Some(config.listen.http_timeout),
                },
            )
            .map_err(|e| format!("cannot start the admin listener: {e}"))?;
            serve_http(&supervisor, &server, &http_state, Listener::Admin)?;
            Some(server)
        }
        None => None,
    };
    let admin_addr = admin
        .as_ref()
        .and_then(|server| server.server_addr().to_ip());

    let drain = Arc::new(Drain::default());
    let context = Arc::new(SessionContext::new(
        instance.clone(),
        SessionServices {
            drain: drain.clone(),
            hub: hub.clone(),
            broker,
            presence,
            flusher: flusher.clone(),
            metrics: metrics.clone(),
        },
        config.session_limits(
            [Some(http_addr.port()), admin_addr.map(|addr| addr.port())]
                .into_iter()
                .flatten()
                .collect(),
            trusted_proxies,
            verifier,
        ),
        supervisor.clone(),
    ));
    liveness::spawn_pinger(
        hub.clone(),
        metrics.clone(),
        config.pinger_settings(),
        &supervisor,
    )
    .map_err(|e| format!("cannot start the pinger thread: {e}"))?;
    supervisor
        .spawn("ws-accept", move || run_accept(ws_listener, context))
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;

    let admin_shown = match admin_addr {
        Some(addr) => format!("admin http://{addr}/"),
        None => "admin off".to_string(),
    };
    info!(
        "instance {instance} listening: page http://{http_addr}/ websocket ws://{ws_addr}{WS_PATH} \
         {admin_shown} broker {:?}",
        config.redis.broker
    );
    Ok(RunningServer {
        instance,
        http_addr,
        ws_addr,
        fatal_rx,
        supervisor,
        hub,
        metrics,
        flusher,
        drain,
        http: http_server,
        admin,
    })
}

/// `--auth token`'s verifier, its keys loaded (the error names the file
/// that is wrong); `None` with `--auth off`.
fn load_verifier(config: &Config) -> Result<Option<Arc<Verifier>>, String> {
    if config.auth.mode == AuthMode::Off {
        return Ok(None);
    }
    let verifier = Verifier::load(
        &config.auth_keys(),
        config.auth.max_token_bytes,
        config.content,
    )?;
    info!(
        "--auth token: clients prove who they are with tokens signed with {}",
        verifier.describe()
    );
    Ok(Some(Arc::new(verifier)))
}

/// The three listening sockets, bound before anything starts, so that a
/// port in use stops the start with its reason.
struct Listeners {
    http: TcpListener,
    ws: TcpListener,
    admin: Option<TcpListener>,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Self, String> {
        let host = config.listen_ip()?;
        let http = TcpListener::bind((host, config.listen.port)).map_err(|e| {
            format!(
                "cannot listen for HTTP on {host}:{}: {e}",
                config.listen.port
            )
        })?;
        let ws_port = config.ws_port()?;
        let ws = listen((host, ws_port).into(), ACCEPT_BACKLOG)
            .map_err(|e| format!("cannot listen for WebSocket on {host}:{ws_port}: {e}"))?;
        let admin = match config.admin_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .map_err(|e| format!("cannot listen for the admin listener on {addr}: {e}"))?,
            ),
            None => None,
        };
        Ok(Listeners { http, ws, admin })
    }
}

/// A tiny_http server on `listener`, held to `limits`.
fn serve_on(
    listener: TcpListener,
    limits: tiny_http::ConnectionLimits,
) -> Result<Arc<tiny_http::Server>, String> {
    tiny_http::Server::from_listener_with_limits(listener, None, limits)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The broker the configuration names: Redis (its threads started, its
/// first connection attempted), or the local, single-instance one.
fn start_broker(
    config: &Config,
    instance: &str,
    events_tx: EventSender,
    metrics: &Arc<Metrics>,
    supervisor: &Arc<Supervisor>,
) -> Result<Arc<dyn Broker>, String> {
    Ok(match config.redis.broker {
        BrokerKind::Redis => RedisBroker::start(
            config.redis_settings(instance)?,
            events_tx,
            metrics.clone(),
            supervisor,
        )?,
        BrokerKind::Local => {
            warn!(
                "local broker: this instance is alone; clients of other instances will not see its messages"
            );
            Arc::new(LocalBroker::new(
                events_tx,
                metrics.clone(),
                config.history.len,
                instance.to_string(),
            ))
        }
    })
}

/// Starts the worker threads that answer `listener`'s requests.
fn serve_http(
    supervisor: &Arc<Supervisor>,
    server: &Arc<tiny_http::Server>,
    state: &Arc<HttpState>,
    listener: Listener,
) -> Result<(), String> {
    let name = match listener {
        Listener::Public => "http",
        Listener::Admin => "admin",
    };
    for worker in 0..HTTP_WORKERS {
        let server = server.clone();
        let state = state.clone();
        supervisor
            .spawn(&format!("{name}-{worker}"), move || {
                http::serve(&server, &state, listener)
            })
            .map_err(|e| format!("cannot start an HTTP thread: {e}"))?;
    }
    Ok(())
}

/// The accept thread: one session (reader thread) per connection.
fn run_accept(listener: TcpListener, context: Arc<SessionContext>) {
    for stream in listener.incoming() {
        if context.supervisor.is_stopping() {
            break;
        }
        match stream {
            Ok(stream) => session::spawn_session(stream, context.clone()),
            Err(e) => {
                // Out of file descriptors, mostly: wait instead of spinning.
                warn!("websocket accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl RunningServer {
    /// Stops accepting, sends every client a Close frame with `reason`
    /// (1001 going away, or 1011 after an internal thread died), and waits
    /// up to `grace` for them to go.
    pub fn shutdown(&self, reason: CloseReason, grace: Duration) {
        info!("instance {} shutting down", self.instance);
        self.supervisor.stop();
        // Wake the accept thread so it sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.ws_addr, Duration::from_millis(100));
        self.hub.close_all(reason);
        self.flusher
            .hasten_cuts(Instant::now() + SHUTDOWN_CLOSE_GRACE.min(grace));
        if self.drain.wait(Instant::now() + grace) {
            info!("instance {} stopped: every client closed", self.instance);
        } else {
            let left = self.metrics.clients_connected.load(Ordering::Relaxed);
            warn!(
                "instance {}: {left} clients still connected at exit",
                self.instance
            );
        }
        // The probes answered 503 until now; the HTTP threads end here.
        self.http.unblock();
        if let Some(admin) = &self.admin {
            admin.unblock();
        }
    }
}

/// Raises the soft open-files limit toward the hard one: each client is a
/// socket, and the usual soft default of 1024 would cap the server far
/// below what its threads allow. Returns the limit in force.
fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(WANTED_OPEN_FILES) {
        Ok(limit) => {
            info!("open files limit: {limit}");
            Some(limit)
        }
        Err(e) => {
            warn!("cannot raise the open files limit: {e}");
            None
        }
    }
}

/// Threads this process needs besides its clients': accept, HTTP and
/// admin workers, tiny_http's own, the subscriber, the fan-out,
/// deliverers, flushers, the pinger, main.
const FIXED_THREADS: u64 = 19;

/// Says at start-up, rather than at the first refused client, when
/// `--max-clients` is more than the machine can give: one thread and one
/// socket per client. Past the real limit clients are refused cleanly
/// anyway (a failed spawn is a 503); this only makes it visible.
fn check_budgets(max_clients: usize, open_files: Option<u64>) {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let thread_limit = [
        read("/proc/sys/kernel/pid_max"),
        read("/proc/sys/kernel/threads-max"),
    ]
    .into_iter()
    .flatten()
    .min();
    let wanted_threads = max_clients as u64 + FIXED_THREADS;
    if let Some(limit) = thread_limit
        && wanted_threads > limit
    {
        warn!(
            "--max-clients {max_clients} needs about {wanted_threads} threads, but this machine allows {limit} \
             in all; clients past what the machine gives will be refused with 503"
        );
    }
    if let Some(limit) = open_files
        && max_clients as u64 + FIXED_THREADS > limit
    {
        warn!(
            "--max-clients {max_clients} needs about {max_clients} open files, but the limit is {limit}"
        );
    }
}
