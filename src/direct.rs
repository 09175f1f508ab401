//! Writing to an idle client's socket straight from the fan-out.
//!
//! Handing a message to a parked writer thread costs a wake-up: a futex
//! call, a context switch, often an idle CPU to rouse. For a small stream
//! to a large room that wake-up, not the bytes, is most of the latency. So
//! when a client's writer is parked with nothing queued, whoever delivers
//! (the fan-out thread) may write the frame itself, with a send that never
//! blocks. Only one thread may write to a socket at a time, or frames would
//! interleave; this is the hand-over protocol, on one atomic, with no lock
//! held while writing:
//!
//! - `WRITER`: the writer thread owns the socket (it is writing, or has
//!   work queued, or still filters history's seam).
//! - `IDLE`: the writer is parked with nothing queued. A deliverer may take
//!   the socket (`IDLE` → `DIRECT`), but only if both queues are still
//!   empty, so that nothing overtakes what is queued.
//! - `DIRECT`: a deliverer is writing. A writer that wakes waits for it.
//!   If the socket cannot take all the bytes, the rest goes into the
//!   carry-over, which the writer sends before anything else, and the
//!   socket goes back to the writer (`WRITER`), which the deliverer wakes.
//! - `CLOSED`: the session is ending; everyone queues (and finds it gone).

use std::io;
use std::net::TcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

const WRITER: u8 = 0;
const IDLE: u8 = 1;
const DIRECT: u8 = 2;
const CLOSED: u8 = 3;

/// Who may write to one client's socket right now.
#[derive(Debug)]
pub struct SocketOwner {
    state: AtomicU8,
    /// Bytes a deliverer could not write without blocking.
    carry_over: Mutex<Vec<u8>>,
}

/// What a direct write attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// All the bytes are on the socket.
    Written,
    /// Some are; the rest is the writer's now, and it must be woken.
    HandedOver,
    /// Nothing was written: queue the bytes as usual.
    NotNow,
}

impl Default for SocketOwner {
    fn default() -> Self {
        SocketOwner {
            state: AtomicU8::new(WRITER),
            carry_over: Mutex::default(),
        }
    }
}

impl SocketOwner {
    /// Deliverer: writes `bytes` now if the writer is idle and
    /// `queues_empty` still holds once the socket is taken.
    pub fn try_write(
        &self,
        socket: &TcpStream,
        bytes: &[u8],
        queues_empty: impl Fn() -> bool,
    ) -> Direct {
        if self
            .state
            .compare_exchange(IDLE, DIRECT, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Direct::NotNow;
        }
        if !queues_empty() {
            self.state.store(IDLE, Ordering::Release);
            return Direct::NotNow;
        }
        let mut written = 0;
        while written < bytes.len() {
            match send_without_blocking(socket, &bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) if written == 0 => {
                    // A broken socket: let the writer find out and end.
                    self.state.store(IDLE, Ordering::Release);
                    return Direct::NotNow;
                }
                Err(_) => break,
            }
        }
        if written == bytes.len() {
            self.state.store(IDLE, Ordering::Release);
            return Direct::Written;
        }
        self.carry_over
            .lock()
            .expect("carry-over lock poisoned")
            .extend_from_slice(&bytes[written..]);
        self.state.store(WRITER, Ordering::Release);
        Direct::HandedOver
    }

    /// Writer: takes the socket back before writing (waiting out a direct
    /// write in progress). Returns the carry-over, which must be written
    /// before anything else: it is the end of a frame already begun.
    #[must_use]
    pub fn acquire(&self) -> Vec<u8> {
        loop {
            match self
                .state
                .compare_exchange(IDLE, WRITER, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) | Err(WRITER) | Err(CLOSED) => break,
                // A send that never blocks: microseconds.
                Err(_) => std::thread::yield_now(),
            }
        }
        std::mem::take(&mut *self.carry_over.lock().expect("carry-over lock poisoned"))
    }

    /// Writer: about to park with nothing to write; deliverers may write.
    pub fn release(&self) {
        let _ = self
            .state
            .compare_exchange(WRITER, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Writer: the session is ending; no more direct writes. Returns the
    /// carry-over, as [`acquire`](Self::acquire) does.
    #[must_use]
    pub fn close(&self) -> Vec<u8> {
        let carry_over = self.acquire();
        self.state.store(CLOSED, Ordering::Release);
        carry_over
    }
}

fn send_without_blocking(socket: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    #[test]
    fn only_an_idle_writer_with_empty_queues_lets_a_deliverer_write() {
        let (server, mut client) = pair();
        let owner = SocketOwner::default();
        assert_eq!(
            owner.try_write(&server, b"no", || true),
            Direct::NotNow,
            "the writer owns it"
        );
        owner.release();
        assert_eq!(
            owner.try_write(&server, b"no", || false),
            Direct::NotNow,
            "something is queued"
        );
        assert_eq!(owner.try_write(&server, b"hi", || true), Direct::Written);
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert!(owner.close().is_empty());
        assert_eq!(
            owner.try_write(&server, b"no", || true),
            Direct::NotNow,
            "closed"
        );
    }

    #[test]
    fn what_a_full_socket_cannot_take_goes_to_the_writer_first() {
        let (server, client) = pair();
        let owner = SocketOwner::default();
        owner.release();
        let big = vec![7u8; 16 * 1024 * 1024];
        assert_eq!(owner.try_write(&server, &big, || true), Direct::HandedOver);
        assert_eq!(
            owner.try_write(&server, b"x", || true),
            Direct::NotNow,
            "the writer owns it now"
        );
        let carry_over = owner.acquire();
        assert!(!carry_over.is_empty() && carry_over.iter().all(|&b| b == 7));
        assert!(carry_over.len() < big.len(), "part went out directly");
        assert!(owner.acquire().is_empty(), "handed over once");
        drop(client.set_nonblocking(true));
    }
}
