//! What one client knows of its room's members, from its presence frames,
//! and the check of that against who is really there.
//!
//! The protocol (docs/PROTOCOL.md, "`presence`, `presence_diff`,
//! `typing`"): a `presence` frame is the client's window, whole (`count`,
//! `offset`, `full`, `members`, `more`); a `presence_diff` brings the
//! room's `count` and, in a small room (`full`: at most
//! `--presence-full-list-max` members), the `joins`, `leaves` and `changed`
//! to apply to the whole list, or, in a large one, when the window
//! changed, the names that entered and left it (`offset`, `added`,
//! `removed`) or the window again (`offset`, `members`). Frames are applied in order and
//! idempotently (a join of someone listed, a leave of someone not listed
//! change nothing). With no `members` frame sent, a client's window is the
//! first `--presence-full-list-max` names of the room, in byte order.
//!
//! A server from before `presence_diff` sent `presence` without `count`
//! (the whole list, as far as `--presence-max-members` goes) and one
//! `join` or `leave` frame per name: a view understands those too, so that
//! one load generator measures both (`PUBSUB_CHAT_BIN`).
//!
//! Our clients' names are `c<k>` (see `layout.rs`): a listed name that is
//! a client's is kept as its number (a bit of a list, an entry of a
//! window); any other is a stranger, kept by name, and a right view has
//! none. What in a frame disagrees with the protocol is counted
//! ([`Anomalies`]): the final state is asserted, the rest reported.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

/// What a server frame is, by its `type`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Message,
    Error,
    Presence,
    PresenceDiff,
    /// A server from before `presence_diff`: one name in, one name out.
    LegacyJoin,
    LegacyLeave,
    /// `status`: whether sending works in the room (`down` or `up`).
    Status,
    Other,
}

impl Kind {
    /// The server writes `type` first: that costs a prefix; a frame
    /// written otherwise is parsed for its `type`.
    pub fn of(frame: &str) -> Kind {
        let ty: Cow<str> = match frame.strip_prefix("{\"type\":\"") {
            Some(rest) => match rest.find('"') {
                Some(end) => Cow::Borrowed(&rest[..end]),
                None => return Kind::Other,
            },
            None => {
                #[derive(Deserialize)]
                struct Typed<'a> {
                    #[serde(rename = "type", borrow)]
                    ty: Cow<'a, str>,
                }
                match serde_json::from_str::<Typed>(frame) {
                    Ok(t) => t.ty,
                    Err(_) => return Kind::Other,
                }
            }
        };
        match ty.as_ref() {
            "message" => Kind::Message,
            "error" => Kind::Error,
            "presence" => Kind::Presence,
            "presence_diff" => Kind::PresenceDiff,
            "join" => Kind::LegacyJoin,
            "leave" => Kind::LegacyLeave,
            "status" => Kind::Status,
            _ => Kind::Other,
        }
    }

    /// A frame about who is in the room (what `--presence off` never
    /// sends; `typing` is not one).
    pub fn is_presence(self) -> bool {
        matches!(
            self,
            Kind::Presence | Kind::PresenceDiff | Kind::LegacyJoin | Kind::LegacyLeave
        )
    }
}

/// Both presence frames: every field optional, so that a missing one is
/// seen (and counted) rather than failing the parse.
#[derive(Deserialize)]
struct Wire<'a> {
    count: Option<usize>,
    offset: Option<usize>,
    full: Option<bool>,
    #[serde(borrow)]
    members: Option<Vec<Member<'a>>>,
    more: Option<usize>,
    #[serde(borrow)]
    joins: Option<Vec<Member<'a>>>,
    #[serde(borrow)]
    leaves: Option<Vec<Departure<'a>>>,
    #[serde(borrow)]
    changed: Option<Vec<Member<'a>>>,
    #[serde(borrow)]
    added: Option<Vec<Member<'a>>>,
    #[serde(borrow)]
    removed: Option<Vec<Cow<'a, str>>>,
}

/// A member; its `instances` and `connections` are not checked.
#[derive(Deserialize)]
struct Member<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Departure<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
}

/// A legacy `join` or `leave`: its name, parsed by hand (a join storm on
/// a server from before is N²/2 of them), JSON for a name with escapes or
/// a frame written otherwise; and whether the reason is `expired`.
fn legacy_event(frame: &str) -> Option<(Cow<'_, str>, bool)> {
    let expired = frame.contains("\"reason\":\"expired\"");
    if let Some(at) = frame.find("\"name\":\"").map(|i| i + 8)
        && let Some(len) = frame[at..].find('"')
        && !frame[at..at + len].contains('\\')
    {
        return Some((Cow::Borrowed(&frame[at..at + len]), expired));
    }
    let wire: Departure = serde_json::from_str(frame).ok()?;
    let expired = wire.reason.as_deref() == Some("expired");
    Some((wire.name, expired))
}

