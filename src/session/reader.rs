//! A client's reader thread, once joined: reads frames, checks them,
//! publishes messages, and answers what needs an answer, all through the
//! client's outbox. It never writes to the socket itself, and sends
//! nothing to other clients: its own message comes back through the
//! broker like everyone else's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use tungstenite::error::{CapacityError, Error};
use tungstenite::{Message, WebSocket};

use super::SessionContext;
use super::identify::{Who, forbidden};
use super::stream::SessionStream;
use crate::broker::{HistoryQuery, PublishError};
use crate::clock::{self, LastSeen};
use crate::delivery::hub::ClientId;
use crate::delivery::outbox::{Outbox, Pushed, Queued};
use crate::delivery::view::View;
use crate::faults;
use crate::metrics::Metrics;
use crate::protocol::{
    ClientRequest, CloseReason, ErrorCode, FrameError, MessageFrame, MessageId, NewMessage,
    ServerFrame, ValidMessage, parse_client_frame,
};
use crate::rate_limit::{RateLimit, TokenBucket, Verdict};
use crate::session::fitting_from;

/// At most one `typing` relayed per client in this time: a page sends one
/// per keystroke burst, and the others only need to know it goes on.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// `typing` frames a client may send back to back, and a second on
/// average, apart from its messages' rate limit: a page sends about one
/// a second while its user types. Past it they are dropped, and
/// `--rate-strikes` of them in a row close the client as flooding.
const TYPING_BURST: u32 = 5;
const TYPING_PER_SECOND: f64 = 1.0;

/// Who the reader speaks for.
pub struct Sender<'a> {
    pub client: ClientId,
    pub who: &'a Who,
    /// Its presence key ([`Who::presence_key`]).
    pub key: &'a str,
    pub room: &'a str,
    /// Its window on the room's member list.
    pub view: &'a View,
    /// When its token expires (the hub's copy, which the pinger reads).
    pub token_expires: &'a AtomicU64,
}

/// Reads frames and publishes messages until the connection ends or a
/// close begins; returns how it ended, for the log. Every close this
/// thread starts goes through the outbox, so its Close frame is the last.
pub fn read_until_closed(
    sender: &Sender<'_>,
    websocket: &mut WebSocket<SessionStream>,
    last_seen: &LastSeen,
    context: &SessionContext,
) -> String {
    let mut reader = Reader::new(sender, Arc::clone(&websocket.get_ref().outbox), context);
    loop {
        let read = websocket.read();
        last_seen.touch();
        let flow = match reader.frame(read) {
            Ok(frame) => reader.handle(&frame),
            Err(flow) => flow,
        };
        match flow {
            Flow::Next => {}
            Flow::Answer(frame) => {
                if let Pushed::Refused | Pushed::Overflowed = reader.outbox.push(frame) {
                    return "closed by the server".into();
                }
            }
            Flow::End(why) => return why,
        }
    }
}

/// What the reader does after a frame.
enum Flow {
    /// Nothing to answer: read the next frame.
    Next,
    /// Send this frame back (through the outbox), then read the next.
    Answer(Vec<u8>),
    /// The session is over (its close, if any, already begun); why, for
    /// the log.
    End(String),
}

/// One client's reader, between frames: its rate limits and counters.
struct Reader<'s> {
    sender: &'s Sender<'s>,
    context: &'s SessionContext,
    outbox: Arc<Outbox>,
    /// Messages this client sent, for their dedup keys.
    sent: u64,
    bucket: TokenBucket,
    typing_bucket: TokenBucket,
    last_typing: Option<Instant>,
}

impl<'s> Reader<'s> {
    fn new(sender: &'s Sender<'s>, outbox: Arc<Outbox>, context: &'s SessionContext) -> Self {
        Reader {
            sender,
            context,
            outbox,
            sent: 0,
            bucket: TokenBucket::new(context.limits.rate),
            typing_bucket: TokenBucket::new(RateLimit {
                burst: TYPING_BURST,
                per_second: TYPING_PER_SECOND,
                strikes: context.limits.rate.strikes,
            }),
            last_typing: None,
        }
    }

