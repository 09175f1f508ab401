//! A room's history, read back: for a client that connects (its first
//! frames), on a connection of its own, so that a large read never holds
//! up a publish; and the stream-reply parsing the catch-up after an outage
//! shares.

use std::sync::Arc;

use log::warn;
use redis::{ConnectionLike, RedisError, Script};

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::{History, HistoryQuery, Unavailable};
use crate::protocol::{ChatMessage, Limits, MessageId, parse_channel_payload};

/// Reads a room's history and the last id handed out (`KEYS[2]`) in one
/// atomic step, so that the seam computed from them is exact. Each mode
/// reads at most `ARGV[3]` entries, the most recent first: `recent`, the
/// newest; `before`, those older than `ARGV[2]`; `after`, those from
/// `ARGV[2]` on, and the oldest entry of all.
const HISTORY_SCRIPT: &str = r#"
local latest = redis.call('GET', KEYS[2])
if ARGV[1] == 'recent' then
  return {latest, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[3])}
elseif ARGV[1] == 'before' then
  return {latest, redis.call('XREVRANGE', KEYS[1], '(' .. ARGV[2], '-', 'COUNT', ARGV[3])}
end
return {latest, redis.call('XREVRANGE', KEYS[1], '+', ARGV[2], 'COUNT', ARGV[3]), redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)}
"#;

/// One entry of an `XRANGE` reply: its id and its field-value pairs.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);

pub struct HistoryReader {
    link: Arc<Link>,
    keys: RedisKeys,
    script: Script,
    limits: Limits,
}

impl HistoryReader {
    pub fn new(link: Link, keys: RedisKeys, limits: Limits) -> Self {
        HistoryReader {
            link: Arc::new(link),
            keys,
            script: Script::new(HISTORY_SCRIPT),
            limits,
        }
    }

    /// The history connection (watched when idle).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Reads history and the last id in one atomic step (a script), so
    /// that the seam computed from them is exact.
    pub fn read(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let (mode, from) = match query {
            HistoryQuery::Recent(_) => ("recent", String::new()),
            HistoryQuery::Before(before, _) => ("before", before.to_string()),
            HistoryQuery::After(since, _) => ("after", since.to_string()),
        };
        let mut invocation = self.script.key(self.keys.history(room));
        invocation
            .key(self.keys.last_id(room))
            .arg(mode)
            .arg(from)
            .arg(query.entries_to_read());
        // Most recent first: put oldest first.
        let messages = |mut entries: Vec<StreamEntry>| {
            entries.reverse();
            parse_stream_entries(entries, &self.limits)
        };
        let history = match query {
            HistoryQuery::Recent(n) | HistoryQuery::Before(_, n) => {
                let (latest, entries): (Option<String>, Vec<StreamEntry>) = self
                    .link
                    .run(|connection| invocation.invoke(connection))
                    .map_err(Failure::into_unavailable)?;
                History::page(messages(entries), n, parse_last_id(latest))
            }
            HistoryQuery::After(since, max) => {
                let (latest, from_since, oldest): (
                    Option<String>,
                    Vec<StreamEntry>,
                    Vec<StreamEntry>,
                ) = self
                    .link
                    .run(|connection| invocation.invoke(connection))
                    .map_err(Failure::into_unavailable)?;
                let oldest = oldest.first().and_then(|(id, _)| id.parse().ok());
                History::resume(
                    since,
                    messages(from_since),
                    max,
                    oldest,
                    parse_last_id(latest),
                )
            }
        };
        Ok(history)
    }
}

/// One page of a room's history, as a catch-up reads it.
pub struct Page {
    /// The valid messages, oldest first.
    pub messages: Vec<ChatMessage>,
    /// The id of the page's last entry, valid or not: where the next page
    /// starts.
    pub last_id: Option<MessageId>,
    /// The page is as long as asked: there may be more after it.
    pub full: bool,
}

/// At most `count` entries of `room`'s history after `after` (from the
/// start when `None`), oldest first.
pub fn read_after(
    connection: &mut dyn ConnectionLike,
    keys: &RedisKeys,
    limits: &Limits,
    room: &str,
    after: Option<MessageId>,
    count: usize,
) -> Result<Page, RedisError> {
    let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg(keys.history(room))
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query(connection)?;
    let full = entries.len() >= count;
    let last_id = entries.last().and_then(|(id, _)| id.parse().ok());
    Ok(Page {
        messages: parse_stream_entries(entries, limits),
        last_id,
        full,
    })
}

/// Reads a stream reply (`XRANGE`, `XREVRANGE`) into messages, skipping
/// entries that are not valid message frames.
pub fn parse_stream_entries(entries: Vec<StreamEntry>, limits: &Limits) -> Vec<ChatMessage> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let frame = fields.into_iter().find(|(name, _)| name == "m")?.1;
            match parse_channel_payload(&frame, limits) {
                Ok(message) => Some(message),
                Err(e) => {
                    warn!("history entry {id} skipped: {e}");
                    None
                }
            }
        })
        .collect()
}

/// Reads the chat's last id (`None` before the first message).
pub fn parse_last_id(raw: Option<String>) -> Option<MessageId> {
    raw.and_then(|raw| raw.parse().ok())
}