/// What in a client's presence frames disagreed with the protocol, counted
/// over the frames (summed over clients in a tally).
#[derive(Clone, Copy, Default, Debug, Serialize, Deserialize)]
pub struct Anomalies {
    /// Frames that did not parse as JSON of the expected shape.
    pub unreadable: u64,
    /// Frames whose `members` were not in strictly increasing byte order
    /// of names.
    pub unsorted: u64,
    /// `presence` frames whose `more` was not `count` minus the listed.
    pub more: u64,
    /// `presence` frames whose `full` disagreed with `count` <= W.
    pub full_flag: u64,
    /// Windows (`full` false) of another length than min(W, count -
    /// offset); whole lists (`full` true) of another length than `count`.
    pub window_size: u64,
    /// Full lists whose size, after a `presence_diff` was applied, was not
    /// its `count`.
    pub size_after_diff: u64,
    /// `presence_diff` frames of the wrong shape: without `count`, with
    /// `joins`/`leaves`/`changed` for a window, with `members` for a whole
    /// list, or before any `presence`.
    pub shape: u64,
    /// `presence_diff` frames whose `count` was on the other side of W
    /// from the client's view (a room that crossed W is sent a `presence`).
    pub crossed: u64,
    /// Joins of a name already listed, and `changed` of a name not listed,
    /// in a `presence_diff` past the first after a `presence` (only the
    /// first may overlap the snapshot; a leave of a name not listed is
    /// fine anywhere: it came and went within the interval).
    pub stale: u64,
}

impl Anomalies {
    pub fn merge(&mut self, o: &Anomalies) {
        self.unreadable += o.unreadable;
        self.unsorted += o.unsorted;
        self.more += o.more;
        self.full_flag += o.full_flag;
        self.window_size += o.window_size;
        self.size_after_diff += o.size_after_diff;
        self.shape += o.shape;
        self.crossed += o.crossed;
        self.stale += o.stale;
    }

    /// Each kind, named as a report shows it.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("frames that did not parse", self.unreadable),
            ("frames whose members are not in name order", self.unsorted),
            (
                "presence frames whose more is not count - listed",
                self.more,
            ),
            (
                "presence frames whose full disagrees with count <= W",
                self.full_flag,
            ),
            (
                "windows (or whole lists) of the wrong length",
                self.window_size,
            ),
            (
                "whole lists whose size is not count after a diff",
                self.size_after_diff,
            ),
            ("presence_diff frames of the wrong shape", self.shape),
            ("presence_diff frames across W from the view", self.crossed),
            (
                "joins of names listed (changed of names not) past the first diff",
                self.stale,
            ),
        ]
    }
}

/// What a client's presence frames were, over its connections.
#[derive(Clone, Copy, Default, Debug, Serialize, Deserialize)]
pub struct Seen {
    pub snapshots: u64,
    pub diffs: u64,
    /// `join` and `leave` frames (a server from before `presence_diff`).
    pub legacy_events: u64,
    /// Snapshots that left members out (`more` > 0) of a whole list
    /// (a server from before: past `--presence-max-members`).
    pub cut_short: u64,
    /// Leaves with reason `expired` (whole lists only: a window has no
    /// per-name events).
    pub expired: u64,
    /// Joins and leaves that changed nothing: the overlap of a snapshot
    /// and the first diff, leaves of names that came and went within an
    /// interval (a legacy server: repeats).
    pub no_ops: u64,
    pub anomalies: Anomalies,
}

impl Seen {
    pub fn merge(&mut self, o: &Seen) {
        self.snapshots += o.snapshots;
        self.diffs += o.diffs;
        self.legacy_events += o.legacy_events;
        self.cut_short += o.cut_short;
        self.expired += o.expired;
        self.no_ops += o.no_ops;
        self.anomalies.merge(&o.anomalies);
    }
}

/// How a view holds the room.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The whole list (`full` true).
    Full,
    /// A window of a large room (`full` false).
    Window,
    /// The whole list, from a server from before (no `count`).
    Legacy,
}

/// A window entry that is no client's name.
const STRANGER: u32 = u32::MAX;

