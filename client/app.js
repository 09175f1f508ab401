/* pubsub-chat browser client: the page's entry point, which loads its modules.
 *
 * Plain vanilla JS in ES modules, no build step. All user/server-provided
 * strings are put into the DOM with textContent / createTextNode only
 * (dom.js h()) — never innerHTML.
 *
 * The modules, each owning one idea, in dependency order (each imports only
 * the ones above it):
 *   js/dom.js           the page's elements, and h() to build nodes
 *   js/format.js        times, counts and names as words
 *   js/session.js       the facts several files share, and window.chatDebug
 *   js/state.js         the connection state machine: pill, banner, composer
 *   js/xray.js          the X-ray of a traced message's hops
 *   js/conversation.js  the message list, and our sends (pending, held, failed)
 *   js/presence.js      the member list, and who is typing
 *   js/lab.js           the instances view (/stats) and the fault panel
 *   js/socket.js        the WebSocket: connect, reconnect, route frames; the sign-in token
 *   js/page.js          joining, leaving, the composer, boot: the wiring
 *
 * The browser fetches the modules in parallel, over several connections
 * at once: the server's HTTP side answers every one of them (see
 * vendor/tiny_http/PATCHED.md for the bug that once left some waiting).
 */

import './js/page.js';
