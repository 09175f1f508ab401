/* The X-ray: how one traced message travelled, hop by hop.
 *
 * Separate because it is a view of its own, with its own vocabulary (hops,
 * stamps, clocks): the conversation hands it a message that carries a
 * `trace` and gets back one <details> to put under the text. Whether
 * tracing is on (the toggle, trace=1 in the handshake) is decided by
 * app.js and the socket, not here.
 */

import { h } from './dom.js';
import { pad2 } from './format.js';
import { S } from './session.js';

// A traced connection (trace=1) gets each message with a `trace` object:
// the stamps of the hops it took (docs/PROTOCOL.md). The page adds the
// last one, "shown", on its own clock.

/** Microseconds since the Unix epoch on this tab's clock, as sent in typed_us. */
export function nowUs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

function isStamp(v) { return typeof v === 'number' && isFinite(v) && v > 0; }

/** The hops of a traced message, in the order it took them. */
function traceHops(msg, mine, shownUs) {
  var t = msg.trace;
  var readBy = typeof t.read_by === 'string' && t.read_by ? t.read_by : (msg.instance || '?');
  var recvBy = typeof t.received_by === 'string' && t.received_by ? t.received_by : (S.instance || '?');
  var via = typeof t.via === 'string' ? t.via : 'pubsub';
  var hops = [];
  if (isStamp(t.typed_us)) {
    hops.push({ hop: 'typed', us: t.typed_us,
      label: mine ? 'typed in this tab' : 'typed in ' + msg.from + "'s tab",
      clock: mine ? "this tab's clock" : msg.from + "'s browser clock" });
  }
  if (isStamp(t.read_us)) {
    hops.push({ hop: 'read', us: t.read_us, label: 'read by instance ' + readBy,
      clock: 'instance ' + readBy + "'s clock" });
  }
  if (isStamp(t.accepted_ms)) {
    hops.push({ hop: 'accepted', us: t.accepted_ms * 1000, coarse: true,
      label: via === 'local' ? 'accepted by instance ' + readBy + ' (no Redis)' : 'accepted by Redis (the id\'s time)',
      clock: via === 'local' ? 'instance ' + readBy + "'s clock, whole ms" : "Redis's clock, whole ms" });
  }
  if (isStamp(t.received_us)) {
    hops.push({ hop: 'received', us: t.received_us, via: via,
      label: via === 'history' ? 'read from history by instance ' + recvBy + ' (catch-up)'
        : via === 'local' ? 'handed to the fan-out of instance ' + recvBy
        : 'received by the subscriber of instance ' + recvBy,
      clock: 'instance ' + recvBy + "'s clock" });
  }
  // Servers before queued_us stamped sent_us when the frame was made, before
  // any wait in the outbox: without it, that wait shows after "written".
  if (isStamp(t.queued_us)) {
    hops.push({ hop: 'queued', us: t.queued_us, label: "put in this tab's outbox by instance " + recvBy,
      clock: 'instance ' + recvBy + "'s clock" });
  }
  if (isStamp(t.sent_us)) {
    hops.push({ hop: 'sent', us: t.sent_us,
      label: isStamp(t.queued_us) ? "taken from the outbox, written to this tab's socket by instance " + recvBy
        : "written to this tab's socket by instance " + recvBy,
      clock: 'instance ' + recvBy + "'s clock" });
  }
  hops.push({ hop: 'shown', us: shownUs, label: 'shown in this tab', clock: "this tab's clock" });
  return hops;
}

/** "12:03:04.567 891" (µs) or "12:03:04.567" (whole ms). */
function fmtUs(us, coarse) {
  var ms = Math.floor(us / 1000);
  var d = new Date(ms);
  var base = pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()) + '.' +
    String(d.getMilliseconds()).padStart(3, '0');
  if (coarse) return base;
  return base + '\u2009' + String(Math.round(us - ms * 1000)).padStart(3, '0');
}

