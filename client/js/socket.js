/* The socket: finding the server, connecting, and reconnecting.
 *
 * It owns the WebSocket's life (config.json, the URL with `since` and
 * `trace`, backoff with jitter, make-before-break for the X-ray toggle),
 * routes each inbound frame to the file that owns its meaning, and writes
 * the connection's own lines in the conversation (lost, back, caught up,
 * Redis down and up). With `--auth token` it also owns the sign-in token
 * (where it comes from, its first frame, its refresh, a new one after a
 * 4401). Separate because it is the only file that knows
 * frames arrive over a socket; state.js tells the rest what that means.
 */

import { el } from './dom.js';
import { plural } from './format.js';
import { S, debug } from './session.js';
import { conn, setConn, setInstance, instanceName, startCountdown, stopCountdown } from './state.js';
import { addNotice, connLine, flushQueue, onMessageFrame, onErrorFrame, onHistoryMore, onHistoryFrame, onOlderError } from './conversation.js';
import { onPresenceFrame, onPresenceDiffFrame, onMembersError, onTypingFrame, clearTyping, applyPresenceConfig } from './presence.js';
import { applyDemoControls, renderFaultPanel } from './lab.js';
import { authOn, applyAuthConfig, ensureToken, freshToken, dropToken, sendAuth, onWelcomeAuth,
  onAuthenticated, onAuthError, lastRefusal, onSocketClosed } from './token.js';

var DEFAULT_WS_PORT = 15000;
var DEFAULT_WS_PATH = '/ws';
var BACKOFF_BASE_MS = 500;
var BACKOFF_MAX_MS = 10000;
// After a reconnection the server replays what we missed, back to back,
// right after welcome; this much silence means the replay is over.
var CATCHUP_QUIET_MS = 400;

var reconnectTimer = null;
var oldWs = null;    // the socket a deliberate reconnection replaces, until the new one is welcomed
var authFailures = 0; // tokens refused in a row at the handshake (4401 before a welcome)

// ---------------------------------------------------------------- inbound
function onFrame(ev) {
  if (typeof ev.data !== 'string') {
    console.warn('[chat] ignoring binary frame');
    return;
  }
  var frame;
  try {
    frame = JSON.parse(ev.data);
  } catch (e) {
    console.warn('[chat] ignoring non-JSON frame', ev.data);
    return;
  }
  if (!frame || typeof frame !== 'object') {
    console.warn('[chat] ignoring frame', frame);
    return;
  }
  switch (frame.type) {
    case 'welcome':
      onWelcome(frame);
      break;
    case 'status':
      onStatusFrame(frame);
      break;
    case 'notice':
      if (frame.code === 'history_more') onHistoryMore(frame.before);
      else addNotice(typeof frame.message === 'string' && frame.message ? frame.message : String(frame.code), 'info');
      break;
    case 'history':
      onHistoryFrame(frame);
      break;
    case 'message': {
      var shown = onMessageFrame(frame);
      if (shown === 'new') noteCaughtUp();
      if (shown) clearTyping(frame.from, frame.user); // they sent what they were typing
      break;
    }
    case 'presence':
      onPresenceFrame(frame);
      break;
    case 'presence_diff':
      onPresenceDiffFrame(frame);
      break;
    case 'typing':
      onTypingFrame(frame);
      break;
    case 'authenticated':
      onAuthenticated(frame);
      break;
    case 'error':
      // A refused token is the sign-in token's business: a refreshed one says so
      // there, one refused at the handshake is told with the Close.
      if (onAuthError(frame)) break;
      // A refused `members` frame (the list's "show more") is the list's
      // business, not a line in the conversation.
      if (onOlderError(frame)) onErrorFrame({ code: frame.code, message: frame.message });
      else if (!onMembersError(frame)) onErrorFrame(frame);
      break;
    default:
      console.info('[chat] ignoring unknown frame type', frame.type, frame);
  }
}
// ---------------------------------------------------------------- connection events

function missedText(n) {
  return n === 0 ? 'nothing missed' : plural(n, 'missed message', 'missed messages');
}

/** "after 3 s" since the outage began, or "" if we do not know. */
function awayText() {
  if (!conn.lostAt) return '';
  var secs = (Date.now() - conn.lostAt) / 1000;
  return ' after ' + (secs < 10 ? secs.toFixed(1) : Math.round(secs)) + ' s';
}

// What a reconnection replays comes right after welcome, back to back,
// with no marker at its end: count the new messages until the stream goes
// quiet. A Redis outage is exact instead: its `up` comes after the replay.
function startCatchup(kind) {
  finishCatchup();
  S.catchup = { kind: kind, count: 0, timer: null };
  armCatchup();
}

