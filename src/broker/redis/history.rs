//! A room's history, read back: for a client that connects (its first
//! frames), on a connection of its own, so that a large read never waits
//! behind a publish; and the stream-reply parsing the catch-up after an
//! outage shares.

use std::sync::Arc;

use log::warn;
use redis::{ConnectionLike, RedisError};

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::{History, HistoryQuery, Unavailable};
use crate::protocol::{ChatMessage, Limits, MessageId, parse_channel_payload};

/// One entry of an `XRANGE` reply: its id and its field-value pairs.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Entries the first `XREVRANGE` of a read asks for: a page of ordinary
/// messages takes one command; the next are sized from what this one
/// weighed.
const FIRST_PAGE: usize = 64;

/// The bytes of an entry's payload.
fn entry_bytes((_, fields): &StreamEntry) -> usize {
    fields.iter().map(|(_, value)| value.len()).sum()
}

pub struct HistoryReader {
    link: Arc<Link>,
    keys: RedisKeys,
    limits: Limits,
    /// Past this many bytes a read stops: the client could not take more.
    max_bytes: usize,
}

impl HistoryReader {
    pub fn new(link: Link, keys: RedisKeys, limits: Limits, max_bytes: usize) -> Self {
        HistoryReader {
            link: Arc::new(link),
            keys,
            limits,
            max_bytes,
        }
    }

    /// The history connection (watched when idle).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Reads the last id handed out, then at most `entries_to_read` of the
    /// history, the most recent first: the newest (`Recent`), those older
    /// than an id (`Before`), or those from `since` on (`After`, with the
    /// oldest entry of all, read last). A read stops once it holds
    /// `max_bytes`, and says that more remain: 200 of the largest messages
    /// are 2.5 MB, of which a client's buffer takes 1 MiB.
    ///
    /// Two plain commands, not one script: a script's reply goes through
    /// Lua tables, and for a page of the largest messages (200 of about
    /// 12 KB) that held Redis, and every publish behind it, for 9 to 17 ms
    /// against 1 to 3 ms for `XREVRANGE` itself (measured with `SLOWLOG`).
    /// Nothing needs the two in one step: ids grow with acceptance, so a
    /// page read after the last id ends with the newest message accepted
    /// by then, and the seam ([`History::seam`]) is the page's last
    /// message; one accepted between the two reads is in the page, and its
    /// live copy, at or below the seam, is not sent again.
    pub fn read(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let history_key = self.keys.history(room);
        let page = |connection: &mut dyn ConnectionLike, from: &str, to: &str| {
            self.newest(connection, &history_key, from, to, query.entries_to_read())
        };
        let latest = |connection: &mut dyn ConnectionLike| {
            redis::cmd("GET")
                .arg(self.keys.last_id(room))
                .query::<Option<String>>(connection)
        };
        // Most recent first: put oldest first.
        let messages = |mut entries: Vec<StreamEntry>| {
            entries.reverse();
            parse_stream_entries(entries, &self.limits)
        };
        let history = match query {
            HistoryQuery::Recent(n) | HistoryQuery::Before(_, n) => {
                let from = match query {
                    HistoryQuery::Before(before, _) => format!("({before}"),
                    _ => "+".to_string(),
                };
                let (latest, (entries, cut)) = self
                    .link
                    .run(|connection| Ok((latest(connection)?, page(connection, &from, "-")?)))
                    .map_err(Failure::into_unavailable)?;
                let mut history = History::page(messages(entries), n, parse_last_id(latest));
                history.more |= cut;
                history
            }
            HistoryQuery::After(since, max) => {
                let (latest, (from_since, cut), oldest) = self
                    .link
                    .run(|connection| {
                        let latest = latest(connection)?;
                        let from_since = page(connection, "+", &since.to_string())?;
                        let oldest: Vec<StreamEntry> = redis::cmd("XRANGE")
                            .arg(&history_key)
                            .arg("-")
                            .arg("+")
                            .arg("COUNT")
                            .arg(1)
                            .query(connection)?;
                        Ok((latest, from_since, oldest))
                    })
                    .map_err(Failure::into_unavailable)?;
                let oldest = oldest.first().and_then(|(id, _)| id.parse().ok());
                let mut history = History::resume(
                    since,
                    messages(from_since),
                    max,
                    oldest,
                    parse_last_id(latest),
                );
                history.more |= cut;
                history
            }
        };
        Ok(history)
    }

    /// At most `wanted` entries from `from` down to `to` (`XREVRANGE`
    /// bounds), newest first, in pages, until `max_bytes` are held: the
    /// entries, and whether the bytes cut them short.
    fn newest(
        &self,
        connection: &mut dyn ConnectionLike,
        key: &str,
        from: &str,
        to: &str,
        wanted: usize,
    ) -> Result<(Vec<StreamEntry>, bool), RedisError> {
        let mut entries: Vec<StreamEntry> = Vec::new();
        let mut bytes = 0;
        let mut from = from.to_string();
        loop {
            let left = wanted - entries.len();
            let count = match entries.len() {
                0 => left.min(FIRST_PAGE),
                // As many as the bytes left hold, at the weight seen so
                // far (one more, to reach the budget).
                read => {
                    let average = (bytes / read).max(1);
                    left.min(self.max_bytes.saturating_sub(bytes) / average + 1)
                }
            };
            let page: Vec<StreamEntry> = redis::cmd("XREVRANGE")
                .arg(key)
                .arg(&from)
                .arg(to)
                .arg("COUNT")
                .arg(count)
                .query(connection)?;
            let exhausted = page.len() < count;
            bytes += page.iter().map(entry_bytes).sum::<usize>();
            entries.extend(page);
            if entries.len() >= wanted || exhausted {
                return Ok((entries, false));
            }
            if bytes >= self.max_bytes {
                return Ok((entries, true));
            }
            let oldest_read = &entries.last().expect("a page that is not exhausted").0;
            from = format!("({oldest_read}");
        }
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
