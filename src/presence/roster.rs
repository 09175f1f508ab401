//! One room's members as this instance knows them: a replica of the room's
//! presence in Redis, kept in step by the changes that travel on the
//! room's channel, each numbered (`seq`) so that a missed one is noticed.
//!
//! It also remembers, until the next diff is taken, which names changed,
//! whether each was in the room before, and at which version of the room
//! (the tracker's count of the changes it took) it changed last: a diff
//! then says where each of them stands now, however many joins and leaves
//! happened in between, and a client whose list is newer than the last
//! diff is told only the names that changed after it.

use std::collections::{BTreeMap, HashMap};

use crate::broker::{Connections, PresenceSnapshot};
use crate::protocol::{Departure, LeaveReason, MemberChange, MembersExpired, PresenceMember};

/// What a change did to the roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// Already in the roster (its `seq` is not past the roster's).
    Old,
    /// Changes before it were missed: the roster must be read again.
    Gap,
}

/// The changes of a room since the last diff: what a `presence_diff` of a
/// small room lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub joins: Vec<PresenceMember>,
    pub leaves: Vec<Departure>,
    pub changed: Vec<PresenceMember>,
    /// The version at which each name changed last.
    at: HashMap<String, u64>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty() && self.changed.is_empty()
    }

    /// Only the names that changed after `version`.
    pub fn since(&self, version: u64) -> Changes {
        let after = |name: &str| self.at.get(name).is_some_and(|at| *at > version);
        Changes {
            joins: self
                .joins
                .iter()
                .filter(|m| after(&m.name))
                .cloned()
                .collect(),
            leaves: self
                .leaves
                .iter()
                .filter(|d| after(&d.name))
                .cloned()
                .collect(),
            changed: self
                .changed
                .iter()
                .filter(|m| after(&m.name))
                .cloned()
                .collect(),
            at: HashMap::new(),
        }
    }
}

/// A name changed since the last diff: what it was then, and the version
/// of its last change.
#[derive(Debug)]
struct Touched {
    before: Option<Connections>,
    at: u64,
}

#[derive(Debug, Default)]
pub struct Roster {
    /// Name → connections by instance; every name has at least one.
    members: BTreeMap<String, Connections>,
    /// The number of the last change in the roster.
    seq: u64,
    /// Names changed since the last diff.
    touched: BTreeMap<String, Touched>,
    /// How each name that left since the last diff left: its instance and
    /// why.
    departures: HashMap<String, (String, LeaveReason)>,
}

impl Roster {
    pub fn new(snapshot: PresenceSnapshot) -> Self {
        Roster {
            members: snapshot.members,
            seq: snapshot.seq,
            ..Roster::default()
        }
    }