function armCatchup() {
  var c = S.catchup;
  if (!c || c.kind === 'delivery') return;
  clearTimeout(c.timer);
  c.timer = setTimeout(finishCatchup, CATCHUP_QUIET_MS);
}

function noteCaughtUp() {
  if (!S.catchup) return;
  S.catchup.count += 1;
  armCatchup();
}

/** Close a socket catch-up with its line (a deliberate reconnection says nothing if nothing was missed). */
function finishCatchup() {
  var c = S.catchup;
  if (!c || c.kind === 'delivery') return;
  clearTimeout(c.timer);
  S.catchup = null;
  setTimeout(flushQueue, 0);
  if (c.kind === 'toggle' && c.count === 0) return;
  var line = connLine('caught-up', 'Caught up: ' + missedText(c.count) + (c.count ? ' (replayed from history)' : ''), 'ok');
  line.setAttribute('data-missed', String(c.count));
}

function onWelcome(frame) {
  if (typeof frame.instance === 'string') setInstance(frame.instance);
  if (typeof frame.client === 'string') debug.client = frame.client;
  if (typeof frame.name === 'string' && frame.name) {
    S.name = frame.name;
    el.myName.textContent = frame.name;
  }
  if (authOn() || typeof frame.user === 'string') onWelcomeAuth(frame);
  authFailures = 0;
  var wasOpen = conn.everOpen;
  var failedBefore = S.attempt > 0;
  var reason = S.connectReason;
  S.attempt = 0; // healthy connection: reset backoff
  S.presenceFresh = false; // a "presence" snapshot follows
  finishCatchup();
  S.catchup = null;
  var away = awayText();
  dropOldSocket();
  // A `status` down follows among the first frames if the server cannot
  // reach Redis right now; until then sending works.
  setConn({ socket: 'open', everOpen: true, delivery: 'up', deliveryReason: '', retryAt: 0, lostAt: 0, halted: '' });
  if (reason === 'xray') {
    connLine('back', S.trace
      ? 'X-ray on: reconnected to instance ' + S.instance + ' with trace=1; new messages show their path'
      : 'X-ray off: reconnected to instance ' + S.instance + ' without traces', 'info');
    startCatchup('toggle');
  } else if (wasOpen || failedBefore) {
    connLine('back', (wasOpen ? 'Reconnected to instance ' : 'Connected to instance ') + S.instance + away, 'ok');
    if (wasOpen) startCatchup('socket');
  }
  S.connectReason = 'reconnect';
  renderFaultPanel();
}

function onStatusFrame(frame) {
  var down = frame.delivery === 'down';
  var words = typeof frame.message === 'string' ? frame.message : '';
  if (down === (conn.delivery === 'down')) return; // no change (an `up` when it never went down)
  if (down) {
    finishCatchup(); // a `down` among the first frames comes after the replay
    setConn({ delivery: 'down', deliveryReason: words });
    var line = connLine('delivery-down', instanceName() + ' lost its link to Redis — sending paused; ' +
      'messages from other instances will arrive when it is back', 'error');
    if (words) line.title = words;
    S.catchup = { kind: 'delivery', count: 0, timer: null };
  } else {
    var n = S.catchup && S.catchup.kind === 'delivery' ? S.catchup.count : 0;
    S.catchup = null;
    var away = awayText();
    setConn({ delivery: 'up', deliveryReason: '', lostAt: 0 });
    var up = connLine('delivery-up', 'Sending works again: ' + instanceName() + ' is linked to Redis' + away +
      ' — caught up: ' + missedText(n), 'ok');
    up.setAttribute('data-missed', String(n));
  }
}

/** The line for a socket that closed; says why when the server said. */
function lostText(ev) {
  var reason = typeof ev.reason === 'string' ? ev.reason : '';
  if (ev.code === 1008 && /slow consumer/i.test(reason)) {
    return instanceName() + ' dropped this tab as a slow consumer (it stopped reading, and more than ' +
      'its send buffer waited) — reconnecting, then catching up';
  }
  if (ev.code === 4401) {
    var refused = lastRefusal();
    if (/expired/i.test(reason) && !refused) {
      return 'Your sign-in expired (' + instanceName() + ' closed the connection: ' + ev.code + ' ' + reason +
        ') — getting a new token, then reconnecting';
    }
    return instanceName() + ' refused the sign-in token (' + (refused ? refused.code + ': ' + refused.message : ev.code + ' ' + reason) +
      ') — getting a new token, then reconnecting';
  }
  if (ev.code === 4408) {
    return instanceName() + ' got no sign-in token in time (' + ev.code + (reason ? ' ' + reason : '') + ') — reconnecting';
  }
  if (ev.code === 1001) return instanceName() + ' is going away' + (reason ? ' (' + reason + ')' : '') + ' — reconnecting';
  if (reason) return instanceName() + ' closed the connection (' + ev.code + ': ' + reason + ') — reconnecting';
  return 'Lost the connection to ' + instanceName() + ' — reconnecting';
}


