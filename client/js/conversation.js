/* The conversation: the list of messages and lines, and what we send into it.
 *
 * It owns everything between the header and the composer's input: messages
 * in id order (with their X-ray, if traced), notices, the scrolling, and
 * our own sends from typed to confirmed (pending, held while the chat
 * cannot send, failed, "may or may not have been sent"). Separate from the
 * socket because none of this depends on how frames arrive: it is handed
 * `message` and `error` frames and asks state.js whether it can send.
 */

import { el, h, avatar, nameHue } from './dom.js';
import { fmtTime } from './format.js';
import { S, debug } from './session.js';
import { phase, canSend, instanceName } from './state.js';
import { buildXray, nowUs } from './xray.js';
import { faultLog } from './lab.js';

var PENDING_TIMEOUT_MS = 15000; // no echo after this long => mark failed
var MAX_QUEUED = 100;       // messages held while sending is paused
var ID_RE = /^(\d+)-(\d+)$/;

var seen = new Set();     // message ids already shown
var lastKey = null;       // parsed key of S.lastId
var sentCids = new Set(); // every cid we have sent in this session
var pending = new Map();  // cid -> {cid, text, li, state ('queued'|'pending'|'failed'), timer, typedUs}
var cidCounter = 0;

// Older history: the server sends a bounded replay and says, with a
// `history_more` notice, that older messages remain before an id.
var OLDER_PAGE = 50;        // messages asked for per page
var older = null;           // the id to ask before; null: nothing older known to remain
var olderLoading = false;   // a `history` request is on its way
var olderRow = null;        // the "Load older messages" row at the top of the list
var fillingGap = false;     // loading what a reconnection skipped, page after page
var olderCounter = 0;

// ---------------------------------------------------------------- ids
function parseId(id) {
  if (typeof id !== 'string') return null;
  var m = ID_RE.exec(id);
  if (!m) return null;
  try {
    return [BigInt(m[1]), BigInt(m[2])];
  } catch (e) {
    return null;
  }
}

/** Compare two parsed ids numerically: ms first, then seq. */
function cmpKey(a, b) {
  if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
  if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
  return 0;
}

function msgTsFromId(id) {
  var k = parseId(id);
  return k ? Number(k[0]) : NaN;
}

function newCid() {
  cidCounter += 1;
  try {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') {
      return window.crypto.randomUUID();
    }
  } catch (e) { /* insecure context etc. */ }
  return 'c' + Date.now().toString(36) + '-' +
    Math.random().toString(36).slice(2, 10) + '-' + cidCounter;
}

// ---------------------------------------------------------------- scrolling
function atBottom() {
  var m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
}
function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
  el.jump.hidden = true;
}
// Whether the view is pinned to the bottom. Updated on every scroll (user
// or programmatic); layout changes (banner shown, window resized) do not
// fire scroll events, so they cannot unpin the view by themselves.
var stick = true;
el.messages.addEventListener('scroll', function () {
  stick = atBottom();
  if (stick) el.jump.hidden = true;
  // Scrolled to the top with older messages left: load them.
  if (el.messages.scrollTop < 40 && older) loadOlder();
});
el.jump.addEventListener('click', scrollToBottom);
if (typeof ResizeObserver === 'function') {
  new ResizeObserver(function () { if (stick) scrollToBottom(); }).observe(el.messages);
}

/** Run a DOM mutation, keeping the view pinned to the bottom if it was. */
function withAutoScroll(fn, force) {
  var pin = force || stick || atBottom();
  fn();
  if (pin) {
    stick = true;
    scrollToBottom();
  } else {
    el.jump.hidden = false;
  }
}

