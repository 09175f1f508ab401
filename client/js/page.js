/* The page's life, and the wiring: the join form, joining and leaving, the
 * composer, the X-ray toggle, and boot.
 *
 * Separate from the files it imports because it is the only one that knows
 * them all: it tells state.js which views follow the connection state, and
 * a join or a leave resets each of them. It runs last (app.js loads it), so
 * its top level is the page's start.
 */

import { el } from './dom.js';
import { S, debug } from './session.js';
import { render, follow, whenSendable, setConn, setInstance, conn } from './state.js';
import { nowUs } from './xray.js';
import { sendText, flushQueue, renderComposerNote, updateRetryButtons, resetConversation } from './conversation.js';
import { refreshMembersStale, noteTyping, resetPresence } from './presence.js';
import { syncStatsPolling, renderFaultPanel } from './lab.js';
import { connect, clearReconnect, reconnectNow, dropOldSocket, loadConfig } from './socket.js';
import { authOn, applyAuthConfig, tokenName, resetAuth } from './token.js';

var DEFAULT_ROOM = 'lobby';
var MAX_TEXT = 2000;
var LS_NAME = 'pubsub-chat.name';
var LS_ROOM = 'pubsub-chat.room';
var ROOM_RE = /^[A-Za-z0-9_-]{1,32}$/;
// Rust's char::is_control == Unicode general category Cc.
var CONTROL_RE = /[\u0000-\u001F\u007F-\u009F]/;

// The views outside the pill, banner and composer that follow the
// connection state, re-rendered by every state.render(); and what runs
// when sending works again.
follow(renderComposerNote);
follow(updateRetryButtons);
follow(refreshMembersStale);
follow(renderFaultPanel);
whenSendable(flushQueue);

// ---------------------------------------------------------------- storage
function storageGet(k) {
  try { return window.localStorage.getItem(k); } catch (e) { return null; }
}
function storageSet(k, v) {
  try { window.localStorage.setItem(k, v); } catch (e) { /* ignore */ }
}

// ---------------------------------------------------------------- validation
function validateName(raw) {
  var name = String(raw || '').trim();
  var len = Array.from(name).length;
  if (len === 0) return { error: 'Please enter a display name.' };
  if (len > 32) return { error: 'Name must be at most 32 characters (it has ' + len + ').' };
  if (CONTROL_RE.test(name)) return { error: 'Name must not contain control characters.' };
  return { value: name };
}

function validateRoom(raw) {
  var room = String(raw || '').trim();
  if (room === '') room = DEFAULT_ROOM;
  if (room.length > 32) return { error: 'Room must be at most 32 characters.' };
  if (!ROOM_RE.test(room)) return { error: 'Room may only contain letters, digits, "_" and "-".' };
  return { value: room };
}

function showFieldError(input, errEl, msg) {
  errEl.textContent = msg || '';
  if (msg) input.setAttribute('aria-invalid', 'true');
  else input.removeAttribute('aria-invalid');
}

// ---------------------------------------------------------------- join/leave
function resetRoomState() {
  resetConversation();
  S.attempt = 0;
  S.instance = null;
  clearTimeout(S.catchup && S.catchup.timer);
  S.catchup = null;
  debug.client = null;
  resetPresence();
}

function join(name, room) {
  S.joinSeq += 1;
  resetRoomState();
  S.name = name;
  S.room = room;
  S.joined = true;
  if (!authOn()) storageSet(LS_NAME, name);
  storageSet(LS_ROOM, room);

  el.roomName.textContent = room;
  // With a token, the welcome says our name for sure; the token's claim until then.
  el.myName.textContent = name || '…';
  setInstance(null);
  el.session.hidden = false;
  el.leave.hidden = false;
  el.xrayToggle.hidden = false;
  el.joinView.hidden = true;
  el.chatView.hidden = false;
  el.app.setAttribute('data-view', 'chat');
  document.title = '#' + room + ' — pubsub-chat';
  el.input.value = '';
  setConn({ socket: 'none', everOpen: false, delivery: 'up', deliveryReason: '', retryAt: 0, lostAt: 0, halted: '' });
  connect('first');
  syncStatsPolling();
  el.input.focus();
}

