/* Presence: who is in the room (the member list) and who is typing.
 *
 * Separate because it is the room's other story, told alongside the
 * messages: it keeps its own picture of the room from `presence`, `join`,
 * `leave` and `typing` frames, and writes only the join and leave lines
 * into the conversation. How fresh that picture can be follows the
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

var members = new Map();  // name -> {name, instances, connections}
var moreMembers = 0;      // members the server did not list
var typing = new Map();   // name -> time (ms) until which "is typing" shows
var typingTimer = null;
var lastTypingSent = 0;

// ---------------------------------------------------------------- members
// The member list is the server's last `presence` snapshot plus the `join`
// and `leave` events since. Snapshot and events overlap around a
// (re)connection, so events are applied idempotently: a join for someone
// listed, or a leave for someone not listed, leaves the list alone.

/** A member from a snapshot, or null if it is not usable. */
function readMember(m) {
  if (!m || typeof m.name !== 'string' || m.name === '') return null;
  var instances = Array.isArray(m.instances)
    ? m.instances.filter(function (i) { return typeof i === 'string' && i !== ''; })
    : [];
  var connections = Number.isInteger(m.connections) && m.connections > 0 ? m.connections : 1;
  return { name: m.name, instances: instances, connections: connections };
}

function forThisRoom(frame) {
  return !(frame.room && S.room && frame.room !== S.room);
}

export function onPresenceFrame(frame) {
  if (!Array.isArray(frame.members) || !forThisRoom(frame)) {
    console.warn('[chat] presence frame ignored', frame);
    return;
  }
  // A snapshot replaces the list: it is the server's word after a
  // (re)connection, and events we missed meanwhile are not replayed.
  var snapshot = new Map();
  frame.members.forEach(function (raw) {
    var m = readMember(raw);
    if (m) snapshot.set(m.name, m);
  });
  members = snapshot;
  moreMembers = Number.isInteger(frame.more) && frame.more > 0 ? frame.more : 0;
  var me = snapshot.get(S.name);
  if (S.uncountOld && me && me.connections > 1) me.connections -= 1;
  S.uncountOld = false;
  S.presenceFresh = true;
  renderMembers();
  refreshMembersStale();
}

export function onJoinFrame(frame) {
  if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) {
    console.warn('[chat] join frame ignored', frame);
    return;
  }
  var instance = typeof frame.instance === 'string' ? frame.instance : '';
  addPresenceLine('join', frame.name, instance, '');
  if (!members.has(frame.name)) {
    // A join is a name's first connection in the room: one tab, one instance.
    members.set(frame.name, { name: frame.name, instances: instance ? [instance] : [], connections: 1 });
    renderMembers();
  }
}

export function onLeaveFrame(frame) {
  if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) {
    console.warn('[chat] leave frame ignored', frame);
    return;
  }
  var instance = typeof frame.instance === 'string' ? frame.instance : '';
  var reason = frame.reason === 'expired' ? 'expired' : 'left';
  addPresenceLine('leave', frame.name, instance, reason);
  clearTyping(frame.name);
  if (members.delete(frame.name)) renderMembers();
}

/** "bob joined (instance b)", "bob left", "bob left (instance b stopped answering)". */
function addPresenceLine(kind, name, instance, reason) {
  var li = h('li', 'presence-line presence-' + kind);
  li.setAttribute('data-testid', 'presence-event');
  li.setAttribute('data-kind', kind);
  li.setAttribute('data-name', name);
  li.setAttribute('data-instance', instance);
  if (reason) li.setAttribute('data-reason', reason);
  li.setAttribute('role', 'status');
  li.style.setProperty('--hue', String(nameHue(name)));
  li.appendChild(h('span', 'notice-time', fmtTime(Date.now())));
  var text = h('span', 'presence-text');
  text.setAttribute('data-testid', 'presence-text');
  text.appendChild(h('strong', 'presence-name', name));
  if (kind === 'join') {
    text.appendChild(document.createTextNode(instance ? ' joined (instance ' + instance + ')' : ' joined'));
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
  var mine = m.name === S.name;
  var li = h('li', 'member' + (mine ? ' mine' : ''));
  li.setAttribute('data-testid', 'member');
  li.setAttribute('data-name', m.name);
  li.setAttribute('data-connections', String(m.connections));
  li.style.setProperty('--hue', String(nameHue(m.name)));
  li.appendChild(avatar(m.name));
  var body = h('div', 'member-body');
  var top = h('div', 'member-top');
  var name = h('span', 'member-name', m.name);
  name.setAttribute('data-testid', 'member-name');
  top.appendChild(name);
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

function renderMembers() {
  var names = Array.from(members.keys()).sort(byName);
  var list = el.memberList;
  while (list.firstChild) list.removeChild(list.firstChild);
  names.forEach(function (name) { list.appendChild(buildMember(members.get(name))); });
  var total = names.length + moreMembers;
  el.membersCount.textContent = String(total);
  el.membersCount.title = total === 1 ? '1 person' : total + ' people';
  // The one-line summary is what a phone shows while the list is collapsed.
  el.membersSummary.textContent = names.join(', ') + (moreMembers ? ' +' + moreMembers : '');
  el.membersMore.textContent = moreMembers ? 'and ' + moreMembers + ' more not listed' : '';
  el.membersMore.hidden = !moreMembers;
}

// The list is only as good as the server's link to Redis: while it is
// down (or we are not connected), joins and leaves on other instances do
// not reach us, so say so instead of showing a confident, wrong list.
export function refreshMembersStale() {
  var text = '';
  var ph = phase();
  if (ph === 'idle') text = '';
  else if (ph === 'paused') text = 'may be out of date — the server lost its link to Redis';
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
  // Our own name typing is another tab of ours (or a namesake): not news here.
  if (frame.name === S.name) return;
  typing.delete(frame.name); // re-insert: names show in the order they last typed
  typing.set(frame.name, Date.now() + TYPING_SHOW_MS);
  renderTyping();
}

export function clearTyping(name) {
  if (typing.delete(name)) renderTyping();
}

/** "bob is typing…", "bob and carol are typing…", "bob, carol and 2 others are typing…". */
function renderTyping() {
  var now = Date.now();
  var names = [];
  var next = Infinity;
  typing.forEach(function (until, name) {
    if (until <= now) {
      typing.delete(name);
    } else {
      names.push(name);
      next = Math.min(next, until);
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
    box.appendChild(h('strong', null, name));
  });
  if (others) box.appendChild(document.createTextNode(' and ' + others + ' others'));
  box.appendChild(document.createTextNode(names.length === 1 ? ' is typing…' : ' are typing…'));
}

// Tell the room we are typing, at most once per TYPING_SEND_MS: the others
// keep the line up for TYPING_SHOW_MS, longer than our interval, so a
// steady typist shows without a flicker. Not while delivery is down: the
// frame could not reach the other instances anyway.
export function noteTyping() {
  if (!canSend() || !S.ws) return;
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

/** Forget the room's members and typists (joining, leaving). */
export function resetPresence() {
  members = new Map();
  moreMembers = 0;
  S.presenceFresh = false;
  typing = new Map();
  lastTypingSent = 0;
  renderMembers();
  renderTyping();
}