// ---------------------------------------------------------------- rendering
function buildMessage(msg, mine) {
  var li = h('li', 'msg' + (mine ? ' mine' : ''));
  li.setAttribute('data-testid', 'message');
  li.setAttribute('data-id', msg.id || '');
  li.setAttribute('data-from', msg.from);
  var user = typeof msg.user === 'string' && msg.user !== '' ? msg.user : null;
  if (user) li.setAttribute('data-user', user);
  li.setAttribute('data-instance', msg.instance || '');
  if (msg.cid) li.setAttribute('data-cid', msg.cid);
  li.style.setProperty('--hue', String(nameHue(msg.from)));

  li.appendChild(avatar(msg.from));
  var body = h('div', 'msg-body');
  var meta = h('div', 'msg-meta');
  meta.appendChild(h('bdi', 'msg-from', msg.from));
  if (user) {
    // `--auth token`: who sent it for sure (two senders may share a name).
    var tag = h('span', 'msg-user', '@' + user);
    tag.setAttribute('data-testid', 'user-tag');
    tag.title = 'user id ' + user;
    meta.appendChild(tag);
  }
  if (mine) meta.appendChild(h('span', 'msg-you', 'you'));
  var ts = typeof msg.ts === 'number' ? msg.ts : msgTsFromId(msg.id);
  var time = h('time', 'msg-time', fmtTime(ts));
  if (!isNaN(new Date(ts).getTime())) {
    time.setAttribute('datetime', new Date(ts).toISOString());
    time.title = new Date(ts).toLocaleString();
  }
  meta.appendChild(time);
  if (msg.instance) {
    var badge = h('span', 'badge', msg.instance);
    badge.title = 'sent through instance ' + msg.instance;
    meta.appendChild(badge);
  }
  body.appendChild(meta);
  var text = h('div', 'msg-text', msg.text);
  text.setAttribute('data-testid', 'message-text');
  body.appendChild(text);
  if (msg.trace && typeof msg.trace === 'object') body.appendChild(buildXray(msg, mine, nowUs()));
  li.appendChild(body);
  return li;
}

/**
 * Insert a delivered message in id order. Local pending entries always stay
 * at the bottom; other items (failed entries, notices) act as barriers so
 * that nothing moves above something shown earlier than it.
 */
function insertMessage(li, key) {
  var list = el.messages;
  var ref = null; // insert before this
  var node = list.lastElementChild;
  while (node) {
    if (node.classList.contains('pending')) {
      ref = node;
    } else if (key && node.getAttribute('data-testid') === 'message') {
      var k = parseId(node.getAttribute('data-id'));
      if (k && cmpKey(k, key) > 0) ref = node;
      else break;
    } else {
      break;
    }
    node = node.previousElementSibling;
  }
  list.insertBefore(li, ref);
}

/** Is a message with our cid ours? Its name, and its user when both sides have one. */
function fromMe(msg, cid) {
  if (!cid || msg.from !== S.name || !sentCids.has(cid)) return false;
  return typeof msg.user !== 'string' || !S.user || msg.user === S.user;
}

/** Append a line that is not a message (notice, join, leave): it goes
 *  after everything shown so far, but above local pending entries. */
export function appendLine(li) {
  withAutoScroll(function () {
    var ref = null;
    var node = el.messages.lastElementChild;
    while (node && node.classList.contains('pending')) {
      ref = node;
      node = node.previousElementSibling;
    }
    el.messages.insertBefore(li, ref);
  });
}

export function addNotice(text, kind) {
  var li = h('li', 'notice' + (kind ? ' notice-' + kind : ''));
  li.setAttribute('data-testid', 'notice');
  li.setAttribute('role', 'status');
  li.appendChild(h('span', 'notice-time', fmtTime(Date.now())));
  var t = h('span', 'notice-text', text);
  t.setAttribute('data-testid', 'notice-text');
  li.appendChild(t);
  appendLine(li);
  return li;
}

// ---------------------------------------------------------------- outbox
function buildPending(p) {
  var li = h('li', 'msg mine pending');
  li.setAttribute('data-testid', 'pending-message');
  li.setAttribute('data-state', p.state);
  li.setAttribute('data-cid', p.cid);
  li.setAttribute('data-from', S.name);
  li.style.setProperty('--hue', String(nameHue(S.name)));
  li.appendChild(avatar(S.name));
  var body = h('div', 'msg-body');
  var meta = h('div', 'msg-meta');
  meta.appendChild(h('bdi', 'msg-from', S.name));
  meta.appendChild(h('span', 'msg-you', 'you'));
  var st = h('span', 'msg-state', 'sending…');
  st.setAttribute('data-testid', 'message-state');
  meta.appendChild(st);
  body.appendChild(meta);
  var text = h('div', 'msg-text', p.text);
  text.setAttribute('data-testid', 'message-text');
  body.appendChild(text);
  li.appendChild(body);
  p.stateEl = st;
  p.metaEl = meta;
  return li;
}

/**
 * Send `text`, or hold it if sending does not work right now: it then
 * shows as "waiting" and goes out by itself when the chat is back
 * (flushQueue). Returns false only if nothing was done.
 */
