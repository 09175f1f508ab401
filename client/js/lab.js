/* The lab: a look inside the cluster from the page, for the demo.
 *
 * Two panels under the member list, on the page the admin listener serves
 * (/config.json says "admin": true; the public port has neither /stats
 * nor the fault panel). The instances view (with the X-ray or demo
 * controls on) polls GET /stats for every instance's Redis link and
 * rates. The fault panel (only with --demo-controls) breaks something on
 * purpose (POST /demo/...) and follows what happens: the connection's lines,
 * the effect's countdown, the /metrics counters that moved. Separate
 * because it talks to the HTTP side, not the WebSocket, and a chat without
 * it is the same chat.
 */

import { el, h } from './dom.js';
import { plural, byName } from './format.js';
import { S, debug } from './session.js';
import { conn } from './state.js';

var STATS_POLL_MS = 3000;   // the instances view polls GET /stats this often
var METRICS_POLL_MS = 1000; // the fault panel's counters, while an experiment runs
var EXPERIMENT_MS = 20000;  // how long the fault panel follows what a button did

var stats = null;      // last GET /stats answer
var statsTimer = null;
var statsError = '';

// ---------------------------------------------------------------- instances view
// Each instance that is up (it reported through Redis in the last few
// seconds), from GET /stats, which any instance answers for all of them.

function statsWanted() {
  var admin = !!(S.config && S.config.admin === true);
  return S.joined && admin && (S.trace || demoControlsOn());
}

export function syncStatsPolling() {
  var want = statsWanted();
  el.instancesView.hidden = !want;
  if (want && !statsTimer) pollStats();
  if (!want && statsTimer) {
    clearTimeout(statsTimer);
    statsTimer = null;
  }
}

function pollStats() {
  statsTimer = setTimeout(pollStats, STATS_POLL_MS);
  fetch('stats', { cache: 'no-store' })
    .then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.json();
    })
    .then(function (st) {
      if (!st || !Array.isArray(st.instances)) throw new Error('unexpected answer');
      stats = st;
      statsError = '';
      // The instance that answered says until when its delivery is held.
      var until = st.local && st.local.delivery_paused_until_ms;
      if (fault.effect && fault.effect.kind === 'pause' && typeof until === 'number' &&
          S.config && st.instance === S.config.instance) {
        fault.effect.until = until;
      }
      renderInstances();
      renderFaultPanel();
    })
    .catch(function (e) {
      statsError = e.message || String(e);
      renderInstances();
    });
}

function fmtRate(v) {
  if (typeof v !== 'number' || !isFinite(v)) return '?';
  return v < 10 ? (Math.round(v * 10) / 10).toString() : String(Math.round(v));
}

function renderInstances() {
  var list = el.instanceList;
  while (list.firstChild) list.removeChild(list.firstChild);
  var st = stats;
  var rows = st && Array.isArray(st.instances) ? st.instances.slice() : [];
  rows.sort(function (a, b) { return byName(String(a.instance), String(b.instance)); });
  rows.forEach(function (inst) {
    if (!inst || typeof inst.instance !== 'string') return;
    var you = inst.instance === S.instance;
    var redisUp = inst.redis !== 'down';
    var li = h('li', 'instance-row' + (you ? ' you' : ''));
    li.setAttribute('data-testid', 'instance-row');
    li.setAttribute('data-instance', inst.instance);
    li.setAttribute('data-redis', redisUp ? 'up' : 'down');
    li.setAttribute('data-you', String(you));
    var top = h('div', 'instance-top');
    var dot = h('span', 'instance-dot');
    dot.title = redisUp ? 'its Redis subscription is up' : 'its Redis subscription is down';
    top.appendChild(dot);
    var name = h('code', 'instance-name', inst.instance);
    name.setAttribute('data-testid', 'instance-name');
    top.appendChild(name);
    if (you) top.appendChild(h('span', 'msg-you', 'this tab'));
    li.appendChild(top);
    var clients = Number.isFinite(inst.clients) ? inst.clients : 0;
    var meta = h('div', 'instance-meta');
    meta.appendChild(h('span', 'instance-redis', redisUp ? 'redis up' : 'redis down'));
    meta.appendChild(document.createTextNode(' · ' +
      plural(clients, 'client', 'clients') + ' · ' + fmtRate(inst.published_per_s) + ' sent/s · ' +
      fmtRate(inst.delivered_per_s) + ' delivered/s'));
    meta.setAttribute('data-testid', 'instance-meta');
    meta.title = 'sent/s: messages this instance accepted from its clients; ' +
      'delivered/s: copies it wrote to its clients' +
      (Number.isFinite(inst.redis_reconnects) ? '; Redis reconnections: ' + inst.redis_reconnects : '') +
      (Number.isFinite(inst.slow_clients_dropped) ? '; slow consumers dropped: ' + inst.slow_clients_dropped : '') +
      (Number.isFinite(inst.history_replayed) ? '; replayed from history: ' + inst.history_replayed : '');
    li.appendChild(meta);
    list.appendChild(li);
  });
  var note = statsError ? 'stats unavailable: ' + statsError
    : st ? plural(rows.length, 'up', 'up') + ' · every ' + STATS_POLL_MS / 1000 + ' s' : 'loading…';
  el.instancesNote.textContent = note;
}