/// One client's view of its room: what its presence frames say.
pub struct View {
    /// The room's size, as clients count; `--presence-full-list-max`.
    clients: usize,
    w: usize,
    /// `None` before the first `presence`.
    mode: Option<Mode>,
    /// The room's members as the last frame said (not for `Legacy`).
    count: Option<usize>,
    /// The whole list: a bit per client, and the strangers.
    bits: Vec<u64>,
    listed: usize,
    strangers: BTreeSet<String>,
    /// The window: its position, and its names (clients' numbers, or
    /// `STRANGER`).
    offset: usize,
    window: Vec<u32>,
    window_strangers: usize,
    /// `presence_diff` frames applied since the last `presence`.
    diffs_since_presence: u64,
    pub seen: Seen,
}

impl View {
    pub fn new(layout: &Layout) -> Self {
        View {
            clients: layout.clients,
            w: layout.presence_window,
            mode: None,
            count: None,
            bits: Vec::new(),
            listed: 0,
            strangers: BTreeSet::new(),
            offset: 0,
            window: Vec::new(),
            window_strangers: 0,
            diffs_since_presence: 0,
            seen: Seen::default(),
        }
    }

    /// Forgets the room (a new connection gets its own `presence`), not
    /// what was seen.
    pub fn reset(&mut self) {
        self.mode = None;
        self.count = None;
        self.clear_list();
        self.window.clear();
        self.window_strangers = 0;
        self.offset = 0;
        self.diffs_since_presence = 0;
    }

    /// The room's size as this client knows it: the last `count` (a
    /// legacy view: its list's size).
    pub fn count(&self) -> Option<usize> {
        match self.mode {
            None => None,
            Some(Mode::Legacy) => Some(self.listed),
            Some(_) => self.count,
        }
    }

    pub fn has_snapshot(&self) -> bool {
        self.mode.is_some()
    }

    fn clear_list(&mut self) {
        if self.bits.is_empty() {
            self.bits = vec![0; self.clients.div_ceil(64)];
        } else {
            self.bits.iter_mut().for_each(|w| *w = 0);
        }
        self.listed = 0;
        self.strangers.clear();
    }

    /// Adds (or removes) `name` from the whole list; true when that
    /// changed it.
    fn set(&mut self, layout: &Layout, name: &str, present: bool) -> bool {
        let changed = match layout.client_of(name) {
            Some(k) => {
                let (word, bit) = (k / 64, 1u64 << (k % 64));
                let was = self.bits[word] & bit != 0;
                if was != present {
                    self.bits[word] ^= bit;
                }
                was != present
            }
            None if present => self.strangers.insert(name.to_string()),
            None => self.strangers.remove(name),
        };
        if changed {
            if present {
                self.listed += 1;
            } else {
                self.listed -= 1;
            }
        }
        changed
    }

    fn set_window(&mut self, layout: &Layout, offset: usize, members: &[Member]) {
        self.offset = offset;
        self.window.clear();
        self.window_strangers = 0;
        for m in members {
            let k = layout.client_of(&m.name).map_or(STRANGER, |k| k as u32);
            self.window_strangers += usize::from(k == STRANGER);
            self.window.push(k);
        }
    }

    /// Applies one presence frame (of kind `kind`, text `frame`).
    pub fn apply(&mut self, layout: &Layout, kind: Kind, frame: &str) {
        match kind {
            Kind::Presence => match serde_json::from_str::<Wire>(frame) {
                Ok(wire) => self.presence(layout, wire),
                Err(_) => self.seen.anomalies.unreadable += 1,
            },
            Kind::PresenceDiff => match serde_json::from_str::<Wire>(frame) {
                Ok(wire) => self.diff(layout, wire),
                Err(_) => self.seen.anomalies.unreadable += 1,
            },
            Kind::LegacyJoin | Kind::LegacyLeave => {
                self.seen.legacy_events += 1;
                let Some((name, expired)) = legacy_event(frame) else {
                    self.seen.anomalies.unreadable += 1;
                    return;
                };
                if !matches!(self.mode, Some(Mode::Legacy | Mode::Full)) {
                    self.seen.anomalies.shape += 1;
                    return;
                }
                let join = kind == Kind::LegacyJoin;
                self.seen.expired += u64::from(!join && expired);
                if !self.set(layout, &name, join) {
                    self.seen.no_ops += 1;
                }
            }
            _ => {}
        }
    }

