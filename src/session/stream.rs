//! The socket as tungstenite sees it for one joined client: reads come
//! straight from the socket, writes go to the client's outbox. Both the
//! handshake's identification and the reader use it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use crate::delivery::outbox::{Outbox, Pushed};

/// The reader's side of the socket for tungstenite: reads come from the
/// socket, writes (the pongs tungstenite sends on its own) go to the
/// client's outbox, in order with everything else.
///
/// Bytes are handed over on `write`, not on `flush`: tungstenite writes a
/// pong at the start of the next `read` and may not flush it.
pub struct SessionStream {
    pub socket: Arc<TcpStream>,
    pub outbox: Arc<Outbox>,
    /// Until the client has said who it is (`--auth token`), its reads
    /// end at the handshake's deadline, however it drips its bytes.
    pub deadline: Option<Instant>,
}

impl Read for SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.socket.set_read_timeout(Some(left))?;
        }
        (&*self.socket).read(buf)
    }
}

impl Write for SessionStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.outbox.push(buf.to_vec()) {
            Pushed::Sent | Pushed::Queued => Ok(buf.len()),
            Pushed::Refused | Pushed::Overflowed => {
                Err(io::Error::other("the connection is closing"))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
