/* pubsub-chat browser client.
 *
 * Plain vanilla JS, no build step. All user/server-provided strings are put
 * into the DOM with textContent / createTextNode only — never innerHTML.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants
  var DEFAULT_ROOM = 'lobby';
  var DEFAULT_WS_PORT = 15000;
  var DEFAULT_WS_PATH = '/ws';
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_MAX_MS = 10000;
  var PENDING_TIMEOUT_MS = 15000; // no echo after this long => mark failed
  var MAX_TEXT = 2000;
  var TYPING_SEND_MS = 2000;  // at most one "typing" frame this often
  var TYPING_SHOW_MS = 3000;  // "bob is typing…" lasts this long after his last one
  var NARROW_MEDIA = '(max-width: 640px)'; // keep in step with style.css
  var LS_NAME = 'pubsub-chat.name';
  var LS_ROOM = 'pubsub-chat.room';
  var ROOM_RE = /^[A-Za-z0-9_-]{1,32}$/;
  var ID_RE = /^(\d+)-(\d+)$/;
  // Rust's char::is_control == Unicode general category Cc.
  var CONTROL_RE = /[\u0000-\u001F\u007F-\u009F]/;

  // ---------------------------------------------------------------- DOM refs
  function $(id) { return document.getElementById(id); }
  var el = {
    app: $('app'),
    session: $('session'),
    roomName: $('room-name'),
    myName: $('my-name'),
    instance: $('instance'),
    status: $('status'),
    statusText: $('status-text'),
    leave: $('leave-button'),
    joinView: $('join-view'),
    joinForm: $('join-form'),
    nameInput: $('name-input'),
    roomInput: $('room-input'),
    nameError: $('name-error'),
    roomError: $('room-error'),
    chatView: $('chat-view'),
    banner: $('offline-banner'),
    messages: $('messages'),
    jump: $('jump-button'),
    composer: $('composer'),
    input: $('message-input'),
    send: $('send-button'),
    members: $('members'),
    membersToggle: $('members-toggle'),
    membersCount: $('members-count'),
    membersSummary: $('members-summary'),
    membersStale: $('members-stale'),
    memberList: $('member-list'),
    membersMore: $('members-more'),
    typing: $('typing')
  };

  // ---------------------------------------------------------------- state
  var S = {
    joined: false,       // user is in a room (chat view shown)
    name: '',            // our display name (as confirmed by welcome, if any)
    room: '',
    config: null,        // last good config.json
    ws: null,            // current socket
    connected: false,    // socket open
    attempt: 0,          // consecutive failed connection attempts
    reconnectTimer: null,
    countdownTimer: null,
    reconnectAt: 0,
    seen: new Set(),     // message ids already shown
    lastId: null,        // highest id seen (string)
    lastKey: null,       // parsed key of lastId
    sentCids: new Set(), // every cid we have sent in this session
    pending: new Map(),  // cid -> {cid, text, li, state, timer, sentAt}
    cidCounter: 0,
    instance: null,
    deliveryDown: false, // the server said it cannot reach Redis
    members: new Map(),  // name -> {name, instances, connections}
    moreMembers: 0,      // members the server did not list
    presenceFresh: false, // a presence snapshot came on the current socket
    typing: new Map(),   // name -> time (ms) until which "is typing" shows
    typingTimer: null,
    lastTypingSent: 0
  };

  var debug = window.chatDebug = {
    instance: null,
    lastId: null,
    received: [],
    state: 'offline',
    client: null
  };

  // ---------------------------------------------------------------- helpers
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

  function pad2(n) { return n < 10 ? '0' + n : String(n); }

  function fmtTime(ts) {
    var d = new Date(ts);
    if (isNaN(d.getTime())) return '--:--:--';
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }

  function nameHue(name) {
    // FNV-1a over UTF-16 code units -> hue 0..359
    var h = 0x811c9dc5;
    for (var i = 0; i < name.length; i++) {
      h ^= name.charCodeAt(i);
      h = Math.imul(h, 0x01000193);
    }
    return (h >>> 0) % 360;
  }

  function initial(name) {
    var chars = Array.from((name || '?').trim());
    return chars.length ? chars[0].toUpperCase() : '?';
  }

  function newCid() {
    S.cidCounter += 1;
    try {
      if (window.crypto && typeof window.crypto.randomUUID === 'function') {
        return window.crypto.randomUUID();
      }
    } catch (e) { /* insecure context etc. */ }
    return 'c' + Date.now().toString(36) + '-' +
      Math.random().toString(36).slice(2, 10) + '-' + S.cidCounter;
  }

  function h(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }

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

  // ---------------------------------------------------------------- status UI
  function setState(state, label) {
    debug.state = state;
    el.status.setAttribute('data-state', state);
    el.statusText.textContent = label || state;
    refreshSendable();
  }

  // Sending needs an open socket AND a server that can reach Redis: while
  // the server says delivery is down, its answer would only be "unavailable".
  function refreshSendable() {
    var connected = debug.state === 'connected';
    var canSend = connected && !S.deliveryDown;
    el.send.disabled = !canSend;
    if (canSend) el.send.removeAttribute('title');
    else el.send.title = connected ? 'sending paused: the server cannot reach Redis' : 'offline';
    el.banner.textContent = connected
      ? 'sending paused — the server lost its link to Redis and is reconnecting'
      : 'sending paused — reconnecting';
    el.banner.hidden = !(S.joined && !canSend);
    el.status.setAttribute('data-delivery', S.deliveryDown ? 'down' : 'up');
    el.composer.classList.toggle('is-offline', !canSend);
    updateRetryButtons();
    refreshMembersStale();
  }

  function setInstance(id) {
    S.instance = id || null;
    debug.instance = S.instance;
    el.instance.textContent = id || '?';
    el.instance.setAttribute('data-instance', id || '');
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
  function avatar(name) {
    var a = h('span', 'avatar', initial(name));
    a.style.setProperty('--hue', String(nameHue(name)));
    a.setAttribute('aria-hidden', 'true');
    return a;
  }

  function buildMessage(msg, mine) {
    var li = h('li', 'msg' + (mine ? ' mine' : ''));
    li.setAttribute('data-testid', 'message');
    li.setAttribute('data-id', msg.id || '');
    li.setAttribute('data-from', msg.from);
    li.setAttribute('data-instance', msg.instance || '');
    if (msg.cid) li.setAttribute('data-cid', msg.cid);
    li.style.setProperty('--hue', String(nameHue(msg.from)));

    li.appendChild(avatar(msg.from));
    var body = h('div', 'msg-body');
    var meta = h('div', 'msg-meta');
    meta.appendChild(h('span', 'msg-from', msg.from));
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
      badge.title = 'delivered via instance ' + msg.instance;
      meta.appendChild(badge);
    }
    body.appendChild(meta);
    var text = h('div', 'msg-text', msg.text);
    text.setAttribute('data-testid', 'message-text');
    body.appendChild(text);
    li.appendChild(body);
    return li;
  }

  function msgTsFromId(id) {
    var k = parseId(id);
    return k ? Number(k[0]) : NaN;
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

  /** Append a line that is not a message (notice, join, leave): it goes
   *  after everything shown so far, but above local pending entries. */
  function appendLine(li) {
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

  function addNotice(text, kind) {
    var li = h('li', 'notice' + (kind ? ' notice-' + kind : ''));
    li.setAttribute('data-testid', 'notice');
    li.setAttribute('role', 'status');
    li.appendChild(h('span', 'notice-time', fmtTime(Date.now())));
    li.appendChild(h('span', 'notice-text', text));
    appendLine(li);
  }

  // ---------------------------------------------------------------- outbox
  function buildPending(p) {
    var li = h('li', 'msg mine pending');
    li.setAttribute('data-testid', 'pending-message');
    li.setAttribute('data-cid', p.cid);
    li.setAttribute('data-from', S.name);
    li.style.setProperty('--hue', String(nameHue(S.name)));
    li.appendChild(avatar(S.name));
    var body = h('div', 'msg-body');
    var meta = h('div', 'msg-meta');
    meta.appendChild(h('span', 'msg-from', S.name));
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

  function sendText(text) {
    if (!S.connected || !S.ws) return false;
    var cid = newCid();
    var p = { cid: cid, text: text, state: 'pending', li: null, timer: null };
    var frame = JSON.stringify({ type: 'message', text: text, cid: cid });
    try {
      S.ws.send(frame);
    } catch (e) {
      console.warn('[chat] send failed', e);
      return false;
    }
    S.sentCids.add(cid);
    S.pending.set(cid, p);
    p.li = buildPending(p);
    withAutoScroll(function () { el.messages.appendChild(p.li); }, true);
    armPendingTimer(p);
    return true;
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
    li.classList.add('failed');
    li.setAttribute('data-testid', 'failed-message');
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

  function retry(p) {
    if (!S.connected) return;
    if (p.li && p.li.parentNode) p.li.parentNode.removeChild(p.li);
    S.pending.delete(p.cid);
    p.state = 'retried';
    sendText(p.text);
  }

  function updateRetryButtons() {
    S.pending.forEach(function (p) {
      if (p.retryEl) {
        p.retryEl.disabled = !S.connected;
        p.retryEl.title = S.connected ? 'send again' : 'offline';
      }
    });
  }

  function oldestPending() {
    var found = null;
    S.pending.forEach(function (p) {
      if (!found && p.state === 'pending') found = p;
    });
    return found;
  }

  // ---------------------------------------------------------------- presence
  // The member list is the server's last `presence` snapshot plus the `join`
  // and `leave` events since. Snapshot and events overlap around a
  // (re)connection, so events are applied idempotently: a join for someone
  // listed, or a leave for someone not listed, leaves the list alone.

  function byName(a, b) { return a < b ? -1 : a > b ? 1 : 0; }

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

  function onPresenceFrame(frame) {
    if (!Array.isArray(frame.members) || !forThisRoom(frame)) {
      console.warn('[chat] presence frame ignored', frame);
      return;
    }
    // A snapshot replaces the list: it is the server's word after a
    // (re)connection, and events we missed meanwhile are not replayed.
    var members = new Map();
    frame.members.forEach(function (raw) {
      var m = readMember(raw);
      if (m) members.set(m.name, m);
    });
    S.members = members;
    S.moreMembers = Number.isInteger(frame.more) && frame.more > 0 ? frame.more : 0;
    S.presenceFresh = true;
    renderMembers();
    refreshMembersStale();
  }

  function onJoinFrame(frame) {
    if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) {
      console.warn('[chat] join frame ignored', frame);
      return;
    }
    var instance = typeof frame.instance === 'string' ? frame.instance : '';
    addPresenceLine('join', frame.name, instance, '');
    if (!S.members.has(frame.name)) {
      // A join is a name's first connection in the room: one tab, one instance.
      S.members.set(frame.name, { name: frame.name, instances: instance ? [instance] : [], connections: 1 });
      renderMembers();
    }
  }

  function onLeaveFrame(frame) {
    if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) {
      console.warn('[chat] leave frame ignored', frame);
      return;
    }
    var instance = typeof frame.instance === 'string' ? frame.instance : '';
    var reason = frame.reason === 'expired' ? 'expired' : 'left';
    addPresenceLine('leave', frame.name, instance, reason);
    clearTyping(frame.name);
    if (S.members.delete(frame.name)) renderMembers();
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
    var names = Array.from(S.members.keys()).sort(byName);
    var list = el.memberList;
    while (list.firstChild) list.removeChild(list.firstChild);
    names.forEach(function (name) { list.appendChild(buildMember(S.members.get(name))); });
    var total = names.length + S.moreMembers;
    el.membersCount.textContent = String(total);
    el.membersCount.title = total === 1 ? '1 person' : total + ' people';
    // The one-line summary is what a phone shows while the list is collapsed.
    el.membersSummary.textContent = names.join(', ') + (S.moreMembers ? ' +' + S.moreMembers : '');
    el.membersMore.textContent = S.moreMembers ? 'and ' + S.moreMembers + ' more not listed' : '';
    el.membersMore.hidden = !S.moreMembers;
  }

  // The list is only as good as the server's link to Redis: while it is
  // down (or we are not connected), joins and leaves on other instances do
  // not reach us, so say so instead of showing a confident, wrong list.
  function refreshMembersStale() {
    var text = '';
    if (debug.state !== 'connected') text = 'may be out of date — reconnecting';
    else if (S.deliveryDown) text = 'may be out of date — the server lost its link to Redis';
    else if (!S.presenceFresh) text = S.members.size ? 'may be out of date — updating' : 'loading…';
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
  function onTypingFrame(frame) {
    if (typeof frame.name !== 'string' || frame.name === '' || !forThisRoom(frame)) return;
    // Our own name typing is another tab of ours (or a namesake): not news here.
    if (frame.name === S.name) return;
    S.typing.delete(frame.name); // re-insert: names show in the order they last typed
    S.typing.set(frame.name, Date.now() + TYPING_SHOW_MS);
    renderTyping();
  }

  function clearTyping(name) {
    if (S.typing.delete(name)) renderTyping();
  }

  /** "bob is typing…", "bob and carol are typing…", "bob, carol and 2 others are typing…". */
  function renderTyping() {
    var now = Date.now();
    var names = [];
    var next = Infinity;
    S.typing.forEach(function (until, name) {
      if (until <= now) {
        S.typing.delete(name);
      } else {
        names.push(name);
        next = Math.min(next, until);
      }
    });
    clearTimeout(S.typingTimer);
    S.typingTimer = names.length ? setTimeout(renderTyping, next - now + 20) : null;

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
  function noteTyping() {
    if (!S.connected || !S.ws || S.deliveryDown) return;
    if (el.input.value.trim() === '') return;
    var now = Date.now();
    if (now - S.lastTypingSent < TYPING_SEND_MS) return;
    S.lastTypingSent = now;
    try {
      S.ws.send(JSON.stringify({ type: 'typing' }));
    } catch (e) {
      console.warn('[chat] typing frame not sent', e);
    }
  }

  // ---------------------------------------------------------------- inbound
  function onMessageFrame(msg) {
    if (typeof msg.text !== 'string' || typeof msg.from !== 'string') {
      console.warn('[chat] malformed message frame ignored', msg);
      return;
    }
    if (msg.room && S.room && msg.room !== S.room) {
      console.warn('[chat] message for another room ignored', msg);
      return;
    }
    var key = parseId(msg.id);
    if (key) {
      if (S.seen.has(msg.id)) return; // duplicate (e.g. replay after reconnect)
      S.seen.add(msg.id);
      if (!S.lastKey || cmpKey(key, S.lastKey) > 0) {
        S.lastKey = key;
        S.lastId = msg.id;
        debug.lastId = msg.id;
      }
    } else {
      console.warn('[chat] message without a valid id', msg);
    }

    var cid = typeof msg.cid === 'string' ? msg.cid : null;
    var mine = !!cid && msg.from === S.name && S.sentCids.has(cid);
    var p = cid ? S.pending.get(cid) : null;

    debug.received.push(msg);
    clearTyping(msg.from); // they sent what they were typing

    withAutoScroll(function () {
      if (p) {
        clearTimeout(p.timer);
        S.pending.delete(cid);
        if (p.li && p.li.parentNode) p.li.parentNode.removeChild(p.li);
      }
      insertMessage(buildMessage(msg, mine), key);
    }, !!p);
  }

  function onErrorFrame(frame) {
    var code = typeof frame.code === 'string' ? frame.code : 'error';
    var text = typeof frame.message === 'string' && frame.message ? frame.message : code;
    var cid = typeof frame.cid === 'string' ? frame.cid : null;
    var p = cid ? S.pending.get(cid) : null;
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
        if (typeof frame.instance === 'string') setInstance(frame.instance);
        if (typeof frame.client === 'string') debug.client = frame.client;
        if (typeof frame.name === 'string' && frame.name) {
          S.name = frame.name;
          el.myName.textContent = frame.name;
        }
        S.attempt = 0; // healthy connection: reset backoff
        S.deliveryDown = false; // a "status" frame follows if it is not
        S.presenceFresh = false; // a "presence" snapshot follows
        setState('connected', 'connected');
        break;
      case 'status':
        S.deliveryDown = frame.delivery === 'down';
        if (typeof frame.message === 'string' && frame.message) {
          addNotice(frame.message, S.deliveryDown ? 'error' : 'info');
        }
        refreshSendable();
        break;
      case 'notice':
        addNotice(typeof frame.message === 'string' && frame.message ? frame.message : String(frame.code), 'info');
        break;
      case 'message':
        onMessageFrame(frame);
        break;
      case 'presence':
        onPresenceFrame(frame);
        break;
      case 'join':
        onJoinFrame(frame);
        break;
      case 'leave':
        onLeaveFrame(frame);
        break;
      case 'typing':
        onTypingFrame(frame);
        break;
      case 'error':
        onErrorFrame(frame);
        break;
      default:
        console.info('[chat] ignoring unknown frame type', frame.type, frame);
    }
  }

  // ---------------------------------------------------------------- connection
  function loadConfig() {
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
      var proto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
      var port = Number(cfg.ws_port) > 0 ? Number(cfg.ws_port) : DEFAULT_WS_PORT;
      var path = typeof cfg.ws_path === 'string' && cfg.ws_path ? cfg.ws_path : DEFAULT_WS_PATH;
      if (path.charAt(0) !== '/') path = '/' + path;
      var host = window.location.hostname || '127.0.0.1';
      url = new URL(proto + '//' + host + ':' + port + path);
    }
    url.searchParams.set('name', S.name);
    url.searchParams.set('room', S.room);
    if (S.lastId) url.searchParams.set('since', S.lastId);
    else url.searchParams.delete('since');
    return url.toString();
  }

  function connect() {
    clearReconnect();
    if (!S.joined) return;
    setState(S.attempt > 0 ? 'reconnecting' : 'connecting',
             S.attempt > 0 ? 'reconnecting…' : 'connecting…');
    var joinedAt = S.joinSeq;
    loadConfig().then(function (cfg) {
      if (!S.joined || joinedAt !== S.joinSeq || S.ws) return;
      if (!S.instance && typeof cfg.instance === 'string') setInstance(cfg.instance);
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
      ws.onopen = function () {
        if (S.ws !== ws) return;
        S.connected = true;
        // Backoff is reset only when the welcome frame arrives, so a server
        // that accepts and immediately drops us is not hammered.
        setState('connected', 'connected');
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
        var wasConnected = S.connected;
        S.connected = false;
        S.presenceFresh = false; // the next socket brings its own snapshot
        console.info('[chat] socket closed', ev.code, ev.reason);
        if (!S.joined) return;
        if (wasConnected) {
          addNotice(ev.code === 1001
            ? 'server is going away — reconnecting'
            : 'connection lost — reconnecting', 'info');
        }
        scheduleReconnect();
      };
    });
  }

  function clearReconnect() {
    clearTimeout(S.reconnectTimer);
    clearInterval(S.countdownTimer);
    S.reconnectTimer = null;
    S.countdownTimer = null;
  }

  function scheduleReconnect() {
    clearReconnect();
    if (!S.joined) return;
    var exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, S.attempt));
    // jitter: somewhere between 50% and 100% of the exponential delay
    var delay = Math.round(exp / 2 + Math.random() * exp / 2);
    S.attempt += 1;
    S.reconnectAt = Date.now() + delay;
    var tick = function () {
      var left = Math.max(0, S.reconnectAt - Date.now());
      var secs = Math.ceil(left / 1000);
      if (navigator.onLine === false) {
        setState('offline', 'offline — retry in ' + secs + 's');
      } else {
        setState('reconnecting', 'reconnecting in ' + secs + 's');
      }
    };
    tick();
    S.countdownTimer = setInterval(tick, 250);
    S.reconnectTimer = setTimeout(connect, delay);
  }

  window.addEventListener('online', function () {
    if (S.joined && !S.ws && S.reconnectTimer) {
      S.attempt = 0;
      connect();
    }
  });
  window.addEventListener('offline', function () {
    if (S.joined && !S.connected && S.reconnectTimer) {
      setState('offline', 'offline');
    }
  });

  // ---------------------------------------------------------------- join/leave
  S.joinSeq = 0;

  function resetRoomState() {
    S.seen = new Set();
    S.lastId = null;
    S.lastKey = null;
    S.pending.forEach(function (p) { clearTimeout(p.timer); });
    S.pending = new Map();
    S.sentCids = new Set();
    S.attempt = 0;
    S.instance = null;
    debug.lastId = null;
    debug.client = null;
    debug.received.length = 0;
    while (el.messages.firstChild) el.messages.removeChild(el.messages.firstChild);
    el.jump.hidden = true;
    stick = true;
    S.members = new Map();
    S.moreMembers = 0;
    S.presenceFresh = false;
    S.typing = new Map();
    S.lastTypingSent = 0;
    renderMembers();
    renderTyping();
  }

  function join(name, room) {
    S.joinSeq += 1;
    resetRoomState();
    S.name = name;
    S.room = room;
    S.joined = true;
    storageSet(LS_NAME, name);
    storageSet(LS_ROOM, room);

    el.roomName.textContent = room;
    el.myName.textContent = name;
    setInstance(null);
    el.session.hidden = false;
    el.leave.hidden = false;
    el.joinView.hidden = true;
    el.chatView.hidden = false;
    el.app.setAttribute('data-view', 'chat');
    document.title = '#' + room + ' — pubsub-chat';
    el.input.value = '';
    connect();
    el.input.focus();
  }

  function leave() {
    S.joined = false;
    S.joinSeq += 1;
    clearReconnect();
    var ws = S.ws;
    S.ws = null;
    S.connected = false;
    if (ws) {
      try { ws.close(1000, 'leaving'); } catch (e) { /* ignore */ }
    }
    resetRoomState();
    setInstance(null);
    el.session.hidden = true;
    el.leave.hidden = true;
    el.chatView.hidden = true;
    el.joinView.hidden = false;
    el.app.setAttribute('data-view', 'join');
    document.title = 'pubsub-chat';
    setState('offline', 'offline');
    el.nameInput.value = S.name;
    el.roomInput.value = S.room;
    el.roomInput.focus();
    el.roomInput.select();
  }

  function tryJoinFromForm() {
    var n = validateName(el.nameInput.value);
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
    var text = el.input.value;
    if (text.trim() === '') return;
    if (text.length > MAX_TEXT) text = text.slice(0, MAX_TEXT);
    if (!S.connected) return;
    if (sendText(text)) el.input.value = '';
    el.input.focus();
  });

  // ---------------------------------------------------------------- boot
  (function boot() {
    setState('offline', 'offline');
    var params = new URLSearchParams(window.location.search);
    var qName = params.get('name');
    var qRoom = params.get('room');
    el.nameInput.value = qName !== null ? qName : (storageGet(LS_NAME) || '');
    el.roomInput.value = qRoom !== null ? qRoom : (storageGet(LS_ROOM) || DEFAULT_ROOM);
    if (qName !== null && qRoom !== null) {
      tryJoinFromForm();
    } else if (el.nameInput.value) {
      el.roomInput.focus();
    } else {
      el.nameInput.focus();
    }
  })();
})();
