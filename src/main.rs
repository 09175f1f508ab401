//! The `pubsub-chat` binary: options, logging, start, wait for a signal,
//! shut down. Everything worth testing lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crossbeam_channel::select;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use pubsub_chat::allocator;
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

fn main() -> ExitCode {
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
