/* The sign-in token (`--auth token`).
 *
 * With `"auth": "token"` in /config.json the server wants a JWT in each
 * socket's first frame, and names us from it. This file owns that token:
 * the one the page was opened with (`#token=...` in the address, read once
 * at load and then removed from the address bar), fresh ones from the
 * application's `auth_token_url` (or, without one, pasted by the user),
 * and the refresh before it expires: a fresh token sent as an `auth` frame
 * on the open socket, answered by `authenticated`. socket.js asks it for
 * a token before it connects, and after a 4401.
 */

import { el } from './dom.js';
import { fmtTime } from './format.js';
import { S, debug } from './session.js';
import { connLine } from './conversation.js';

var REFRESH_LEAD_MS = 30000;   // refresh this long before `exp`...
var REFRESH_AT = 2 / 3;        // ...or at this share of what is left, if that is sooner (a short token
                               // keeps a third of its life for the fetch, however slow the machine)
var REFRESH_RETRY_MS = 5000;   // a failed refresh is tried again after this, if time is left
var USABLE_MIN_MS = 2000;      // a token closer than this to `exp` is not worth connecting with
var JWT_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

// The error codes that are about the token (docs/PROTOCOL.md, "Authentication").
var AUTH_CODES = ['auth_required', 'token_too_large', 'token_malformed', 'token_algorithm',
  'token_unknown_key', 'token_signature', 'token_expired', 'token_not_yet_valid',
  'token_claims', 'room_forbidden'];

var token = null;       // the token the next socket sends first
var claims = null;      // what it says about itself (decoded, not verified: the server verifies)
var tokenExpMs = 0;     // when the held token expires (its own `exp`)
var expiresMs = 0;      // when the connection's token expires (the server's word)
var refreshTimer = null;
var refreshing = null;  // {ws}: a fresh token was sent on this socket, its answer not yet in
var inflight = null;    // the fresh token being fetched (or asked for)
var refusal = null;     // the last `error` frame that refused a token at the handshake

debug.auth = 'off';
debug.user = null;
debug.expires = null;
debug.authSent = 0;       // `auth` frames sent, first frames and refreshes
debug.authenticated = 0;  // `authenticated` answers (refreshes accepted)
debug.tokenFetches = 0;   // requests to auth_token_url
debug.tokenFromFragment = false;

function decodeClaims(jwt) {
  try {
    var part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    while (part.length % 4) part += '=';
    var bytes = Uint8Array.from(atob(part), function (c) { return c.charCodeAt(0); });
    var json = JSON.parse(new TextDecoder().decode(bytes));
    return json && typeof json === 'object' ? json : null;
  } catch (e) {
    return null;
  }
}

function setToken(jwt) {
  token = jwt;
  claims = decodeClaims(jwt);
  tokenExpMs = claims && Number.isFinite(claims.exp) ? claims.exp * 1000 : 0;
}

// The address the page was opened with may carry the token, in its
// fragment (never sent to a server, unlike a query). Read it once, and
// take it out of the address bar, the history and any link copied later.
(function readFragment() {
  var hash = window.location.hash;
  if (!hash || hash.length < 2) return;
  var params = new URLSearchParams(hash.slice(1));
  var t = params.get('token');
  if (t === null) return;
  params.delete('token');
  if (JWT_RE.test(t.trim())) {
    setToken(t.trim());
    debug.tokenFromFragment = true;
  }
  try {
    var rest = params.toString();
    var u = new URL(window.location.href);
    u.hash = rest ? '#' + rest : '';
    window.history.replaceState(window.history.state, '', u.toString());
  } catch (e) { /* ignore */ }
})();

/** Does the server want a token (`"auth": "token"` in config.json)? */
export function authOn(cfg) {
  var c = cfg || S.config;
  return !!(c && c.auth === 'token');
}

function tokenUrl() {
  var c = S.config;
  return c && typeof c.auth_token_url === 'string' && c.auth_token_url.trim() !== '' ? c.auth_token_url.trim() : '';
}

/** The display name the token gives, if it says (until the welcome says it for sure). */
export function tokenName() {
  return claims && typeof claims.name === 'string' ? claims.name : '';
}

/** The token the next socket sends, or null. */
export function currentToken() { return token; }

/** A body from auth_token_url: the token as plain text, or JSON {"token": "..."}. */
function parseTokenBody(text) {
  var body = String(text || '').trim();
  if (body.charAt(0) === '{') {
    var json = JSON.parse(body);
    body = json && typeof json.token === 'string' ? json.token.trim() : '';
  }
  if (!JWT_RE.test(body)) throw new Error('the answer is not a token');
  return body;
}

function fetchToken(url) {
  debug.tokenFetches += 1;
  var ask = function (credentials) {
    return fetch(url, { credentials: credentials, cache: 'no-store' });
  };
  return ask('include')
    .catch(function () {
      // An endpoint that answers `Access-Control-Allow-Origin: *` cannot be
      // read with credentials: ask once more without them.
      debug.tokenFetches += 1;
      return ask('same-origin');
    })
    .then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.text();
    })
    .then(parseTokenBody);
}

function promptToken(why) {
  return new Promise(function (resolve, reject) {
    var text = window.prompt(why + '\n\nPaste a new sign-in token (a JWT) to go on:', '');
    if (text === null || text.trim() === '') {
      var e = new Error('no token given');
      e.cancelled = true;
      reject(e);
      return;
    }
    try {
      resolve(parseTokenBody(text));
    } catch (err) {
      reject(err);
    }
  });
}

/**
 * A Promise of a new token: from auth_token_url if there is one, else
 * asked of the user, saying `why` (expired, refused, and the server's words).
 * A rejection with `cancelled` set means the user gave none.
 */
