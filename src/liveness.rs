//! Finding dead peers: one thread per instance pings every client now and
//! then and drops those that stopped answering.
//!
//! A peer that vanishes without a FIN (power cut, a laptop closed, a NAT
//! that forgot the connection) leaves its reader blocked in `read()` for
//! ever, holding two threads and a hub entry. Its reader records the time
//! of every frame it reads, pongs included; this thread, waking once per
//! interval for the whole instance (not once per client), closes any client
//! silent for longer than the idle timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use tungstenite::protocol::frame::Frame;

use crate::hub::{Batch, CloseReason, Delivery, Hub};
use crate::metrics::Metrics;
use crate::protocol::WsBytes;

/// Milliseconds since the process started, on the monotonic clock.
pub fn now_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a client was last heard from, shared by its reader and the pinger.
#[derive(Debug, Default)]
pub struct LastSeen(AtomicU64);

impl LastSeen {
    pub fn new() -> Self {
        LastSeen(AtomicU64::new(now_millis()))
    }

    pub fn touch(&self) {
        self.0.store(now_millis(), Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_millis().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// Starts the pinger thread.
pub fn spawn_pinger(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    interval: Duration,
    idle_timeout: Duration,
) -> std::io::Result<()> {
    let mut ping = Vec::new();
    Frame::ping(Vec::new())
        .format(&mut ping)
        .expect("a ping frame formats into a Vec");
    let ping: Delivery = Arc::new(Batch::from(&WsBytes::from(ping)));
    thread::Builder::new()
        .name("pinger".into())
        .spawn(move || {
            loop {
                thread::sleep(interval);
                let mut pinged = 0;
                for member in hub.members() {
                    let idle_for = member.last_seen.idle_for();
                    if idle_for > idle_timeout {
                        warn!("client {} dropped: silent for {idle_for:?}", member.id);
                        Metrics::inc(&metrics.idle_clients_dropped_total);
                        hub.leave(&member.room, member.id);
                        member.close(CloseReason::IDLE);
                    } else if idle_for >= interval / 2 {
                        // A full queue means a slow client, which the hub handles.
                        let _ = member.frames_tx.try_send(ping.clone());
                        pinged += 1;
                    }
                }
                debug!("pinger: pinged {pinged} idle clients");
            }
        })?;
    Ok(())
}