export function sendText(text, typedUs) {
  if (!S.joined) return false;
  var queued = 0;
  pending.forEach(function (q) { if (q.state === 'queued') queued += 1; });
  if (!canSend() && queued >= MAX_QUEUED) {
    addNotice('not queued: ' + MAX_QUEUED + ' messages are already waiting for the connection', 'error');
    return false;
  }
  var cid = newCid();
  var p = { cid: cid, text: text, state: 'queued', li: null, timer: null,
            typedUs: typeof typedUs === 'number' ? typedUs : nowUs() };
  sentCids.add(cid);
  pending.set(cid, p);
  p.li = buildPending(p);
  withAutoScroll(function () { el.messages.appendChild(p.li); }, true);
  if (canSend()) transmit(p);
  else holdPending(p);
  return true;
}

/** Put a waiting message on the wire. */
function transmit(p) {
  var frame = { type: 'message', text: p.text, cid: p.cid };
  // typed_us is what lets the X-ray start at the key press (sent only
  // when tracing: other clients pay nothing).
  if (S.trace) frame.typed_us = p.typedUs;
  try {
    S.ws.send(JSON.stringify(frame));
  } catch (e) {
    console.warn('[chat] send failed', e);
    holdPending(p);
    return;
  }
  p.state = 'pending';
  p.li.classList.remove('queued');
  p.li.setAttribute('data-state', 'pending');
  p.stateEl.textContent = 'sending…';
  if (p.cancelEl) { p.cancelEl.remove(); p.cancelEl = null; }
  armPendingTimer(p);
  renderComposerNote();
}

/** Show a message as held, with why and what happens to it. */
function holdPending(p) {
  p.state = 'queued';
  p.li.classList.add('queued');
  p.li.setAttribute('data-state', 'queued');
  p.stateEl.textContent = phase() === 'paused'
    ? 'waiting — ' + instanceName() + ' cannot reach Redis; goes out when it can'
    : 'waiting — not connected; goes out when the connection is back';
  if (!p.cancelEl) {
    var btn = h('button', 'btn btn-small cancel', 'cancel');
    btn.type = 'button';
    btn.setAttribute('data-testid', 'cancel-button');
    btn.title = 'do not send this message; put its text back in the input';
    btn.addEventListener('click', function () { cancelQueued(p); });
    p.metaEl.appendChild(btn);
    p.cancelEl = btn;
  }
  renderComposerNote();
}

/** Drop a held message, giving its text back to the input if that is empty. */
function cancelQueued(p) {
  if (p.state !== 'queued') return;
  pending.delete(p.cid);
  if (p.li && p.li.parentNode) p.li.parentNode.removeChild(p.li);
  if (el.input.value === '') el.input.value = p.text;
  renderComposerNote();
  el.input.focus();
}

/**
 * Sending works again: send what waited, oldest first. After a
 * reconnection, not before the replay of what we missed is over
 * (finishCatchup calls it again), so that held messages come after it.
 */
export function flushQueue() {
  if (S.catchup && S.catchup.kind !== 'delivery') return;
  pending.forEach(function (p) {
    if (p.state === 'queued' && canSend()) transmit(p);
  });
  renderComposerNote();
}

function armPendingTimer(p) {
  clearTimeout(p.timer);
  p.timer = setTimeout(function () {
    if (p.state === 'pending') failPending(p, 'no confirmation from server (it may still arrive)');
  }, PENDING_TIMEOUT_MS);
}

function failPending(p, reason) {
  clearTimeout(p.timer);
  p.state = 'failed';
  var li = p.li;
  li.classList.remove('pending');
  li.classList.remove('queued');
  li.classList.add('failed');
  li.setAttribute('data-testid', 'failed-message');
  li.setAttribute('data-state', 'failed');
  p.stateEl.textContent = 'not sent: ' + reason;
  p.stateEl.classList.add('is-error');
  if (!p.retryEl) {
    var btn = h('button', 'btn btn-small retry', 'retry');
    btn.type = 'button';
    btn.setAttribute('data-testid', 'retry-button');
    btn.addEventListener('click', function () { retry(p); });
    p.metaEl.appendChild(btn);
    p.retryEl = btn;
  }
  updateRetryButtons();
}

