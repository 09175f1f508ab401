//! Where a message is published: the accept script, run on the publishing
//! connection, gives the message its id, appends it to the room's history
//! and `PUBLISH`es it on the room's channel, as one atomic step; the retry
//! loop around it makes sure a client gets exactly one answer even when
//! the link breaks while the script is in flight.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use redis::Script;

use super::keys::RedisKeys;
use super::link::{Failure, Link};
use crate::broker::{PublishError, Unavailable};
use crate::protocol::{MessageId, NewMessage};

/// Pause between two attempts of a publish whose outcome is unknown.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long Redis remembers that a message was accepted, past the publish
/// deadline: retries of a message stop at the deadline, so this margin
/// covers a retry sent just before it, and no more.
const DEDUP_MARGIN: Duration = Duration::from_secs(30);

/// The accept script: gives the message the next id, appends it to the
/// room's history and publishes it, atomically (Redis runs a script as one
/// step), so that id order, history order and delivery order are one order.
///
/// Ids follow the Streams scheme `<ms>-<seq>` and come from the counter
/// `KEYS[2]`: with one Redis, one counter for every room, so that ids are
/// unique and increasing across the whole chat; in a Redis Cluster, one per
/// room, in the room's hash slot (a script may only touch one slot).
/// `ARGV[3]` is the message JSON without its opening brace; the script puts
/// `type`, `id` and `ts` in front. The last step is the one this whole
/// project is about: `PUBLISH` on the room's channel `KEYS[4]` (`SPUBLISH`,
/// sharded Pub/Sub, in a Redis Cluster: `ARGV[1]` is `sharded`), which
/// Redis pushes to every instance subscribed to it, this one included.
///
/// `KEYS[3]` makes it idempotent: it remembers, for `ARGV[4]` seconds, the
/// id given to this message, and a retry after a broken link gets that id
/// back instead of publishing the message twice.
///
/// With `--redis-min-replicas` (`ARGV[6]` is `deferred`) it does not
/// publish: it appends the frame to the room's pending list `KEYS[5]`, and
/// [`FLUSH_SCRIPT`] publishes it once `WAIT` says enough replicas hold it.
///
/// Nothing it writes lives for ever: the history lives `ARGV[5]` ms after
/// the room's last message, and so does, in a cluster, the room's own
/// last id (with one Redis, the last id is one key for the whole chat).
const ACCEPT_SCRIPT: &str = r#"
local prior = redis.call('GET', KEYS[3])
if prior then
  return prior
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[2])
if last then
  local last_ms, last_seq = string.match(last, '^(%d+)-(%d+)$')
  last_ms = tonumber(last_ms)
  if last_ms >= ms then
    ms = last_ms
    seq = tonumber(last_seq) + 1
  end
end
local id = string.format('%d-%d', ms, seq)
local frame = '{"type":"message","id":"' .. id .. '","ts":' .. string.format('%d', ms) .. ',' .. ARGV[3]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'm', frame)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[1] == 'sharded' then
  redis.call('SET', KEYS[2], id, 'PX', ARGV[5])
else
  redis.call('SET', KEYS[2], id)
end
redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
if ARGV[6] == 'deferred' then
  redis.call('RPUSH', KEYS[5], frame)
  redis.call('PEXPIRE', KEYS[5], ARGV[5])
elseif ARGV[1] == 'sharded' then
  redis.call('SPUBLISH', KEYS[4], frame)
else
  redis.call('PUBLISH', KEYS[4], frame)
end
return id
"#;

