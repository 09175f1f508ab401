//! The broker: what joins this instance to the others.
//!
//! [`Broker`] is the seam between the local world (sessions, the hub) and
//! the shared one, in four narrow traits, each used by the part that needs
//! it: [`Messages`] (publish, read history, attach a room), [`Presence`]
//! (who is in a room, who types), [`Readiness`] (whether the links work,
//! and the fault panel's cut) and [`InstanceReports`] (the instances
//! view). A broker accepts messages ([`Messages::publish`]) and reads
//! history; what it receives it only **emits**, as [`BrokerEvent`]s into
//! one channel, in order. It knows nothing of clients: the fan-out
//! thread is the one consumer of that channel and the one caller of the
//! hub, whichever broker runs. Two implementations:
//! - [`redis::RedisBroker`]: Redis Pub/Sub carries every message to every
//!   instance, and a Redis Stream per room keeps its history;
//! - [`local::LocalBroker`]: no Redis, one isolated instance. Two of these
//!   do not see each other, which is the problem this project exists to
//!   show and solve.

pub mod local;
pub mod redis;
pub mod report;

use std::collections::BTreeMap;
use std::fmt;

use crate::protocol::{
    ChatMessage, MemberChange, MembersExpired, MembersRewritten, MessageId, NewMessage, Received,
};
use report::InstanceReport;

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

/// Why a publish did not end with an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// The message was NOT accepted: nobody will receive it.
    Unavailable(Unavailable),
    /// Redis took the accept script but never said how it ended, even
    /// after retries until `--publish-deadline-ms`: the message may have
    /// been accepted, and then everyone receives it like any other.
    OutcomeUnknown(String),
}

impl From<Unavailable> for PublishError {
    fn from(unavailable: Unavailable) -> Self {
        PublishError::Unavailable(unavailable)
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Unavailable(reason) => write!(f, "{reason}"),
            PublishError::OutcomeUnknown(reason) => write!(f, "outcome unknown: {reason}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Which part of a room's history a connecting client wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The most recent `n` messages (a newcomer's context).
    Recent(usize),
    /// The messages after this id that history still holds, at most the
    /// most recent `max` of them (recovery; older ones are paged with
    /// `Before`).
    After(MessageId, usize),
    /// Up to `n` messages older than this id, the most recent of them (a
    /// page back).
    Before(MessageId, usize),
}

impl HistoryQuery {
    /// Entries a broker reads to answer: one more than it sends, to know
    /// whether older ones remain (`After` also reads `since` itself, to
    /// know whether it is still there).
    pub fn entries_to_read(&self) -> usize {
        match *self {
            HistoryQuery::Recent(n) | HistoryQuery::Before(_, n) => n + 1,
            HistoryQuery::After(_, max) => max + 1,
        }
    }
}

/// A room's history as read for one client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Oldest first.
    pub messages: Vec<ChatMessage>,
    /// The client asked for messages after an id older than anything
    /// history still holds: some messages are gone for good.
    pub truncated: bool,
    /// Older messages than those (and, after `since`, newer than it)
    /// remain in history: the client may ask for them.
    pub more: bool,
    /// The last id accepted anywhere in the chat when history was read.
    pub latest: Option<MessageId>,
}

impl History {
    /// The history for `After(since)`, from the room's entries from `since`
    /// on (inclusive, oldest first), its oldest entry, and the chat's latest
    /// id, all read in one atomic step.
    ///
    /// If `since` itself is still there, nothing was lost. If it is not,
    /// and the oldest entry is newer than it, history was trimmed past it
    /// (or lost in a Redis restart): the client is told.
    /// `from_since` is the most recent `max + 1` entries from `since` on
    /// (or fewer, if there are no more): if it reaches `since`, every
    /// message after it is there; if not, and it is full, more remain
    /// between `since` and those, and only the most recent `max` are sent.
    pub fn resume(
        since: MessageId,
        mut from_since: Vec<ChatMessage>,
        max: usize,
        oldest: Option<MessageId>,
        latest: Option<MessageId>,
    ) -> History {
        let found = from_since.first().is_some_and(|m| m.id == since);
        if found {
            from_since.remove(0);
        }
        let more = from_since.len() > max;
        if more {
            from_since.drain(..from_since.len() - max);
        }
        let truncated = !found
            && match oldest {
                Some(oldest) => oldest > since,
                None => latest.is_none_or(|latest| since <= latest),
            };
        History {
            messages: from_since,
            truncated,
            more,
            latest,
        }
    }

    /// `Recent(n)` or `Before(_, n)` from the most recent `n + 1` entries
    /// asked for, oldest first: `n` of them, and whether more remain.
    pub fn page(mut entries: Vec<ChatMessage>, n: usize, latest: Option<MessageId>) -> History {
        let more = entries.len() > n;
        if more {
            entries.drain(..entries.len() - n);
        }
        History {
            messages: entries,
            truncated: false,
            more,
            latest,
        }
    }