// ---------------------------------------------------------------- fault panel
// Only when /config.json says "demo_controls": true (the instance runs
// with --demo-controls, and answers those POSTs to loopback callers only).
// Each button asks the instance serving this page to break something;
// the panel then follows what happens for a while: the lines the
// connection writes (down, up, lost, back, caught up), the effect's
// countdown, and the counters of /metrics that moved.

var fault = {
  panel: null,        // the <section>, present only with demo controls
  experiment: null,   // {kind, at, baseline: Map, series: Map, timer}
  effect: null,       // {kind, until}: a pause or a stall under way
  tick: null
};

/** What the fault log says when an effect ends. */
var RESUMED = {
  cut: 'the cut ended: the instance reconnects to Redis and catches up',
  pause: 'delivery resumed',
  stall: 'the stall ended (or the stalled connection was dropped)'
};

var COUNTERS = [
  ['chat_redis_subscriber_up', 'Redis subscription up (1) or down (0)'],
  ['chat_redis_reconnects_total', 'Redis reconnections'],
  ['chat_broker_messages_total', 'messages from Redis'],
  ['chat_history_replayed_total', 'messages replayed from history'],
  ['chat_history_caught_up_total', 'messages caught up from history'],
  ['chat_messages_delivered_total', 'deliveries to clients'],
  ['chat_deliveries_queued_total', 'deliveries queued (socket full)'],
  ['chat_slow_clients_dropped_total', 'slow consumers dropped'],
  ['chat_connections_total', 'connections'],
  ['chat_clients_connected', 'clients connected']
];

function demoControlsOn() { return !!fault.panel; }

export function applyDemoControls(cfg) {
  var on = cfg && cfg.demo_controls === true;
  if (on && !fault.panel) buildFaultPanel();
  if (!on && fault.panel) {
    fault.panel.remove();
    fault.panel = null;
  }
  syncStatsPolling();
  renderFaultPanel();
}

function faultRow(kind, button, help, seconds) {
  var row = h('div', 'fault');
  var line = h('div', 'fault-line');
  var btn = h('button', 'btn btn-fault', button);
  btn.type = 'button';
  btn.setAttribute('data-testid', 'fault-' + kind);
  line.appendChild(btn);
  var input = null;
  if (seconds) {
    line.appendChild(document.createTextNode(' for '));
    input = document.createElement('input');
    input.type = 'number';
    input.min = '1';
    input.max = '60';
    input.value = String(seconds);
    input.className = 'fault-seconds';
    input.setAttribute('data-testid', 'fault-' + kind + '-seconds');
    input.setAttribute('aria-label', 'seconds');
    line.appendChild(input);
    line.appendChild(document.createTextNode(' s'));
  }
  row.appendChild(line);
  row.appendChild(h('p', 'fault-help', help));
  btn.addEventListener('click', function () {
    var n = input ? Math.max(1, Math.min(60, Math.round(Number(input.value) || seconds))) : 0;
    runFault(kind, n);
  });
  return { row: row, button: btn };
}