// ---------------------------------------------------------------- connection
export function loadConfig() {
  return fetch('config.json', { cache: 'no-store' })
    .then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.json();
    })
    .then(function (cfg) {
      if (!cfg || typeof cfg !== 'object') throw new Error('bad config');
      S.config = cfg;
      return cfg;
    })
    .catch(function (e) {
      console.warn('[chat] config.json unavailable, using last/default config', e);
      return S.config || {};
    });
}

function buildWsUrl(cfg) {
  var url;
  var wsProto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  if (typeof cfg.ws_url === 'string' && cfg.ws_url.trim() !== '') {
    var configured = cfg.ws_url.trim();
    // A path ("/ws") means: this page's own host, through its proxy.
    if (configured.charAt(0) === '/') configured = wsProto + '//' + window.location.host + configured;
    url = new URL(configured, window.location.href);
  } else {
    var port = Number(cfg.ws_port) > 0 ? Number(cfg.ws_port) : DEFAULT_WS_PORT;
    var path = typeof cfg.ws_path === 'string' && cfg.ws_path ? cfg.ws_path : DEFAULT_WS_PATH;
    if (path.charAt(0) !== '/') path = '/' + path;
    var host = window.location.hostname || '127.0.0.1';
    url = new URL(wsProto + '//' + host + ':' + port + path);
  }
  // With `--auth token` the token names us: the query's name is ignored.
  if (authOn(cfg)) url.searchParams.delete('name');
  else url.searchParams.set('name', S.name);
  url.searchParams.set('room', S.room);
  if (S.lastId) url.searchParams.set('since', S.lastId);
  else url.searchParams.delete('since');
  // trace is a handshake parameter: turning the X-ray on or off reconnects.
  if (S.trace) url.searchParams.set('trace', '1');
  else url.searchParams.delete('trace');
  return url.toString();
}

/** Open a socket. `reason`: 'first' (join), 'reconnect', or 'xray' (the toggle). */
export function connect(reason) {
  clearReconnect();
  if (!S.joined) return;
  if (reason) S.connectReason = reason;
  setConn({ socket: 'opening', retryAt: 0, halted: '' });
  var joinedAt = S.joinSeq;
  var current = function () { return S.joined && joinedAt === S.joinSeq && !S.ws; };
  loadConfig().then(function (cfg) {
    if (!current()) return;
    if (!S.instance && typeof cfg.instance === 'string') setInstance(cfg.instance);
    applyDemoControls(cfg);
    applyPresenceConfig(cfg);
    applyAuthConfig(cfg);
    if (!authOn(cfg)) {
      openSocket(cfg);
      return;
    }
    // `--auth token`: a token first (the one held, or a fresh one).
    ensureToken().then(function () {
      if (current()) openSocket(cfg);
    }, function (e) {
      if (current()) noToken(e);
    });
  });
}

/** No token to connect with: the user gave none (stop), or fetching one failed (try again later). */
function noToken(e) {
  console.warn('[chat] no token', e);
  if (e && e.cancelled) {
    var why = 'Not connected: this chat needs a sign-in token, and none was given.';
    connLine('token-missing', why + ' Press "retry now" to paste one.', 'error');
    halt(why);
    return;
  }
  var line = connLine('token-failed', 'Could not get a sign-in token (' + (e && e.message ? e.message : e) + ') — trying again', 'error');
  line.setAttribute('data-reason', e && e.message ? e.message : String(e));
  scheduleReconnect();
}

/** Stop reconnecting, saying why (the banner offers "retry now"). */
function halt(why) {
  clearReconnect();
  setConn({ socket: 'none', retryAt: 0, halted: why });
}