/// With `--redis-min-replicas`: publishes, in id order, the room's pending
/// messages (`KEYS[1]`, a list the accept script appended to) up to id
/// `ARGV[1]-ARGV[2]`, once `WAIT` said enough replicas hold it. Replication
/// is one ordered stream, so a replica that holds this message holds every
/// earlier one: they are published too, in order, by whichever publisher
/// gets there first. A message whose `WAIT` fell short stays pending, and
/// goes out with the next message of its room that is replicated in time.
const FLUSH_SCRIPT: &str = r#"
local upto_ms = tonumber(ARGV[1])
local upto_seq = tonumber(ARGV[2])
local published = 0
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then
    break
  end
  local ms, seq = string.match(head, '^{"type":"message","id":"(%d+)-(%d+)"')
  if ms then
    ms = tonumber(ms)
    seq = tonumber(seq)
    if ms > upto_ms or (ms == upto_ms and seq > upto_seq) then
      break
    end
    if ARGV[3] == 'sharded' then
      redis.call('SPUBLISH', KEYS[2], head)
    else
      redis.call('PUBLISH', KEYS[2], head)
    end
    published = published + 1
  end
  redis.call('LPOP', KEYS[1])
end
return published
"#;

/// What one attempt of the accept step ended with.
enum Accepted {
    /// The id; published (or, with `--redis-min-replicas`, replicated and
    /// published).
    Done(String),
    /// Accepted on the primary, but fewer replicas than asked confirmed
    /// it in time: (id, how many did).
    Unreplicated(String, i64),
}

/// The publishing side of the broker: the sessions' messages, and their
/// typing notices, on a connection of their own.
pub struct Publisher {
    link: Arc<Link>,
    keys: RedisKeys,
    script: Script,
    history_len: usize,
    history_ttl: Duration,
    /// How long a publish whose outcome is unknown is retried.
    deadline: Duration,
    /// `--redis-min-replicas`: replicas that must hold a message before
    /// it is published (0: published by the accept script itself).
    min_replicas: usize,
    /// How long `WAIT` waits for them.
    replicas_timeout: Duration,
    flush: Script,
}

impl Publisher {
    pub fn new(
        link: Link,
        keys: RedisKeys,
        history_len: usize,
        history_ttl: Duration,
        deadline: Duration,
        min_replicas: usize,
        replicas_timeout: Duration,
    ) -> Self {
        Publisher {
            link: Arc::new(link),
            keys,
            script: Script::new(ACCEPT_SCRIPT),
            history_len,
            history_ttl,
            deadline,
            min_replicas,
            replicas_timeout,
            flush: Script::new(FLUSH_SCRIPT),
        }
    }

