//! The wire contract (`docs/PROTOCOL.md`): every JSON shape that crosses a
//! WebSocket or the Redis channel, and the only place that encodes, decodes
//! and validates them.
//!
//! Keeping all of it here means a change to the contract is a change to one
//! file, and the parsers that face hostile input are small enough to test
//! exhaustively.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame};

/// The longest client-chosen `cid`: a UUID is 36, so 64 leaves room for any
/// sane scheme without letting a client make every echo expensive.
pub const MAX_CID_CHARS: usize = 64;
/// The room a client joins when it names none.
pub const DEFAULT_ROOM: &str = "lobby";
/// The longest user id (a token's `sub`): a UUID is 36, an e-mail address
/// rarely more than 64.
pub const MAX_USER_CHARS: usize = 64;
/// Between a member's display name and its user id in a presence key
/// ([`member_key`]). A control character, so no name can hold it.
const USER_SEPARATOR: char = '\u{1f}';

/// The content limits every parser here enforces: a group of the server's
/// options (`crate::config`), with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "What a client may send")]
pub struct Limits {
    /// Longest message text, in characters.
    #[arg(long, env = "MAX_TEXT_CHARS", default_value_t = 2000)]
    pub max_text_chars: usize,
    /// Longest display name, in characters (no control characters).
    #[arg(long, env = "MAX_NAME_CHARS", default_value_t = 32)]
    pub max_name_chars: usize,
    /// Longest room name, in characters (A-Z, a-z, 0-9, _ and -).
    #[arg(long, env = "MAX_ROOM_CHARS", default_value_t = 32)]
    pub max_room_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_chars: 2000,
            max_name_chars: 32,
            max_room_chars: 32,
        }
    }
}

impl Limits {
    /// The largest payload worth parsing from the Redis channel: a message
    /// at every limit, every character escaped, plus the fixed fields.
    pub fn max_payload_bytes(&self) -> usize {
        (self.max_text_chars
            + self.max_name_chars
            + MAX_USER_CHARS
            + self.max_room_chars
            + MAX_CID_CHARS
            + 64)
            * 6
            + 512
    }
}

/// A message id as Redis Streams write it: `<milliseconds>-<sequence>`.
///
/// Ids are compared as number pairs, never as strings (`"9-0" > "10-0"` as
/// strings). The order of ids is the order in which messages were accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub millis: u64,
    pub seq: u64,
}

impl MessageId {
    pub const ZERO: MessageId = MessageId { millis: 0, seq: 0 };

    /// The smallest id after this one.
    pub fn next(self) -> MessageId {
        MessageId {
            seq: self.seq + 1,
            ..self
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.millis, self.seq)
    }
}

/// Why a string is not a [`MessageId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessageId(pub String);

impl fmt::Display for BadMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a message id (expected <milliseconds>-<sequence>)",
            self.0
        )
    }
}

impl std::error::Error for BadMessageId {}

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMessageId(s.chars().take(64).collect());
        let (millis, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(millis) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            millis: millis.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A chat message as every receiver sees it, and exactly as it travels on
/// the Redis channel and sits in the room's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub id: MessageId,
    pub room: String,
    pub from: String,
    /// The sender's user id, as its token says (`--auth token` only):
    /// two senders may share a display name, never a user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub text: String,
    pub ts: u64,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// X-ray stamps that travel with the message (see [`Trace`]): when the
    /// sender's tab says it was typed, and when `instance` read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typed_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_us: Option<u64>,
}

/// The fields of a message that the accepting instance knows before the
/// broker has given it an id and a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewMessage {
    pub room: String,
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub text: String,
    pub instance: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typed_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_us: Option<u64>,
}

impl NewMessage {
    /// The message once the broker has accepted it under `id`.
    pub fn accepted(self, id: MessageId) -> ChatMessage {
        ChatMessage {
            id,
            ts: id.millis,
            room: self.room,
            from: self.from,
            user: self.user,
            text: self.text,
            instance: self.instance,
            cid: self.cid,
            typed_us: self.typed_us,
            read_us: self.read_us,
        }
    }
}

/// Stable error codes (`docs/PROTOCOL.md`): clients branch on these, so they
/// never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON, has an unknown `type`, or misses a field.
    BadRequest,
    /// The frame or the text is longer than the configured limit.
    TooLarge,
    /// The client sends faster than its rate limit allows.
    RateLimited,
    /// The message was NOT accepted: the broker (Redis) is unreachable.
    Unavailable,
    /// The message may or may not have been accepted: Redis took the accept
    /// script and never said how it ended. If it was accepted, it appears
    /// in the conversation like any other; a client must not resend it
    /// blindly.
    OutcomeUnknown,
    /// The client asked for the X-ray and `--max-traced-clients` clients
    /// have it: it is accepted without.
    TraceRefused,
    /// `--auth token`: the first frame was not `auth`, or came too late.
    AuthRequired,
    /// The token is longer than `--auth-max-token-bytes`.
    TokenTooLarge,
    /// The token is not a JWT (three base64url parts of JSON).
    TokenMalformed,
    /// The token is signed with an algorithm this server does not accept
    /// (`none` included): only the configured keys' algorithms are.
    TokenAlgorithm,
    /// The token names a key (`kid`) this server does not have, or names
    /// none where several could verify it.
    TokenUnknownKey,
    /// The signature does not verify with the server's key.
    TokenSignature,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token's `nbf` is still to come.
    TokenNotYetValid,
    /// A claim is missing (`sub`, `name`, `exp`) or not acceptable.
    TokenClaims,
    /// The token's `rooms` claim does not include the room asked for.
    RoomForbidden,
}

