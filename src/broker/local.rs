//! The broker with no Redis: one instance, alone.
//!
//! It hands out ids and keeps history the way the Redis broker does, so the
//! page and the protocol behave the same; what it cannot do is reach any
//! other instance. Run two of these and their clients live in two separate
//! worlds: the "my chat works on one server" starting point.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::broker::report::InstanceReport;
use crate::broker::{
    BrokerEvent, Connections, EventSender, History, HistoryQuery, InstanceReports, Messages,
    Presence, PresenceChange, PresenceSnapshot, Readiness, Unavailable,
};
use crate::clock;
use crate::metrics::Metrics;
use crate::protocol::{
    ChatMessage, LeaveReason, MemberChange, MessageId, NewMessage, Received, Via,
};
use crate::sync::{Mutex, lock};

#[derive(Debug, Default)]
struct State {
    last_id: MessageId,
    rooms: HashMap<String, VecDeque<ChatMessage>>,
    /// Presence by room: connections by name, and the number of the last
    /// change (numbered as the Redis broker numbers them, so the presence
    /// tracker reads both alike).
    present: HashMap<String, RoomPresence>,
    /// This instance's last report: alone, it is every instance there is.
    report: Option<InstanceReport>,
}

#[derive(Debug, Default)]
struct RoomPresence {
    seq: u64,
    names: BTreeMap<String, u64>,
}

pub struct LocalBroker {
    state: Mutex<State>,
    events_tx: EventSender,
    metrics: Arc<Metrics>,
    history_len: usize,
    instance: String,
}

impl LocalBroker {
    pub fn new(
        events_tx: EventSender,
        metrics: Arc<Metrics>,
        history_len: usize,
        instance: String,
    ) -> Self {
        LocalBroker {
            state: Mutex::default(),
            events_tx,
            metrics,
            history_len,
            instance,
        }
    }

    /// Changes `name`'s connections in `room` by `delta`, and emits the
    /// numbered change (under the lock: changes reach the fan-out in the
    /// order of their numbers).
    fn change(&self, room: &str, name: &str, delta: i64) -> Option<u64> {
        let mut state = lock(&self.state);
        let presence = state.present.entry(room.to_string()).or_default();
        let count = presence.names.entry(name.to_string()).or_default();
        if delta < 0 && *count == 0 {
            presence.names.remove(name);
            return None;
        }
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            presence.names.remove(name);
        }
        presence.seq += 1;
        let change = MemberChange {
            room: room.to_string(),
            name: name.to_string(),
            instance: self.instance.clone(),
            delta,
            reason: (delta < 0).then_some(LeaveReason::Left),
            seq: presence.seq,
        };
        let seq = presence.seq;
        // The room's number is kept when it empties: a tracker that still
        // holds the room must not see the numbers start again.
        let _ = self
            .events_tx
            .send(BrokerEvent::Presence(PresenceChange::MemberChange(change)));
        Some(seq)
    }
}

/// The next id after `last`, in the `<ms>-<seq>` scheme Redis Streams use.
pub fn next_id(last: MessageId, now_millis: u64) -> MessageId {
    if now_millis > last.millis {
        MessageId {
            millis: now_millis,
            seq: 0,
        }
    } else {
        MessageId {
            millis: last.millis,
            seq: last.seq + 1,
        }
    }
}

impl Messages for LocalBroker {
    fn publish(
        &self,
        message: NewMessage,
        _dedup_key: &str,
    ) -> Result<MessageId, super::PublishError> {
        // Emitting under the lock is what keeps the event order equal to
        // id order.
        let mut state = lock(&self.state);
        let id = next_id(state.last_id, clock::wall_millis());
        state.last_id = id;
        let message = message.accepted(id);
        let history = state.rooms.entry(message.room.clone()).or_default();
        if history.len() == self.history_len {
            history.pop_front();
        }
        history.push_back(message.clone());
        Metrics::inc(&self.metrics.broker_messages_total);
        self.events_tx
            .send(BrokerEvent::Message(message, Received::now(Via::Local)))
            .map_err(|_| Unavailable("the fan-out thread is gone".into()))?;
        Ok(id)
    }

    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let state = lock(&self.state);
        let latest = (state.last_id != MessageId::ZERO).then_some(state.last_id);
        let empty = VecDeque::new();
        let history = state.rooms.get(room).unwrap_or(&empty);
        // The most recent entries that match, as Redis's XREVRANGE with a
        // COUNT reads them, oldest first.
        let read = |matches: &dyn Fn(&ChatMessage) -> bool| -> Vec<ChatMessage> {
            let mut entries: Vec<ChatMessage> = history
                .iter()
                .rev()
                .filter(|m| matches(m))
                .take(query.entries_to_read())
                .cloned()
                .collect();
            entries.reverse();
            entries
        };
        Ok(match query {
            HistoryQuery::Recent(n) => History::page(read(&|_| true), n, latest),
            HistoryQuery::Before(before, n) => History::page(read(&|m| m.id < before), n, latest),
            HistoryQuery::After(since, max) => History::resume(
                since,
                read(&|m| m.id >= since),
                max,
                history.front().map(|m| m.id),
                latest,
            ),
        })
    }
}

