//! The broker with no Redis: one instance, alone.
//!
//! It hands out ids and keeps history the way the Redis broker does, so the
//! page and the protocol behave the same; what it cannot do is reach any
//! other instance. Run two of these and their clients live in two separate
//! worlds: the "my chat works on one server" starting point.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::broker::{Broker, History, HistoryQuery, Unavailable};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{ChatMessage, MessageId, NewMessage};

#[derive(Debug, Default)]
struct State {
    last_id: MessageId,
    rooms: HashMap<String, VecDeque<ChatMessage>>,
}

pub struct LocalBroker {
    state: Mutex<State>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    history_len: usize,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, history_len: usize) -> Self {
        LocalBroker {
            state: Mutex::default(),
            hub,
            metrics,
            history_len,
        }
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

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Broker for LocalBroker {
    fn publish(&self, message: NewMessage, _dedup_key: &str) -> Result<MessageId, Unavailable> {
        // Delivering under the lock is what keeps every local receiver's
        // order equal to id order; `Hub::deliver` never blocks, so the lock
        // is held for microseconds.
        let mut state = self.state.lock().expect("local broker lock poisoned");
        let id = next_id(state.last_id, now_millis());
        state.last_id = id;
        let message = message.accepted(id);
        let history = state.rooms.entry(message.room.clone()).or_default();
        if history.len() == self.history_len {
            history.pop_front();
        }
        history.push_back(message.clone());
        Metrics::inc(&self.metrics.broker_messages_total);
        self.hub.deliver(&message);
        Ok(id)
    }

    fn history(&self, room: &str, query: HistoryQuery) -> Result<History, Unavailable> {
        let state = self.state.lock().expect("local broker lock poisoned");
        let latest = (state.last_id != MessageId::ZERO).then_some(state.last_id);
        let empty = VecDeque::new();
        let history = state.rooms.get(room).unwrap_or(&empty);
        Ok(match query {
            HistoryQuery::Recent(n) => History {
                messages: history
                    .iter()
                    .skip(history.len().saturating_sub(n))
                    .cloned()
                    .collect(),
                truncated: false,
                latest,
            },
            HistoryQuery::After(since) => History::resume(
                since,
                history.iter().filter(|m| m.id >= since).cloned().collect(),
                history.front().map(|m| m.id),
                latest,
            ),
        })
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
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
        let hub = Arc::new(Hub::new(Arc::default()));
        let broker = LocalBroker::new(hub, Arc::default(), 3);
        let mut ids = Vec::new();
        for n in 0..5 {
            let message = NewMessage {
                room: "lobby".into(),
                from: "a".into(),
                text: n.to_string(),
                instance: "i".into(),
                cid: None,
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
        assert_eq!(texts(HistoryQuery::Recent(10)), ["2", "3", "4"]);
        assert_eq!(texts(HistoryQuery::Recent(2)), ["3", "4"]);
        assert_eq!(texts(HistoryQuery::After(ids[3])), ["4"]);
        let elsewhere = broker
            .history("elsewhere", HistoryQuery::Recent(5))
            .unwrap();
        assert!(elsewhere.messages.is_empty());
        let trimmed = broker
            .history("lobby", HistoryQuery::After(ids[0]))
            .unwrap();
        assert!(trimmed.truncated, "the first message was trimmed away");
        assert_eq!(trimmed.messages.len(), 3);
    }
}
