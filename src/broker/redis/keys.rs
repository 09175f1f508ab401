//! Every name this server uses in Redis, in one place: the layout that
//! outside tools (a `redis-cli` injecting a message, a dashboard reading
//! `/stats`) rely on, and docs/PROTOCOL.md documents.
//!
//! Everything sits under one prefix (`--redis-prefix`, default `chat`):
//! - channel `<prefix>:room:{<room>}`, one per room: one JSON frame per
//!   message (and per join, leave, typing), exactly what clients receive.
//!   The braces are a Redis Cluster hash tag, so that every name of a room
//!   lands in one slot, and `PUBSUB CHANNELS` reads as a list of rooms;
//! - stream `<prefix>:history:<room>`: the same frame in field `m`, under
//!   the message's id, trimmed to about `--history-len` entries;
//! - string `<prefix>:last-id`: the last id handed out, so that ids
//!   increase across all rooms and all instances;
//! - string `<prefix>:accepted:<key>`, for a few minutes: the id a message
//!   got, so that a publish retried after a broken link is not accepted
//!   twice;
//! - presence, per room: a hash of names and a change counter; per
//!   instance: its liveness and the rooms it has members in
//!   ([`super::presence`]);
//! - hash `<prefix>:instances`: every instance's last `/stats` report.
//!
//! In a Redis Cluster every name of a room carries the room as its hash
//! tag (`{lobby}`), so that the accept script touches one slot, and the id
//! counter is per room.

/// The Redis names this instance uses, all under one prefix.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
    cluster: bool,
}

impl RedisKeys {
    pub fn new(prefix: &str, cluster: bool) -> Self {
        RedisKeys {
            prefix: prefix.to_string(),
            cluster,
        }
    }

    /// A room's channel: `<prefix>:room:{<room>}`.
    pub fn room_channel(&self, room: &str) -> String {
        format!("{}:room:{{{room}}}", self.prefix)
    }

    /// The room a channel of [`room_channel`](Self::room_channel) names.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":room:{")?
            .strip_suffix('}')
    }

    /// A room's messages accepted but not yet published, with
    /// `--redis-min-replicas`: each is published once enough replicas
    /// hold it.
    pub fn pending(&self, room: &str) -> String {
        if self.cluster {
            format!("{}:pending:{{{room}}}", self.prefix)
        } else {
            format!("{}:pending:{room}", self.prefix)
        }
    }

    /// A room's history stream.
    pub fn history(&self, room: &str) -> String {
        if self.cluster {
            format!("{}:history:{{{room}}}", self.prefix)
        } else {
            format!("{}:history:{room}", self.prefix)
        }
    }

    /// The counter ids of `room` come from: the chat's, or the room's.
    pub fn last_id(&self, room: &str) -> String {
        if self.cluster {
            format!("{}:last-id:{{{room}}}", self.prefix)
        } else {
            format!("{}:last-id", self.prefix)
        }
    }

    /// Where the id of an accepted message is remembered, for retries.
    pub fn accepted(&self, room: &str, dedup_key: &str) -> String {
        if self.cluster {
            format!("{}:accepted:{{{room}}}:{dedup_key}", self.prefix)
        } else {
            format!("{}:accepted:{dedup_key}", self.prefix)
        }
    }

    /// Who is in the room: name → connections by instance.
    pub fn presence(&self, room: &str) -> String {
        format!("{}:presence:{{{room}}}", self.prefix)
    }

    /// The number of the room's last presence change.
    pub fn presence_seq(&self, room: &str) -> String {
        format!("{}:presence-seq:{{{room}}}", self.prefix)
    }

    /// Every instance alive, scored by when it expires unless refreshed.
    pub fn presence_instances(&self) -> String {
        format!("{}:presence-instances", self.prefix)
    }

    /// The rooms `instance` has members in: where to clean up after it.
    pub fn presence_rooms(&self, instance: &str) -> String {
        format!("{}:presence-rooms:{instance}", self.prefix)
    }

    /// Claimed by the instance that cleans up after dead `instance`.
    pub fn presence_cleaning(&self, instance: &str) -> String {
        format!("{}:presence-cleaning:{instance}", self.prefix)
    }

    /// Every instance's last report (`/stats`): instance → JSON.
    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// Whether the names are a Redis Cluster's (every name of a room in the
    /// room's hash slot; channels published with `SPUBLISH`).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The command that publishes on a room's channel: sharded Pub/Sub in
    /// a cluster, where a plain `PUBLISH` would be broadcast to every node.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_names_its_room_and_nothing_else() {
        let keys = RedisKeys::new("chat", false);
        let channel = keys.room_channel("lobby");
        assert_eq!(channel, "chat:room:{lobby}");
        assert_eq!(keys.room_of_channel(&channel), Some("lobby"));
        assert_eq!(keys.room_of_channel("other:room:{lobby}"), None);
        assert_eq!(keys.room_of_channel("chat:history:lobby"), None);
    }

    #[test]
    fn in_a_cluster_every_name_of_a_room_shares_its_hash_tag() {
        let keys = RedisKeys::new("chat", true);
        for name in [
            keys.history("lobby"),
            keys.last_id("lobby"),
            keys.accepted("lobby", "k"),
            keys.presence("lobby"),
        ] {
            assert!(name.contains("{lobby}"), "{name}");
        }
        assert_eq!(
            RedisKeys::new("chat", false).last_id("lobby"),
            "chat:last-id"
        );
    }
}