    /// Starts a close through the outbox (queued bytes first) and ends.
    fn close(&self, reason: CloseReason, why: String) -> Flow {
        self.outbox.close(reason, Queued::Send);
        Flow::End(why)
    }

    /// What one read gave: a data frame to handle, or how the reading goes
    /// on (a ping: nothing) or ends (a close, an error).
    fn frame(&self, read: Result<Message, Error>) -> Result<Message, Flow> {
        // A close began elsewhere (slow consumer, dead peer, shutdown):
        // what the client says now changes nothing.
        if self.outbox.is_closing() {
            return Err(Flow::End("closed by the server".into()));
        }
        Err(match read {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => return Ok(message),
            Ok(Message::Close(frame)) => {
                self.outbox.close(
                    CloseReason::echo(frame.map(|frame| u16::from(frame.code))),
                    Queued::Drop,
                );
                Flow::End("closed by the client".into())
            }
            // tungstenite answers pings itself (the pong goes out at the
            // start of the next read); pongs only prove life.
            Ok(_) => Flow::Next,
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => Flow::End("closed".into()),
            Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => self.close(
                CloseReason::TOO_LARGE,
                format!("frame of {size} bytes over the {max_size} byte limit"),
            ),
            Err(Error::Utf8(_)) => self.close(
                CloseReason::INVALID_UTF8,
                "invalid UTF-8 in a text frame".into(),
            ),
            Err(Error::Protocol(e)) => {
                self.close(CloseReason::PROTOCOL_ERROR, format!("protocol error: {e}"))
            }
            Err(Error::Io(e)) => Flow::End(format!("connection lost: {e}")),
            Err(e) => Flow::End(format!("error: {e}")),
        })
    }

    /// One data frame: checked, rate-limited, and answered.
    fn handle(&mut self, frame: &Message) -> Flow {
        let context = self.context;
        Metrics::inc(&context.metrics.messages_received_total);
        let parsed = match frame {
            Message::Text(text) => parse_client_frame(text, &context.limits.content),
            _ => Err(FrameError::bad_request(
                "binary frames are not supported: send JSON text",
            )),
        };
        if let Ok(ClientRequest::Typing) = parsed {
            return self.typing();
        }
        if let Ok(ClientRequest::Message(message)) = &parsed {
            faults::inject("reader", &message.text);
        }
        match self.bucket.check() {
            Verdict::Allow => self.answer(parsed),
            Verdict::Refuse => {
                Metrics::inc(&context.metrics.rate_limited_total);
                let limit = context.limits.rate;
                let reason = format!(
                    "slow down: at most {} messages a second, {} in a burst",
                    limit.per_second, limit.burst
                );
                Flow::Answer(error_frame(
                    ErrorCode::RateLimited,
                    &reason,
                    cid_of(&parsed),
                ))
            }
            Verdict::Disconnect => {
                Metrics::inc(&context.metrics.rate_limited_total);
                self.flooding("")
            }
        }
    }

    /// A request within the rate limit.
    fn answer(&mut self, parsed: Result<ClientRequest, FrameError>) -> Flow {
        let (sender, context) = (self.sender, self.context);
        let answer = match parsed {
            Ok(ClientRequest::Message(message)) => {
                match publish(sender, &mut self.sent, message, context) {
                    None => return Flow::Next,
                    Some(refusal) => refusal,
                }
            }
            Ok(ClientRequest::Members { offset, limit, cid }) => {
                match context.presence.request(
                    sender.room,
                    sender.view,
                    &self.outbox,
                    offset,
                    limit,
                ) {
                    Ok(()) => return Flow::Next,
                    Err(why) => error_frame(ErrorCode::BadRequest, &why, cid.as_deref()),
                }
            }
            Ok(ClientRequest::History { before, limit, cid }) => {
                history_page(sender, before, limit, cid.as_deref(), context)
            }
            Ok(ClientRequest::Typing) => return Flow::Next,
            Ok(ClientRequest::Auth(token)) => refresh(sender, &token, context),
            Err(refused) => {
                Metrics::inc(&context.metrics.messages_rejected_total);
                debug!(
                    "client {}: frame refused: {}",
                    sender.client, refused.message
                );
                refused.to_frame().to_ws_bytes().to_vec()
            }
        };
        Flow::Answer(answer)
    }

