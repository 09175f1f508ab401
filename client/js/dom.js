/* The page's elements, and the one way this page builds nodes.
 *
 * Every module reads the static page through `el` and builds new nodes with
 * h(), which sets text with textContent only: user and server strings never
 * go through innerHTML, so nothing they contain can become markup. Kept
 * apart because every other file depends on it and it depends on nothing.
 */

function $(id) { return document.getElementById(id); }

export var el = {
  app: $('app'),
  session: $('session'),
  roomName: $('room-name'),
  myName: $('my-name'),
  instance: $('instance'),
  status: $('status'),
  statusText: $('status-text'),
  xrayToggle: $('xray-toggle'),
  leave: $('leave-button'),
  joinView: $('join-view'),
  joinForm: $('join-form'),
  nameInput: $('name-input'),
  nameField: $('name-field'),
  nameTokenHint: $('name-token-hint'),
  roomInput: $('room-input'),
  nameError: $('name-error'),
  roomError: $('room-error'),
  chatView: $('chat-view'),
  banner: $('offline-banner'),
  bannerText: $('banner-text'),
  bannerRetry: $('banner-retry'),
  composerNote: $('composer-note'),
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
  membersPanel: $('members-panel'),
  memberList: $('member-list'),
  membersMore: $('members-more'),
  membersLoad: $('members-load'),
  instancesView: $('instances-view'),
  instancesNote: $('instances-note'),
  instanceList: $('instance-list'),
  typing: $('typing')
};

/** A new element, with its class and its text (as text, never as markup). */
export function h(tag, cls, text) {
  var n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined && text !== null) n.textContent = String(text);
  return n;
}

export function nameHue(name) {
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

/** A person's round initial, in their colour. */
export function avatar(name) {
  var a = h('span', 'avatar', initial(name));
  a.style.setProperty('--hue', String(nameHue(name)));
  a.setAttribute('aria-hidden', 'true');
  return a;
}
