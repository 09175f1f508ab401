//! The WebSocket handshake: one deadline for the whole exchange, the
//! Origin check, the join query, and the answers to a client refused.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use log::{debug, warn};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;

use super::{SessionContext, WS_PATH, crowded_address, linger};
use crate::delivery::hub::ClientId;
use crate::metrics::Metrics;
use crate::per_address::AddressSlot;
use crate::protocol::{
    CloseReason, DEFAULT_ROOM, ErrorCode, Limits, MessageId, ServerFrame, normalize_name,
    validate_name, validate_room,
};

/// TCP keepalive: a peer that vanished without a FIN (power loss, a
/// sleeping laptop) is found after about 30 s idle + 3 probes 10 s apart.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Answers a raw HTTP error on a socket no thread could be found for.
pub fn refuse_raw(stream: &mut TcpStream, status: &str, reason: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}",
        reason.len()
    );
    let _ = stream.shutdown(Shutdown::Both);
}

/// What the client asked for in its handshake URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub name: Option<String>,
    pub room: String,
    pub since: Option<MessageId>,
    /// `trace=1`: this client wants the X-ray of every message.
    pub trace: bool,
}

/// Reads `name`, `room`, `since` and `trace` from a handshake query string.
pub fn parse_join_query(query: &str, limits: &Limits) -> Result<JoinRequest, String> {
    let mut join = JoinRequest {
        name: None,
        room: DEFAULT_ROOM.to_string(),
        since: None,
        trace: false,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "name" if !value.trim().is_empty() => {
                let name = normalize_name(&value);
                validate_name(&name, limits)?;
                join.name = Some(name);
            }
            "room" if !value.is_empty() => {
                validate_room(&value, limits)?;
                join.room = value.into_owned();
            }
            "since" if !value.is_empty() => {
                join.since = Some(value.parse().map_err(|e| format!("since: {e}"))?);
            }
            "trace" => join.trace = matches!(&*value, "1" | "true"),
            _ => {}
        }
    }
    Ok(join)
}

fn refuse_handshake(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

/// Bounds the whole handshake, not each read: a client dripping one byte
/// every few seconds (slowloris) is cut off at the deadline all the same.
///
/// It also reads the request and not one byte further. tungstenite's
/// server handshake fails ("junk after client request") when a read brings
/// more than the request, and would drop those bytes; but a client may
/// send its first frame right behind the request without waiting for the
/// `101` (simple clients do). Reading only up to the end of the request
/// (found by peeking) leaves that frame in the socket, where the session's
/// WebSocket reads it like any other.
struct DeadlineStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    head: HeadEnd,
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let peeked = self.stream.peek(buf)?;
        let take = self.head.clone().feed(&buf[..peeked]);
        let read = self.stream.read(&mut buf[..take])?;
        self.head.feed(&buf[..read]);
        Ok(read)
    }
}

/// Finds the end of an HTTP request head, its empty line (`\r\n\r\n`, or
/// the bare `\n\n` that HTTP parsers also accept), across reads.
#[derive(Debug, Clone, Default)]
struct HeadEnd {
    /// 0: inside a line; 1: just after a `\n`; 2: after `\n\r`; 3: done.
    state: u8,
}