    fn presence(&mut self, layout: &Layout, wire: Wire) {
        self.seen.snapshots += 1;
        self.diffs_since_presence = 0;
        let members = wire.members.unwrap_or_default();
        if !sorted(&members) {
            self.seen.anomalies.unsorted += 1;
        }
        let more = wire.more.unwrap_or(0);
        let Some(count) = wire.count else {
            // From before: the whole list, replacing what was known.
            self.mode = Some(Mode::Legacy);
            self.clear_list();
            for m in &members {
                self.set(layout, &m.name, true);
            }
            self.seen.cut_short += u64::from(more > 0);
            return;
        };
        self.count = Some(count);
        let listed = members.len();
        if wire.more != Some(count.saturating_sub(listed)) || listed > count {
            self.seen.anomalies.more += 1;
        }
        let full = match wire.full {
            Some(full) => full,
            None => {
                self.seen.anomalies.shape += 1;
                listed == count
            }
        };
        if full != (count <= self.w) {
            self.seen.anomalies.full_flag += 1;
        }
        let offset = wire.offset.unwrap_or(0);
        if full {
            self.mode = Some(Mode::Full);
            self.clear_list();
            for m in &members {
                self.set(layout, &m.name, true);
            }
            if listed != count || offset != 0 {
                self.seen.anomalies.window_size += 1;
            }
        } else {
            self.mode = Some(Mode::Window);
            self.set_window(layout, offset, &members);
            if listed != self.w.min(count.saturating_sub(offset)) {
                self.seen.anomalies.window_size += 1;
            }
        }
    }

    fn diff(&mut self, layout: &Layout, wire: Wire) {
        self.seen.diffs += 1;
        let first = self.diffs_since_presence == 0;
        self.diffs_since_presence += 1;
        match wire.count {
            Some(count) => self.count = Some(count),
            None => self.seen.anomalies.shape += 1,
        }
        let count = self.count.unwrap_or(0);
        let events = wire.joins.is_some() || wire.leaves.is_some() || wire.changed.is_some();
        match self.mode {
            None | Some(Mode::Legacy) => self.seen.anomalies.shape += 1,
            Some(Mode::Full) => {
                if wire.members.is_some() || wire.added.is_some() || wire.removed.is_some() {
                    self.seen.anomalies.shape += 1;
                }
                if count > self.w {
                    self.seen.anomalies.crossed += 1;
                }
                for m in wire.joins.iter().flatten() {
                    if !self.set(layout, &m.name, true) {
                        if first {
                            self.seen.no_ops += 1;
                        } else {
                            self.seen.anomalies.stale += 1;
                        }
                    }
                }
                for d in wire.leaves.iter().flatten() {
                    self.seen.expired += u64::from(d.reason.as_deref() == Some("expired"));
                    if !self.set(layout, &d.name, false) {
                        self.seen.no_ops += 1;
                    }
                }
                // Still there (a second tab, an instance less): present.
                for m in wire.changed.iter().flatten() {
                    if self.set(layout, &m.name, true) && !first {
                        self.seen.anomalies.stale += 1;
                    }
                }
                if self.listed != count {
                    self.seen.anomalies.size_after_diff += 1;
                }
            }
            Some(Mode::Window) => {
                if events {
                    self.seen.anomalies.shape += 1;
                }
                if count <= self.w {
                    self.seen.anomalies.crossed += 1;
                }
                if let Some(members) = wire.members {
                    if !sorted(&members) {
                        self.seen.anomalies.unsorted += 1;
                    }
                    let offset = wire.offset.unwrap_or(self.offset);
                    if members.len() != self.w.min(count.saturating_sub(offset)) {
                        self.seen.anomalies.window_size += 1;
                    }
                    self.set_window(layout, offset, &members);
                } else if wire.added.is_some() || wire.removed.is_some() {
                    if wire.offset != Some(self.offset) {
                        self.seen.anomalies.shape += 1;
                    }
                    let added = wire.added.unwrap_or_default();
                    self.change_window(layout, &added, &wire.removed.unwrap_or_default());
                    if self.window.len() != self.w.min(count.saturating_sub(self.offset)) {
                        self.seen.anomalies.window_size += 1;
                    }
                }
            }
        }
    }

    /// Applies what entered (or changed in) and left the window, keeping
    /// it in name order.
    fn change_window(&mut self, layout: &Layout, added: &[Member], removed: &[Cow<str>]) {
        for name in removed {
            let k = layout.client_of(name).map_or(STRANGER, |k| k as u32);
            match self.window.iter().position(|&held| held == k) {
                Some(at) => {
                    self.window.remove(at);
                    self.window_strangers -= usize::from(k == STRANGER);
                }
                None => self.seen.anomalies.stale += 1,
            }
        }
        for m in added {
            let k = layout.client_of(&m.name).map_or(STRANGER, |k| k as u32);
            if k == STRANGER || !self.window.contains(&k) {
                self.window_strangers += usize::from(k == STRANGER);
                self.window.push(k);
            }
        }
        // Strangers (never in a right view) go last.
        self.window
            .sort_by(|&a, &b| match (a == STRANGER, b == STRANGER) {
                (false, false) => by_name(a, b),
                (x, y) => x.cmp(&y),
            });
    }

