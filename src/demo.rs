//! The fault panel (`--demo-controls`, off by default): faults a student
//! can cause from the page to watch the server recover.
//!
//! Each control breaks something real, the way it breaks in production:
//! the Redis subscription is cut at its socket, delivery is held where the
//! fan-out takes its events, and a stalled tab is a client whose socket
//! the server stops writing to. Nothing here simulates the recovery: what
//! the page then shows is the server's ordinary code at work.
//!
//! Who may use them: a page served by this instance, on this machine.
//! Loopback alone is not enough: a proxy on the same host (nginx, as
//! `run_cluster.sh` sets it up) makes every user loopback, and any web
//! site can make a browser POST to 127.0.0.1. So a request must carry the
//! run's random token in an `X-Demo-Token` header (the page gets it from
//! `/config.json`, which another site cannot read; a custom header also
//! makes a cross-site request ask first, which is refused), come with no
//! `Origin` or this instance's own, and come straight: a request that
//! names a proxy (`Forwarded`, `X-Forwarded-*`, `Via`) is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use log::warn;

use crate::delivery::hub::Hub;
use crate::delivery::pause::DeliveryPause;

/// The longest pause or stall one request may ask for.
pub const MAX_SECONDS: u64 = 60;

/// Stalls at once, each a sleeping thread until it ends.
pub const MAX_STALLS: usize = 8;

/// What the controls share with the threads they act on.
#[derive(Debug, Default)]
pub struct DemoControls {
    enabled: bool,
    /// What a request must carry (`X-Demo-Token`): random, per run.
    token: String,
    /// Stalls in progress.
    stalls: Arc<AtomicUsize>,
    /// What the fan-out waits for while delivery is paused.
    delivery: Arc<DeliveryPause>,
}

impl DemoControls {
    pub fn new(enabled: bool) -> Self {
        DemoControls {
            enabled,
            token: crate::random::random_base36(32),
            stalls: Arc::default(),
            delivery: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The run's token, for the page of this machine and the start log.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Holds this instance's delivery for `seconds`: events wait, in
    /// order, in the fan-out's queue. Returns until when (wall-clock ms).
    pub fn pause_delivery(&self, seconds: u64) -> u64 {
        warn!("demo control: delivery paused for {seconds} s");
        self.delivery.hold_for(Duration::from_secs(seconds))
    }

    /// Until when delivery is paused, if it is.
    pub fn delivery_paused_until(&self) -> Option<u64> {
        self.delivery.held_until()
    }

    /// The gate the fan-out passes before each delivery, which
    /// [`DemoControls::pause_delivery`] closes.
    pub fn delivery_pause(&self) -> Arc<DeliveryPause> {
        Arc::clone(&self.delivery)
    }
}

/// What became of a stall request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    Started,
    NoSuchClient,
    /// [`MAX_STALLS`] are in progress.
    TooMany,
}

impl DemoControls {
    /// Stops writing to client `client`'s socket for `seconds`, as if its
    /// tab had stopped reading: what it is sent meanwhile waits in its
    /// outbox, and past `--client-buffer-bytes` (or `--send-timeout-ms`)
    /// the client is dropped as a slow consumer.
    pub fn stall_reading(&self, hub: &Hub, client: u64, seconds: u64) -> Stall {
        let Some(member) = hub.members().into_iter().find(|m| m.id == client) else {
            return Stall::NoSuchClient;
        };
        if self.stalls.fetch_add(1, Ordering::Relaxed) >= MAX_STALLS {
            self.stalls.fetch_sub(1, Ordering::Relaxed);
            return Stall::TooMany;
        }
        warn!("demo control: client {client}'s socket is not written to for {seconds} s");
        member.outbox.hold();
        let outbox = Arc::clone(&member.outbox);
        let stalls = Arc::clone(&self.stalls);
        let resumed = thread::Builder::new()
            .name(format!("demo-stall-{client}"))
            .spawn(move || {
                thread::sleep(Duration::from_secs(seconds));
                outbox.release();
                stalls.fetch_sub(1, Ordering::Relaxed);
            });
        if resumed.is_err() {
            member.outbox.release();
            self.stalls.fetch_sub(1, Ordering::Relaxed);
        }
        Stall::Started
    }
}
