/* Presence: who is in the room (the member list) and who is typing.
 *
 * Separate because it is the room's other story, told alongside the
 * messages: it keeps its own picture of the room from `presence`,
 * `presence_diff` and `typing` frames, and writes only the join and leave
 * lines into the conversation. How fresh that picture can be follows the
 * connection state (refreshMembersStale).
 */

import { el, h, avatar, nameHue } from './dom.js';
import { fmtTime, byName } from './format.js';
import { S } from './session.js';
import { phase, canSend } from './state.js';
import { appendLine } from './conversation.js';

var TYPING_SEND_MS = 2000;  // at most one "typing" frame this often
var TYPING_SHOW_MS = 3000;  // "bob is typing…" lasts this long after his last one
var NARROW_MEDIA = '(max-width: 640px)'; // keep in step with style.css
var WINDOW_STEP = 100;      // a larger window asks for this many more members
var WINDOW_MAX = 1000;      // the most a `members` frame may ask for (the server's default --presence-max-members)
var NEAR_BOTTOM_PX = 150;   // "scrolled near the bottom": the list ends this close below what shows
var ASK_TIMEOUT_MS = 10000; // an unanswered `members` frame stops blocking the next one after this
var SUMMARY_NAMES = 10;     // names in the collapsed one-line summary (it ellipsizes anyway)

// The member list is the window the server gave us: the whole room while
// it is small (`full`), the first members by name while it is large.
var members = new Map();  // key -> {key, name, user, instances, connections}: what we hold
var count = 0;            // members in the room, over every instance
var offset = 0;           // the room-list position of the first member held
var full = true;          // the held list is the whole room; changes come per name
var shown = new Map();    // key -> {li, key}: each held member's <li>, and what it shows
var asking = null;        // {cid, ws, timer}: a larger window asked for, until a `presence` answers
var askSeq = 0;
var askCeiling = WINDOW_MAX; // lowered if the server refuses a window size
var wanted = 0;           // the window size we last asked for: asked again after a reconnection
var typing = new Map();   // key -> {name, until}: until when (ms) "is typing" shows
var typingTimer = null;
var lastTypingSent = 0;
var enabled = true;       // false when /config.json says the server runs --presence off

// ---------------------------------------------------------------- members
// With `--auth token` a member is a display name AND a user id (the
// token's sub): two users may share a name, and are two members. Every
// map here is keyed by memberKey(): the name alone without a user (so
// `--auth off` works exactly as before), name + U+001F + user with one
// (a control character, which no name can hold).

/** The key of a member: its name, and its user if it has one. */
function memberKey(name, user) {
  return typeof user === 'string' && user !== '' ? name + '\u001f' + user : name;
}

/** A frame's user id, or null. */
function userOf(x) {
  return x && typeof x.user === 'string' && x.user !== '' ? x.user : null;
}

/** Is this member (or typist) us? By name, and by user when there is one. */
function isMine(name, user) {
  if (name !== S.name) return false;
  return !user || !S.user || user === S.user;
}

function myKey() { return memberKey(S.name, S.user); }

// A `presence` frame replaces what we hold; a `presence_diff` says what
// changed since: per name (joins, leaves, changed) in a small room, the
// window whole in a large one. The first snapshot and the first diff
// overlap around a (re)connection, so per-name changes are applied
// idempotently: a join of someone held, or a leave of someone not held,
// changes nothing and writes no line.

/** A member from a frame, or null if it is not usable. */
function readMember(m) {
  if (!m || typeof m.name !== 'string' || m.name === '') return null;
  var instances = Array.isArray(m.instances)
    ? m.instances.filter(function (i) { return typeof i === 'string' && i !== ''; })
    : [];
  var connections = Number.isInteger(m.connections) && m.connections > 0 ? m.connections : 1;
  var user = userOf(m);
  return { key: memberKey(m.name, user), name: m.name, user: user, instances: instances, connections: connections };
}

function readMembers(list) {
  var out = new Map();
  list.forEach(function (raw) {
    var m = readMember(raw);
    if (m) out.set(m.key, m);
  });
  return out;
}

/** A count from a frame, or null if it is not one. */
function countOf(n) { return Number.isInteger(n) && n >= 0 ? n : null; }

function forThisRoom(frame) {
  return !(frame.room && S.room && frame.room !== S.room);
}