    /// `typing`: ephemeral, with a bucket of its own: extra ones are
    /// dropped, not counted against the messages' rate limit, and at most
    /// one in TYPING_INTERVAL is relayed.
    fn typing(&mut self) -> Flow {
        match self.typing_bucket.check() {
            Verdict::Allow => {}
            // Dropped quietly: a page's burst of keys is no fault.
            Verdict::Refuse => return Flow::Next,
            Verdict::Disconnect => return self.flooding(" (typing)"),
        }
        if self
            .last_typing
            .is_none_or(|at| at.elapsed() >= TYPING_INTERVAL)
        {
            self.last_typing = Some(Instant::now());
            if self.context.presence.settings().enabled {
                self.context
                    .broker
                    .typing(self.sender.room, self.sender.key);
            } else {
                let refusal = "typing is not relayed: presence is off on this server \
                               (--presence off)";
                return Flow::Answer(error_frame(ErrorCode::BadRequest, refusal, None));
            }
        }
        Flow::Next
    }

    /// Too many frames refused in a row: the client is closed as flooding
    /// (its `rate_limited` errors still go out first, then the Close).
    fn flooding(&self, what: &str) -> Flow {
        Metrics::inc(&self.context.metrics.flooding_clients_dropped_total);
        warn!(
            "client {} dropped: {}{what}",
            self.sender.client,
            CloseReason::FLOODING.reason
        );
        self.close(CloseReason::FLOODING, CloseReason::FLOODING.reason.into())
    }
}

/// The `cid` of a request, if it has one: an answer names it.
fn cid_of(parsed: &Result<ClientRequest, FrameError>) -> Option<&str> {
    match parsed {
        Ok(ClientRequest::Message(message)) => message.cid.as_deref(),
        Ok(ClientRequest::Members { cid, .. } | ClientRequest::History { cid, .. }) => {
            cid.as_deref()
        }
        Ok(ClientRequest::Typing | ClientRequest::Auth(_)) => None,
        Err(refused) => refused.cid.as_deref(),
    }
}

/// Publishes a valid message; `None` once it is accepted (the sender's own
/// copy, coming back through the broker like everyone else's, is its
/// receipt), or the error frame to send back: `unavailable` (not sent) or
/// `outcome_unknown` (Redis never said).
pub(crate) fn publish(
    sender: &Sender<'_>,
    sent: &mut u64,
    message: ValidMessage,
    context: &SessionContext,
) -> Option<Vec<u8>> {
    let cid = message.cid.clone();
    let new = NewMessage {
        room: sender.room.to_string(),
        from: sender.who.name.clone(),
        user: sender.who.user.clone(),
        text: message.text,
        instance: context.instance.clone(),
        cid: message.cid,
        typed_us: message.typed_us,
        // The X-ray's second hop: this instance has read and checked it.
        read_us: Some(clock::wall_micros()),
    };
    *sent += 1;
    let dedup_key = format!("{}-{}-{sent}", context.run_nonce, sender.client);
    match context.broker.publish(new, &dedup_key) {
        Ok(_) => {
            Metrics::inc(&context.metrics.messages_published_total);
            None
        }
        Err(PublishError::Unavailable(e)) => {
            Metrics::inc(&context.metrics.messages_unavailable_total);
            debug!("client {}: message not accepted: {e}", sender.client);
            Some(error_frame(
                ErrorCode::Unavailable,
                &format!("message not sent: {e}"),
                cid.as_deref(),
            ))
        }
        Err(PublishError::OutcomeUnknown(why)) => {
            Metrics::inc(&context.metrics.messages_outcome_unknown_total);
            debug!("client {}: message outcome unknown: {why}", sender.client);
            let refusal = FrameError::outcome_unknown(&why, cid.as_deref());
            Some(refusal.to_frame().to_ws_bytes().to_vec())
        }
    }
}