/// Every frame the server sends, told apart by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        instance: &'a str,
        client: &'a str,
        name: &'a str,
        room: &'a str,
        /// `--auth token`: the user id the token vouches for.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// `--auth token`: when the token expires (seconds since the
        /// Unix epoch); the connection is closed then unless a fresh
        /// token comes first.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
    },
    /// A fresh token was accepted (`--auth token`): the connection now
    /// lasts until `expires`.
    Authenticated {
        user: &'a str,
        expires: u64,
    },
    Message(MessageFrame<'a>),
    /// Whether messages can be sent right now: `"down"` while the server
    /// cannot reach Redis (sending is paused), `"up"` when it is back.
    Status {
        delivery: &'a str,
        message: &'a str,
    },
    /// Something the client should know that is not an error: for example
    /// `history_truncated` when `since` is older than what history holds.
    Notice {
        code: &'a str,
        message: &'a str,
        /// `history_more`: the oldest message sent; older ones remain, to
        /// be asked for with a `history` request.
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<MessageId>,
    },
    /// A page of older history, in answer to a `history` request: oldest
    /// first, and whether older messages remain.
    History {
        room: &'a str,
        messages: Vec<MessageFrame<'a>>,
        more: bool,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cid: Option<&'a str>,
    },
    /// Who is in the room, over every instance, as the client's window
    /// shows it, whole: after `welcome`, in answer to `members`, when the
    /// room crosses `--presence-full-list-max`, after a reconnection.
    Presence {
        room: &'a str,
        /// Members in the room.
        count: usize,
        /// Where the window starts in the room's list, sorted by name.
        offset: usize,
        /// The window is the whole room: changes come as joins, leaves and
        /// changed members.
        full: bool,
        members: &'a [PresenceMember],
        /// Members not listed.
        more: usize,
    },
    /// What changed since the client's last presence frame, coalesced.
    PresenceDiff(&'a PresenceDiff),
    /// Someone in the room is typing.
    Typing {
        room: &'a str,
        name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
    },
}

impl<'a> ServerFrame<'a> {
    /// The `typing` frame of the member with presence key `key`.
    pub fn typing(room: &'a str, key: &'a str) -> Self {
        let (name, user) = split_member_key(key);
        ServerFrame::Typing { room, name, user }
    }
}

/// A chat message as a client receives it: the message's own fields, in
/// the order they always had, and the X-ray only for clients that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageFrame<'a> {
    id: MessageId,
    room: &'a str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    text: &'a str,
    ts: u64,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<Trace<'a>>,
}

impl<'a> MessageFrame<'a> {
    /// What every client that did not ask for traces gets.
    pub fn plain(message: &'a ChatMessage) -> Self {
        MessageFrame {
            id: message.id,
            room: &message.room,
            from: &message.from,
            user: message.user.as_deref(),
            text: &message.text,
            ts: message.ts,
            instance: &message.instance,
            cid: message.cid.as_deref(),
            trace: None,
        }
    }

    /// With the X-ray: `received` says how instance `received_by` got the
    /// message, `queued_us` when its frame for this client was made and
    /// entered the client's outbox, `sent_us` when its first byte was
    /// handed to the client's socket.
    pub fn traced(
        message: &'a ChatMessage,
        received: Received,
        received_by: &'a str,
        queued_us: u64,
        sent_us: u64,
    ) -> Self {
        MessageFrame {
            trace: Some(Trace {
                typed_us: message.typed_us,
                read_us: message.read_us,
                read_by: &message.instance,
                accepted_ms: message.id.millis,
                received_us: received.at_us,
                received_by,
                queued_us,
                sent_us,
                via: received.via,
            }),
            ..MessageFrame::plain(message)
        }
    }
}

/// One message's path, stamped at each hop (microseconds since the Unix
/// epoch, each on the clock of whoever stamped it): the page's X-ray.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace<'a> {
    /// The sender's tab: when it was typed (that browser's clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typed_us: Option<u64>,
    /// `read_by` read it from the sender's socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_us: Option<u64>,
    pub read_by: &'a str,
    /// Redis accepted it: the id's time, in milliseconds (Redis's clock).
    pub accepted_ms: u64,
    /// `received_by` got it from its subscription (or from history).
    pub received_us: u64,
    pub received_by: &'a str,
    /// The frame for this client was made and entered its outbox.
    pub queued_us: u64,
    /// The frame's first byte was handed to this client's socket: after
    /// any wait in the outbox (a full socket, a stalled tab).
    pub sent_us: u64,
    pub via: Via,
}

/// How an instance came by a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Live, from the Redis subscription.
    Pubsub,
    /// From the room's history: a catch-up, or `since` at the handshake.
    History,
    /// From the in-memory broker (`--broker local`).
    Local,
}

/// When and how an instance received a message (for the X-ray).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub at_us: u64,
    pub via: Via,
}

impl Received {
    pub fn now(via: Via) -> Self {
        Received {
            at_us: crate::clock::wall_micros(),
            via,
        }
    }
}

/// A member of a room: one name (one user, with `--auth token`), however
/// many tabs and instances.
///
/// `name` is the member's presence key ([`member_key`]): on the wire it is
/// written as the display name and, if there is one, the `user` id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    pub name: String,
    pub instances: Vec<String>,
    pub connections: u64,
}

/// A presence key as the wire writes it: `name`, and `user` when it has
/// one ([`member_key`]).
#[derive(Serialize)]
struct KeyFields<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

impl<'a> KeyFields<'a> {
    fn of(key: &'a str) -> Self {
        let (name, user) = split_member_key(key);
        KeyFields { name, user }
    }
}

impl Serialize for PresenceMember {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(flatten)]
            key: KeyFields<'a>,
            instances: &'a [String],
            connections: u64,
        }
        Wire {
            key: KeyFields::of(&self.name),
            instances: &self.instances,
            connections: self.connections,
        }
        .serialize(serializer)
    }
}

/// Who a member is, for the wire: a presence key written as its display
/// name alone (`--auth off`) or as `{"name": ..., "user": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef(pub String);

impl Serialize for MemberRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match KeyFields::of(&self.0) {
            KeyFields { name, user: None } => serializer.serialize_str(name),
            with_user => with_user.serialize(serializer),
        }
    }
}

/// The presence key of a member: its display name, and with `--auth
/// token` its user id after U+001F (`USER_SEPARATOR`). Presence counts members by
/// key, so two users who share a name are two members, and one user's
/// tabs on every instance are one. Keys sort by name first, the order the
/// member list is shown in.
pub fn member_key(name: &str, user: Option<&str>) -> String {
    match user {
        Some(user) => format!("{name}{USER_SEPARATOR}{user}"),
        None => name.to_string(),
    }
}