function buildFaultPanel() {
  var sec = h('section', 'lab faults');
  sec.setAttribute('data-testid', 'fault-panel');
  sec.setAttribute('aria-label', 'fault panel');
  var title = h('h3', 'lab-title', 'Break it ');
  fault.where = h('span', 'lab-sub', '');
  fault.where.setAttribute('data-testid', 'fault-where');
  title.appendChild(fault.where);
  sec.appendChild(title);
  fault.cut = faultRow('cut', 'Cut Redis subscription',
    'The instance closes its subscription as a network cut would and stays away N seconds: status goes down, then up, and it catches up from history.', 5);
  fault.pause = faultRow('pause', 'Pause delivery',
    'The instance stops delivering to its clients; messages wait, in order, and arrive when it resumes.', 5);
  fault.stall = faultRow('stall', 'Stall this tab',
    'The instance stops writing to this tab, as if it stopped reading; past its send buffer it drops the tab as a slow consumer.', 10);
  sec.appendChild(fault.cut.row);
  sec.appendChild(fault.pause.row);
  sec.appendChild(fault.stall.row);
  fault.status = h('p', 'fault-status');
  fault.status.setAttribute('data-testid', 'fault-status');
  fault.status.setAttribute('role', 'status');
  sec.appendChild(fault.status);
  fault.log = h('ol', 'fault-log');
  fault.log.setAttribute('data-testid', 'fault-log');
  sec.appendChild(fault.log);
  fault.counters = h('div', 'fault-counters');
  fault.counters.setAttribute('data-testid', 'fault-counters');
  sec.appendChild(fault.counters);
  el.members.appendChild(sec);
  fault.panel = sec;
}

export function renderFaultPanel() {
  if (!fault.panel) return;
  var target = (S.config && typeof S.config.instance === 'string' && S.config.instance) || S.instance || '?';
  // The tab's own client id (from its welcome frame): what a stall
  // made with curl names (?client=...).
  fault.where.textContent = 'demo controls · instance ' + target +
    (debug.client ? ' · this tab is client ' + debug.client : '');
  var open = conn.socket === 'open';
  fault.cut.button.disabled = !S.joined;
  fault.pause.button.disabled = !S.joined;
  fault.stall.button.disabled = !open || !debug.client;
  var text = '';
  var e = fault.effect;
  if (e && e.kind === 'stall' && e.client !== debug.client) {
    // The stalled connection is gone (dropped as a slow consumer, then a
    // new one): the stall went with it.
    e.until = 0;
  }
  if (e && e.until > Date.now()) {
    var left = Math.ceil((e.until - Date.now()) / 1000) + ' s';
    text = e.kind === 'cut'
      ? 'Instance ' + target + ' is cut off from Redis: it reconnects and catches up in ' + left
      : e.kind === 'pause'
        ? 'Delivery on instance ' + target + ' paused: resumes in ' + left
        : 'This tab is stalled: instance ' + target + ' holds what it would send, for ' + left + ' more (or until its send buffer is full)';
  } else if (e) {
    fault.effect = null;
  }
  fault.status.textContent = text;
  fault.status.hidden = text === '';
}

/** A line in the fault log, while an experiment is being followed. */
export function faultLog(event, text) {
  var x = fault.experiment;
  if (!fault.panel || !x || Date.now() - x.at > EXPERIMENT_MS) return;
  var li = h('li', 'fault-entry fault-' + event);
  li.setAttribute('data-testid', 'fault-log-entry');
  li.setAttribute('data-event', event);
  li.appendChild(h('span', 'fault-when', '+' + ((Date.now() - x.at) / 1000).toFixed(1) + ' s'));
  li.appendChild(h('span', 'fault-what', text));
  fault.log.appendChild(li);
}

function readMetrics() {
  return fetch('metrics', { cache: 'no-store' })
    .then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.text();
    })
    .then(function (body) {
      var values = new Map();
      body.split('\n').forEach(function (line) {
        var m = /^(chat_[a-z_]+) (-?[0-9.e+]+)$/.exec(line.trim());
        if (m) values.set(m[1], Number(m[2]));
      });
      return values;
    });
}