/** Members in the room that we do not hold (past the window). */
function notHeld() { return Math.max(0, count - offset - members.size); }

export function onPresenceFrame(frame) {
  if (!Array.isArray(frame.members) || !forThisRoom(frame)) {
    console.warn('[chat] presence frame ignored', frame);
    return;
  }
  // A snapshot replaces the list: it is the server's word after a
  // (re)connection, a change of room size, or our `members` frame, and
  // what we missed meanwhile is not replayed.
  members = readMembers(frame.members);
  var more = countOf(frame.more) || 0;
  count = countOf(frame.count);
  if (count === null) count = members.size + more; // a server from before `count`
  offset = countOf(frame.offset) || 0;
  full = frame.full !== false;
  var me = members.get(myKey());
  if (S.uncountOld && me && me.connections > 1) me.connections -= 1;
  S.uncountOld = false;
  S.presenceFresh = true;
  var answer = !!asking && asking.ws === S.ws;
  answered();
  renderMembers();
  refreshMembersStale();
  // A new socket starts with the server's default window: ask again for
  // the one the user had scrolled to (not in answer to our own question,
  // which could go round for ever if the server gave less than asked).
  if (!answer && !full && wanted > offset + members.size && notHeld()) askForMore(wanted);
}

export function onPresenceDiffFrame(frame) {
  if (!forThisRoom(frame)) {
    console.warn('[chat] presence_diff frame ignored', frame);
    return;
  }
  var n = countOf(frame.count);
  if (n !== null) count = n;
  if (Array.isArray(frame.members)) {
    // A large room: our window, whole. Nobody's coming or going is news.
    members = readMembers(frame.members);
    offset = countOf(frame.offset) || 0;
    full = false;
  } else if (Array.isArray(frame.added) || Array.isArray(frame.removed)) {
    // A large room: who entered and left our window (a shift counts too),
    // not joins and leaves of the room, so no line in the chat.
    // `removed` holds names (`--auth off`) or {name, user} (`--auth token`).
    (Array.isArray(frame.removed) ? frame.removed : []).forEach(function (gone) {
      if (typeof gone === 'string') members.delete(gone);
      else if (gone && typeof gone.name === 'string') members.delete(memberKey(gone.name, userOf(gone)));
    });
    (Array.isArray(frame.added) ? frame.added : []).forEach(function (raw) {
      var m = readMember(raw);
      if (m) members.set(m.key, m);
    });
    full = false;
  }
  if (Array.isArray(frame.leaves)) frame.leaves.forEach(applyLeave);
  if (Array.isArray(frame.joins)) frame.joins.forEach(applyJoin);
  if (Array.isArray(frame.changed)) {
    // Still in the room, with another tab or one instance less. One we did
    // not hold is in the room all the same (the snapshot overlapped).
    frame.changed.forEach(function (raw) {
      var m = readMember(raw);
      if (m) members.set(m.key, m);
    });
  }
  renderMembers();
}

function applyJoin(raw) {
  var m = readMember(raw);
  if (!m) return;
  var known = members.has(m.key);
  members.set(m.key, m); // the join's instances are newer than what we held
  if (!known) addPresenceLine('join', m.name, m.user, m.instances.join(', '), '');
}

function applyLeave(raw) {
  if (!raw || typeof raw.name !== 'string' || raw.name === '') return;
  var user = userOf(raw);
  clearTyping(raw.name, user);
  if (!members.delete(memberKey(raw.name, user))) return;
  var instance = typeof raw.instance === 'string' ? raw.instance : '';
  addPresenceLine('leave', raw.name, user, instance, raw.reason === 'expired' ? 'expired' : 'left');
}

/** A member's user id, small and muted after its name ("@u1"): two who share a name are told apart. */
function userTag(user, cls) {
  var tag = h('span', cls, '@' + user);
  tag.setAttribute('data-testid', 'user-tag');
  tag.title = 'user id ' + user;
  return tag;
}