/// A presence key's display name and user id.
pub fn split_member_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(USER_SEPARATOR) {
        Some((name, user)) => (name, Some(user)),
        None => (key, None),
    }
}

/// Checks a presence key from the Redis channel: a valid name, and a valid
/// user id if it has one.
pub fn validate_member_key(key: &str, limits: &Limits) -> Result<(), String> {
    let (name, user) = split_member_key(key);
    validate_name(name, limits)?;
    user.map_or(Ok(()), validate_user)
}

/// Checks a user id (a token's `sub`): 1 to [`MAX_USER_CHARS`] characters,
/// no control characters.
pub fn validate_user(user: &str) -> Result<(), String> {
    let chars = user.chars().count();
    if chars == 0 || chars > MAX_USER_CHARS || user.chars().any(char::is_control) {
        return Err(format!(
            "user id (sub) must be 1 to {MAX_USER_CHARS} characters with no control characters"
        ));
    }
    Ok(())
}

/// What a `presence_diff` frame carries (see docs/PROTOCOL.md): the count,
/// and either the changes of a small room's whole list or a large room's
/// window: what entered and left it, or the window whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PresenceDiff {
    pub room: String,
    pub count: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub joins: Vec<PresenceMember>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaves: Vec<Departure>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<PresenceMember>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<PresenceMember>>,
    /// A large room: members that entered the window (or changed in it)
    /// since the last tick, and the names that left it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<PresenceMember>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<MemberRef>,
}

/// A name gone from a room: where its last connection was, and why.
/// `name` is a presence key, written like [`PresenceMember`]'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub name: String,
    pub instance: String,
    pub reason: LeaveReason,
}

impl Serialize for Departure {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(flatten)]
            key: KeyFields<'a>,
            instance: &'a str,
            reason: LeaveReason,
        }
        Wire {
            key: KeyFields::of(&self.name),
            instance: &self.instance,
            reason: self.reason,
        }
        .serialize(serializer)
    }
}

/// Why a member left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// Its last connection closed.
    Left,
    /// Its instance stopped refreshing it (crashed, or lost Redis for
    /// longer than `--presence-ttl-ms`).
    Expired,
}

/// One connection of `name` more (`delta` 1) or less (-1) on `instance`,
/// as the presence scripts publish it on the room's channel (clients get
/// it coalesced, in `presence_diff`). `seq` counts the room's presence
/// changes: a receiver that sees one skipped reads the room again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberChange {
    pub room: String,
    pub name: String,
    pub instance: String,
    pub delta: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    pub seq: u64,
}

/// Every connection `instance` had in the room, for these `names`, is gone:
/// it stopped answering (crashed, or lost Redis past the TTL). One event
/// names at most [`MAX_EXPIRED_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersExpired {
    pub room: String,
    pub instance: String,
    pub names: Vec<String>,
    pub seq: u64,
}

/// The room's presence was rewritten (`instance` registered its members
/// again after Redis lost them): receivers read it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersRewritten {
    pub room: String,
    pub instance: String,
    pub seq: u64,
}

/// Most names one `members_expired` event carries: the scripts split a
/// dead instance's members in chunks, so that a payload stays small.
pub const MAX_EXPIRED_NAMES: usize = 200;

/// The largest presence payload on a room's channel: a `members_expired`
/// of [`MAX_EXPIRED_NAMES`] names of the longest kind.
const MAX_PRESENCE_PAYLOAD_BYTES: usize = 64 * 1024;

/// What a room's channel carries besides messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    Message(ChatMessage),
    MemberChange(MemberChange),
    MembersExpired(MembersExpired),
    MembersRewritten(MembersRewritten),
    Typing { room: String, name: String },
}

impl ChannelEvent {
    pub fn room(&self) -> &str {
        match self {
            ChannelEvent::Message(message) => &message.room,
            ChannelEvent::MemberChange(change) => &change.room,
            ChannelEvent::MembersExpired(expired) => &expired.room,
            ChannelEvent::MembersRewritten(rewritten) => &rewritten.room,
            ChannelEvent::Typing { room, .. } => room,
        }
    }
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// The complete WebSocket text frame, ready to write to any client.
    pub fn to_ws_bytes(&self) -> WsBytes {
        ws_text_frame(self.to_json())
    }
}

/// The bytes of one complete WebSocket frame, shared by every receiver.
///
/// Server frames are not masked, so the same bytes are correct for every
/// client: a message is framed once per instance and each receiver costs one
/// reference-count increment.
pub type WsBytes = Arc<[u8]>;

/// Frames `text` as a single unmasked WebSocket text frame.
pub fn ws_text_frame(text: String) -> WsBytes {
    let frame = Frame::message(text.into_bytes(), OpCode::Data(Data::Text), true);
    let mut bytes = Vec::with_capacity(frame.len());
    frame
        .format(&mut bytes)
        .expect("writing a frame into a Vec cannot fail");
    bytes.into()
}