/** Follow /metrics while an experiment runs; show each counter that moved, with every value it took. */
function sampleCounters(x) {
  if (fault.experiment !== x) return;
  readMetrics().then(function (values) {
    if (fault.experiment !== x) return;
    COUNTERS.forEach(function (c) {
      if (!values.has(c[0])) return;
      var series = x.series.get(c[0]) || [];
      var v = values.get(c[0]);
      if (series[series.length - 1] !== v) series.push(v);
      x.series.set(c[0], series);
    });
    renderCounters(x);
  }).catch(function (e) {
    fault.counters.textContent = 'counters unavailable: ' + e.message;
  }).then(function () {
    if (fault.experiment === x && Date.now() - x.at < EXPERIMENT_MS) {
      x.timer = setTimeout(function () { sampleCounters(x); }, METRICS_POLL_MS);
    }
  });
}

function renderCounters(x) {
  var box = fault.counters;
  while (box.firstChild) box.removeChild(box.firstChild);
  var moved = COUNTERS.filter(function (c) { return (x.series.get(c[0]) || []).length > 1; });
  box.appendChild(h('p', 'fault-counters-title', moved.length
    ? 'Counters of instance ' + (S.config && S.config.instance || '?') + ' that moved:'
    : 'No counter moved yet.'));
  var ul = h('ul', 'counter-list');
  moved.forEach(function (c) {
    var li = h('li', 'counter');
    li.setAttribute('data-testid', 'fault-counter');
    li.setAttribute('data-metric', c[0]);
    li.appendChild(h('span', 'counter-name', c[1]));
    li.appendChild(h('span', 'counter-values', x.series.get(c[0]).join(' \u2192 ')));
    li.title = c[0];
    ul.appendChild(li);
  });
  box.appendChild(ul);
}

var FAULT_PATHS = {
  cut: function (n) { return 'demo/cut-subscription?seconds=' + n; },
  pause: function (n) { return 'demo/pause-delivery?seconds=' + n; },
  stall: function (n) {
    return 'demo/stall-reading?client=' + encodeURIComponent(debug.client || '') + '&seconds=' + n;
  }
};

function runFault(kind, seconds) {
  if (!fault.panel) return;
  if (fault.experiment) clearTimeout(fault.experiment.timer);
  var x = { kind: kind, at: Date.now(), series: new Map(), timer: null };
  fault.experiment = x;
  while (fault.log.firstChild) fault.log.removeChild(fault.log.firstChild);
  while (fault.counters.firstChild) fault.counters.removeChild(fault.counters.firstChild);
  var path = FAULT_PATHS[kind](seconds);
  // The counters before the fault, then the POST, then follow.
  readMetrics().catch(function () { return new Map(); }).then(function (values) {
    COUNTERS.forEach(function (c) { if (values.has(c[0])) x.series.set(c[0], [values.get(c[0])]); });
    // The run's token, given by /config.json to this machine's page only:
    // the instance refuses fault requests without it.
    var token = S.config && typeof S.config.demo_token === 'string' ? S.config.demo_token : '';
    return fetch(path, { method: 'POST', cache: 'no-store', headers: { 'X-Demo-Token': token } });
  }).then(function (r) {
    return r.text().then(function (body) {
      var words = body;
      try {
        var j = JSON.parse(body);
        if (j && typeof j.message === 'string') words = j.message;
      } catch (e) { /* a text/plain refusal */ }
      if (!r.ok) {
        faultLog('refused', 'refused (HTTP ' + r.status + '): ' + words);
        return;
      }
      faultLog('done', words);
      if (kind === 'cut' || kind === 'pause' || kind === 'stall') {
        // A stall belongs to this tab's connection: it ends with it.
        fault.effect = { kind: kind, until: Date.now() + seconds * 1000, client: debug.client };
        clearInterval(fault.tick);
        fault.tick = setInterval(function () {
          renderFaultPanel();
          if (!fault.effect) {
            clearInterval(fault.tick);
            faultLog('resumed', RESUMED[kind]);
          }
        }, 250);
      }
      renderFaultPanel();
      sampleCounters(x);
    });
  }).catch(function (e) {
    faultLog('refused', 'request failed: ' + e.message);
  });
}