    /// The publishing connection (probed by `/readyz`, watched when idle).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Runs the accept script. If the link breaks while the script is in
    /// flight, the outcome is unknown: the same script, with the same dedup
    /// key, is retried after reconnecting until Redis says which id the
    /// message got, or the deadline passes.
    ///
    /// `shard_is_up` says whether the subscription of the room's shard is
    /// up. In a Redis Cluster, a refusal while it is up means the cluster
    /// connection's map is older than a failover the subscription already
    /// followed (a node asked for the slots had not heard of it yet): the
    /// message did not run, and is tried again, on a rebuilt connection,
    /// until the deadline, so that `up` means a send gets through.
    pub fn publish(
        &self,
        message: NewMessage,
        dedup_key: &str,
        shard_is_up: &dyn Fn() -> bool,
    ) -> Result<MessageId, PublishError> {
        let body = serde_json::to_string(&message).expect("messages always serialize");
        let deadline = Instant::now() + self.deadline;
        let mut in_doubt = false;
        loop {
            let attempt = self
                .link
                .run(|connection| self.accept(connection, &message.room, &body, dedup_key));
            let reason = match attempt {
                Ok(Accepted::Unreplicated(id, replicas)) => {
                    warn!(
                        "redis publisher: message {dedup_key} ({id}) accepted by the primary, but \
                         {replicas} of {} replicas confirmed it within {} ms: held back, sender told \
                         outcome_unknown",
                        self.min_replicas,
                        self.replicas_timeout.as_millis()
                    );
                    return Err(PublishError::OutcomeUnknown(format!(
                        "accepted by the primary, but {replicas} of the {} replicas required \
                         confirmed it within {} ms; it is delivered once a replica holds it, and \
                         lost if the primary fails first",
                        self.min_replicas,
                        self.replicas_timeout.as_millis()
                    )));
                }
                Ok(Accepted::Done(id)) => {
                    if in_doubt {
                        info!(
                            "redis publisher: message {dedup_key} resolved after a broken link: {id}"
                        );
                    }
                    return id
                        .parse()
                        .map_err(|e| Unavailable(format!("redis returned a bad id: {e}")).into());
                }
                Err(Failure::Refused(reason)) if !in_doubt => {
                    if self.link.is_cluster() && shard_is_up() && Instant::now() < deadline {
                        debug!(
                            "redis publisher: message {dedup_key} refused by a master the \
                             cluster map still names ({reason}); again"
                        );
                        thread::sleep(RETRY_PAUSE);
                        continue;
                    }
                    return Err(Unavailable(reason).into());
                }
                Err(Failure::Redirected(reason)) => {
                    // It did not run: try again, without doubt, while the
                    // deadline allows.
                    if Instant::now() >= deadline {
                        return Err(Unavailable(reason).into());
                    }
                    debug!("redis publisher: message {dedup_key} redirected ({reason}); again");
                    thread::sleep(RETRY_PAUSE);
                    continue;
                }
                Err(Failure::Refused(reason) | Failure::Unknown(reason)) => reason,
            };
            if !in_doubt {
                warn!(
                    "redis publisher: message {dedup_key} in doubt ({reason}); retrying until it is known"
                );
                in_doubt = true;
            }
            if Instant::now() >= deadline {
                error!(
                    "redis publisher: message {dedup_key} still in doubt at the deadline: {reason}"
                );
                return Err(PublishError::OutcomeUnknown(format!(
                    "redis did not answer within {} ms ({reason})",
                    self.deadline.as_millis()
                )));
            }
            thread::sleep(RETRY_PAUSE);
        }
    }

    /// One attempt: the accept script; with `--redis-min-replicas`, then
    /// `WAIT` and, if enough replicas hold it, the flush script that
    /// publishes it. All on one connection, under the link's lock.
    fn accept(
        &self,
        connection: &mut dyn redis::ConnectionLike,
        room: &str,
        body: &str,
        dedup_key: &str,
    ) -> Result<Accepted, redis::RedisError> {
        let mode = if self.keys.is_cluster() {
            "sharded"
        } else {
            "plain"
        };
        let deferred = self.min_replicas > 0;
        let id: String = self
            .script
            .key(self.keys.history(room))
            .key(self.keys.last_id(room))
            .key(self.keys.accepted(room, dedup_key))
            .key(self.keys.room_channel(room))
            .key(self.keys.pending(room))
            .arg(mode)
            .arg(self.history_len)
            .arg(&body[1..])
            .arg((self.deadline + DEDUP_MARGIN).as_secs().max(1))
            .arg(self.history_ttl.as_millis() as u64)
            .arg(if deferred { "deferred" } else { "now" })
            .invoke(connection)?;
        if !deferred {
            return Ok(Accepted::Done(id));
        }
        let replicas: i64 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replicas_timeout.as_millis() as u64)
            .query(connection)?;
        if replicas < self.min_replicas as i64 {
            return Ok(Accepted::Unreplicated(id, replicas));
        }
        let (ms, seq) = id.split_once('-').unwrap_or((&id, "0"));
        self.flush
            .key(self.keys.pending(room))
            .key(self.keys.room_channel(room))
            .arg(ms)
            .arg(seq)
            .arg(mode)
            .invoke::<i64>(connection)?;
        Ok(Accepted::Done(id))
    }

    /// Publishes an ephemeral frame (typing) on the room's channel: not
    /// stored, lost if Redis is away.
    pub fn publish_ephemeral(&self, room: &str, frame: &str) {
        let channel = self.keys.room_channel(room);
        let command = self.keys.publish_command();
        let _ = self.link.run(|connection| {
            redis::cmd(command)
                .arg(&channel)
                .arg(frame)
                .query::<i64>(connection)
        });
    }
}