/// Why the server ends a connection: its Close frame's code and reason
/// (`docs/PROTOCOL.md`, "Closing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseReason {
    /// The client did not read, and its outbox passed `--client-buffer-bytes`.
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer: send buffer full",
    };
    /// The client's socket took none of what was queued for it for
    /// `--send-timeout-ms`: it talks, perhaps, but does not read.
    pub const STALLED: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer: nothing read for too long",
    };
    /// The client stopped answering pings: a dead peer, most likely.
    pub const IDLE: CloseReason = CloseReason {
        code: 1001,
        reason: "no answer to ping",
    };
    /// The client kept sending past its rate limit.
    pub const FLOODING: CloseReason = CloseReason {
        code: 1008,
        reason: "rate limit exceeded repeatedly",
    };
    /// The handshake query (name, room, since) is not acceptable.
    pub const BAD_REQUEST: CloseReason = CloseReason {
        code: 1008,
        reason: "bad request",
    };
    /// A frame over `--max-frame-bytes`.
    pub const TOO_LARGE: CloseReason = CloseReason {
        code: 1009,
        reason: "message too large",
    };
    /// A text frame that is not UTF-8.
    pub const INVALID_UTF8: CloseReason = CloseReason {
        code: 1007,
        reason: "text frame is not valid UTF-8",
    };
    /// A frame that breaks RFC 6455.
    pub const PROTOCOL_ERROR: CloseReason = CloseReason {
        code: 1002,
        reason: "protocol error",
    };
    /// The instance is shutting down (1001, "going away").
    pub const SHUTDOWN: CloseReason = CloseReason {
        code: 1001,
        reason: "server shutting down",
    };
    /// `--auth token`: the token was refused (the `error` frame before the
    /// Close says why), or expired with no fresh one: get a new token and
    /// connect again. The code is the one graphql-ws uses for this.
    pub const UNAUTHORIZED: CloseReason = CloseReason {
        code: 4401,
        reason: "unauthorized: get a new token",
    };
    /// `--auth token`: the token expired, and no fresh one came.
    pub const TOKEN_EXPIRED: CloseReason = CloseReason {
        code: 4401,
        reason: "token expired",
    };
    /// `--auth token`: the token's `rooms` do not include this room.
    pub const FORBIDDEN: CloseReason = CloseReason {
        code: 4403,
        reason: "forbidden: the token does not allow this room",
    };
    /// `--auth token`: no `auth` frame within the handshake timeout.
    pub const AUTH_TIMEOUT: CloseReason = CloseReason {
        code: 4408,
        reason: "no auth frame in time",
    };
    /// An internal thread died: the instance exits so that its supervisor
    /// restarts it.
    pub const INTERNAL_ERROR: CloseReason = CloseReason {
        code: 1011,
        reason: "internal error: the server is restarting",
    };

    /// The answer to a client's Close: its own code back (RFC 6455 5.5.1),
    /// or 1000 when it gave none or one a server may not send back.
    pub fn echo(code: Option<u16>) -> CloseReason {
        let code = code
            .filter(|&code| CloseCode::from(code).is_allowed())
            .unwrap_or(1000);
        CloseReason { code, reason: "" }
    }

    /// The complete Close frame.
    pub fn to_ws_bytes(&self) -> Vec<u8> {
        let frame = Frame::close(Some(CloseFrame {
            code: CloseCode::from(self.code),
            reason: self.reason.into(),
        }));
        let mut bytes = Vec::with_capacity(frame.len());
        frame
            .format(&mut bytes)
            .expect("writing a frame into a Vec cannot fail");
        bytes
    }
}

/// What a client may send. A field its type does not define is refused,
/// by name: a frame carries nothing the server would relay or keep
/// without reading it (a `typing` padded with kilobytes, relayed to a
/// whole room).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Message {
        text: String,
        #[serde(default)]
        cid: Option<String>,
        /// When the page says the user typed it (the X-ray's first hop).
        #[serde(default)]
        typed_us: Option<u64>,
    },
    /// The user is typing: relayed to the room's other members. (A struct
    /// variant with no field, not a unit one: serde lets a unit variant
    /// of a tagged enum carry any field.)
    Typing {},
    /// Another window of the room's member list.
    Members {
        #[serde(default)]
        offset: Option<u64>,
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        cid: Option<String>,
    },
    /// A page of the room's history older than `before`.
    History {
        before: String,
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        cid: Option<String>,
    },
    /// `--auth token`: who the client is, first; later, a fresh token
    /// before the last one expires.
    Auth { token: String },
}

/// A client frame that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    Message(ValidMessage),
    Typing,
    /// A window of the member list: from `offset`, `limit` members (the
    /// current size if absent). The range is checked by the session,
    /// which knows `--presence-max-members`.
    Members {
        offset: u64,
        limit: Option<u64>,
        cid: Option<String>,
    },
    /// Up to `limit` messages older than `before` (`--history-replay` if
    /// absent). The limit is checked by the session, which knows
    /// `--history-replay-max`.
    History {
        before: MessageId,
        limit: Option<u64>,
        cid: Option<String>,
    },
    /// A token, checked by the session (`crate::auth`).
    Auth(String),
}

/// Why a client frame was refused; turned into an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub cid: Option<String>,
}

impl FrameError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        FrameError {
            code: ErrorCode::BadRequest,
            message: message.into(),
            cid: None,
        }
    }

    /// The answer to a publish whose outcome Redis never told: `why` is
    /// the broker's reason.
    pub fn outcome_unknown(why: &str, cid: Option<&str>) -> Self {
        FrameError {
            code: ErrorCode::OutcomeUnknown,
            message: format!(
                "message may or may not have been sent ({why}); if it was, it will appear in the \
                 conversation: do not resend it blindly"
            ),
            cid: cid.map(str::to_string),
        }
    }

    pub fn to_frame(&self) -> ServerFrame<'_> {
        ServerFrame::Error {
            code: self.code,
            message: &self.message,
            cid: self.cid.as_deref(),
        }
    }
}

/// A client message that passed every check, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidMessage {
    pub text: String,
    pub cid: Option<String>,
    pub typed_us: Option<u64>,
}