/** "bob joined (instance b)", "bob left", "bob left (instance b stopped answering)". */
function addPresenceLine(kind, name, user, instance, reason) {
  var li = h('li', 'presence-line presence-' + kind);
  li.setAttribute('data-testid', 'presence-event');
  li.setAttribute('data-kind', kind);
  li.setAttribute('data-name', name);
  if (user) li.setAttribute('data-user', user);
  li.setAttribute('data-instance', instance);
  if (reason) li.setAttribute('data-reason', reason);
  li.setAttribute('role', 'status');
  li.style.setProperty('--hue', String(nameHue(name)));
  li.appendChild(h('span', 'notice-time', fmtTime(Date.now())));
  var text = h('span', 'presence-text');
  text.setAttribute('data-testid', 'presence-text');
  var who = h('strong', 'presence-name');
  who.appendChild(h('bdi', null, name));
  text.appendChild(who);
  if (user) {
    text.appendChild(document.createTextNode(' '));
    text.appendChild(userTag(user, 'presence-user'));
  }
  if (kind === 'join') {
    // Joins are coalesced: two tabs on two instances can arrive as one.
    var where = instance.indexOf(', ') >= 0 ? ' (instances ' : ' (instance ';
    text.appendChild(document.createTextNode(instance ? ' joined' + where + instance + ')' : ' joined'));
  } else if (reason === 'expired') {
    // Its instance died without saying goodbye; the others noticed when
    // it stopped refreshing its presence.
    text.appendChild(document.createTextNode(instance
      ? ' left (instance ' + instance + ' stopped answering)'
      : ' left (its instance stopped answering)'));
  } else {
    text.appendChild(document.createTextNode(' left'));
  }
  li.appendChild(text);
  appendLine(li);
}

function buildMember(m) {
  var mine = isMine(m.name, m.user);
  var li = h('li', 'member' + (mine ? ' mine' : ''));
  li.setAttribute('data-testid', 'member');
  li.setAttribute('data-name', m.name);
  if (m.user) li.setAttribute('data-user', m.user);
  li.setAttribute('data-connections', String(m.connections));
  li.style.setProperty('--hue', String(nameHue(m.name)));
  li.appendChild(avatar(m.name));
  var body = h('div', 'member-body');
  var top = h('div', 'member-top');
  var name = h('bdi', 'member-name', m.name);
  name.setAttribute('data-testid', 'member-name');
  top.appendChild(name);
  if (m.user) top.appendChild(userTag(m.user, 'member-user'));
  if (mine) top.appendChild(h('span', 'msg-you', 'you'));
  body.appendChild(top);
  var meta = h('div', 'member-meta');
  var tabs = h('span', 'member-tabs', m.connections === 1 ? '1 tab' : m.connections + ' tabs');
  tabs.setAttribute('data-testid', 'member-connections');
  meta.appendChild(tabs);
  m.instances.forEach(function (id) {
    var badge = h('span', 'badge', id);
    badge.setAttribute('data-testid', 'member-instance');
    badge.title = 'connected to instance ' + id;
    meta.appendChild(badge);
  });
  body.appendChild(meta);
  li.appendChild(body);
  return li;
}

/** What a member's <li> shows: when it changes, the <li> is built again. */
function rowKey(m) {
  return m.connections + '|' + m.instances.join(',') + '|' + (isMine(m.name, m.user) ? 'you' : '');
}

/**
 * Brings the list's <li>s in step with `sorted`, touching only what
 * changed: a frame in a room of a thousand moves a few rows, and a full
 * rebuild would lose the reader's scroll position and focus each time.
 */
function syncList(sorted) {
  var list = el.memberList;
  var keep = new Set(sorted.map(function (m) { return m.key; }));
  shown.forEach(function (row, key) {
    if (keep.has(key)) return;
    list.removeChild(row.li);
    shown.delete(key);
  });
  // What is left is in name order, as `sorted` is: walk both together,
  // inserting the new rows where they belong.
  var next = list.firstChild;
  sorted.forEach(function (m) {
    var key = rowKey(m);
    var row = shown.get(m.key);
    if (!row || row.key !== key) {
      var li = buildMember(m);
      if (row) list.replaceChild(li, row.li);
      if (row && next === row.li) next = li;
      row = { li: li, key: key };
      shown.set(m.key, row);
    }
    if (row.li === next) next = next.nextSibling;
    else list.insertBefore(row.li, next);
  });
}

