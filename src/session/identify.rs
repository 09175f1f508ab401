//! Who a joining client is. With `--auth off`, the name it asked for (or
//! a guest name). With `--auth token`, what its token says: the token
//! comes in the client's first frame, within the handshake's deadline,
//! and is checked before the client is in any room, has a member entry,
//! or costs a Redis command (`crate::auth` does the checking).

use std::io;

use log::info;
use tungstenite::error::{CapacityError, Error};
use tungstenite::{Message, WebSocket};

use super::SessionContext;
use super::handshake::JoinRequest;
use super::stream::SessionStream;
use crate::auth::{Identity, Verifier};
use crate::clock;
use crate::delivery::hub::ClientId;
use crate::metrics::Metrics;
use crate::protocol::{ClientRequest, CloseReason, ErrorCode, member_key, parse_client_frame};

/// Who a client is, for as long as it is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// Its display name.
    pub name: String,
    /// `--auth token`: the user id its token vouches for.
    pub user: Option<String>,
    /// `--auth token`: when its token expires (seconds since the Unix
    /// epoch), until a fresh one comes.
    pub expires: Option<u64>,
}

impl Who {
    fn from_token(identity: Identity) -> Self {
        Who {
            name: identity.name,
            user: Some(identity.user),
            expires: Some(identity.expires),
        }
    }

    /// What presence counts it by: two users who share a name are two
    /// members, one user's tabs are one.
    pub fn presence_key(&self) -> String {
        member_key(&self.name, self.user.as_deref())
    }
}

/// Why a client may not join: its `error` frame, then its Close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
    pub close: CloseReason,
}

/// Says who the client is: from its join query with `--auth off`, from
/// the `auth` frame it sends first with `--auth token`.
pub fn identify(
    client: ClientId,
    join: &JoinRequest,
    websocket: &mut WebSocket<SessionStream>,
    context: &SessionContext,
) -> Result<Who, Refused> {
    let Some(verifier) = &context.limits.auth else {
        let name = join
            .name
            .clone()
            .unwrap_or_else(|| format!("guest-{}-{client}", context.guest_tag));
        return Ok(Who {
            name,
            user: None,
            expires: None,
        });
    };
    let refused = read_token(websocket, verifier, &join.room, context);
    if let Err(refusal) = &refused {
        Metrics::inc(&context.metrics.auth_refused_total);
        // The reason, never the token.
        info!(
            "client {client} refused: {}: {}",
            serde_json::to_string(&refusal.code).unwrap_or_default(),
            refusal.message
        );
    }
    refused.map(Who::from_token)
}

/// Reads frames until the first that is not a ping or pong: it must be a
/// valid `auth` for `room`.
fn read_token(
    websocket: &mut WebSocket<SessionStream>,
    verifier: &Verifier,
    room: &str,
    context: &SessionContext,
) -> Result<Identity, Refused> {
    let required = |message: String| Refused {
        code: ErrorCode::AuthRequired,
        message,
        close: CloseReason::UNAUTHORIZED,
    };
    let text = loop {
        match websocket.read() {
            Ok(Message::Text(text)) => break text,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) => return Err(required("the first frame must be a text frame".into())),
            Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                return Err(Refused {
                    code: ErrorCode::TokenTooLarge,
                    message: format!("a frame of {size} bytes; the limit is {max_size}"),
                    close: CloseReason::TOO_LARGE,
                });
            }
            Err(Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                let within = context.limits.handshake_timeout;
                return Err(Refused {
                    close: CloseReason::AUTH_TIMEOUT,
                    ..required(format!(
                        "no auth frame within the handshake timeout ({within:?}, \
                         --handshake-timeout-ms)"
                    ))
                });
            }
            Err(e) => return Err(required(format!("the connection failed: {e}"))),
        }
    };
    let token = match parse_client_frame(&text, &context.limits.content) {
        Ok(ClientRequest::Auth(token)) => token,
        _ => {
            return Err(required(
                "this server checks who you are: send {\"type\":\"auth\",\"token\":\"...\"} first"
                    .into(),
            ));
        }
    };
    let identity = verifier
        .verify(&token, clock::wall_millis() / 1000)
        .map_err(|refusal| Refused {
            code: refusal.code(),
            message: refusal.to_string(),
            close: CloseReason::UNAUTHORIZED,
        })?;
    if !identity.allows(room) {
        return Err(forbidden(&identity, room));
    }
    Ok(identity)
}

/// The refusal of a room the token's `rooms` do not name.
pub fn forbidden(identity: &Identity, room: &str) -> Refused {
    let allowed = identity.rooms.as_deref().unwrap_or_default().join(", ");
    Refused {
        code: ErrorCode::RoomForbidden,
        message: format!("this token may join only these rooms: {allowed}; not {room}"),
        close: CloseReason::FORBIDDEN,
    }
}