/// Parses and validates one text frame from a client.
///
/// The limits bound the message text; the frame size itself is bounded
/// earlier, by tungstenite, before the frame is buffered. serde_json
/// refuses nesting deeper than 128 levels, so a deeply nested frame is a
/// `bad_request`, not a stack overflow.
pub fn parse_client_frame(raw: &str, limits: &Limits) -> Result<ClientRequest, FrameError> {
    let max_text_chars = limits.max_text_chars;
    let frame: ClientFrame = serde_json::from_str(raw).map_err(|e| FrameError {
        cid: readable_cid(raw),
        ..FrameError::bad_request(format!(
            "expected {{\"type\":\"message\",\"text\":\"...\"}}, {{\"type\":\"typing\"}}, {{\"type\":\"members\",\"offset\":0,\"limit\":100}} or {{\"type\":\"history\",\"before\":\"ID\",\"limit\":50}} or {{\"type\":\"auth\",\"token\":\"...\"}}: {e}"
        ))
    })?;
    let (text, cid, typed_us) = match frame {
        ClientFrame::Message {
            text,
            cid,
            typed_us,
        } => (text, cid, typed_us),
        ClientFrame::Typing {} => return Ok(ClientRequest::Typing),
        ClientFrame::Members { offset, limit, cid } => {
            return Ok(ClientRequest::Members {
                offset: offset.unwrap_or(0),
                limit,
                cid: cid.filter(|cid| valid_cid(cid)),
            });
        }
        ClientFrame::History { before, limit, cid } => {
            let cid = cid.filter(|cid| valid_cid(cid));
            let before = before.parse().map_err(|e| FrameError {
                cid: cid.clone(),
                ..FrameError::bad_request(format!("before: {e}"))
            })?;
            return Ok(ClientRequest::History { before, limit, cid });
        }
        ClientFrame::Auth { token } => return Ok(ClientRequest::Auth(token)),
    };
    if let Some(cid) = &cid
        && !valid_cid(cid)
    {
        return Err(FrameError::bad_request(format!(
            "cid must be at most {MAX_CID_CHARS} characters with no control characters"
        )));
    }
    let refuse = |code, message: String| FrameError {
        code,
        message,
        cid: cid.clone(),
    };
    if text.trim().is_empty() {
        return Err(refuse(ErrorCode::BadRequest, "text is empty".to_string()));
    }
    let chars = text.chars().count();
    if chars > max_text_chars {
        return Err(refuse(
            ErrorCode::TooLarge,
            format!("text is {chars} characters; the limit is {max_text_chars}"),
        ));
    }
    Ok(ClientRequest::Message(ValidMessage {
        text,
        cid,
        typed_us,
    }))
}

/// Whether a client's `cid` may be echoed: short, no control characters.
fn valid_cid(cid: &str) -> bool {
    cid.chars().count() <= MAX_CID_CHARS && !cid.chars().any(char::is_control)
}

/// The `cid` of a frame that is not a valid client frame (unknown `type`,
/// a field missing or of the wrong type), when it is a JSON object with a
/// valid `cid`: its error is then about that message, and names it. Only
/// read on the way to an error, so valid frames are parsed once.
fn readable_cid(raw: &str) -> Option<String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw).ok()?;
    let cid = object.get("cid")?.as_str()?;
    valid_cid(cid).then(|| cid.to_string())
}

/// Why a payload from the Redis channel was skipped.
#[derive(Debug)]
pub struct BadPayload(pub String);

impl fmt::Display for BadPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses what a room's channel carries: a message, a `join` or `leave`,
/// or `typing`. Anyone with access to Redis can publish: every kind is
/// validated as strictly as a client frame.
pub fn parse_channel_event(payload: &[u8], limits: &Limits) -> Result<ChannelEvent, BadPayload> {
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Payload {
        MemberChange(MemberChange),
        MembersExpired(MembersExpired),
        MembersRewritten(MembersRewritten),
        Typing {
            room: String,
            name: String,
            #[serde(default)]
            user: Option<String>,
        },
    }
    // Messages are nearly all the traffic: parsed first, and once.
    let not_a_message = match parse_channel_payload(payload, limits) {
        Ok(message) => return Ok(ChannelEvent::Message(message)),
        Err(e) => e,
    };
    if payload.len() > MAX_PRESENCE_PAYLOAD_BYTES {
        return Err(not_a_message);
    }
    let Ok(kind) = serde_json::from_slice::<Payload>(payload) else {
        return Err(not_a_message);
    };
    let room = |room: &str| validate_room(room, limits).map_err(BadPayload);
    let name = |key: &str| validate_member_key(key, limits).map_err(BadPayload);
    let instance = |instance: &str| {
        if instance.is_empty() || instance.chars().count() > 64 {
            Err(BadPayload(
                "instance must be 1 to 64 characters".to_string(),
            ))
        } else {
            Ok(())
        }
    };
    match kind {
        Payload::MemberChange(change) => {
            room(&change.room)?;
            name(&change.name)?;
            instance(&change.instance)?;
            if change.delta != 1 && change.delta != -1 {
                return Err(BadPayload(format!("delta {} is not 1 or -1", change.delta)));
            }
            Ok(ChannelEvent::MemberChange(change))
        }
        Payload::MembersExpired(expired) => {
            room(&expired.room)?;
            instance(&expired.instance)?;
            if expired.names.len() > MAX_EXPIRED_NAMES {
                return Err(BadPayload(format!(
                    "{} names in one event; at most {MAX_EXPIRED_NAMES}",
                    expired.names.len()
                )));
            }
            expired.names.iter().try_for_each(|n| name(n))?;
            Ok(ChannelEvent::MembersExpired(expired))
        }
        Payload::MembersRewritten(rewritten) => {
            room(&rewritten.room)?;
            instance(&rewritten.instance)?;
            Ok(ChannelEvent::MembersRewritten(rewritten))
        }
        Payload::Typing {
            room: r,
            name: n,
            user,
        } => {
            let key = member_key(&n, user.as_deref());
            room(&r)?;
            name(&key)?;
            Ok(ChannelEvent::Typing { room: r, name: key })
        }
    }
}

/// Parses a message payload (from the Redis channel or history), which
/// anyone with access to Redis can write: it is validated as strictly as a
/// client frame.
pub fn parse_channel_payload(payload: &[u8], limits: &Limits) -> Result<ChatMessage, BadPayload> {
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Payload {
        Message(ChatMessage),
    }
    if payload.len() > limits.max_payload_bytes() {
        return Err(BadPayload(format!(
            "payload of {} bytes is over the {} byte limit",
            payload.len(),
            limits.max_payload_bytes()
        )));
    }
    let Payload::Message(message) = serde_json::from_slice(payload)
        .map_err(|e| BadPayload(format!("not a message payload: {e}")))?;
    validate_room(&message.room, limits).map_err(BadPayload)?;
    validate_name(&message.from, limits).map_err(BadPayload)?;
    if let Some(user) = &message.user {
        validate_user(user).map_err(BadPayload)?;
    }
    let chars = message.text.chars().count();
    if chars > limits.max_text_chars {
        return Err(BadPayload(format!(
            "text of {chars} characters is over the limit"
        )));
    }
    if message.instance.chars().count() > 64
        || message
            .cid
            .as_ref()
            .is_some_and(|c| c.chars().count() > MAX_CID_CHARS)
    {
        return Err(BadPayload("instance or cid too long".to_string()));
    }
    Ok(message)
}