    /// The id up to which a client that read this history must not get live
    /// copies: the last message it was sent, or the `since` it already has,
    /// but never beyond what was accepted (a `since` from the future would
    /// otherwise swallow every new message).
    pub fn seam(&self, since: Option<MessageId>) -> Option<MessageId> {
        let known = since.and_then(|since| self.latest.map(|latest| since.min(latest)));
        let sent = self.messages.last().map(|m| m.id);
        known.max(sent)
    }
}

/// What a broker hands the fan-out, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// A message accepted by some instance, for the clients of its room,
    /// and when and how this instance received it (for the X-ray).
    Message(ChatMessage, Received),
    /// Sending and receiving went down or came back for some rooms: their
    /// clients are told, in order with the messages around it.
    Link(LinkChange),
    /// Who is in a room changed, or someone there is typing.
    Presence(PresenceChange),
}

/// A change of who is in a room, or of who types there. The presence
/// tracker (`crate::presence`) keeps each room's member list from these,
/// and tells clients what changed, coalesced; typing goes to them as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    MemberChange(MemberChange),
    MembersExpired(MembersExpired),
    /// The room's presence was rewritten: read it again.
    MembersRewritten(MembersRewritten),
    /// Every room's presence may be stale (this instance's link to Redis
    /// came back): read them all again, and tell their clients afresh.
    Resync,
    /// Relayed to the room's members but those with this name.
    Typing {
        room: String,
        name: String,
    },
}

impl PresenceChange {
    /// The room it is about (`None` for every room).
    pub fn room(&self) -> Option<&str> {
        match self {
            PresenceChange::MemberChange(change) => Some(&change.room),
            PresenceChange::MembersExpired(expired) => Some(&expired.room),
            PresenceChange::MembersRewritten(rewritten) => Some(&rewritten.room),
            PresenceChange::Typing { room, .. } => Some(room),
            PresenceChange::Resync => None,
        }
    }
}

/// Connections by instance, of one name in one room, in instance order.
///
/// A name is on one instance or a few, and a replica of a room of 20,000
/// holds one of these per name: a sorted vector costs a small allocation,
/// where a `BTreeMap` of one entry allocates a whole node (~400 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connections(Vec<(String, u64)>);

impl Connections {
    pub fn one(instance: &str, count: u64) -> Self {
        Connections(vec![(instance.to_string(), count)])
    }

    /// Adds `delta` to `instance`'s count; an instance at zero is gone.
    pub fn add(&mut self, instance: &str, delta: i64) {
        match self.0.binary_search_by(|(i, _)| i.as_str().cmp(instance)) {
            Ok(at) => {
                let count = self.0[at].1.saturating_add_signed(delta);
                match count {
                    0 => {
                        self.0.remove(at);
                    }
                    _ => self.0[at].1 = count,
                }
            }
            Err(at) if delta > 0 => self.0.insert(at, (instance.to_string(), delta as u64)),
            Err(_) => {}
        }
        self.0.shrink_to_fit();
    }

    pub fn remove(&mut self, instance: &str) {
        self.0.retain(|(i, _)| i != instance);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn instances(&self) -> impl DoubleEndedIterator<Item = &String> {
        self.0.iter().map(|(instance, _)| instance)
    }

    /// Connections over every instance.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, count)| count).sum()
    }
}

impl FromIterator<(String, u64)> for Connections {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(pairs: I) -> Self {
        let mut connections = Connections::default();
        for (instance, count) in pairs {
            connections.add(&instance, count.min(i64::MAX as u64) as i64);
        }
        connections
    }
}

/// A room's presence as read at once: its members and the number of the
/// last change it includes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceSnapshot {
    pub seq: u64,
    pub members: BTreeMap<String, Connections>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    Up,
    Down,
}

/// Whether the clients of some rooms can send and receive across
/// instances now, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkChange {
    pub status: LinkStatus,
    /// The rooms whose clients are told: every room of this instance
    /// (`None`), or those of one Redis Cluster shard.
    pub rooms: Option<Vec<String>>,
    /// For people: the `status` frame's `message`.
    pub message: String,
}

/// Where a broker sends its events.
pub type EventSender = crossbeam_channel::Sender<BrokerEvent>;

/// The broker, whole: one object implements the four traits below, and
/// each part of the server names only the one it uses (the instances/// view, [`InstanceReports`]; presence, [`Presence`]; ...).
pub trait Broker: Messages + Presence + Readiness + InstanceReports {}

impl<T: Messages + Presence + Readiness + InstanceReports> Broker for T {}

/// Publishing and history: what a session needs to send and to catch up.
pub trait Messages: Send + Sync {
    /// Accepts a message: gives it its id and sends it to every instance,
    /// this one included, which delivers it through its subscriber like any
    /// other. Returns the id once the message is accepted, or `Unavailable`
    /// when it was not (and never will be).
    ///
    /// `dedup_key` is unique to this message: a retry with the same key
    /// after a broken link cannot accept the message twice.
    fn publish(&self, message: NewMessage, dedup_key: &str) -> Result<MessageId, PublishError>;

    /// A room's history.
    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable>;

    /// A local client joins `room`. Returns once this instance receives
    /// the room's messages (a broker that subscribes per room waits for
    /// its subscription here), so that history read afterwards meets the
    /// live messages with no gap.
    fn attach(&self, _room: &str) {}