// A retry is a new message (new cid): the failed one was not accepted.
function retry(p) {
  if (!S.joined) return;
  if (p.li && p.li.parentNode) p.li.parentNode.removeChild(p.li);
  pending.delete(p.cid);
  p.state = 'retried';
  sendText(p.text);
}

export function updateRetryButtons() {
  var ok = canSend();
  pending.forEach(function (p) {
    if (p.retryEl) {
      p.retryEl.title = ok ? 'send again' : 'queue it: it goes out when the chat is back';
    }
  });
}

function oldestPending() {
  var found = null;
  pending.forEach(function (p) {
    if (!found && p.state === 'pending') found = p;
  });
  return found;
}

// One line above the composer while messages are held, saying why.
export function renderComposerNote() {
  var queued = 0;
  pending.forEach(function (p) { if (p.state === 'queued') queued += 1; });
  var ph = phase();
  var text = '';
  if (queued && ph !== 'connected') {
    text = (queued === 1 ? '1 message is' : queued + ' messages are') + ' waiting: ' +
      (ph === 'paused' ? instanceName() + ' cannot reach Redis' : 'no connection to the server') +
      '. ' + (queued === 1 ? 'It goes' : 'They go') + ' out by itself when the chat is back; cancel it to keep it from going.';
  }
  el.composerNote.textContent = text;
  el.composerNote.hidden = text === '';
}

// ---------------------------------------------------------------- inbound
/**
 * Show a `message` frame, in place of our pending line if it is ours.
 * Returns 'new' (an id not seen before), 'unnumbered' (shown, but without a
 * valid id) or null (not shown: malformed, another room, a duplicate), so
 * that the socket can count a replay and presence can drop the sender's
 * "is typing" without this file knowing about either.
 */
export function onMessageFrame(msg) {
  if (typeof msg.text !== 'string' || typeof msg.from !== 'string') {
    console.warn('[chat] malformed message frame ignored', msg);
    return null;
  }
  if (msg.room && S.room && msg.room !== S.room) {
    console.warn('[chat] message for another room ignored', msg);
    return null;
  }
  var key = parseId(msg.id);
  if (key) {
    if (seen.has(msg.id)) return null; // duplicate (e.g. replay after reconnect)
    seen.add(msg.id);
    if (!lastKey || cmpKey(key, lastKey) > 0) {
      lastKey = key;
      S.lastId = msg.id;
      debug.lastId = msg.id;
    }
  } else {
    console.warn('[chat] message without a valid id', msg);
  }

  var cid = typeof msg.cid === 'string' ? msg.cid : null;
  var mine = fromMe(msg, cid);
  var p = cid ? pending.get(cid) : null;

  debug.received.push(msg);

  withAutoScroll(function () {
    if (p) {
      clearTimeout(p.timer);
      pending.delete(cid);
      if (p.li && p.li.parentNode) p.li.parentNode.removeChild(p.li);
    }
    insertMessage(buildMessage(msg, mine), key);
  }, !!p);
  return key ? 'new' : 'unnumbered';
}

export function onErrorFrame(frame) {
  var code = typeof frame.code === 'string' ? frame.code : 'error';
  var text = typeof frame.message === 'string' && frame.message ? frame.message : code;
  var cid = typeof frame.cid === 'string' ? frame.cid : null;
  var p = cid ? pending.get(cid) : null;
  if (p && p.state === 'pending' && code === 'outcome_unknown') {
    // Not a failure: if Redis took it, it comes back like any message
    // (same cid) and replaces this line. No retry: it could go out twice.
    clearTimeout(p.timer);
    p.state = 'unknown';
    p.li.setAttribute('data-state', 'unknown');
    p.stateEl.textContent = 'may or may not have been sent — if it was, it will appear here; do not resend it blindly';
    return;
  }
  if (p && p.state === 'pending') {
    failPending(p, text);
    return;
  }
  if (!cid && code === 'unavailable') {
    var oldest = oldestPending();
    if (oldest) {
      failPending(oldest, text);
      return;
    }
  }
  addNotice(code + ': ' + text, 'error');
}

