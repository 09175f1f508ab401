//! Finding dead peers: one thread per instance pings every quiet client
//! now and then and closes those that stopped answering.
//!
//! A peer that vanishes without a FIN (power cut, a laptop closed, a NAT
//! that forgot the connection) leaves its reader blocked in `read()` for
//! ever, holding a thread and a hub entry. Its reader records the time of
//! every frame it reads, pongs included; this thread, waking once per
//! interval for the whole instance (not once per client), closes any
//! client silent for longer than the idle timeout. The close cuts the
//! connection at the end of the close grace, which ends the reader.
//!
//! The same thread closes clients that talk but do not read: bytes queued
//! for one that its socket has taken none of for `--send-timeout-ms`. Its
//! buffer alone would not catch it if nothing more is sent to it (the
//! first frames of a join, then a quiet room), and pongs of its own keep
//! it from looking idle. That check runs four times per send timeout
//! (pings keep their own interval), so a stuck client goes within a
//! quarter of the timeout past it, whatever `--ping-interval-ms` is.
//!
//! With `--auth token` it also closes clients whose token expired with no
//! fresh one (4401, "token expired"), looking every second: a token is
//! never honoured more than a second past its `exp`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::protocol::frame::Frame;

use crate::clock;
use crate::delivery::hub::Hub;
use crate::delivery::outbox::Queued;
use crate::metrics::Metrics;
use crate::protocol::CloseReason;
use crate::supervisor::Supervisor;

/// When the pinger wakes, and what it closes: a group of the server's
/// options (`crate::config`).
#[derive(Debug, Clone, Copy, clap::Args)]
#[command(next_help_heading = "Dead and slow clients")]
pub struct PingerSettings {
    /// Milliseconds between two pings to a client that has been quiet
    /// (the pinger wakes this often; a client quiet for half of it is
    /// pinged).
    #[arg(long = "ping-interval-ms", env = "PING_INTERVAL_MS", value_name = "PING_INTERVAL_MS", default_value = "30000", value_parser = crate::clock::millis)]
    pub interval: Duration,
    /// Milliseconds of silence (not even a pong) after which a client is
    /// dropped as dead.
    #[arg(long = "idle-timeout-ms", env = "IDLE_TIMEOUT_MS", value_name = "IDLE_TIMEOUT_MS", default_value = "75000", value_parser = crate::clock::millis)]
    pub idle_timeout: Duration,
    /// Milliseconds during which bytes queued for a client may wait with
    /// its socket taking none of them; past it, the client is closed as a
    /// slow consumer (1008), even if it keeps sending. Checked four times
    /// per timeout.
    #[arg(long = "send-timeout-ms", env = "SEND_TIMEOUT_MS", value_name = "SEND_TIMEOUT_MS", default_value = "30000", value_parser = crate::clock::millis)]
    pub send_timeout: Duration,
    /// Clients are closed when their token expires: set from `--auth
    /// token`, not an option of its own.
    #[arg(skip)]
    pub tokens_expire: bool,
}

/// How often expired tokens are looked for.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

/// Starts the pinger thread.
pub fn spawn_pinger(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    settings: PingerSettings,
    supervisor: &Arc<Supervisor>,
) -> std::io::Result<()> {
    let PingerSettings {
        interval,
        idle_timeout,
        send_timeout,
        tokens_expire,
    } = settings;
    let mut ping = Vec::new();
    Frame::ping(Vec::new())
        .format(&mut ping)
        .expect("a ping frame formats into a Vec");
    let mut tick = interval.min(send_timeout / 4);
    if tokens_expire {
        tick = tick.min(TOKEN_CHECK);
    }
    supervisor.spawn("pinger", move || {
        let mut next_round = Instant::now() + interval;
        loop {
            thread::sleep(tick);
            // Most ticks only look for stuck clients; a ping round comes
            // once per interval.
            let ping_round = Instant::now() >= next_round;
            if ping_round {
                next_round += interval;
            }
            let mut pinged = 0;
            let now_s = clock::wall_millis() / 1000;
            for member in hub.members() {
                let expires = member.token_expires.load(Ordering::Relaxed);
                if expires != 0 && now_s >= expires {
                    // What is queued goes first: nothing in flight is lost.
                    if member
                        .outbox
                        .close(CloseReason::TOKEN_EXPIRED, Queued::Send)
                    {
                        info!("client {} closed: its token expired", member.id);
                        Metrics::inc(&metrics.tokens_expired_total);
                    }
                    continue;
                }
                if let Some(stuck_for) = member.outbox.stuck_for()
                    && stuck_for > send_timeout
                {
                    if member.outbox.close(CloseReason::STALLED, Queued::Drop) {
                        warn!(
                            "client {} dropped: nothing read for {stuck_for:?} (slow consumer)",
                            member.id
                        );
                        Metrics::inc(&metrics.slow_clients_dropped_total);
                    }
                    continue;
                }
                if !ping_round {
                    continue;
                }
                let idle_for = member.last_seen.idle_for();
                if idle_for > idle_timeout {
                    if member.outbox.close(CloseReason::IDLE, Queued::Drop) {
                        warn!("client {} dropped: silent for {idle_for:?}", member.id);
                        Metrics::inc(&metrics.idle_clients_dropped_total);
                    }
                } else if idle_for >= interval / 2 {
                    // A client that does not read fills its outbox, and the
                    // outbox closes it: nothing to handle here.
                    member.outbox.push(ping.clone());
                    pinged += 1;
                }
            }
            if ping_round {
                debug!("pinger: pinged {pinged} idle clients");
            }
        }
    })?;
    Ok(())
}