    /// A local client left `room`.
    fn detach(&self, _room: &str) {}
}

/// Who is in each room, as the instances share it, and who is typing.
pub trait Presence: Send + Sync {
    /// A local client named `name` is now in `room`: one more connection
    /// in the room's presence. Returns once it is written: the change's
    /// number, which the client's member list waits for (`None` if it
    /// failed).
    fn present(&self, room: &str, name: &str) -> Option<u64>;

    /// That client left.
    fn absent(&self, room: &str, name: &str);

    /// The room's presence, whole, with the number of its last change.
    fn presence_snapshot(&self, room: &str) -> Result<PresenceSnapshot, Unavailable>;

    /// Tells the room's other members that `name` is typing. Ephemeral:
    /// not stored, and lost if Redis is away.
    fn typing(&self, room: &str, name: &str);
}

/// Whether this instance's links to the others work, and the fault
/// panel's cut.
pub trait Readiness: Send + Sync {
    /// `Ok` while this instance can deliver across instances, in every
    /// room; otherwise every reason, for `/readyz`.
    fn readiness(&self) -> Result<(), String>;

    /// For a client joining `room`: `Ok` if it can send and receive across
    /// instances now; otherwise why not, and the client, told `down`, is
    /// owed an `up` when that changes.
    fn link_status(&self, _room: &str) -> Result<(), String> {
        Ok(())
    }

    /// `--demo-controls`: cuts this instance's subscription the way a
    /// network failure would, keeps it away for `hold`, and says what it
    /// cut.
    fn cut_subscription(&self, _hold: std::time::Duration) -> Result<String, String> {
        Err("this instance has no Redis subscription to cut (--broker local)".into())
    }
}

/// Each instance's report for the instances view (`/stats`).
pub trait InstanceReports: Send + Sync {
    /// Tells the other instances how this one is doing (`/stats`). Best
    /// effort: a report lost to an outage is replaced by the next.
    fn report(&self, report: &InstanceReport);

    /// Every instance that reported lately, this one included, by name.
    fn instances(&self) -> Result<Vec<InstanceReport>, Unavailable>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(millis: u64, seq: u64) -> MessageId {
        MessageId { millis, seq }
    }

    fn message(id: MessageId) -> ChatMessage {
        ChatMessage {
            id,
            room: "r".into(),
            from: "a".into(),
            user: None,
            text: id.to_string(),
            ts: id.millis,
            instance: "i".into(),
            cid: None,
            typed_us: None,
            read_us: None,
        }
    }

    #[test]
    fn an_exact_resume_replays_what_follows_since() {
        let entries = vec![message(id(5, 0)), message(id(6, 0)), message(id(7, 0))];
        let history = History::resume(id(5, 0), entries, 10, Some(id(1, 0)), Some(id(7, 0)));
        assert!(!history.truncated);
        assert_eq!(
            history.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            [id(6, 0), id(7, 0)]
        );
        assert_eq!(history.seam(Some(id(5, 0))), Some(id(7, 0)));
    }

    #[test]
    fn a_resume_past_its_cap_keeps_the_most_recent_and_says_more_remain() {
        // since (1, 0) not reached: 3 entries read for a cap of 2.
        let entries = vec![message(id(5, 0)), message(id(6, 0)), message(id(7, 0))];
        let history = History::resume(id(1, 0), entries, 2, Some(id(1, 0)), Some(id(7, 0)));
        assert!(history.more && !history.truncated);
        assert_eq!(
            history.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            [id(6, 0), id(7, 0)]
        );
        // since reached within the cap: nothing more.
        let entries = vec![message(id(6, 0)), message(id(7, 0))];
        let history = History::resume(id(6, 0), entries, 1, Some(id(1, 0)), Some(id(7, 0)));
        assert!(!history.more);
        assert_eq!(history.messages.len(), 1);
    }

    #[test]
    fn a_since_older_than_history_is_truncated() {
        let entries = vec![message(id(5, 0)), message(id(6, 0))];
        let history = History::resume(id(2, 0), entries, 10, Some(id(5, 0)), Some(id(6, 0)));
        assert!(history.truncated);
        assert_eq!(history.messages.len(), 2);
        let lost = History::resume(id(2, 0), Vec::new(), 10, None, None);
        assert!(lost.truncated, "history emptied by a Redis restart");
    }

    #[test]
    fn a_future_since_replays_nothing_and_does_not_block_live_messages() {
        let history = History::resume(id(99, 0), Vec::new(), 10, Some(id(1, 0)), Some(id(7, 0)));
        assert!(!history.truncated);
        assert!(history.messages.is_empty());
        assert_eq!(history.seam(Some(id(99, 0))), Some(id(7, 0)));
    }

    #[test]
    fn recent_history_seams_at_its_last_message() {
        let history = History {
            messages: vec![message(id(3, 1))],
            truncated: false,
            more: false,
            latest: Some(id(4, 0)),
        };
        assert_eq!(history.seam(None), Some(id(3, 1)));
        assert_eq!(History::default().seam(None), None);
    }
}
