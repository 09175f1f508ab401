//! The instance's own threads (fan-out, deliverers, flushers, the Redis
//! subscriber, the pinger, accept, HTTP): started here, and watched.
//!
//! If one of them dies (a panic: a bug), messages would be lost without a
//! sound while `/readyz` kept answering 200. So a death is logged with its
//! cause, `/readyz` answers 503 with it, and the instance exits non-zero
//! after closing its clients with 1011, for its supervisor (systemd,
//! Kubernetes, a shell loop) to start it again.
//!
//! Why exit rather than restart the thread: a thread that panicked left
//! its work half done (a fan-out that died mid-batch has given a message to
//! some clients and not to others), and nothing in the process knows
//! which. A fresh process starts from a state that is right by
//! construction; its clients reconnect with `since` and miss nothing,
//! because history is in Redis.
//!
//! The stop flag lives here too: one flag that every thread reads, so that
//! threads ending during a shutdown are not taken for deaths.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, unbounded};
use log::error;

use crate::sync::{Mutex, lock};

pub struct Supervisor {
    stopping: AtomicBool,
    /// Every death, for `/readyz`. One may cause others (the deliverers
    /// end when the fan-out is gone), so all are told.
    deaths: Mutex<Vec<String>>,
    fatal_tx: Sender<String>,
}

impl Supervisor {
    /// A supervisor, and where the first death is announced (`main` waits
    /// on it, next to the signals).
    pub fn new() -> (Arc<Supervisor>, Receiver<String>) {
        let (fatal_tx, fatal_rx) = unbounded();
        let supervisor = Supervisor {
            stopping: AtomicBool::new(false),
            deaths: Mutex::default(),
            fatal_tx,
        };
        (Arc::new(supervisor), fatal_rx)
    }

    /// Starts a thread that must live as long as the instance: its end
    /// (return or panic) before [`stop`](Self::stop) is a death.
    pub fn spawn(
        self: &Arc<Self>,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        install_panic_hook();
        let supervisor = Arc::clone(self);
        let thread_name = name.to_string();
        thread::Builder::new().name(name.into()).spawn(move || {
            SUPERVISED.with(|supervised| {
                *supervised.borrow_mut() = Some((supervisor.clone(), thread_name.clone()));
            });
            let outcome = panic::catch_unwind(AssertUnwindSafe(body));
            // A panic was recorded by the hook, before unwinding.
            if outcome.is_ok() && !supervisor.is_stopping() {
                supervisor.died(&thread_name, "it returned");
            }
        })
    }

    fn died(&self, name: &str, cause: &str) {
        let what = format!("internal thread {name} died ({cause})");
        error!("{what}: this instance can no longer deliver; it exits so that it is restarted");
        lock(&self.deaths).push(what.clone());
        let _ = self.fatal_tx.send(what);
    }

    /// `Err` with the cause once an internal thread died, or while the
    /// instance shuts down (a load balancer stops sending clients here).
    pub fn readiness(&self) -> Result<(), String> {
        let deaths = lock(&self.deaths);
        if !deaths.is_empty() {
            Err(format!("{}; the instance is exiting", deaths.join("; ")))
        } else if self.is_stopping() {
            Err("the instance is shutting down".into())
        } else {
            Ok(())
        }
    }

    /// The instance is shutting down: threads may end now.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// The supervisor of the current thread, if it is supervised.
    static SUPERVISED: std::cell::RefCell<Option<(Arc<Supervisor>, String)>> =
        const { std::cell::RefCell::new(None) };
}

/// Records a supervised thread's panic as it happens, before unwinding:
/// what the unwinding then drops (the fan-out's job queues, say) ends
/// other threads, and the first death told must be the cause, not those.
fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            previous(info);
            let supervised = SUPERVISED.with(|supervised| supervised.borrow().clone());
            if let Some((supervisor, name)) = supervised
                && !supervisor.is_stopping()
            {
                supervisor.died(&name, &panic_message(info.payload()));
            }
        }));
    });
}

/// The text of a panic, if it carried one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panic: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panic: {text}")
    } else {
        "panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_death_is_announced_and_makes_the_instance_unready() {
        let (supervisor, fatal_rx) = Supervisor::new();
        assert_eq!(supervisor.readiness(), Ok(()));
        supervisor.spawn("doomed", || panic!("boom")).unwrap();
        let death = fatal_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(death, "internal thread doomed died (panic: boom)");
        assert!(supervisor.readiness().unwrap_err().contains("doomed died"));
    }

    #[test]
    fn threads_ending_during_a_shutdown_are_not_deaths() {
        let (supervisor, fatal_rx) = Supervisor::new();
        supervisor.stop();
        supervisor.spawn("done", || {}).unwrap().join().unwrap();
        assert!(fatal_rx.try_recv().is_err(), "no death announced");
        assert_eq!(
            supervisor.readiness(),
            Err("the instance is shutting down".into())
        );
    }
}
