//! The broker: what joins this instance to the others.
//!
//! [`Broker`] is the seam between the local world (sessions, the hub) and
//! the shared one. Two implementations sit behind it:
//! - [`redis_pubsub::RedisBroker`]: Redis Pub/Sub carries every message to
//!   every instance, and a Redis Stream per room keeps its history;
//! - [`local::LocalBroker`]: no Redis, one isolated instance. Two of these
//!   do not see each other, which is the problem this project exists to
//!   show and solve.

pub mod local;
pub mod redis_pubsub;

use std::fmt;

use crate::protocol::{ChatMessage, MessageId, NewMessage};

/// Why the broker could not do what was asked. The message of a failed
/// publish was NOT accepted: nobody will receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Which part of a room's history a connecting client wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The most recent `n` messages (a newcomer's context).
    Recent(usize),
    /// Every message after this id that history still holds (recovery).
    After(MessageId),
}

pub trait Broker: Send + Sync {
    /// Accepts a message: gives it its id and sends it to every instance,
    /// this one included, which delivers it through its subscriber like any
    /// other. Returns the id once the message is accepted.
    fn publish(&self, message: NewMessage) -> Result<MessageId, Unavailable>;

    /// A room's history, oldest first.
    fn history(&self, room: &str, query: HistoryQuery) -> Result<Vec<ChatMessage>, Unavailable>;

    /// `Ok` while this instance can deliver across instances; otherwise
    /// the reason, for `/readyz`.
    fn readiness(&self) -> Result<(), String>;
}
