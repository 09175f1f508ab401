/* What this tab knows about its session, read and written by several files.
 *
 * Only the facts more than one file needs live here (who we are, where we
 * are, the socket and its reconnection bookkeeping); each file keeps the
 * rest of its state to itself. `chatDebug` is the read-only window the
 * browser tests look through: keep its fields and their meaning stable.
 */

export var S = {
  joined: false,       // user is in a room (chat view shown)
  name: '',            // our display name (as confirmed by welcome, if any)
  user: null,          // `--auth token`: our user id (the token's sub), from the welcome
  room: '',
  config: null,        // last good config.json
  ws: null,            // current socket
  attempt: 0,          // consecutive failed connection attempts
  connectReason: '',   // why the current socket was opened: 'first' | 'reconnect' | 'xray'
  joinSeq: 0,          // bumped by every join and leave: a late config.json answer is dropped
  lastId: null,        // highest message id seen (string): the next socket asks `since` it
  instance: null,      // the instance our socket is on (from its welcome)
  trace: false,        // X-ray: connect with trace=1, show each message's hops
  catchup: null,       // {kind, count, timer}: counting what a reconnection replays
  presenceFresh: false, // a presence snapshot came on the current socket
  uncountOld: false    // the next snapshot counts a socket we just replaced: take it off
};

export var debug = window.chatDebug = {
  instance: null,
  lastId: null,
  received: [],
  state: 'idle',
  client: null
};