function openSocket(cfg) {
  var url;
  try {
    url = buildWsUrl(cfg);
  } catch (e) {
    console.error('[chat] cannot build WebSocket URL', e);
    scheduleReconnect();
    return;
  }
  var ws;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    console.error('[chat] WebSocket constructor failed', e);
    scheduleReconnect();
    return;
  }
  S.ws = ws;
  // The state turns "connected" at the welcome frame, not at open: only
  // then has the server joined us to the room (and the backoff resets
  // only then, so a server that accepts and drops us is not hammered).
  ws.onopen = function () {
    if (S.ws !== ws) return;
    // `--auth token`: who we are, in the first frame.
    if (authOn(cfg)) sendAuth(ws);
  };
  ws.onmessage = function (ev) {
    if (S.ws !== ws) return;
    onFrame(ev);
  };
  ws.onerror = function () {
    if (S.ws !== ws) return;
    console.warn('[chat] WebSocket error');
  };
  ws.onclose = function (ev) {
    if (S.ws !== ws) return;
    S.ws = null;
    dropOldSocket();
    onSocketClosed();
    var wasOpen = conn.socket === 'open';
    S.presenceFresh = false; // the next socket brings its own snapshot
    clearTimeout(S.catchup && S.catchup.timer);
    S.catchup = null;
    console.info('[chat] socket closed', ev.code, ev.reason);
    if (!S.joined) return;
    var auth = ev.code === 4401 || ev.code === 4403;
    if (wasOpen || S.connectReason === 'xray' || auth) {
      var line = connLine('lost', ev.code === 4403 ? forbiddenText(ev) : lostText(ev), 'error');
      line.setAttribute('data-close-code', String(ev.code));
      if (ev.reason) line.setAttribute('data-close-reason', ev.reason);
    }
    S.connectReason = 'reconnect';
    if (ev.code === 4403) {
      // The token does not allow this room: trying again changes nothing.
      halt('Not connected: your sign-in does not allow room ' + S.room + '. Leave and pick another room, ' +
        'or sign in with an account that may join it.');
      return;
    }
    if (ev.code === 4401) {
      renewAndReconnect(ev, wasOpen);
      return;
    }
    scheduleReconnect();
  };
}

function forbiddenText(ev) {
  var refused = lastRefusal();
  return instanceName() + ' refused room ' + S.room + ' (' + ev.code + ': ' +
    (refused ? refused.message : ev.reason || 'forbidden') + ') — not reconnecting';
}

/**
 * A 4401: the token expired or was refused. Get a new one, then connect
 * again at once (the URL asks `since` our last id, so nothing is lost);
 * after a second refusal in a row without a welcome, with the backoff.
 */
function renewAndReconnect(ev, wasOpen) {
  var refused = lastRefusal();
  var expired = !refused && /expired/i.test(ev.reason || '');
  if (!wasOpen) authFailures += 1;
  dropToken();
  setConn({ socket: 'none', retryAt: 0 });
  var joinedAt = S.joinSeq;
  var why = expired
    ? 'Your sign-in expired.'
    : 'The server refused your sign-in token' + (refused ? ' (' + refused.code + ': ' + refused.message + ').' : '.');
  freshToken(why).then(function () {
    if (!S.joined || joinedAt !== S.joinSeq || S.ws) return;
    connLine('token-renewed', (expired ? 'Your sign-in expired — got a new token, reconnecting'
      : 'Got a new sign-in token — reconnecting'), 'info');
    if (authFailures > 1) scheduleReconnect();
    else connect('reconnect');
  }, function (e) {
    if (!S.joined || joinedAt !== S.joinSeq || S.ws) return;
    noToken(e);
  });
}

export function clearReconnect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  stopCountdown();
}

function scheduleReconnect() {
  clearReconnect();
  if (!S.joined) return;
  var exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, S.attempt));
  // jitter: somewhere between 50% and 100% of the exponential delay
  var delay = Math.round(exp / 2 + Math.random() * exp / 2);
  S.attempt += 1;
  setConn({ socket: 'none', retryAt: Date.now() + delay });
  startCountdown();
  reconnectTimer = setTimeout(function () { connect('reconnect'); }, delay);
}

/**
 * Replace the socket on purpose (the X-ray toggle: trace is a handshake
 * parameter). Make before break: the old socket stays open until the new
 * one is welcomed, so the room sees no leave and join, and nothing is
 * missed (the new socket replays from `since`; ids already shown are
 * dropped).
 */
export function reconnectNow(reason) {
  if (!S.joined) return;
  dropOldSocket();
  oldWs = S.ws; // detached: its frames and its close are ignored from now on
  S.ws = null;
  clearTimeout(S.catchup && S.catchup.timer);
  S.catchup = null;
  S.attempt = 0;
  connect(reason);
}

/** Close the socket a deliberate reconnection replaced. */
export function dropOldSocket() {
  var old = oldWs;
  if (!old) return;
  oldWs = null;
  try { old.close(1000, 'replaced'); } catch (e) { /* ignore */ }
  // The new socket's presence snapshot (right after its welcome) counts
  // the old one among our tabs, and the `presence_diff` that says it
  // closed comes up to half a second later: onPresenceFrame takes it off
  // at once, and that diff then changes nothing.
  S.uncountOld = true;
}

el.bannerRetry.addEventListener('click', function () {
  if (S.joined && !S.ws) {
    if (conn.halted) S.attempt = 0;
    connect('reconnect');
  }
});

window.addEventListener('online', function () {
  setConn({ deviceOffline: false });
  if (S.joined && !S.ws && reconnectTimer) {
    S.attempt = 0;
    connect('reconnect');
  }
});
window.addEventListener('offline', function () {
  setConn({ deviceOffline: true });
});