/// Checks a room name: 1 to `max_room_chars` of `[A-Za-z0-9_-]`.
pub fn validate_room(room: &str, limits: &Limits) -> Result<(), String> {
    let max = limits.max_room_chars;
    let ok_len = !room.is_empty() && room.len() <= max;
    let ok_chars = room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "room must be 1 to {max} characters of A-Z, a-z, 0-9, _ and -"
        ))
    }
}

/// Checks a display name: 1 to `max_name_chars` characters, not blank,
/// no control characters, and nothing invisible that would let one name
/// pass for another (`is_invisible`). Names are compared as they are
/// written, so they are taken in Unicode's composed form first
/// ([`normalize_name`]).
pub fn validate_name(name: &str, limits: &Limits) -> Result<(), String> {
    let max = limits.max_name_chars;
    let chars = name.chars().count();
    if chars == 0 || chars > max || name.trim().is_empty() {
        return Err(format!("name must be 1 to {max} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("name must not contain control characters".to_string());
    }
    if let Some(c) = name.chars().find(|&c| is_invisible(c)) {
        return Err(format!(
            "name must not contain U+{:04X}: invisible and direction-changing characters \
             (zero-width spaces and joiners, bidi marks, overrides and isolates, soft \
             hyphens, fillers) would let one name pass for another",
            c as u32
        ));
    }
    Ok(())
}

/// A name as it is compared and shown: trimmed, in Unicode's composed form
/// (NFC), so that "é" typed as one character or as "e" and an accent is
/// one name.
pub fn normalize_name(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    name.trim().nfc().collect()
}

/// Whether `c` shows nothing, or changes how the text around it shows:
/// Unicode's format characters (general category Cf: zero-width spaces
/// and joiners, bidi marks, embeddings, overrides and isolates, the byte
/// order mark, soft hyphens, ...) and the fillers and joiners that render
/// as nothing though they are letters or marks.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    const BLANK_LETTERS: [char; 7] = [
        '\u{034F}', // combining grapheme joiner
        '\u{115F}', // Hangul choseong filler
        '\u{1160}', // Hangul jungseong filler
        '\u{17B4}', // Khmer vowel inherent aq
        '\u{17B5}', // Khmer vowel inherent aa
        '\u{3164}', // Hangul filler
        '\u{FFA0}', // halfwidth Hangul filler
    ];
    c.general_category() == GeneralCategory::Format || BLANK_LETTERS.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_with_a_user_id_is_written_as_its_name_and_user() {
        let key = member_key("alice", Some("u1"));
        assert_eq!(split_member_key(&key), ("alice", Some("u1")));
        assert_eq!(split_member_key("alice"), ("alice", None));
        let member = PresenceMember {
            name: key.clone(),
            instances: vec!["a".into()],
            connections: 1,
        };
        assert_eq!(
            serde_json::to_value(&member).unwrap(),
            serde_json::json!({"name": "alice", "user": "u1", "instances": ["a"], "connections": 1})
        );
        let plain = PresenceMember {
            name: "bob".into(),
            ..member
        };
        assert!(serde_json::to_value(&plain).unwrap().get("user").is_none());
        assert_eq!(
            serde_json::to_value([MemberRef(key.clone()), MemberRef("bob".into())]).unwrap(),
            serde_json::json!([{"name": "alice", "user": "u1"}, "bob"])
        );
        let departure = Departure {
            name: key.clone(),
            instance: "b".into(),
            reason: LeaveReason::Left,
        };
        assert_eq!(serde_json::to_value(&departure).unwrap()["user"], "u1");
        // Two users who share a name sort by name first, then user id.
        assert!(member_key("alice", Some("u2")) < member_key("alicia", None));
        assert!(member_key("alice", Some("u1")) < member_key("alice", Some("u2")));
    }

    #[test]
    fn member_keys_from_redis_are_checked_name_and_user_alike() {
        let limits = Limits::default();
        assert!(validate_member_key(&member_key("alice", Some("u1")), &limits).is_ok());
        assert!(validate_member_key("alice", &limits).is_ok());
        assert!(validate_member_key(&member_key("alice", Some("")), &limits).is_err());
        assert!(validate_member_key(&member_key("alice", Some(&"u".repeat(65))), &limits).is_err());
        assert!(validate_member_key(&member_key("", Some("u1")), &limits).is_err());
        // A typing frame carries its user through the channel and back.
        let typing = ServerFrame::typing("lobby", "alice\u{1f}u1").to_json();
        assert!(typing.contains(r#""user":"u1""#), "{typing}");
        match parse_channel_event(typing.as_bytes(), &limits) {
            Ok(ChannelEvent::Typing { name, .. }) => assert_eq!(name, "alice\u{1f}u1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message_ids_order_numerically_not_lexically() {
        let nine: MessageId = "9-0".parse().unwrap();
        let ten: MessageId = "10-0".parse().unwrap();
        assert!(nine < ten);
        assert!("10-1".parse::<MessageId>().unwrap() > ten);
        assert_eq!(ten.to_string(), "10-0");
    }

    #[test]
    fn malformed_message_ids_are_refused() {
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            " 1-2",
            "+1-2",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_valid_client_message_parses() {
        let Ok(ClientRequest::Message(msg)) = parse_client_frame(
            r#"{"type":"message","text":"hi","cid":"c1"}"#,
            &Limits::default(),
        ) else {
            panic!("not a message");
        };
        assert_eq!(msg.text, "hi");
        assert_eq!(msg.cid.as_deref(), Some("c1"));
        assert_eq!(
            parse_client_frame(r#"{"type":"typing"}"#, &Limits::default()),
            Ok(ClientRequest::Typing)
        );
    }

    #[test]
    fn presence_changes_travel_on_the_channel_as_the_scripts_write_them() {
        let limits = Limits::default();
        // As Lua's cjson writes them, fields in any order.
        let joined =
            br#"{"seq":7,"delta":1,"instance":"b","type":"member_change","room":"lobby","name":"bob"}"#;
        let ChannelEvent::MemberChange(change) = parse_channel_event(joined, &limits).unwrap()
        else {
            panic!("not a member change");
        };
        assert_eq!((change.delta, change.seq, change.reason), (1, 7, None));
        let left = br#"{"type":"member_change","room":"lobby","name":"bob","instance":"b","delta":-1,"reason":"left","seq":8}"#;
        assert!(matches!(
            parse_channel_event(left, &limits),
            Ok(ChannelEvent::MemberChange(MemberChange {
                reason: Some(LeaveReason::Left),
                ..
            }))
        ));
        let expired = br#"{"type":"members_expired","room":"lobby","instance":"b","names":["al","bo"],"seq":9}"#;
        let ChannelEvent::MembersExpired(expired) = parse_channel_event(expired, &limits).unwrap()
        else {
            panic!("not an expiry");
        };
        assert_eq!(expired.names, ["al", "bo"]);
        let typing = ServerFrame::typing("lobby", "al").to_json();
        assert!(matches!(
            parse_channel_event(typing.as_bytes(), &limits),
            Ok(ChannelEvent::Typing { .. })
        ));
        for bad in [
            &br#"{"type":"typing","room":"lobby","name":"a\nb"}"#[..],
            br#"{"type":"member_change","room":"lobby","name":"bob","instance":"b","delta":5,"seq":1}"#,
            br#"{"type":"member_change","room":"lobby","name":"bob","instance":"","delta":1,"seq":1}"#,
            br#"{"type":"members_expired","room":"lobby","instance":"b","names":["a\u0007"],"seq":1}"#,
            // The old per-name frames are not presence changes any more.
            br#"{"type":"join","room":"lobby","name":"bob","instance":"b"}"#,
        ] {
            assert!(parse_channel_event(bad, &limits).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let too_many = serde_json::json!({
            "type": "members_expired", "room": "lobby", "instance": "b", "seq": 1,
            "names": (0..=MAX_EXPIRED_NAMES).map(|n| format!("n{n}")).collect::<Vec<_>>(),
        });
        assert!(parse_channel_event(too_many.to_string().as_bytes(), &limits).is_err());
    }

    #[test]
    fn a_members_request_parses_and_a_presence_diff_writes_only_what_it_has() {
        assert_eq!(
            parse_client_frame(
                r#"{"type":"members","offset":200,"limit":100}"#,
                &Limits::default()
            ),
            Ok(ClientRequest::Members {
                offset: 200,
                limit: Some(100),
                cid: None
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"members"}"#, &Limits::default()),
            Ok(ClientRequest::Members {
                offset: 0,
                limit: None,
                cid: None
            })
        );
        assert!(
            parse_client_frame(r#"{"type":"members","offset":-1}"#, &Limits::default()).is_err()
        );
        let diff = PresenceDiff {
            room: "lobby".into(),
            count: 3,
            leaves: vec![Departure {
                name: "al".into(),
                instance: "a".into(),
                reason: LeaveReason::Expired,
            }],
            ..PresenceDiff::default()
        };
        assert_eq!(
            ServerFrame::PresenceDiff(&diff).to_json(),
            r#"{"type":"presence_diff","room":"lobby","count":3,"leaves":[{"name":"al","instance":"a","reason":"expired"}]}"#
        );
    }

    #[test]
    fn bad_client_frames_get_stable_codes() {
        let limits = Limits {
            max_text_chars: 5,
            ..Limits::default()
        };
        let code = |raw: &str| parse_client_frame(raw, &limits).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"shout","text":"x"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"message"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"message","text":42}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"message","text":"  "}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"message","text":"toolong"}"#),
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn a_refused_message_echoes_its_cid() {
        let err = parse_client_frame(
            r#"{"type":"message","text":"toolong","cid":"c9"}"#,
            &Limits {
                max_text_chars: 5,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.cid.as_deref(), Some("c9"));
    }

    #[test]
    fn an_outcome_unknown_answer_has_its_own_code_and_says_what_to_do() {
        let refusal =
            FrameError::outcome_unknown("redis did not answer within 10000 ms", Some("c7"));
        let frame = refusal.to_frame().to_json();
        let frame: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(frame["code"], "outcome_unknown");
        assert_eq!(frame["cid"], "c7");
        let message = frame["message"].as_str().unwrap();
        assert!(
            message.contains("may or may not have been sent"),
            "{message}"
        );
        assert!(message.contains("do not resend"), "{message}");
        assert!(message.contains("redis did not answer"), "{message}");
    }

    #[test]
    fn a_malformed_frame_with_a_valid_cid_echoes_it() {
        let limits = Limits::default();
        let refused = |raw: &str| parse_client_frame(raw, &limits).unwrap_err();
        for raw in [
            r#"{"type":"shout","text":"x","cid":"c1"}"#,
            r#"{"type":"message","cid":"c1"}"#,
            r#"{"cid":"c1","type":"message","text":42}"#,
            r#"{"type":"message","text":null,"cid":"c1"}"#,
            r#"{"text":"no type","cid":"c1"}"#,
            r#"{"type":7,"text":"x","cid":"c1"}"#,
        ] {
            let err = refused(raw);
            assert_eq!(err.code, ErrorCode::BadRequest, "{raw}");
            assert_eq!(err.cid.as_deref(), Some("c1"), "{raw}: {err:?}");
        }
        // Nothing to echo: not JSON, no cid, or the cid is itself the problem.
        let long = "x".repeat(MAX_CID_CHARS + 1);
        for raw in [
            r#"{"type":"shout","cid":"#.to_string(),
            r#"{"type":"shout","text":"x"}"#.to_string(),
            r#"{"type":"shout","cid":null}"#.to_string(),
            r#"{"type":"shout","cid":42}"#.to_string(),
            r#"{"type":"message","text":"x","cid":42}"#.to_string(),
            r#"{"type":"shout","cid":"a\u0007b"}"#.to_string(),
            format!(r#"{{"type":"shout","cid":"{long}"}}"#),
            r#"[{"cid":"c1"}]"#.to_string(),
            r#"["c1"]"#.to_string(),
        ] {
            assert_eq!(refused(&raw).cid, None, "{raw}");
        }
    }

    #[test]
    fn only_a_traced_client_gets_the_x_ray_and_the_plain_frame_is_unchanged() {
        let message = NewMessage {
            room: "lobby".into(),
            from: "ann".into(),
            user: None,
            text: "hi".into(),
            instance: "a".into(),
            cid: Some("c1".into()),
            typed_us: Some(1_764_080_000_000_100),
            read_us: Some(1_764_080_000_000_200),
        }
        .accepted("1764080000000-3".parse().unwrap());
        assert_eq!(
            ServerFrame::Message(MessageFrame::plain(&message)).to_json(),
            r#"{"type":"message","id":"1764080000000-3","room":"lobby","from":"ann","text":"hi","ts":1764080000000,"instance":"a","cid":"c1"}"#
        );
        let received = Received {
            at_us: 1_764_080_000_000_900,
            via: Via::Pubsub,
        };
        let traced =
            ServerFrame::Message(MessageFrame::traced(&message, received, "b", 5, 7)).to_json();
        let traced: serde_json::Value = serde_json::from_str(&traced).unwrap();
        assert_eq!(
            traced["trace"],
            serde_json::json!({
                "typed_us": 1_764_080_000_000_100u64, "read_us": 1_764_080_000_000_200u64,
                "read_by": "a", "accepted_ms": 1_764_080_000_000u64,
                "received_us": 1_764_080_000_000_900u64, "received_by": "b",
                "queued_us": 5, "sent_us": 7, "via": "pubsub"
            })
        );
        // The stamps travel on the channel, so the receiving instance has them.
        let channel = serde_json::to_value(&message).unwrap();
        let mut channel = channel.as_object().unwrap().clone();
        channel.insert("type".into(), "message".into());
        let payload = serde_json::to_vec(&channel).unwrap();
        assert_eq!(
            parse_channel_payload(&payload, &Limits::default()).unwrap(),
            message
        );
    }

    #[test]
    fn channel_payloads_round_trip_and_junk_is_refused() {
        let msg = NewMessage {
            room: "lobby".into(),
            from: "alice".into(),
            user: None,
            text: "<b>hi</b>".into(),
            instance: "a1".into(),
            cid: None,
            typed_us: None,
            read_us: None,
        }
        .accepted("1764080000000-3".parse().unwrap());
        let wire = ServerFrame::Message(MessageFrame::plain(&msg)).to_json();
        let limits = Limits::default();
        assert_eq!(
            parse_channel_payload(wire.as_bytes(), &limits).unwrap(),
            msg
        );
        assert!(parse_channel_payload(b"{}", &limits).is_err());
        assert!(parse_channel_payload(b"\xff\xfe", &limits).is_err());
        let bad_room = wire.replace("\"lobby\"", "\"no spaces allowed\"");
        assert!(parse_channel_payload(bad_room.as_bytes(), &limits).is_err());
        let huge = wire.replace("<b>hi</b>", &"x".repeat(limits.max_text_chars + 1));
        assert!(parse_channel_payload(huge.as_bytes(), &limits).is_err());
    }

    #[test]
    fn ws_frames_are_unmasked_text_frames() {
        let bytes = ws_text_frame("hi".to_string());
        assert_eq!(&bytes[..], &[0x81, 0x02, b'h', b'i']);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)),
                ".{0,40}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(6, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("type".to_string()),
                            Just("text".to_string()),
                            Just("cid".to_string()),
                            Just("id".to_string()),
                            Just("room".to_string()),
                            ".{0,8}".prop_map(String::from)
                        ],
                        inner,
                        0..8
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn client_frame_parser_never_panics_on_arbitrary_text(raw in ".{0,300}") {
                let _ = parse_client_frame(&raw, &Limits::default());
            }

            #[test]
            fn client_frame_parser_never_panics_on_arbitrary_json(value in json_value()) {
                let _ = parse_client_frame(&value.to_string(), &Limits::default());
            }

            #[test]
            fn channel_parser_never_panics_on_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..400)) {
                let _ = parse_channel_payload(&raw, &Limits::default());
                let _ = parse_channel_event(&raw, &Limits::default());
            }

            #[test]
            fn channel_parser_never_panics_on_arbitrary_json(value in json_value()) {
                let _ = parse_channel_payload(value.to_string().as_bytes(), &Limits::default());
            }

            #[test]
            fn every_valid_message_round_trips_through_the_channel(
                millis in 0u64..=u64::MAX / 2, seq in any::<u64>(),
                room in "[A-Za-z0-9_-]{1,32}", from in "[^\\p{Cc}\\p{Cf}\\u{034F}\\u{115F}\\u{1160}\\u{17B4}\\u{17B5}\\u{3164}\\u{FFA0}]{1,32}", text in ".{1,200}",
                cid in proptest::option::of("[a-z0-9-]{1,36}"),
            ) {
                prop_assume!(!from.trim().is_empty());
                let message = NewMessage { room, from, user: None, text, instance: "i".into(), cid, typed_us: None, read_us: None }
                    .accepted(MessageId { millis, seq });
                let wire = ServerFrame::Message(MessageFrame::plain(&message)).to_json();
                prop_assert_eq!(parse_channel_payload(wire.as_bytes(), &Limits::default()).unwrap(), message);
            }

            #[test]
            fn valid_client_frames_are_accepted(text in ".{1,100}", cid in "[a-z0-9]{1,20}") {
                prop_assume!(!text.trim().is_empty());
                let raw = serde_json::json!({"type": "message", "text": text, "cid": cid}).to_string();
                let parsed = parse_client_frame(&raw, &Limits::default()).unwrap();
                prop_assert_eq!(parsed, ClientRequest::Message(ValidMessage { text, cid: Some(cid), typed_us: None }));
            }
        }
    }
}