impl HeadEnd {
    /// Takes in `bytes`; returns how many of them belong to the head: all
    /// of them, unless the head ends inside (none once it has ended).
    fn feed(&mut self, bytes: &[u8]) -> usize {
        for (at, &byte) in bytes.iter().enumerate() {
            self.state = match (self.state, byte) {
                (3, _) => return at,
                (1 | 2, b'\n') => {
                    self.state = 3;
                    return at + 1;
                }
                (1, b'\r') => 2,
                (_, b'\n') => 1,
                _ => 0,
            };
        }
        bytes.len()
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Runs the WebSocket handshake; on success, what the client asked for,
/// or why its query is not acceptable (answered with an error frame, which
/// a browser can read, unlike an HTTP status).
///
/// `address_slot`: the client's place under `--max-clients-per-ip`; when
/// it is `None` (the peer is a trusted proxy), it is taken here, for the
/// address the proxy forwards.
// The callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
pub fn handshake(
    client: ClientId,
    stream: &TcpStream,
    deadline: Instant,
    address_slot: &mut Option<AddressSlot>,
    context: &SessionContext,
) -> Option<Result<JoinRequest, String>> {
    let mut join = None;
    let peer = stream.peer_addr().map(|addr| addr.ip()).ok();
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != WS_PATH {
            return Err(refuse_handshake(
                StatusCode::NOT_FOUND,
                format!("the WebSocket is at {WS_PATH}"),
            ));
        }
        let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
        if address_slot.is_none()
            && let Some(peer) = peer
        {
            let address = context
                .limits
                .trusted_proxies
                .client_address(peer, header("x-forwarded-for"));
            match context.per_address.take(address) {
                Some(taken) => *address_slot = Some(taken),
                None => {
                    return Err(refuse_handshake(
                        StatusCode::TOO_MANY_REQUESTS,
                        crowded_address(client, address, context),
                    ));
                }
            }
        }
        let origin = header("origin");
        if !context.limits.origins.allows(origin, header("host")) {
            Metrics::inc(&context.metrics.origin_refused_total);
            warn!("client {client} refused: origin {origin:?} not allowed");
            return Err(refuse_handshake(
                StatusCode::FORBIDDEN,
                format!(
                    "origin {} may not open a WebSocket here",
                    origin.unwrap_or("")
                ),
            ));
        }
        join = Some(parse_join_query(
            request.uri().query().unwrap_or(""),
            &context.limits.content,
        ));
        Ok(response)
    };
    let guarded = DeadlineStream {
        stream,
        deadline,
        head: HeadEnd::default(),
    };
    match tungstenite::accept_hdr_with_config(guarded, callback, Some(context.ws_config())) {
        // Nothing past the request was read (see DeadlineStream), so
        // nothing is lost when its WebSocket is dropped for the session's.
        Ok(_) => join,
        Err(e) => {
            let timed_out = match &e {
                HandshakeError::Interrupted(_) => true,
                HandshakeError::Failure(tungstenite::Error::Io(e)) => {
                    matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    )
                }
                HandshakeError::Failure(_) => false,
            };
            if timed_out {
                debug!("client {client} refused: no handshake within the timeout");
                Metrics::inc(&context.metrics.handshake_timeouts_total);
            } else {
                debug!("client {client} refused: handshake failed: {e}");
            }
            None
        }
    }
}

/// Socket options for a client: no Nagle delay (chat frames are small and
/// latency matters), a bound on the blocking writes of the handshake, and
/// TCP keepalive underneath the pings.
pub fn set_socket_options(stream: &TcpStream, write_timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(write_timeout))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Closes a connection that completed its handshake but will not join:
/// an `error` frame naming the problem (a browser can read that, unlike
/// an HTTP status) if there is one, the Close frame, then a lingering
/// close.
pub fn close_unjoined(
    mut stream: &TcpStream,
    error: Option<(ErrorCode, &str)>,
    reason: CloseReason,
    close_grace: Duration,
) {
    let mut bytes = Vec::new();
    if let Some((code, message)) = error {
        let frame = ServerFrame::Error {
            code,
            message,
            cid: None,
        };
        bytes.extend_from_slice(&frame.to_ws_bytes());
    }
    bytes.extend_from_slice(&reason.to_ws_bytes());
    if stream.write_all(&bytes).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
        linger(stream, Instant::now() + close_grace);
    }
    let _ = stream.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_query_defaults_and_decoding() {
        let join = parse_join_query("", &Limits::default()).unwrap();
        assert_eq!(join.room, "lobby");
        assert_eq!(join.name, None);
        let join = parse_join_query(
            "name=Ann%C3%A9e+B&room=team-1&since=17-3",
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(join.name.as_deref(), Some("Année B"));
        assert_eq!(join.room, "team-1");
        assert_eq!(join.since, Some(MessageId { millis: 17, seq: 3 }));
    }

    #[test]
    fn the_head_ends_at_its_empty_line_and_not_a_byte_later() {
        let request = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n\x81\x85";
        assert_eq!(HeadEnd::default().feed(request), request.len() - 2);
        let bare = b"GET / HTTP/1.1\nHost: x\n\nrest";
        assert_eq!(HeadEnd::default().feed(bare), bare.len() - 4);
        // Across reads, however the request is cut.
        for cut in 0..request.len() {
            let mut head = HeadEnd::default();
            let first = head.feed(&request[..cut]);
            let second = head.feed(&request[cut..]);
            assert_eq!(first + second, request.len() - 2, "cut at {cut}");
            assert_eq!(head.feed(b"more"), 0);
        }
    }

    #[test]
    fn bad_join_queries_are_refused_with_a_reason() {
        assert!(
            parse_join_query("room=has%20space", &Limits::default())
                .unwrap_err()
                .contains("room")
        );
        assert!(
            parse_join_query("since=yesterday", &Limits::default())
                .unwrap_err()
                .contains("since")
        );
        assert!(parse_join_query(&format!("name={}", "x".repeat(40)), &Limits::default()).is_err());
        assert!(parse_join_query("name=a%0Ab", &Limits::default()).is_err());
    }
}