function renderMembers() {
  var sorted = Array.from(members.values()).sort(function (a, b) {
    // By name; namesakes by user id (the server's order).
    return byName(a.name, b.name) || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
  });
  syncList(sorted);
  el.membersCount.textContent = String(count);
  el.membersCount.title = count === 1 ? '1 person in this room' : count + ' people in this room';
  // The one-line summary is what a phone shows while the list is collapsed.
  var names = sorted.slice(0, SUMMARY_NAMES).map(function (m) { return m.name; });
  var rest = Math.max(0, count - names.length);
  el.membersSummary.textContent = names.join(', ') + (rest ? ' +' + rest : '');
  var more = notHeld();
  el.membersMore.textContent = more ? 'and ' + more + ' more' : '';
  el.membersMore.hidden = !more;
  el.membersLoad.hidden = !canAskMore();
}

// ---------------------------------------------------------------- a larger window
// A large room shows the first members by name; scrolling to the bottom
// of the list (or the "show more" button, for a list too short to
// scroll) asks for WINDOW_STEP more, from the top: one window, so that
// every later `presence_diff` keeps all of it up to date.

function canAskMore() {
  return !full && notHeld() > 0 && offset + members.size < askCeiling;
}

function askForMore(limit) {
  if (asking || !S.ws || !canSend()) return;
  limit = Math.min(limit, askCeiling);
  if (limit <= 0) return;
  askSeq += 1;
  var cid = 'members-' + askSeq;
  try {
    S.ws.send(JSON.stringify({ type: 'members', offset: 0, limit: limit, cid: cid }));
  } catch (e) {
    console.warn('[chat] members frame not sent', e);
    return;
  }
  wanted = Math.max(wanted, limit);
  // Until its `presence` comes, one question is enough (scroll events come
  // by the dozen); a lost answer must not block the list for good.
  asking = { cid: cid, ws: S.ws, timer: setTimeout(answered, ASK_TIMEOUT_MS) };
  el.membersLoad.disabled = true;
}

function answered() {
  if (asking) clearTimeout(asking.timer);
  asking = null;
  el.membersLoad.disabled = false;
}

function askIfNearBottom() {
  if (!canAskMore() || asking) return;
  var list = el.memberList;
  if (!list.getClientRects().length) return; // collapsed (a phone) or hidden
  // The list ends below what shows of it: the aside scrolls as a whole on
  // a wide screen, the panel on a narrow one.
  var visibleBottom = Math.min(window.innerHeight,
    el.members.getBoundingClientRect().bottom, el.membersPanel.getBoundingClientRect().bottom);
  if (list.getBoundingClientRect().bottom - visibleBottom > NEAR_BOTTOM_PX) return;
  askForMore(offset + members.size + WINDOW_STEP);
}

/** An `error` frame about our `members` frame: true if it was ours. */
export function onMembersError(frame) {
  if (!asking || typeof frame.cid !== 'string' || frame.cid !== asking.cid) return false;
  console.warn('[chat] members frame refused', frame);
  // A size the server refuses will be refused again: stay at what we hold.
  if (frame.code === 'bad_request') askCeiling = offset + members.size;
  answered();
  renderMembers();
  return true;
}

// Scroll events do not bubble, but the aside sees its panel's in the
// capture phase; one check per frame is plenty.
var scrollQueued = false;
el.members.addEventListener('scroll', function () {
  if (scrollQueued) return;
  scrollQueued = true;
  window.requestAnimationFrame(function () {
    scrollQueued = false;
    askIfNearBottom();
  });
}, true);

el.membersLoad.addEventListener('click', function () {
  if (canAskMore()) askForMore(offset + members.size + WINDOW_STEP);
});

// The list is only as good as the server's link to Redis: while it is
// down (or we are not connected), joins and leaves on other instances do
// not reach us, so say so instead of showing a confident, wrong list.
export function refreshMembersStale() {
  var text = '';
  var ph = phase();
  if (ph === 'idle') text = '';
  else if (ph === 'paused') text = 'may be out of date — the server lost its link to Redis';
  else if (ph === 'halted') text = 'may be out of date — not connected';
  else if (ph !== 'connected') text = 'may be out of date — reconnecting';
  else if (!S.presenceFresh) text = members.size ? 'may be out of date — updating' : 'loading…';
  el.membersStale.textContent = text;
  el.membersStale.hidden = text === '';
  el.members.setAttribute('data-stale', text ? 'true' : 'false');
}