export function freshToken(why) {
  if (inflight) return inflight;
  var url = tokenUrl();
  var p = url ? fetchToken(url) : promptToken(why || 'This chat needs you to sign in.');
  inflight = p.then(function (t) {
    inflight = null;
    setToken(t);
    return t;
  }, function (e) {
    inflight = null;
    throw e;
  });
  return inflight;
}

/** A Promise of a token good enough to connect with: the one held, or a fresh one. */
export function ensureToken() {
  if (token && (!tokenExpMs || tokenExpMs - Date.now() > USABLE_MIN_MS)) return Promise.resolve(token);
  return freshToken(token ? 'Your sign-in token has expired.' : 'This chat needs you to sign in.');
}

/** Forget the held token (the server refused it): the next connection gets a fresh one. */
export function dropToken() {
  token = null;
  claims = null;
  tokenExpMs = 0;
}

/** The first frame of a socket: who we are. */
export function sendAuth(ws) {
  if (!token) return false;
  if (!refreshing) refusal = null; // a new attempt: an old refusal says nothing about it
  try {
    ws.send(JSON.stringify({ type: 'auth', token: token }));
  } catch (e) {
    console.warn('[chat] auth frame not sent', e);
    return false;
  }
  debug.authSent += 1;
  return true;
}

// ---- lines
function untilText() {
  return expiresMs ? ' (it expires at ' + fmtTime(expiresMs) + ')' : '';
}

function showSignedIn() {
  el.myName.title = S.user
    ? 'signed in as ' + S.user + (expiresMs ? ' until ' + fmtTime(expiresMs) : '')
    : '';
}

// ---- keeping it fresh
function clearRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
}

/** Fetch a fresh token some time before `exp`, and send it on the open socket. */
function armRefresh() {
  clearRefresh();
  if (!tokenUrl() || !expiresMs) return;
  var left = expiresMs - Date.now();
  var delay = Math.max(0, Math.max(left - REFRESH_LEAD_MS, left * REFRESH_AT));
  refreshTimer = setTimeout(refreshNow, delay);
}

function refreshNow() {
  refreshTimer = null;
  var ws = S.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || refreshing) return;
  var url = tokenUrl();
  if (!url) return;
  fetchToken(url).then(function (t) {
    setToken(t); // the next socket uses it, whatever this one does
    if (S.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
    refreshing = { ws: ws };
    if (!sendAuth(ws)) refreshing = null;
  }, function (e) {
    if (S.ws !== ws) return;
    var left = expiresMs - Date.now();
    var again = left > 2 * REFRESH_RETRY_MS;
    var li = connLine('token-refresh-failed', 'Could not get a fresh sign-in token (' + e.message + ')' +
      (again ? ' — trying again in ' + REFRESH_RETRY_MS / 1000 + ' s'
        : ' — the server will close this connection when the token expires' + untilText() +
          '; a new token is fetched then'), 'error');
    li.setAttribute('data-reason', e.message);
    if (again) refreshTimer = setTimeout(refreshNow, REFRESH_RETRY_MS);
  });
}

// ---- what the server says about it
/** The welcome: who the server says we are, and until when. */
export function onWelcomeAuth(frame) {
  refreshing = null;
  refusal = null;
  if (typeof frame.user === 'string') {
    S.user = frame.user;
    debug.user = frame.user;
  }
  holdUntil(frame.expires);
}

/** The server's word on when the connection's token expires: shown, and refreshed before then. */
function holdUntil(expires) {
  if (Number.isFinite(expires)) {
    expiresMs = expires * 1000;
    debug.expires = expires;
  }
  showSignedIn();
  armRefresh();
}

/** `authenticated`: the server took our fresh token. */
export function onAuthenticated(frame) {
  refreshing = null;
  debug.authenticated += 1;
  holdUntil(frame.expires);
}

/**
 * An `error` frame: true if it was about a token. A refused refresh says
 * so (the connection keeps its old expiry); a refusal at the handshake is
 * kept for the Close that follows it.
 */
export function onAuthError(frame) {
  if (AUTH_CODES.indexOf(frame.code) < 0) return false;
  var words = typeof frame.message === 'string' && frame.message ? frame.message : frame.code;
  if (refreshing && refreshing.ws === S.ws) {
    refreshing = null;
    var li = connLine('token-refused', 'The server refused the fresh sign-in token (' + frame.code + ': ' + words +
      ') — this connection lasts until its token expires' + untilText(), 'error');
    li.setAttribute('data-code', frame.code);
    return true;
  }
  refusal = { code: frame.code, message: words };
  return true;
}

/** The refusal that came before the Close, if any: {code, message}. */
export function lastRefusal() { return refusal; }

/** The socket closed: no refresh for it any more. */
export function onSocketClosed() {
  clearRefresh();
  refreshing = null;
  expiresMs = 0;
}

/** Not in a room any more (leaving): the token stays, its schedule does not. */
export function resetAuth() {
  onSocketClosed();
  refusal = null;
  S.user = null;
  debug.user = null;
  debug.expires = null;
  el.myName.title = '';
}

/**
 * config.json said how this server checks who we are. With a token, the
 * join form's name field is not used (the token names us): it is hidden,
 * and a hint says so.
 */
export function applyAuthConfig(cfg) {
  var on = authOn(cfg);
  debug.auth = on ? 'token' : 'off';
  if (!el.nameField || !el.nameTokenHint) return;
  el.nameField.hidden = on;
  el.nameInput.disabled = on;
  el.nameTokenHint.hidden = !on;
  el.nameTokenHint.textContent = on
    ? 'You join as your sign-in says' + (tokenName() ? ' (' + tokenName() + ')' : '') +
      ': this server names you from your sign-in token, not from a name typed here.'
    : '';
}