    /// Members in the room.
    pub fn count(&self) -> usize {
        self.members.len()
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether a change numbered `seq` comes next, is already in, or comes
    /// after a gap.
    fn order(&self, seq: u64) -> Applied {
        if seq <= self.seq {
            Applied::Old
        } else if seq == self.seq + 1 {
            Applied::Yes
        } else {
            Applied::Gap
        }
    }

    /// Notes what `name` was before its first change since the last diff,
    /// and that it changed at version `at`.
    fn touch(&mut self, name: &str, at: u64) {
        match self.touched.get_mut(name) {
            Some(touched) => touched.at = at,
            None => {
                let before = self.members.get(name).cloned();
                self.touched
                    .insert(name.to_string(), Touched { before, at });
            }
        }
    }

    /// Applies a change, which makes version `at` of the room if it comes
    /// next.
    pub fn apply_change(&mut self, change: &MemberChange, at: u64) -> Applied {
        let order = self.order(change.seq);
        if order != Applied::Yes {
            return order;
        }
        self.seq = change.seq;
        self.touch(&change.name, at);
        let connections = self.members.entry(change.name.clone()).or_default();
        connections.add(&change.instance, change.delta);
        if connections.is_empty() {
            self.members.remove(&change.name);
            let reason = change.reason.unwrap_or(LeaveReason::Left);
            self.departures
                .insert(change.name.clone(), (change.instance.clone(), reason));
        }
        Applied::Yes
    }

    pub fn apply_expired(&mut self, expired: &MembersExpired, at: u64) -> Applied {
        let order = self.order(expired.seq);
        if order != Applied::Yes {
            return order;
        }
        self.seq = expired.seq;
        for name in &expired.names {
            if !self.members.contains_key(name) {
                continue;
            }
            self.touch(name, at);
            let Some(connections) = self.members.get_mut(name) else {
                continue;
            };
            connections.remove(&expired.instance);
            if connections.is_empty() {
                self.members.remove(name);
                self.departures.insert(
                    name.clone(),
                    (expired.instance.clone(), LeaveReason::Expired),
                );
            }
        }
        Applied::Yes
    }

    /// Takes a fresh reading whole (after a gap, or a rewrite): what
    /// differs from the roster is noted as changed, for the next diff. A
    /// name gone this way left for an unknown reason: `expired`, its
    /// instance the last it was seen on.
    pub fn replace(&mut self, snapshot: PresenceSnapshot, at: u64) {
        let names: Vec<String> = self
            .members
            .keys()
            .chain(snapshot.members.keys())
            .cloned()
            .collect();
        for name in names {
            if self.members.get(&name) != snapshot.members.get(&name) {
                self.touch(&name, at);
                if !snapshot.members.contains_key(&name)
                    && let Some(instance) = self.members[&name].instances().next_back()
                {
                    self.departures
                        .insert(name.clone(), (instance.clone(), LeaveReason::Expired));
                }
            }
        }
        self.members = snapshot.members;
        self.seq = snapshot.seq;
    }

    /// What changed since the last diff, and forgets it. Every name
    /// touched since is listed by where it stands now (a join if it was
    /// not in the room then, a leave if it is not now, changed otherwise):
    /// a client whose list was read between two diffs may hold any state
    /// in between, and ends right whichever it held.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes::default();
        let departures = std::mem::take(&mut self.departures);
        for (name, Touched { before, at }) in std::mem::take(&mut self.touched) {
            changes.at.insert(name.clone(), at);
            match (before, self.members.get(&name)) {
                (None, Some(now)) => changes.joins.push(member(&name, now)),
                (Some(_), Some(now)) => changes.changed.push(member(&name, now)),
                (_, None) => {
                    let (instance, reason) = departures
                        .get(&name)
                        .cloned()
                        .unwrap_or((String::new(), LeaveReason::Left));
                    changes.leaves.push(Departure {
                        name,
                        instance,
                        reason,
                    });
                }
            }
        }
        changes
    }

    /// Up to `limit` members from position `offset`, in name order.
    pub fn window(&self, offset: usize, limit: usize) -> Vec<PresenceMember> {
        self.members
            .iter()
            .skip(offset)
            .take(limit)
            .map(|(name, connections)| member(name, connections))
            .collect()
    }
}