// On a wide screen the list is a sidebar that is always shown; on a narrow
// one it collapses to a one-line summary above the conversation.
var narrow = typeof window.matchMedia === 'function' ? window.matchMedia(NARROW_MEDIA) : null;

function syncMembersToggle() {
  var collapsible = !!(narrow && narrow.matches);
  var open = el.members.getAttribute('data-open') === 'true';
  el.membersToggle.disabled = !collapsible;
  el.membersToggle.setAttribute('aria-expanded', String(!collapsible || open));
}

el.membersToggle.addEventListener('click', function () {
  var open = el.members.getAttribute('data-open') === 'true';
  el.members.setAttribute('data-open', String(!open));
  syncMembersToggle();
});
if (narrow) {
  if (typeof narrow.addEventListener === 'function') narrow.addEventListener('change', syncMembersToggle);
  else if (typeof narrow.addListener === 'function') narrow.addListener(syncMembersToggle);
}
syncMembersToggle();

// ---------------------------------------------------------------- typing
export function onTypingFrame(frame) {
  if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) return;
  // Ourselves typing is another tab of ours (or, without users, a namesake): not news here.
  var user = userOf(frame);
  if (isMine(frame.name, user)) return;
  var key = memberKey(frame.name, user);
  typing.delete(key); // re-insert: names show in the order they last typed
  typing.set(key, { name: frame.name, until: Date.now() + TYPING_SHOW_MS });
  renderTyping();
}

/** `name` (of `user`, if it has one) is not typing any more. */
export function clearTyping(name, user) {
  if (typeof name !== 'string') return;
  if (typing.delete(memberKey(name, typeof user === 'string' ? user : null))) renderTyping();
}

/** "bob is typing…", "bob and carol are typing…", "bob, carol and 2 others are typing…". */
function renderTyping() {
  var now = Date.now();
  var names = [];
  var next = Infinity;
  typing.forEach(function (t, key) {
    if (t.until <= now) {
      typing.delete(key);
    } else {
      names.push(t.name);
      next = Math.min(next, t.until);
    }
  });
  clearTimeout(typingTimer);
  typingTimer = names.length ? setTimeout(renderTyping, next - now + 20) : null;

  var box = el.typing;
  while (box.firstChild) box.removeChild(box.firstChild);
  box.setAttribute('data-names', names.join('\n'));
  if (!names.length) return;
  var shown = names.length > 3 ? names.slice(0, 2) : names;
  var others = names.length - shown.length;
  shown.forEach(function (name, i) {
    if (i > 0) box.appendChild(document.createTextNode(i === shown.length - 1 && !others ? ' and ' : ', '));
    var who = h('strong');
    who.appendChild(h('bdi', null, name));
    box.appendChild(who);
  });
  if (others) box.appendChild(document.createTextNode(' and ' + others + ' others'));
  box.appendChild(document.createTextNode(names.length === 1 ? ' is typing…' : ' are typing…'));
}

// Tell the room we are typing, at most once per TYPING_SEND_MS: the others
// keep the line up for TYPING_SHOW_MS, longer than our interval, so a
// steady typist shows without a flicker. Not while delivery is down: the
// frame could not reach the other instances anyway.
export function noteTyping() {
  if (!enabled || !canSend() || !S.ws) return;
  if (el.input.value.trim() === '') return;
  var now = Date.now();
  if (now - lastTypingSent < TYPING_SEND_MS) return;
  lastTypingSent = now;
  try {
    S.ws.send(JSON.stringify({ type: 'typing' }));
  } catch (e) {
    console.warn('[chat] typing frame not sent', e);
  }
}

/** With `--presence off` the server lists nobody and relays no typing:
 * the page hides its member list and sends no `typing` frame. */
export function applyPresenceConfig(cfg) {
  enabled = !(cfg && cfg.presence === false);
  var aside = document.getElementById('members');
  if (aside) aside.setAttribute('data-presence', enabled ? 'on' : 'off');
}

/** Forget the room's members and typists (joining, leaving). */
export function resetPresence() {
  members = new Map();
  count = 0;
  offset = 0;
  full = true;
  answered();
  askCeiling = WINDOW_MAX;
  wanted = 0;
  S.presenceFresh = false;
  typing = new Map();
  lastTypingSent = 0;
  renderMembers();
  renderTyping();
}
