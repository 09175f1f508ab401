//! The `pubsub-chat` binary: options, logging, start, wait for a signal,
//! shut down; `pubsub-chat token`, which mints a token for development;
//! and `pubsub-chat check-redis [OPTIONS]`, which says whether the Redis
//! the options name answers. Everything worth testing lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crossbeam_channel::select;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use pubsub_chat::allocator;
use pubsub_chat::auth::{self, Claims, KeySources, SigningKey};
use pubsub_chat::clock;
use pubsub_chat::config::Config;
use pubsub_chat::protocol::CloseReason;
use pubsub_chat::server;

/// How long shutdown waits for clients to take their close frames: the
/// whole exit must fit in the 2 seconds an orchestrator usually allows,
/// with room to spare on a loaded machine. Clients that do not answer are
/// cut sooner than this (`server::SHUTDOWN_CLOSE_GRACE`); this bounds the
/// rest.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1000);

/// The exit status after an internal thread died (`EX_SOFTWARE`): not a
/// clean stop, so that a supervisor restarts the instance.
const EXIT_INTERNAL_ERROR: u8 = 70;

/// Mints a token (a JWT) for development and tests, signed with the
/// server's HS256 secret or a private key. Your application's backend
/// does this in production (docs/OPERATIONS.md).
#[derive(Debug, Parser)]
#[command(name = "pubsub-chat token")]
struct TokenCommand {
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// The display name (`name`).
    #[arg(long)]
    name: String,
    /// How long the token lasts: seconds, or with s, m, h or d.
    #[arg(long, default_value = "1h", value_parser = parse_seconds)]
    ttl: u64,
    /// The rooms it may join, comma-separated [default: any].
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
    /// Valid only from this long from now (`nbf`): seconds, or with s, m,
    /// h or d.
    #[arg(long, value_parser = parse_seconds)]
    not_before_in: Option<u64>,
    /// The HS256 secret's file, as the server's option (or set
    /// AUTH_HS256_SECRET).
    #[arg(long, env = "AUTH_HS256_SECRET_FILE")]
    auth_hs256_secret_file: Option<PathBuf>,
    /// Sign with this RS256 or ES256 private key (PEM) instead.
    #[arg(long)]
    private_key_file: Option<PathBuf>,
    /// Leave out the key id (`kid`) from the header.
    #[arg(long)]
    no_kid: bool,
}

fn parse_seconds(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number of s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(n * scale)
}

fn mint_token(command: TokenCommand) -> ExitCode {
    let now = clock::wall_millis() / 1000;
    let claims = Claims {
        sub: command.sub,
        name: Some(command.name),
        exp: now + command.ttl,
        nbf: command.not_before_in.map(|s| now + s),
        rooms: (!command.rooms.is_empty()).then_some(command.rooms),
    };
    let signing = match command.private_key_file {
        Some(path) => SigningKey::PrivateKeyFile(path),
        None => SigningKey::Secret(KeySources {
            secret_file: command.auth_hs256_secret_file,
            secret: std::env::var(auth::SECRET_ENV).ok(),
            public_key_files: Vec::new(),
        }),
    };
    match auth::mint(&claims, &signing, !command.no_kid) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pubsub-chat token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints where Redis is (its password hidden) when it answers `PING`, and
/// exits 0; else prints why not, and exits 1.
fn check_redis(config: &Config) -> ExitCode {
    match server::check_redis(config) {
        Ok(shown) => {
            println!("{shown}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pubsub-chat check-redis: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("token") {
        return mint_token(TokenCommand::parse_from(std::env::args().skip(1)));
    }
    if std::env::args().nth(1).as_deref() == Some("check-redis") {
        return check_redis(&Config::parse_from(std::env::args().skip(1)));
    }
    let allocator_note = allocator::configure();
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Some(note) = allocator_note {
        warn!("{note}");
    }
    // Registered before start, so that a signal during start-up is not lost.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match server::start(&config) {
        Ok(server) => server,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (signal_tx, signal_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = signal_tx.send(signal);
        }
    });
    select! {
        recv(signal_rx) -> signal => {
            info!("signal {} received", signal.unwrap_or_default());
            server.shutdown(CloseReason::SHUTDOWN, SHUTDOWN_GRACE);
            ExitCode::SUCCESS
        }
        recv(server.fatal_rx) -> death => {
            error!("exiting: {}", death.unwrap_or_default());
            server.shutdown(CloseReason::INTERNAL_ERROR, SHUTDOWN_GRACE);
            ExitCode::from(EXIT_INTERNAL_ERROR)
        }
    }
}