/// A member as frames list it.
fn member(name: &str, connections: &Connections) -> PresenceMember {
    PresenceMember {
        name: name.to_string(),
        instances: connections.instances().cloned().collect(),
        connections: connections.total(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, instance: &str, delta: i64, seq: u64) -> MemberChange {
        MemberChange {
            room: "r".into(),
            name: name.into(),
            instance: instance.into(),
            delta,
            reason: (delta < 0).then_some(LeaveReason::Left),
            seq,
        }
    }

    fn names(members: &[PresenceMember]) -> Vec<&str> {
        members.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn changes_are_applied_in_order_and_a_skipped_one_is_a_gap() {
        let mut roster = Roster::default();
        assert_eq!(
            roster.apply_change(&change("bo", "a", 1, 1), 1),
            Applied::Yes
        );
        assert_eq!(
            roster.apply_change(&change("al", "b", 1, 2), 2),
            Applied::Yes
        );
        assert_eq!(
            roster.apply_change(&change("al", "b", 1, 2), 2),
            Applied::Old
        );
        assert_eq!(
            roster.apply_change(&change("al", "a", 1, 4), 4),
            Applied::Gap
        );
        assert_eq!(roster.count(), 2);
        assert_eq!(names(&roster.window(0, 10)), ["al", "bo"]);
        assert_eq!(names(&roster.window(1, 10)), ["bo"]);
    }

    #[test]
    fn a_diff_says_what_changed_since_the_last_however_many_changes_between() {
        let mut roster = Roster::new(PresenceSnapshot {
            seq: 10,
            members: BTreeMap::from([
                ("al".to_string(), Connections::one("a", 1)),
                ("bo".to_string(), Connections::one("a", 1)),
            ]),
        });
        // cy comes and goes: said as a leave (a client that read the room
        // while cy was in it must drop it). al leaves. bo opens a tab on b.
        // dee joins.
        roster.apply_change(&change("cy", "a", 1, 11), 11);
        roster.apply_change(&change("cy", "a", -1, 12), 12);
        roster.apply_change(&change("al", "a", -1, 13), 13);
        roster.apply_change(&change("bo", "b", 1, 14), 14);
        roster.apply_change(&change("dee", "b", 1, 15), 15);
        let changes = roster.take_changes();
        assert_eq!(names(&changes.joins), ["dee"]);
        let leaves: Vec<_> = changes
            .leaves
            .iter()
            .map(|leave| (leave.name.as_str(), leave.reason))
            .collect();
        assert_eq!(
            leaves,
            [("al", LeaveReason::Left), ("cy", LeaveReason::Left)]
        );
        assert_eq!(changes.changed[0].instances, ["a", "b"]);
        assert!(roster.take_changes().is_empty(), "taken once");
    }

    #[test]
    fn an_expired_instance_leaves_its_names_with_their_other_tabs_kept() {
        let mut roster = Roster::default();
        roster.apply_change(&change("al", "a", 1, 1), 1);
        roster.apply_change(&change("al", "b", 1, 2), 2);
        roster.apply_change(&change("bo", "b", 1, 3), 3);
        roster.take_changes();
        let expired = MembersExpired {
            room: "r".into(),
            instance: "b".into(),
            names: vec!["al".into(), "bo".into()],
            seq: 4,
        };
        assert_eq!(roster.apply_expired(&expired, 4), Applied::Yes);
        let changes = roster.take_changes();
        assert_eq!(changes.leaves[0].name, "bo");
        assert_eq!(changes.leaves[0].reason, LeaveReason::Expired);
        assert_eq!(changes.changed[0].instances, ["a"]);
    }

    #[test]
    fn a_fresh_reading_is_diffed_against_the_roster() {
        let mut roster = Roster::default();
        roster.apply_change(&change("al", "a", 1, 1), 1);
        roster.apply_change(&change("bo", "a", 1, 2), 2);
        roster.take_changes();
        roster.replace(
            PresenceSnapshot {
                seq: 9,
                members: BTreeMap::from([
                    ("bo".to_string(), Connections::one("a", 1)),
                    ("cy".to_string(), Connections::one("b", 2)),
                ]),
            },
            3,
        );
        let changes = roster.take_changes();
        assert_eq!(names(&changes.joins), ["cy"]);
        assert_eq!(changes.leaves[0].name, "al");
        assert!(changes.changed.is_empty());
        assert_eq!(roster.seq(), 9);
    }

    #[test]
    fn a_list_newer_than_the_last_diff_is_told_only_what_changed_after_it() {
        let mut roster = Roster::default();
        roster.apply_change(&change("al", "a", 1, 1), 1);
        roster.apply_change(&change("bo", "a", 1, 2), 2);
        // A client read the room here, at version 2.
        roster.apply_change(&change("al", "a", -1, 3), 3);
        roster.apply_change(&change("cy", "a", 1, 4), 4);
        let changes = roster.take_changes();
        assert_eq!(names(&changes.joins), ["bo", "cy"]);
        let newer = changes.since(2);
        assert_eq!(names(&newer.joins), ["cy"]);
        assert_eq!(newer.leaves[0].name, "al");
        assert!(changes.since(4).is_empty());
    }
}
