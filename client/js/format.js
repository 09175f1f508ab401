/* Small pure helpers that turn numbers, times and names into words.
 *
 * Shared by the conversation, the X-ray, presence and the lab; none of them
 * touch the DOM or any state, so they live apart from all of those.
 */

export function pad2(n) { return n < 10 ? '0' + n : String(n); }

export function fmtTime(ts) {
  var d = new Date(ts);
  if (isNaN(d.getTime())) return '--:--:--';
  return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
}

export function plural(n, one, many) { return n === 1 ? '1 ' + one : n + ' ' + many; }

/** Sort order for names (plain UTF-16 code-unit order). */
export function byName(a, b) { return a < b ? -1 : a > b ? 1 : 0; }