impl Presence for LocalBroker {
    fn present(&self, room: &str, name: &str) -> Option<u64> {
        self.change(room, name, 1)
    }

    fn absent(&self, room: &str, name: &str) {
        self.change(room, name, -1);
    }

    fn presence_snapshot(&self, room: &str) -> Result<PresenceSnapshot, Unavailable> {
        let state = lock(&self.state);
        let Some(presence) = state.present.get(room) else {
            return Ok(PresenceSnapshot::default());
        };
        let members = presence
            .names
            .iter()
            .map(|(name, count)| {
                let connections = Connections::one(&self.instance, *count);
                (name.clone(), connections)
            })
            .collect();
        Ok(PresenceSnapshot {
            seq: presence.seq,
            members,
        })
    }

    fn typing(&self, room: &str, name: &str) {
        let _ = self
            .events_tx
            .send(BrokerEvent::Presence(PresenceChange::Typing {
                room: room.to_string(),
                name: name.to_string(),
            }));
    }
}

impl Readiness for LocalBroker {
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

impl InstanceReports for LocalBroker {
    fn report(&self, report: &InstanceReport) {
        lock(&self.state).report = Some(report.clone());
    }

    fn instances(&self) -> Result<Vec<InstanceReport>, Unavailable> {
        Ok(lock(&self.state).report.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_does_not() {
        let first = next_id(MessageId::ZERO, 100);
        assert_eq!(
            first,
            MessageId {
                millis: 100,
                seq: 0
            }
        );
        let same_ms = next_id(first, 100);
        assert_eq!(
            same_ms,
            MessageId {
                millis: 100,
                seq: 1
            }
        );
        let clock_went_back = next_id(same_ms, 90);
        assert!(clock_went_back > same_ms);
    }

    #[test]
    fn history_is_bounded_and_answers_both_queries() {
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let broker = LocalBroker::new(events_tx, Arc::default(), 3, "i".into());
        let mut ids = Vec::new();
        for n in 0..5 {
            let message = NewMessage {
                room: "lobby".into(),
                from: "a".into(),
                user: None,
                text: n.to_string(),
                instance: "i".into(),
                cid: None,
                typed_us: None,
                read_us: None,
            };
            ids.push(broker.publish(message, &n.to_string()).unwrap());
        }
        let texts = |query| {
            broker
                .history("lobby", query)
                .unwrap()
                .messages
                .into_iter()
                .map(|m| m.text)
                .collect::<Vec<_>>()
        };
        let emitted: Vec<_> = events_rx.try_iter().collect();
        assert_eq!(
            emitted.len(),
            5,
            "every message goes to the fan-out, in order"
        );
        assert!(matches!(&emitted[4], BrokerEvent::Message(m, _) if m.id == ids[4]));
        assert_eq!(texts(HistoryQuery::Recent(10)), ["2", "3", "4"]);
        assert_eq!(texts(HistoryQuery::Recent(2)), ["3", "4"]);
        assert_eq!(texts(HistoryQuery::After(ids[3], 10)), ["4"]);
        assert_eq!(texts(HistoryQuery::After(ids[0], 2)), ["3", "4"]);
        assert_eq!(texts(HistoryQuery::Before(ids[4], 2)), ["2", "3"]);
        let elsewhere = broker
            .history("elsewhere", HistoryQuery::Recent(5))
            .unwrap();
        assert!(elsewhere.messages.is_empty());
        let trimmed = broker
            .history("lobby", HistoryQuery::After(ids[0], 10))
            .unwrap();
        assert!(trimmed.truncated, "the first message was trimmed away");
        assert_eq!(trimmed.messages.len(), 3);
    }
}