/// A `history` request: the page of messages older than `before`, as one
/// frame no larger than the client's buffer (the most recent of them that
/// fit, `more` if others remain), or the error frame to send back.
fn history_page(
    sender: &Sender<'_>,
    before: MessageId,
    limit: Option<u64>,
    cid: Option<&str>,
    context: &SessionContext,
) -> Vec<u8> {
    let max = context.limits.history_replay_max;
    let limit = limit.map_or(context.limits.history_replay as u64, |limit| limit);
    if limit == 0 || limit > max as u64 {
        let why = format!("limit must be 1 to {max} (--history-replay-max)");
        return error_frame(ErrorCode::BadRequest, &why, cid);
    }
    let query = HistoryQuery::Before(before, limit as usize);
    let history = match context.broker.history(sender.room, query) {
        Ok(history) => history,
        Err(e) => {
            let why = format!("history is unavailable: {e}");
            return error_frame(ErrorCode::Unavailable, &why, cid);
        }
    };
    let frames: Vec<Vec<u8>> = history
        .messages
        .iter()
        .map(|message| serde_json::to_vec(&MessageFrame::plain(message)).unwrap_or_default())
        .collect();
    // The page's envelope and commas, and room for them in the budget.
    let budget = context.limits.client_buffer_bytes.saturating_sub(256);
    let skipped = fitting_from(&frames, budget);
    let messages = history.messages[skipped..]
        .iter()
        .map(MessageFrame::plain)
        .collect();
    Metrics::add(
        &context.metrics.history_replayed_total,
        (frames.len() - skipped) as u64,
    );
    ServerFrame::History {
        room: sender.room,
        messages,
        more: history.more || skipped > 0,
    }
    .to_ws_bytes()
    .to_vec()
}

/// A fresh token (`--auth token`): for the same user, and allowing this
/// room, it extends the connection to its `exp`; anything else is refused
/// with the reason, and the connection keeps its current token until that
/// one expires.
fn refresh(sender: &Sender<'_>, token: &str, context: &SessionContext) -> Vec<u8> {
    let Some(verifier) = &context.limits.auth else {
        let why = "this server does not check tokens (--auth off)";
        return error_frame(ErrorCode::BadRequest, why, None);
    };
    let identity = match verifier.verify(token, clock::wall_millis() / 1000) {
        Ok(identity) => identity,
        Err(refusal) => {
            debug!("client {}: fresh token refused: {refusal}", sender.client);
            return error_frame(refusal.code(), &refusal.to_string(), None);
        }
    };
    if Some(&identity.user) != sender.who.user.as_ref() {
        let why = "a fresh token must be for the same user (sub) as the connection's";
        return error_frame(ErrorCode::TokenClaims, why, None);
    }
    if !identity.allows(sender.room) {
        let refused = forbidden(&identity, sender.room);
        return error_frame(refused.code, &refused.message, None);
    }
    sender
        .token_expires
        .store(identity.expires, Ordering::Relaxed);
    debug!(
        "client {}: token refreshed until {}",
        sender.client, identity.expires
    );
    ServerFrame::Authenticated {
        user: &identity.user,
        expires: identity.expires,
    }
    .to_ws_bytes()
    .to_vec()
}

fn error_frame(code: ErrorCode, message: &str, cid: Option<&str>) -> Vec<u8> {
    ServerFrame::Error { code, message, cid }
        .to_ws_bytes()
        .to_vec()
}
