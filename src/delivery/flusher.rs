//! The flusher pool: a few threads (one per core) that finish what
//! sockets could not take at once, and cut connections whose close took
//! too long.
//!
//! Most bytes never come here: an outbox sends at once when the socket
//! takes them ([`crate::delivery::outbox`]). Only when a socket is full does
//! its outbox ask to be called back; the flusher waits for writability on
//! all such sockets at once (`epoll`, through the `polling` crate: a thin
//! system-call wrapper, not an async runtime) and calls the outbox's
//! `flush`, which sends under the outbox's own lock, so order holds.
//!
//! Each client belongs to one flusher (its key modulo the pool size): a
//! `polling::Poller` has one waiting thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::TcpStream;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::debug;
use polling::{Event, Events, Poller};

use crate::delivery::outbox::{Outbox, Watcher};
use crate::supervisor::Supervisor;
use crate::sync::{Mutex, lock};

/// The pool.
pub struct Flusher {
    shards: Vec<Arc<Shard>>,
}

/// One flusher thread's sockets.
struct Shard {
    poller: Poller,
    outboxes: Mutex<HashMap<usize, Weak<Outbox>>>,
    /// When to cut connections whose close began: (deadline, key).
    cuts: Mutex<BinaryHeap<Reverse<(Instant, usize)>>>,
}

impl Flusher {
    /// Starts `threads` flusher threads.
    pub fn start(threads: usize, supervisor: &Arc<Supervisor>) -> std::io::Result<Arc<Flusher>> {
        let mut shards = Vec::new();
        for n in 0..threads.max(1) {
            let shard = Arc::new(Shard {
                poller: Poller::new()?,
                outboxes: Mutex::default(),
                cuts: Mutex::default(),
            });
            let running = Arc::clone(&shard);
            supervisor.spawn(&format!("flusher-{n}"), move || running.run())?;
            shards.push(shard);
        }
        Ok(Arc::new(Flusher { shards }))
    }

    fn shard(&self, key: usize) -> &Arc<Shard> {
        &self.shards[key % self.shards.len()]
    }

    /// What an outbox for `key` calls when its socket is full or its close
    /// begins.
    pub fn watcher(&self, key: usize) -> Arc<dyn Watcher> {
        self.shard(key).clone()
    }

    /// Makes `outbox` known to its flusher; [`forget`](Self::forget) it
    /// before its socket is closed.
    pub fn register(
        &self,
        key: usize,
        socket: &TcpStream,
        outbox: &Arc<Outbox>,
    ) -> std::io::Result<()> {
        let shard = self.shard(key);
        lock(&shard.outboxes).insert(key, Arc::downgrade(outbox));
        // SAFETY: the socket is deleted from the poller in `forget`, which
        // the session calls while it still holds the socket open.
        unsafe { shard.poller.add(socket, Event::none(key)) }
    }

    /// Brings every pending cut forward to `deadline` at the latest: at
    /// shutdown, connections whose close has begun get a shorter grace.
    pub fn hasten_cuts(&self, deadline: Instant) {
        for shard in &self.shards {
            let mut cuts = lock(&shard.cuts);
            let hastened = cuts
                .drain()
                .map(|Reverse((at, key))| Reverse((at.min(deadline), key)))
                .collect();
            *cuts = hastened;
            drop(cuts);
            let _ = shard.poller.notify();
        }
    }

    /// The session is over: no more call-backs for this socket.
    pub fn forget(&self, key: usize, socket: &TcpStream) {
        let shard = self.shard(key);
        lock(&shard.outboxes).remove(&key);
        let _ = shard.poller.delete(socket);
    }
}

impl Watcher for Shard {
    fn watch_writable(&self, key: usize, socket: &TcpStream) {
        // Fails only once the session forgot the socket: nothing to flush.
        if let Err(e) = self.poller.modify(socket, Event::writable(key)) {
            debug!("client {key}: not watched for writability: {e}");
        }
    }

    fn cut_at(&self, key: usize, deadline: Instant) {
        lock(&self.cuts).push(Reverse((deadline, key)));
        let _ = self.poller.notify();
    }
}

impl Shard {
    fn run(&self) {
        let mut events = Events::new();
        loop {
            events.clear();
            let next_cut = lock(&self.cuts).peek().map(|Reverse((at, _))| *at);
            let timeout = next_cut.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poller.wait(&mut events, timeout)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                panic!("flusher cannot wait on its sockets: {e}");
            }
            for event in events.iter() {
                if let Some(outbox) = self.outbox(event.key) {
                    outbox.flush();
                }
            }
            for key in self.due_cuts() {
                if let Some(outbox) = self.outbox(key) {
                    debug!("client {key}: close grace over, connection cut");
                    outbox.cut();
                }
            }
        }
    }

    fn outbox(&self, key: usize) -> Option<Arc<Outbox>> {
        lock(&self.outboxes).get(&key).and_then(Weak::upgrade)
    }

    /// The keys whose close grace is over, taken off the heap.
    fn due_cuts(&self) -> Vec<usize> {
        let now = Instant::now() + Duration::from_millis(1);
        let mut cuts = lock(&self.cuts);
        let mut due = Vec::new();
        while let Some(&Reverse((at, key))) = cuts.peek() {
            if at > now {
                break;
            }
            cuts.pop();
            due.push(key);
        }
        due
    }
}