function leave() {
  S.joined = false;
  S.joinSeq += 1;
  clearReconnect();
  var ws = S.ws;
  S.ws = null;
  if (ws) {
    try { ws.close(1000, 'leaving'); } catch (e) { /* ignore */ }
  }
  dropOldSocket();
  resetRoomState();
  resetAuth();
  setInstance(null);
  el.session.hidden = true;
  el.leave.hidden = true;
  el.xrayToggle.hidden = true;
  el.chatView.hidden = true;
  el.joinView.hidden = false;
  el.app.setAttribute('data-view', 'join');
  document.title = 'pubsub-chat';
  setConn({ socket: 'none', everOpen: false, delivery: 'up', deliveryReason: '', retryAt: 0, lostAt: 0, halted: '' });
  syncStatsPolling();
  if (!authOn()) el.nameInput.value = S.name;
  el.roomInput.value = S.room;
  el.roomInput.focus();
  el.roomInput.select();
}

function tryJoinFromForm() {
  // With `--auth token` the token names us: the name field is not used.
  var n = authOn() ? { value: tokenName() } : validateName(el.nameInput.value);
  var r = validateRoom(el.roomInput.value);
  showFieldError(el.nameInput, el.nameError, n.error);
  showFieldError(el.roomInput, el.roomError, r.error);
  if (n.error) { el.nameInput.focus(); return false; }
  if (r.error) { el.roomInput.focus(); return false; }
  join(n.value, r.value);
  return true;
}

el.joinForm.addEventListener('submit', function (ev) {
  ev.preventDefault();
  tryJoinFromForm();
});
el.nameInput.addEventListener('input', function () {
  if (el.nameError.textContent) showFieldError(el.nameInput, el.nameError, '');
});
el.roomInput.addEventListener('input', function () {
  if (el.roomError.textContent) showFieldError(el.roomInput, el.roomError, '');
});
el.leave.addEventListener('click', leave);

el.input.addEventListener('input', noteTyping);

el.composer.addEventListener('submit', function (ev) {
  ev.preventDefault();
  var typedUs = nowUs(); // the X-ray's first hop: the key press
  var text = el.input.value;
  if (text.trim() === '') return;
  if (text.length > MAX_TEXT) text = text.slice(0, MAX_TEXT);
  // Sent or held, the text leaves the input and shows in the list with
  // its state: nothing is lost silently, and Enter always does something.
  if (sendText(text, typedUs)) el.input.value = '';
  el.input.focus();
});

// ---------------------------------------------------------------- X-ray toggle
function setTrace(on) {
  on = !!on;
  if (on === S.trace) return;
  S.trace = on;
  renderXrayToggle();
  // Keep ?trace=1 in the address, so that a reload or a shared link keeps it.
  try {
    var u = new URL(window.location.href);
    if (on) u.searchParams.set('trace', '1');
    else u.searchParams.delete('trace');
    window.history.replaceState(null, '', u.toString());
  } catch (e) { /* ignore */ }
  syncStatsPolling();
  if (S.joined && (S.ws || conn.socket === 'open')) reconnectNow('xray');
}

function renderXrayToggle() {
  el.xrayToggle.setAttribute('aria-pressed', String(S.trace));
  el.xrayToggle.textContent = S.trace ? 'X-ray on' : 'X-ray';
  el.app.setAttribute('data-xray', S.trace ? 'on' : 'off');
}

el.xrayToggle.addEventListener('click', function () { setTrace(!S.trace); });

// ---------------------------------------------------------------- boot
(function boot() {
  var params = new URLSearchParams(window.location.search);
  S.trace = params.get('trace') === '1';
  renderXrayToggle();
  render();
  var qName = params.get('name');
  var qRoom = params.get('room');
  el.nameInput.value = qName !== null ? qName : (storageGet(LS_NAME) || '');
  el.roomInput.value = qRoom !== null ? qRoom : (storageGet(LS_ROOM) || DEFAULT_ROOM);
  if (qName !== null && qRoom !== null) {
    tryJoinFromForm();
    return;
  }
  if (el.nameInput.value) {
    el.roomInput.focus();
  } else {
    el.nameInput.focus();
  }
  // Does this server name us from a token? Then the form has no name
  // field, and a room in the address is enough to join.
  loadConfig().then(function (cfg) {
    applyAuthConfig(cfg);
    if (!authOn(cfg) || S.joined) return;
    if (qRoom !== null) tryJoinFromForm();
    else el.roomInput.focus();
  });
})();