// ---------------------------------------------------------------- older history
function showOlderRow() {
  if (!olderRow) {
    olderRow = h('li', 'older');
    olderRow.setAttribute('data-testid', 'older');
    var button = h('button', 'older-button');
    button.type = 'button';
    button.setAttribute('data-testid', 'load-older');
    button.addEventListener('click', loadOlder);
    olderRow.appendChild(button);
  }
  if (el.messages.firstChild !== olderRow) el.messages.insertBefore(olderRow, el.messages.firstChild);
  var button = olderRow.firstChild;
  button.disabled = olderLoading;
  button.textContent = olderLoading ? 'Loading older messages…' : 'Load older messages';
}

function hideOlderRow() {
  if (olderRow && olderRow.parentNode) olderRow.parentNode.removeChild(olderRow);
}

/**
 * A `history_more` notice: messages older than `before` remain. On a fresh
 * page the row at the top offers them; after a reconnection that skipped
 * some (more were missed than one replay holds), they are loaded at once.
 */
export function onHistoryMore(before) {
  if (typeof before !== 'string' || !parseId(before)) return;
  older = before;
  showOlderRow();
  if (seen.size > 0) {
    fillingGap = true;
    loadOlder();
  }
}

/** Ask for the page before `older` (the button, a scroll to the top). */
export function loadOlder() {
  if (!older || olderLoading || !S.ws || S.ws.readyState !== WebSocket.OPEN) return;
  olderLoading = true;
  showOlderRow();
  try {
    S.ws.send(JSON.stringify({ type: 'history', before: older, limit: OLDER_PAGE, cid: 'older-' + (++olderCounter) }));
  } catch (e) {
    console.warn('[chat] history request failed', e);
    olderLoading = false;
    showOlderRow();
  }
}

/** A page of older history: each message in its place by id, the view kept where it was. */
export function onHistoryFrame(frame) {
  olderLoading = false;
  var page = Array.isArray(frame.messages) ? frame.messages : [];
  var list = el.messages;
  var fromBottom = list.scrollHeight - list.scrollTop;
  var reachedShown = false;
  for (var i = page.length - 1; i >= 0; i--) {
    if (!insertOlder(page[i])) reachedShown = true;
  }
  list.scrollTop = list.scrollHeight - fromBottom;
  var oldest = page.length && parseId(page[0].id) ? page[0].id : null;
  if (frame.more === true && oldest) {
    older = oldest;
    showOlderRow();
    // A reconnection's gap is filled once the pages reach what was shown.
    if (fillingGap && !reachedShown) loadOlder();
    else fillingGap = false;
  } else {
    older = null;
    fillingGap = false;
    hideOlderRow();
  }
}

/** A refused `history` request (its cid says so); false if it was not one. */
export function onOlderError(frame) {
  if (typeof frame.cid !== 'string' || frame.cid.indexOf('older-') !== 0) return false;
  olderLoading = false;
  fillingGap = false;
  showOlderRow();
  return true;
}

/** Insert a message of an older page before the first newer message shown; false if already shown. */
function insertOlder(msg) {
  if (!msg || typeof msg.text !== 'string' || typeof msg.from !== 'string') return true;
  var key = parseId(msg.id);
  if (!key) return true;
  if (seen.has(msg.id)) return false;
  seen.add(msg.id);
  var cid = typeof msg.cid === 'string' ? msg.cid : null;
  var li = buildMessage(msg, fromMe(msg, cid));
  var ref = null;
  for (var node = el.messages.firstElementChild; node; node = node.nextElementSibling) {
    if (node.classList.contains('pending')) { ref = node; break; }
    if (node.getAttribute('data-testid') !== 'message') continue;
    var k = parseId(node.getAttribute('data-id'));
    if (k && cmpKey(k, key) > 0) { ref = node; break; }
  }
  el.messages.insertBefore(li, ref);
  return true;
}

/** Forget the room: its messages, its ids, and whatever we were sending to it. */
export function resetConversation() {
  older = null;
  olderLoading = false;
  fillingGap = false;
  olderRow = null;
  seen = new Set();
  S.lastId = null;
  lastKey = null;
  pending.forEach(function (p) { clearTimeout(p.timer); });
  pending = new Map();
  sentCids = new Set();
  debug.lastId = null;
  debug.received.length = 0;
  while (el.messages.firstChild) el.messages.removeChild(el.messages.firstChild);
  el.jump.hidden = true;
  stick = true;
}

/** A line in the conversation about the connection (lost, back, caught up...). */
export function connLine(event, text, kind) {
  var li = addNotice(text, kind);
  li.setAttribute('data-event', event);
  faultLog(event, text);
  return li;
}