    /// This view against who is in the room.
    pub fn check(&self, e: &Expected) -> Checked {
        let count_right = self.count() == Some(e.count);
        let mut c = Checked {
            count_right,
            ..Checked::default()
        };
        match self.mode {
            None => c.missing = e.count,
            Some(Mode::Full | Mode::Legacy) => {
                for (mine, want) in self.bits.iter().zip(&e.present) {
                    c.missing += (want & !mine).count_ones() as usize;
                    c.extra += (mine & !want).count_ones() as usize;
                }
                c.strangers = self.strangers.len();
                // A whole list stands for a small room only (a legacy one,
                // for any).
                c.wrong_mode = self.mode == Some(Mode::Full) && e.count > e.w;
            }
            Some(Mode::Window) => {
                let inside = self
                    .window
                    .iter()
                    .filter(|&&k| k != STRANGER && e.in_window(k))
                    .count();
                c.missing = e.window.len().saturating_sub(inside);
                c.extra = self.window.len() - self.window_strangers - inside;
                c.strangers = self.window_strangers;
                c.wrong_mode = e.count <= e.w || self.offset != 0;
            }
        }
        c.right = count_right
            && c.missing == 0
            && c.extra == 0
            && c.strangers == 0
            && !c.wrong_mode
            // A window must be the expected one in order too.
            && (self.mode != Some(Mode::Window) || self.window == e.window);
        c
    }
}

/// Clients `a` and `b` in the byte order of their names (`c<k>`), without
/// writing the names out.
fn by_name(a: u32, b: u32) -> std::cmp::Ordering {
    fn digits(k: u32, buf: &mut [u8; 10]) -> &[u8] {
        let (mut k, mut at) = (k, buf.len());
        loop {
            at -= 1;
            buf[at] = b'0' + (k % 10) as u8;
            k /= 10;
            if k == 0 {
                return &buf[at..];
            }
        }
    }
    let (mut x, mut y) = ([0u8; 10], [0u8; 10]);
    digits(a, &mut x).cmp(digits(b, &mut y))
}

fn sorted(members: &[Member]) -> bool {
    members.windows(2).all(|p| p[0].name < p[1].name)
}

/// Who is in the room, as views are checked against it.
pub struct Expected {
    /// Bit `k` set when client `k` is in the room.
    pub present: Vec<u64>,
    pub count: usize,
    /// The window a client holds by default: the first W present names,
    /// in byte order.
    pub window: Vec<u32>,
    /// A bit per client of `window`.
    window_bits: Vec<u64>,
    pub w: usize,
}

impl Expected {
    /// `present` as a bit per client; `by_name` every client in name order
    /// (`Layout::by_name`).
    pub fn new(present: Vec<u64>, by_name: &[u32], w: usize) -> Self {
        let is = |k: u32| {
            present
                .get(k as usize / 64)
                .is_some_and(|b| b & (1 << (k % 64)) != 0)
        };
        let count = present.iter().map(|b| b.count_ones() as usize).sum();
        let window: Vec<u32> = by_name.iter().copied().filter(|&k| is(k)).take(w).collect();
        let mut window_bits = vec![0u64; present.len()];
        for &k in &window {
            window_bits[k as usize / 64] |= 1 << (k % 64);
        }
        Expected {
            present,
            count,
            window,
            window_bits,
            w,
        }
    }

    fn in_window(&self, k: u32) -> bool {
        self.window_bits
            .get(k as usize / 64)
            .is_some_and(|b| b & (1 << (k % 64)) != 0)
    }
}

/// One view against [`Expected`].
#[derive(Default, Debug)]
pub struct Checked {
    pub count_right: bool,
    /// The count, and the list or window, exactly.
    pub right: bool,
    /// Names that should be listed (in the window, or the whole list) and
    /// are not; listed and should not be; strangers listed.
    pub missing: usize,
    pub extra: usize,
    pub strangers: usize,
    /// A whole list for a large room, a window for a small one, or a
    /// window that does not start at 0.
    pub wrong_mode: bool,
}
