/* The connection state machine: the one story the pill, the banner and the
 * composer tell.
 *
 * Separate because it is the page's single source of truth about "can I
 * send right now, and if not, why": every other file asks phase() or
 * canSend() instead of looking at the socket, and only setConn() moves it.
 * Views elsewhere that follow the state (the composer note, retry buttons,
 * the members' staleness, the fault panel) register with follow(), so this
 * file depends on none of them.
 */

import { el } from './dom.js';
import { S, debug } from './session.js';

// The connection's whole story lives in `conn`, and only setConn() changes
// it. Every change re-renders the pill, the banner and the composer from
// it (render()), so they cannot tell different stories; the lines in the
// conversation (lost, back, caught up) are written by the event handlers
// that cause each change.
export var conn = {
  socket: 'none',     // 'none' (waiting to retry, or not joined) | 'opening' | 'open' (welcome received)
  everOpen: false,    // a welcome came since joining: a loss now means "reconnecting"
  delivery: 'up',     // 'up' | 'down': the server's status frames (can it reach Redis?)
  deliveryReason: '', // the server's words for "down"
  retryAt: 0,         // when the next attempt starts (socket 'none')
  deviceOffline: typeof navigator.onLine === 'boolean' ? !navigator.onLine : false,
  lostAt: 0,          // when the current outage began (socket or Redis), for "back after 3 s"
  halted: ''          // not reconnecting, and why (a room the token does not allow; no token given)
};

var countdownTimer = null;
var followers = [];   // re-rendered after every render()
var onResume = [];    // run (after the current handler) when sending starts working

/** Call `fn` at the end of every render(): a view that follows the state. */
export function follow(fn) { followers.push(fn); }

/** Run `fn` whenever sending works again (the queue goes out then). */
export function whenSendable(fn) { onResume.push(fn); }

/**
 * The one state the page is in, derived from `conn`:
 * idle (not joined) | connecting (first attempt) | reconnecting |
 * halted (not trying again: `conn.halted` says why) |
 * offline (the browser says there is no network) |
 * paused (connected, but the server cannot reach Redis) | connected.
 */
export function phase() {
  if (!S.joined) return 'idle';
  if (conn.halted && conn.socket === 'none') return 'halted';
  if (conn.socket === 'open') return conn.delivery === 'down' ? 'paused' : 'connected';
  // Turning the X-ray on or off reconnects on purpose: not an outage.
  if (conn.socket === 'opening' && S.connectReason === 'xray') return 'connecting';
  if (conn.deviceOffline) return 'offline';
  return conn.everOpen || S.attempt > 0 ? 'reconnecting' : 'connecting';
}

export function canSend() { return phase() === 'connected'; }

export function setConn(patch) {
  var before = phase();
  Object.keys(patch).forEach(function (k) { conn[k] = patch[k]; });
  var after = phase();
  if (before !== after && (after === 'paused' || after === 'reconnecting' || after === 'offline') &&
      (before === 'connected' || before === 'paused')) {
    conn.lostAt = Date.now();
  }
  render();
  // Held messages go out as soon as sending works again (after the
  // handler that made it work has finished).
  if (after === 'connected' && before !== 'connected') {
    onResume.forEach(function (fn) { setTimeout(fn, 0); });
  }
}

function secondsLeft() {
  return Math.max(1, Math.ceil((conn.retryAt - Date.now()) / 1000));
}

export function instanceName() { return S.instance ? 'instance ' + S.instance : 'the server'; }

/** The pill, the banner and the composer, from phase(). */
export function render() {
  var ph = phase();
  var waiting = conn.socket === 'none' && conn.retryAt > Date.now();
  var pill, banner = '';
  switch (ph) {
    case 'idle':
      pill = 'not connected';
      break;
    case 'connecting':
      pill = 'connecting…';
      break;
    case 'reconnecting':
      pill = waiting ? 'reconnecting in ' + secondsLeft() + ' s' : 'reconnecting…';
      banner = 'Connection to the server lost — ' +
        (waiting ? 'trying again in ' + secondsLeft() + ' s' : 'reconnecting now') +
        '. Messages you send now wait here and go out when it is back.';
      break;
    case 'offline':
      pill = 'offline';
      banner = 'This device is offline — ' +
        (waiting ? 'trying again in ' + secondsLeft() + ' s' : 'waiting for the network') +
        '. Messages you send now wait here and go out when it is back.';
      break;
    case 'halted':
      pill = 'not connected';
      banner = conn.halted + ' Messages you send now wait here.';
      break;
    case 'paused':
      pill = 'sending paused';
      banner = 'Connected to ' + instanceName() + ', but it lost its link to Redis: sending is paused, ' +
        'and messages from other instances will arrive when it is back. ' +
        'Messages you send now wait here and go out then.';
      break;
    default:
      pill = 'connected';
  }
  debug.state = ph;
  el.status.setAttribute('data-state', ph);
  el.status.setAttribute('data-delivery', conn.delivery);
  el.statusText.textContent = pill;
  el.status.title = ph === 'paused' && conn.deliveryReason ? conn.deliveryReason : pill;

  el.banner.hidden = banner === '';
  el.banner.setAttribute('data-state', ph);
  el.bannerText.textContent = banner;
  // "retry now" skips the backoff wait; it makes no sense while paused
  // (the server retries Redis by itself) or while an attempt is running.
  el.bannerRetry.hidden = ph === 'halted' ? false : !(ph === 'reconnecting' || ph === 'offline') || !waiting;

  // The composer stays usable in every joined state: what cannot go out
  // now is held (and says so), instead of Enter doing nothing.
  var sendable = ph === 'connected';
  el.send.disabled = !S.joined;
  el.send.textContent = sendable ? 'Send' : 'Queue';
  el.send.title = sendable ? 'send' : 'sending is paused: your message waits here and goes out when the chat is back';
  el.composer.classList.toggle('is-offline', !sendable);
  el.composer.setAttribute('data-state', ph);
  followers.forEach(function (fn) { fn(); });
}

// Keep the countdowns ("reconnecting in 3 s") moving.
export function startCountdown() {
  clearInterval(countdownTimer);
  countdownTimer = setInterval(render, 250);
}

/** Stop the countdown: an attempt is running, or nothing is to retry. */
export function stopCountdown() {
  clearInterval(countdownTimer);
  countdownTimer = null;
}

/** The instance this tab's socket is on: in the header, and in chatDebug. */
export function setInstance(id) {
  S.instance = id || null;
  debug.instance = S.instance;
  el.instance.textContent = id || '?';
  el.instance.setAttribute('data-instance', id || '');
}