/** A duration in µs for people: "0.412 ms", "38.1 ms", "2.31 s". */
function fmtDur(us) {
  var a = Math.abs(us) / 1000;
  var text = a < 10 ? a.toFixed(3) + ' ms' : a < 1000 ? a.toFixed(1) + ' ms' : (a / 1000).toFixed(2) + ' s';
  return (us < 0 ? '\u2212' : '') + text;
}

/**
 * The X-ray of one message: a one-line summary (total time, path) that
 * opens into the list of hops, each with its time, the time since the
 * hop before, and the clock it was read on.
 */
export function buildXray(msg, mine, shownUs) {
  var hops = traceHops(msg, mine, shownUs);
  var box = h('details', 'xray');
  box.setAttribute('data-testid', 'xray');
  box.setAttribute('data-via', typeof msg.trace.via === 'string' ? msg.trace.via : '');
  var first = hops[0];
  var total = hops[hops.length - 1].us - first.us;

  var sum = h('summary', 'xray-summary');
  sum.appendChild(h('span', 'xray-tag', 'X-ray'));
  // Where it went: sender's tab → a → Redis → b → this tab.
  var path = [];
  hops.forEach(function (hp) {
    var stop = hp.hop === 'typed' ? (mine ? 'this tab' : msg.from + "'s tab")
      : hp.hop === 'read' ? (msg.trace.read_by || msg.instance || '?')
      : hp.hop === 'accepted' ? (hp.label.indexOf('Redis') >= 0 ? 'Redis' : null)
      : hp.hop === 'received' ? (msg.trace.received_by || S.instance || '?') + (hp.via === 'history' ? ' (history)' : '')
      : hp.hop === 'shown' ? 'this tab' : null;
    if (stop && path[path.length - 1] !== stop) path.push(stop);
  });
  sum.appendChild(h('span', 'xray-path', path.join(' \u2192 ')));
  var totalEl = h('span', 'xray-total', fmtDur(total));
  totalEl.title = 'from "' + first.label + '" to "shown"';
  sum.appendChild(totalEl);
  // A bar cut in segments proportional to each hop's share of the total.
  var bar = h('span', 'xray-bar');
  bar.setAttribute('aria-hidden', 'true');
  for (var i = 1; i < hops.length; i++) {
    var seg = h('span', 'xray-seg xray-seg-' + hops[i].hop);
    var share = total > 0 ? Math.max(0, hops[i].us - hops[i - 1].us) / total : 0;
    seg.style.flexGrow = String(share);
    bar.appendChild(seg);
  }
  sum.appendChild(bar);
  box.appendChild(sum);

  var list = h('ol', 'xray-hops');
  hops.forEach(function (hp, i) {
    var row = h('li', 'xray-hop xray-hop-' + hp.hop);
    row.setAttribute('data-testid', 'xray-hop');
    row.setAttribute('data-hop', hp.hop);
    row.setAttribute('data-us', String(Math.round(hp.us)));
    row.setAttribute('data-clock', hp.clock);
    var label = h('span', 'xray-label', hp.label);
    label.setAttribute('data-testid', 'xray-label');
    row.appendChild(label);
    var at = h('time', 'xray-at', fmtUs(hp.us, hp.coarse));
    at.setAttribute('data-testid', 'xray-time');
    row.appendChild(at);
    var delta = '';
    if (i > 0) {
      var d = hp.us - hops[i - 1].us;
      delta = (d < 0 ? '' : '+') + fmtDur(d);
      if (hp.coarse || hops[i - 1].coarse) delta = '\u2248' + delta; // a whole-ms stamp on one side
    }
    var dEl = h('span', 'xray-delta', delta);
    dEl.setAttribute('data-testid', 'xray-delta');
    row.appendChild(dEl);
    row.appendChild(h('span', 'xray-clock', hp.clock));
    list.appendChild(row);
  });
  box.appendChild(list);
  box.appendChild(h('p', 'xray-note',
    'Every stamp is a wall-clock time read by the process named; here they all run on one machine, ' +
    'so their clocks agree. Redis stamps whole milliseconds, so its hop may show up to 1 ms early. ' +
    'The time on the "written" row is the wait in the outbox: long when this tab was not reading (or stalled).'));
  return box;
}
