// Real-browser end-to-end checks of the chat page across two instances.
//
//   node tests/browser/chat.mjs --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B \
//        --room ROOM --out DIR
//
// (scenario "basic", the default) Opens one headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core: nothing downloads a
// browser) with two pages: alice on instance A and bob on instance B, in
// the same room. Checks that a message typed on one instance shows up on
// the other, that message text is never interpreted as HTML, and saves
// screenshots to DIR.
//
//   node tests/browser/chat.mjs --scenario reconnect --proxy http://127.0.0.1:NGINX \
//        --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B \
//        --pids ID_A=PID_A,ID_B=PID_B --room ROOM --out DIR
//
// (scenario "reconnect") Both instances run with --public-ws-url /ws behind
// the nginx at --proxy. alice and bob both open the page through nginx and
// end up on different instances; alice's instance is SIGKILLed (its PID
// from --pids), bob sends three messages while alice is cut off (her
// config.json fetches, which precede each connection attempt, are held
// until bob's messages are accepted), and alice's tab must reconnect by
// itself (no reload) through nginx to the survivor and show each missed
// message exactly once. Saves DIR/reconnect-alice-away.png and
// DIR/reconnect-alice.png.
//
//   node tests/browser/chat.mjs --scenario presence --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --pids ID_A=PID_A,ID_B=PID_B --room ROOM --out DIR
//
// (scenario "presence") A small room: the server sends `presence_diff`
// frames with joins, leaves and changed members, coalesced (up to
// --presence-diff-ms, 1 s by default, after the fact), and never the old
// `join` and `leave` frames. alice on instance A and bob on instance B:
// both member lists show alice and bob with their instances, and alice's
// page shows bob's join line; bob types without sending and alice's page
// shows "bob is typing…", gone a few seconds after he stops; a second tab
// of bob, on A, lists bob with both instances and 2 tabs (on his page and
// on alice's); closing it leaves bob listed on alice's page with 1 tab and
// no leave line, closing bob's first tab removes him and shows "bob left"
// once. A tab whose name is markup comes and goes: alice's page shows that
// name as text everywhere. Then carol opens on B, instance A (alice's) is
// SIGKILLed (its PID from --pids; run the instances with a short
// --presence-ttl-ms), and carol's page shows "alice left (instance A
// stopped answering)". Saves DIR/presence-*.png, one of them at 390x844.
//
//   node tests/browser/chat.mjs --scenario large-room --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --room ROOM --count 31 --window 5 \
//        --bots bot00,bot01,...,bot29 --leave-file FILE --out DIR
//
// (scenario "large-room") Both instances run with --presence-full-list-max
// WINDOW, and the bots (plain WebSocket clients of the Rust test, named by
// --bots) are in ROOM already: a large room. alice opens on A: her page
// shows COUNT members (the bots and herself) and lists only the first
// WINDOW by name, "and N more" for the rest, no join line; her page sends
// no `members` frame until its list is scrolled. Bots leave (chat.mjs
// writes their names to FILE, one a line; the Rust side closes each bot it
// finds named there): the count and the window follow, the rows that stay
// are the same nodes (the list is updated, not rebuilt). alice scrolls her
// member list to its bottom (a short window, so that it scrolls): the page
// asks for WINDOW + 100 members from 0, once, and then lists every member,
// in name order, never more rows than the count. Saves
// DIR/large-room-window.png and DIR/large-room.png.
//
//   node tests/browser/chat.mjs --scenario presence-off --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --room ROOM --out DIR
//
// (scenario "presence-off") Both instances run with --presence off. alice
// on A and bob on B chat as usual; neither page shows a member list (the
// sidebar is gone), alice's page sends no `typing` frame while she types,
// gets no presence frame and shows no error. Saves
// DIR/presence-off.png.
//
//   node tests/browser/chat.mjs --scenario lab --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --room ROOM --out DIR
//
// (scenario "lab") Both instances run with --demo-controls, A with a small
// --client-buffer-bytes; --a and --b are their admin listeners, which serve
// the page with its instances view and fault panel. The X-ray: alice on A opens the page with
// ?trace=1, bob on B turns it on with the toggle (a smooth reconnection,
// with trace=1 in the WebSocket query); bob's message, read by B and shown
// on A, shows on alice's page every hop in order (typed in bob's tab, read
// by B, accepted by Redis, received by A's subscriber, queued in alice's
// outbox, written to her socket, shown), each with a time, non-decreasing (the whole-ms Redis
// stamp may be up to 1 ms early). The instances view lists both, alice's
// marked. The fault panel, each button in turn, from alice's page: cut A's
// subscription while bob sends a steady stream (alice's page shows paused
// then connected, and every message once, in order, some caught up from
// history); pause A's delivery for 3 s (bob's message arrives only after,
// its wait before "queued"); stall alice's tab for 2 s (bob's message waits
// in A's outbox: its X-ray shows the wait between "queued" and "written",
// not after "written"); stall alice's tab for good (A drops it as a slow
// consumer, the page says so, reconnects and catches up). Saves DIR/lab-*.png.
//
//   node tests/browser/chat.mjs --scenario older-history --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --room <room> --count <n> --out <dir>
// (scenario "older-history") The room already holds n (> 50) messages
// old-0 ... old-<n-1>. carol opens the page on B: it shows the newest 50
// (--history-replay) and a "Load older messages" row, not the server's
// notice as text; scrolled to the top, it shows all n in order, the row
// gone, and the view kept in place. Saves DIR/older-*.png.
//
//   node tests/browser/chat.mjs --scenario token --a http://127.0.0.1:PORT_A \
//        --b http://127.0.0.1:PORT_B --token-server http://127.0.0.1:PORT_T --room ROOM --out DIR
//
// (scenario "token") Both instances run with --auth token and
// --auth-token-url PORT_T/token: the Rust test's token endpoint, which
// names the user by its `session` cookie (each page's context has one)
// and hands out 6 s tokens for alice (u-alice) and twin (u-twin, who is
// also called "alice"), failing alice's first request; /initial?user=
// gives a page its first token (10 s), which goes in the page's #token=. bob
// (u-bob, a long token) on B and twin on B; alice on A, whose refresh
// before her token's exp fails: the server closes her with 4401 "token
// expired", her page says so and fetches a new token (held here until
// bob, meanwhile, has sent three messages), reconnects at once with
// `since`, and shows every message exactly once, in order, with the
// welcome's user u-alice. twin's page refreshes in time: `authenticated`
// comes before her first token's exp, and her socket is never closed.
// Every page: the token gone from the address bar, no name field on the
// join form, the `auth` frame first on every socket, the name from the
// token; the member list shows the two "alice"s apart (@u-alice,
// @u-twin), only one of them "you" on alice's page. Saves DIR/token-*.png.
//
// Every wait has an explicit timeout; prints one "ok" line per check and
// exits 0, or prints what failed plus both pages' console logs and exits 1.

import { mkdir, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const WAIT_MS = 15_000; // any single wait
const RECONNECT_MS = 20_000; // a tab's reconnection to a survivor, and what it missed
const MAX_PLACEMENT_TRIES = 6; // page loads through nginx to land bob on the other instance
const SETTLE_MS = 750; // time given to a duplicate or an injected handler to show up
const OVERALL_MS = 140_000; // the whole run; the Rust side kills us at 150 s
const DESKTOP = { width: 1000, height: 700 };
const PHONE = { width: 390, height: 844 };
const TYPING_GONE_MS = 3_000 + 2_500; // the page shows "is typing…" ~3 s after the last frame; slack
const EXPIRE_MS = 20_000; // a killed instance's members expire (--presence-ttl-ms, short in the test)
const XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>';
const XSS_NAME = '<img src=x onerror=__xss=3>'; // a display name is at most 32 characters

class CheckFailed extends Error {}

function fail(message) {
  throw new CheckFailed(message);
}

function ok(message) {
  console.log(`ok - ${message}`);
}

function usage(problem) {
  console.error(`chat.mjs: ${problem}`);
  console.error('usage: node chat.mjs [--scenario basic] --a <http url of instance A> --b <http url of instance B> --room <room> --out <dir>');
  console.error('       node chat.mjs --scenario reconnect --proxy <http url of nginx> --a <url> --b <url> --pids <id>=<pid>,<id>=<pid> --room <room> --out <dir>');
  console.error('       node chat.mjs --scenario presence --a <url> --b <url> --pids <id>=<pid>,<id>=<pid> --room <room> --out <dir>');
  console.error('       node chat.mjs --scenario lab --a <url> --b <url> --room <room> --out <dir>');
  console.error('       node chat.mjs --scenario token --a <url> --b <url> --token-server <url> --room <room> --out <dir>');
  console.error('       node chat.mjs --scenario large-room --a <url> --b <url> --room <room> --count <n> --window <n> --bots <name>,<name>,... --leave-file <file> --out <dir>');
  process.exit(2);
}

/** "browser-a=123,browser-b=456" -> Map { 'browser-a' => 123, 'browser-b' => 456 } */
function parsePids(text) {
  const pids = new Map();
  for (const part of text.split(',')) {
    const m = /^([^=]+)=(\d+)$/.exec(part.trim());
    if (!m) usage(`bad --pids entry ${JSON.stringify(part)}: want <instance id>=<pid>`);
    pids.set(m[1], Number(m[2]));
  }
  return pids;
}

function parseCli() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        scenario: { type: 'string', default: 'basic' },
        proxy: { type: 'string' },
        pids: { type: 'string' },
        'redis-pid': { type: 'string' },
        a: { type: 'string' },
        b: { type: 'string' },
        room: { type: 'string' },
        out: { type: 'string' },
        count: { type: 'string' },
        window: { type: 'string' },
        bots: { type: 'string' },
        'leave-file': { type: 'string' },
        'token-server': { type: 'string' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!['basic', 'reconnect', 'presence', 'lab', 'large-room', 'presence-off', 'older-history', 'token'].includes(values.scenario)) usage(`unknown --scenario ${values.scenario}`);
  const required = ['a', 'b', 'room', 'out'];
  if (values.scenario === 'reconnect') required.push('proxy', 'pids');
  if (values.scenario === 'presence') required.push('pids');
  if (values.scenario === 'large-room') required.push('count', 'window', 'bots', 'leave-file');
  if (values.scenario === 'older-history') required.push('count');
  if (values.scenario === 'token') required.push('token-server');
  for (const key of required) {
    if (!values[key]) usage(`missing --${key}`);
  }
  for (const key of ['count', 'window']) {
    if (values[key] !== undefined && !/^[1-9][0-9]*$/.test(values[key])) usage(`--${key} must be a positive number`);
  }
  return {
    count: values.count ? Number(values.count) : null,
    window: values.window ? Number(values.window) : null,
    bots: values.bots ? values.bots.split(',').filter((n) => n !== '') : null,
    leaveFile: values['leave-file'] || null,
    tokenServer: values['token-server'] ? values['token-server'].replace(/\/+$/, '') : null,
    redisPid: values['redis-pid'] ? Number(values['redis-pid']) : null,
    scenario: values.scenario,
    proxy: values.proxy ? values.proxy.replace(/\/+$/, '') : null,
    pids: values.pids ? parsePids(values.pids) : null,
    a: values.a.replace(/\/+$/, ''),
    b: values.b.replace(/\/+$/, ''),
    room: values.room,
    out: values.out,
  };
}

/** `config.json` of an instance, fetched outside the browser: the expected instance id. */
async function instanceId(base) {
  let res;
  try {
    res = await fetch(`${base}/config.json`, { signal: AbortSignal.timeout(WAIT_MS) });
  } catch (e) {
    fail(`GET ${base}/config.json failed: ${e.message}`);
  }
  if (!res.ok) fail(`GET ${base}/config.json answered HTTP ${res.status}`);
  const cfg = await res.json();
  if (typeof cfg.instance !== 'string' || cfg.instance === '') {
    fail(`${base}/config.json has no instance id: ${JSON.stringify(cfg)}`);
  }
  return cfg.instance;
}

/** Records everything a page says, to print if a check fails. */
function recordLogs(page, label, logs) {
  page.on('console', (msg) => {
    const where = msg.location()?.url ? ` (${msg.location().url})` : '';
    logs.push(`[${label}] console.${msg.type()}: ${msg.text()}${where}`);
  });
  page.on('response', (res) => {
    if (res.status() >= 400) logs.push(`[${label}] HTTP ${res.status()} for ${res.request().method()} ${res.url()}`);
  });
  page.on('pageerror', (err) => logs.push(`[${label}] page error: ${err.stack || err.message}`));
  page.on('requestfailed', (req) =>
    logs.push(`[${label}] request failed: ${req.method()} ${req.url()}: ${req.failure()?.errorText}`),
  );
  page.on('crash', () => logs.push(`[${label}] page crashed`));
}

// The presence frames a page's sockets receive, recorded for the checks
// (`join` and `leave` are gone from the protocol: recorded to catch them).
const PRESENCE_TYPES = ['presence', 'presence_diff', 'join', 'leave'];

/** A WebSocket frame's JSON object, or null. */
function parseFrame(payload) {
  if (typeof payload !== 'string') return null;
  try {
    const frame = JSON.parse(payload);
    return frame && typeof frame === 'object' ? frame : null;
  } catch {
    return null;
  }
}

/** Runs a wait; a timeout becomes a failure that says what was awaited. */
async function waitFor(what, promise) {
  try {
    return await promise;
  } catch (e) {
    fail(`timed out or failed waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
}

/**
 * Waits until a delivered message (data-testid=message) matching `want`
 * is in the page's list, and returns its attributes and text.
 */
function waitForMessage(page, label, want) {
  return waitFor(
    `${label} to show a message ${JSON.stringify(want)}`,
    page
      .waitForFunction(
        (w) => {
          const items = document.querySelectorAll('[data-testid="messages"] [data-testid="message"]');
          for (const li of items) {
            const textEl = li.querySelector('[data-testid="message-text"]');
            const text = textEl ? textEl.textContent : null;
            if (w.text !== undefined && text !== w.text) continue;
            if (w.from !== undefined && li.getAttribute('data-from') !== w.from) continue;
            return {
              text,
              id: li.getAttribute('data-id'),
              from: li.getAttribute('data-from'),
              instance: li.getAttribute('data-instance'),
            };
          }
          return null;
        },
        want,
        { timeout: WAIT_MS, polling: 50 },
      )
      .then((handle) => handle.jsonValue()),
  );
}

/** Every list item (delivered, pending or failed) whose text is `text`. */
function itemsWithText(page, text) {
  return page.evaluate((t) => {
    const out = [];
    for (const li of document.querySelectorAll('[data-testid="messages"] > li')) {
      const textEl = li.querySelector('[data-testid="message-text"]');
      if (textEl && textEl.textContent === t) out.push(li.getAttribute('data-testid'));
    }
    return out;
  }, text);
}

/**
 * Opens the page of `base` in a new context and joins `room` as `name`
 * (through the URL's name and room). `extra` is appended to the query
 * (`&trace=1`). Every WebSocket the page opens is recorded in
 * `page.__wsUrls`; the JSON frames its sockets send, in `page.__sent`, and
 * the presence frames they receive (PRESENCE_TYPES), in `page.__presence`
 * (each with `at`, the time it came, in ms).
 */
async function openAndJoin(browser, base, name, room, label, logs, extra = '') {
  const context = await browser.newContext({ viewport: DESKTOP });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.setDefaultNavigationTimeout(WAIT_MS);
  recordLogs(page, label, logs);
  page.__wsUrls = [];
  page.__sent = [];
  page.__presence = [];
  page.on('websocket', (ws) => {
    page.__wsUrls.push(ws.url());
    ws.on('framesent', (f) => {
      const frame = parseFrame(f.payload);
      if (frame) page.__sent.push(frame);
    });
    ws.on('framereceived', (f) => {
      const frame = parseFrame(f.payload);
      if (frame && PRESENCE_TYPES.includes(frame.type)) page.__presence.push({ ...frame, at: Date.now() });
    });
  });
  const url = `${base}/?name=${encodeURIComponent(name)}&room=${encodeURIComponent(room)}${extra}`;
  const res = await waitFor(`${label} to load ${url}`, page.goto(url, { waitUntil: 'load', timeout: WAIT_MS }));
  if (!res || !res.ok()) fail(`${label}: GET ${url} answered ${res ? `HTTP ${res.status()}` : 'nothing'}`);
  return page;
}

async function waitConnected(page, label, expectedId) {
  await waitFor(
    `${label} status data-state=connected`,
    page.locator('[data-testid="status"][data-state="connected"]').waitFor({ state: 'visible', timeout: WAIT_MS }),
  );
  // data-state turns "connected" when the socket opens; the welcome frame
  // (which sets chatDebug.client) means the server has joined us to the room.
  await waitFor(
    `${label} to receive the welcome frame`,
    page.waitForFunction(() => window.chatDebug && window.chatDebug.client, null, { timeout: WAIT_MS, polling: 50 }),
  );
  const state = await page.getAttribute('[data-testid="status"]', 'data-state', { timeout: WAIT_MS });
  if (state !== 'connected') fail(`${label}: status is ${state} right after the welcome frame`);
  const shown = (await page.locator('[data-testid="instance"]').textContent({ timeout: WAIT_MS })).trim();
  const attr = await page.getAttribute('[data-testid="instance"]', 'data-instance', { timeout: WAIT_MS });
  if (shown !== expectedId || attr !== expectedId) {
    fail(`${label}: instance label shows ${JSON.stringify(shown)} (data-instance ${JSON.stringify(attr)}), expected ${JSON.stringify(expectedId)}`);
  }
  ok(`${label} connected, instance label shows ${expectedId}`);
}

async function launch(state) {
  state.browser = await waitFor(
    `Chromium at ${CHROMIUM} to launch`,
    chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      timeout: WAIT_MS,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-quic',
      ],
    }),
  );
  ok(`launched Chromium ${state.browser.version()}`);
}

async function mainBasic(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // Before anything was tried, the join screen does not say "offline".
  {
    const context = await state.browser.newContext({ viewport: DESKTOP });
    const page = await context.newPage();
    recordLogs(page, 'join screen', logs);
    await waitFor('the join screen to load', page.goto(`${opts.a}/`, { waitUntil: 'load', timeout: WAIT_MS }));
    const pill = await page.evaluate(() => ({
      state: document.querySelector('[data-testid="status"]').getAttribute('data-state'),
      text: document.querySelector('[data-testid="status"]').textContent.trim(),
      form: !!document.querySelector('[data-testid="join-form"]').offsetParent,
      banner: !document.querySelector('[data-testid="offline-banner"]').hidden,
    }));
    if (pill.state !== 'idle' || pill.text !== 'not connected' || !pill.form || pill.banner) {
      fail(`the join screen, before anything was tried, shows ${JSON.stringify(pill)}`);
    }
    ok(`the join screen's pill says ${JSON.stringify(pill.text)} (data-state=idle), no banner`);
    await context.close();
  }

  const pageA = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'page A', logs);
  const pageB = await openAndJoin(state.browser, opts.b, 'bob', opts.room, 'page B', logs);
  await waitConnected(pageA, 'page A', idA);
  await waitConnected(pageB, 'page B', idB);
  ok(`the two pages are on different instances (${idA}, ${idB})`);

  // The public page: no fault panel, and the endpoints are not there (they
  // are on the admin listener).
  for (const [label, page, base] of [['page A', pageA, opts.a], ['page B', pageB, opts.b]]) {
    const cfg = await fetch(`${base}/config.json`, { signal: AbortSignal.timeout(WAIT_MS) }).then((r) => r.json());
    if (cfg.demo_controls !== false) fail(`${base}/config.json has demo_controls ${JSON.stringify(cfg.demo_controls)}, expected false`);
    const panels = await page.locator('[data-testid="fault-panel"], [data-testid^="fault-"]').count();
    if (panels !== 0) fail(`${label} shows ${panels} fault panel element(s) without --demo-controls`);
    const client = await page.evaluate(() => window.chatDebug.client);
    for (const path of ['/demo/cut-subscription', '/demo/pause-delivery?seconds=1', `/demo/stall-reading?client=${client}&seconds=1`]) {
      const res = await fetch(`${base}${path}`, { method: 'POST', signal: AbortSignal.timeout(WAIT_MS) });
      const body = await res.text();
      if (res.status !== 404) fail(`POST ${base}${path} answered HTTP ${res.status} (${JSON.stringify(body)}), expected 404 on the public port`);
    }
    ok(`${label}: config.json says demo_controls false, no fault panel in the page, POST /demo/* answer 404 on the public port`);
  }

  // Alice types a message and presses Enter.
  const hello = 'hello from A';
  const inputA = pageA.getByTestId('message-input');
  await inputA.click({ timeout: WAIT_MS });
  await inputA.pressSequentially(hello, { timeout: WAIT_MS });
  await inputA.press('Enter', { timeout: WAIT_MS });
  const onB = await waitForMessage(pageB, 'page B', { text: hello });
  if (onB.from !== 'alice' || onB.instance !== idA) {
    fail(`page B shows ${JSON.stringify(hello)} with data-from=${onB.from} data-instance=${onB.instance}, expected alice / ${idA}`);
  }
  ok(`alice's message typed on A appears on B (data-from=alice, data-instance=${idA}, id ${onB.id})`);
  await waitForMessage(pageA, 'page A', { text: hello, from: 'alice' });
  await pageA.waitForTimeout(SETTLE_MS);
  const onA = await itemsWithText(pageA, hello);
  if (onA.length !== 1 || onA[0] !== 'message') {
    fail(`page A shows ${JSON.stringify(hello)} as ${JSON.stringify(onA)}, expected exactly one delivered message`);
  }
  const inputValue = await inputA.inputValue({ timeout: WAIT_MS });
  if (inputValue !== '') fail(`page A message input still holds ${JSON.stringify(inputValue)} after sending`);
  ok("alice's message appears exactly once in A's own list, and the input was cleared");

  // Bob sends with the Send button.
  const reply = 'hello from B';
  await pageB.getByTestId('message-input').fill(reply, { timeout: WAIT_MS });
  await pageB.getByTestId('send-button').click({ timeout: WAIT_MS });
  const replyOnA = await waitForMessage(pageA, 'page A', { text: reply });
  if (replyOnA.from !== 'bob' || replyOnA.instance !== idB) {
    fail(`page A shows ${JSON.stringify(reply)} with data-from=${replyOnA.from} data-instance=${replyOnA.instance}, expected bob / ${idB}`);
  }
  ok(`bob's message sent with the Send button on B appears on A (data-from=bob, data-instance=${idB})`);
  await waitForMessage(pageB, 'page B', { text: reply, from: 'bob' });
  const replyOnB = await itemsWithText(pageB, reply);
  if (replyOnB.length !== 1 || replyOnB[0] !== 'message') {
    fail(`page B shows ${JSON.stringify(reply)} as ${JSON.stringify(replyOnB)}, expected exactly one delivered message`);
  }
  ok("bob's message appears exactly once in B's own list");

  // Message text is text, never markup.
  await inputA.fill(XSS, { timeout: WAIT_MS });
  await inputA.press('Enter', { timeout: WAIT_MS });
  const xssOnB = await waitForMessage(pageB, 'page B', { text: XSS });
  if (xssOnB.from !== 'alice') fail(`page B shows the markup message from ${xssOnB.from}, expected alice`);
  await waitForMessage(pageA, 'page A', { text: XSS, from: 'alice' });
  ok('the markup message is shown on B with its literal text as textContent');
  // Give a parsed <img src=x> time to fail loading and run its onerror.
  await pageB.waitForTimeout(SETTLE_MS);
  for (const [label, page] of [['page A', pageA], ['page B', pageB]]) {
    const injected = await page.evaluate(() => {
      const list = document.querySelector('[data-testid="messages"]');
      return {
        img: list.querySelectorAll('img').length,
        script: list.querySelectorAll('script').length,
        xss: typeof window.__xss === 'undefined' ? 'undefined' : String(window.__xss),
      };
    });
    if (injected.img !== 0) fail(`${label}: ${injected.img} <img> element(s) inside the messages list`);
    if (injected.script !== 0) fail(`${label}: ${injected.script} <script> element(s) inside the messages list`);
    if (injected.xss !== 'undefined') fail(`${label}: window.__xss is ${injected.xss}: the message text ran as HTML`);
    ok(`${label}: no <img>/<script> in the messages list and window.__xss is undefined`);
  }

  const received = await pageB.evaluate(() => window.chatDebug.received.map((m) => m.text));
  for (const text of [hello, reply, XSS]) {
    if (!received.includes(text)) fail(`page B chatDebug.received lacks ${JSON.stringify(text)}: ${JSON.stringify(received)}`);
  }
  ok('page B chatDebug.received holds all three messages');

  // Screenshots: both pages at desktop size, then B at phone width.
  const shotA = path.join(opts.out, 'page-a.png');
  const shotB = path.join(opts.out, 'page-b.png');
  const shotPhone = path.join(opts.out, 'page-b-phone.png');
  await pageA.screenshot({ path: shotA, timeout: WAIT_MS });
  await pageB.screenshot({ path: shotB, timeout: WAIT_MS });
  await pageB.setViewportSize(PHONE);
  await pageB.waitForTimeout(300); // let the layout and the pinned scroll settle
  const phoneXss = pageB.getByTestId('message-text').filter({ hasText: 'window.__xss=2' }).last();
  await waitFor('the markup message to be visible at phone width', phoneXss.waitFor({ state: 'visible', timeout: WAIT_MS }));
  await pageB.screenshot({ path: shotPhone, timeout: WAIT_MS });
  ok(`screenshots saved: ${shotA}, ${shotB}, ${shotPhone}`);

  // Redis goes away: both pages, still connected to their instances, must
  // tell one story: the pill says sending is paused (not a green
  // "connected"), the banner says why, the conversation has a line, and
  // Enter holds the message visibly instead of doing nothing.
  if (opts.redisPid) {
    await pageB.setViewportSize(DESKTOP);
    process.kill(opts.redisPid, 'SIGKILL');
    for (const [label, page] of [['page A', pageA], ['page B', pageB]]) {
      await waitFor(
        `${label}'s pill to say sending is paused`,
        page.locator('[data-testid="status"][data-state="paused"]').waitFor({ state: 'visible', timeout: WAIT_MS }),
      );
      const pill = (await page.getByTestId('status').textContent()).trim();
      if (pill !== 'sending paused') fail(`${label}: the pill says ${JSON.stringify(pill)} while Redis is down`);
      const banner = page.getByTestId('offline-banner');
      await waitFor(`${label} to show that sending is paused`, banner.waitFor({ state: 'visible', timeout: WAIT_MS }));
      const text = await banner.textContent();
      if (!/paused/.test(text) || !/Redis/.test(text)) fail(`${label}: banner says ${JSON.stringify(text)}`);
      const line = page.locator('[data-testid="notice"][data-event="delivery-down"]');
      await waitFor(`${label} to write a line that sending is paused`, line.first().waitFor({ state: 'visible', timeout: WAIT_MS }));
      if ((await line.count()) !== 1) fail(`${label}: ${await line.count()} "sending paused" lines, expected 1`);
      ok(`${label}: Redis killed: pill ${JSON.stringify(pill)} (data-state=paused), banner ${JSON.stringify(text.trim())}, one line ${JSON.stringify((await line.textContent()).trim())}`);
      const stale = page.getByTestId('members-stale');
      await waitFor(`${label}'s member list to say it may be out of date`, stale.waitFor({ state: 'visible', timeout: WAIT_MS }));
      const staleText = await stale.textContent();
      if (!/out of date/.test(staleText)) fail(`${label}: the member list's note says ${JSON.stringify(staleText)}`);
      ok(`${label}: the member list says ${JSON.stringify(staleText.trim())}`);
    }
    // Enter while paused: the message is held, in the list, with the reason.
    const held = 'said while Redis is down';
    await inputA.fill(held, { timeout: WAIT_MS });
    await inputA.press('Enter', { timeout: WAIT_MS });
    const entry = pageA.locator('[data-testid="pending-message"][data-state="queued"]');
    await waitFor('page A to show the held message', entry.waitFor({ state: 'visible', timeout: WAIT_MS }));
    const shown = await entry.evaluate((li) => ({
      text: li.querySelector('[data-testid="message-text"]').textContent,
      state: li.querySelector('[data-testid="message-state"]').textContent,
      cancel: !!li.querySelector('[data-testid="cancel-button"]'),
    }));
    if (shown.text !== held || !/waiting/.test(shown.state) || !/Redis/.test(shown.state) || !shown.cancel) {
      fail(`page A shows the message held while Redis is down as ${JSON.stringify(shown)}`);
    }
    const note = await pageA.getByTestId('composer-note').textContent();
    if (!/waiting/.test(note)) fail(`page A's composer note says ${JSON.stringify(note)}`);
    ok(`page A: Enter while paused holds the message: ${JSON.stringify(shown.state)}; note ${JSON.stringify(note)}`);
    const shotPaused = path.join(opts.out, 'page-a-paused.png');
    await pageA.screenshot({ path: shotPaused, timeout: WAIT_MS });
    ok(`screenshot saved: ${shotPaused}`);
  }
}

// ------------------------------------------------------------ reconnect

/**
 * Waits until the page is connected and has its welcome frame, and returns
 * the instance the welcome named (the label, which config.json may have set
 * to another instance before the socket opened, must agree by then).
 */
async function waitWelcomed(page, label, timeout = WAIT_MS) {
  await waitFor(
    `${label} status data-state=connected`,
    page.locator('[data-testid="status"][data-state="connected"]').waitFor({ state: 'visible', timeout }),
  );
  await waitFor(
    `${label} to receive the welcome frame`,
    page.waitForFunction(() => window.chatDebug && window.chatDebug.client && window.chatDebug.instance, null, {
      timeout,
      polling: 50,
    }),
  );
  const seen = await page.evaluate(() => ({
    debug: window.chatDebug.instance,
    shown: document.querySelector('[data-testid="instance"]').textContent.trim(),
    attr: document.querySelector('[data-testid="instance"]').getAttribute('data-instance'),
  }));
  if (seen.shown !== seen.debug || seen.attr !== seen.debug) {
    fail(`${label}: instance label shows ${JSON.stringify(seen.shown)} (data-instance ${JSON.stringify(seen.attr)}) but the welcome came from ${JSON.stringify(seen.debug)}`);
  }
  return seen.debug;
}

/** Types `text` into the page's composer and presses Enter. */
async function typeAndSend(page, text) {
  const input = page.getByTestId('message-input');
  await input.fill(text, { timeout: WAIT_MS });
  await input.press('Enter', { timeout: WAIT_MS });
}

/** Fails unless `text` is in the page's list exactly once, as a delivered message. */
async function expectOnce(page, label, text) {
  const items = await itemsWithText(page, text);
  if (items.length !== 1 || items[0] !== 'message') {
    fail(`${label} shows ${JSON.stringify(text)} as ${JSON.stringify(items)}, expected exactly one delivered message`);
  }
  const received = await page.evaluate((t) => window.chatDebug.received.filter((m) => m.text === t).length, text);
  if (received !== 1) fail(`${label}: chatDebug.received holds ${JSON.stringify(text)} ${received} times, expected once`);
}

async function mainReconnect(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  for (const id of [idA, idB]) {
    if (!opts.pids.has(id)) fail(`--pids has no PID for instance ${JSON.stringify(id)}: ${JSON.stringify([...opts.pids])}`);
  }
  const proxyCfg = await fetch(`${opts.proxy}/config.json`, { signal: AbortSignal.timeout(WAIT_MS) })
    .then((r) => r.json())
    .catch((e) => fail(`GET ${opts.proxy}/config.json failed: ${e.message}`));
  if (proxyCfg.ws_url !== '/ws') {
    fail(`${opts.proxy}/config.json has ws_url ${JSON.stringify(proxyCfg.ws_url)}: the instances must run with --public-ws-url /ws`);
  }
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // 1. alice, through nginx.
  const alice = await openAndJoin(state.browser, opts.proxy, 'alice', opts.room, 'alice', logs);
  const aliceOn = await waitWelcomed(alice, 'alice');
  if (aliceOn !== idA && aliceOn !== idB) fail(`alice is on ${JSON.stringify(aliceOn)}, neither ${idA} nor ${idB}`);
  const survivor = aliceOn === idA ? idB : idA;
  // Gone after a reload: proves the tab reconnected by itself.
  await alice.evaluate(() => {
    window.__noReload = 1;
  });
  ok(`alice connected through nginx, on instance ${aliceOn}`);

  // 2. bob on the other instance. With --public-ws-url /ws the page opens
  // its WebSocket on its own host, so an instance's own URL cannot serve a
  // chat tab: bob comes through nginx too, reloaded until nginx's round
  // robin puts him on the other instance.
  let bob = null;
  for (let attempt = 1; attempt <= MAX_PLACEMENT_TRIES && !bob; attempt++) {
    const page = await openAndJoin(state.browser, opts.proxy, 'bob', opts.room, `bob#${attempt}`, logs);
    const on = await waitWelcomed(page, `bob#${attempt}`);
    if (on === survivor) {
      bob = page;
    } else {
      console.log(`# bob#${attempt} landed on alice's instance ${on}; opening another tab`);
      await page.context().close();
    }
  }
  if (!bob) fail(`bob landed on alice's instance ${aliceOn} ${MAX_PLACEMENT_TRIES} times in a row through nginx`);
  ok(`bob connected through nginx, on the other instance ${survivor}`);

  // 3. A message before the crash.
  const before = 'before the crash';
  await typeAndSend(bob, before);
  await waitForMessage(bob, 'bob', { text: before, from: 'bob' });
  await waitForMessage(alice, 'alice', { text: before, from: 'bob' });
  await alice.waitForTimeout(SETTLE_MS);
  await expectOnce(alice, 'alice', before);
  ok(`alice sees bob's ${JSON.stringify(before)} once`);

  // Every value alice's status takes from now on (attribute records carry
  // the old value; the current one is read at the end).
  await alice.evaluate(() => {
    window.__states = [];
    const status = document.querySelector('[data-testid="status"]');
    new MutationObserver((records) => {
      for (const r of records) window.__states.push(r.oldValue);
    }).observe(status, { attributes: true, attributeFilter: ['data-state'], attributeOldValue: true });
  });

  // alice's page fetches config.json before each connection attempt: hold
  // those fetches (then pass them on to nginx untouched) until bob's
  // messages are accepted, so that alice has really missed them and gets
  // them from the history, with since, not live.
  let openGate;
  const gate = new Promise((resolve) => {
    openGate = resolve;
  });
  await alice.route('**/config.json', async (route) => {
    await gate;
    await route.continue().catch(() => {});
  });

  // 4. Kill alice's instance, no goodbye.
  const victimPid = opts.pids.get(aliceOn);
  try {
    process.kill(victimPid, 'SIGKILL');
  } catch (e) {
    fail(`cannot SIGKILL instance ${aliceOn} (pid ${victimPid}): ${e.message}`);
  }
  const killedAt = Date.now();
  ok(`SIGKILLed instance ${aliceOn} (pid ${victimPid})`);
  await waitFor(
    'alice to show data-state=reconnecting',
    alice.locator('[data-testid="status"][data-state="reconnecting"]').waitFor({ state: 'attached', timeout: RECONNECT_MS }),
  );
  ok(`alice shows "reconnecting" ${Date.now() - killedAt} ms after the kill`);

  // 5. bob talks meanwhile; his instance is alive.
  const away = [1, 2, 3].map((n) => `while you were away ${n}`);
  const queuedText = 'typed while cut off';
  try {
    for (const text of away) {
      await typeAndSend(bob, text);
      await waitForMessage(bob, 'bob', { text, from: 'bob' });
    }
    const stillAway = await alice.evaluate(() => ({
      state: document.querySelector('[data-testid="status"]').getAttribute('data-state'),
      shown: [...document.querySelectorAll('[data-testid="message-text"]')].filter((el) => el.textContent.startsWith('while you were away')).length,
    }));
    if (stillAway.state === 'connected' || stillAway.shown !== 0) {
      fail(`alice was not cut off while bob sent: ${JSON.stringify(stillAway)}`);
    }
    ok(`bob sent ${away.length} messages while alice was cut off (alice: ${stillAway.state}, none of them shown)`);
    // One story while cut off: pill, banner and a line; Enter holds the message.
    const story = await alice.evaluate(() => ({
      pill: document.querySelector('[data-testid="status"]').textContent.trim(),
      banner: document.querySelector('[data-testid="offline-banner"]').hidden ? null : document.querySelector('[data-testid="offline-banner"]').textContent.trim(),
      lost: [...document.querySelectorAll('[data-testid="notice"][data-event="lost"]')].map((li) => li.textContent),
    }));
    if (!/^reconnecting/.test(story.pill) || !story.banner || !/lost/.test(story.banner) || story.lost.length !== 1) {
      fail(`alice, cut off, tells ${JSON.stringify(story)}: want a "reconnecting" pill, a banner and one "lost" line`);
    }
    await typeAndSend(alice, queuedText);
    const held = alice.locator('[data-testid="pending-message"][data-state="queued"]');
    await waitFor('alice to show her message as held', held.waitFor({ state: 'visible', timeout: WAIT_MS }));
    const heldState = await held.getByTestId('message-state').textContent();
    if (!/waiting/.test(heldState) || (await alice.getByTestId('message-input').inputValue()) !== '') {
      fail(`alice's held message says ${JSON.stringify(heldState)}`);
    }
    ok(`alice, cut off: pill ${JSON.stringify(story.pill)}, banner ${JSON.stringify(story.banner)}, line ${JSON.stringify(story.lost[0])}; Enter holds her message: ${JSON.stringify(heldState)}`);
    await alice.screenshot({ path: path.join(opts.out, 'reconnect-alice-away.png'), timeout: WAIT_MS });
  } finally {
    openGate();
  }
  const gateOpenedAt = Date.now();

  // 6. alice is back, on the survivor, with everything, each once, no reload.
  await waitFor(
    `alice to reconnect to ${survivor} within ${RECONNECT_MS / 1000} s`,
    alice.waitForFunction(
      (id) =>
        document.querySelector('[data-testid="status"]').getAttribute('data-state') === 'connected' &&
        window.chatDebug.instance === id &&
        document.querySelector('[data-testid="instance"]').textContent.trim() === id,
      survivor,
      { timeout: Math.max(1, RECONNECT_MS - (Date.now() - gateOpenedAt)), polling: 50 },
    ),
  );
  const reconnectedMs = Date.now() - gateOpenedAt;
  await waitWelcomed(alice, 'alice (reconnected)');
  const states = (
    await alice.evaluate(() => [...window.__states, document.querySelector('[data-testid="status"]').getAttribute('data-state')])
  ).filter((st, i, all) => i === 0 || st !== all[i - 1]);
  if (!states.includes('reconnecting')) fail(`alice never showed "reconnecting"; its states: ${JSON.stringify(states)}`);
  ok(`alice reconnected through nginx to ${survivor}, ${reconnectedMs} ms after its config.json fetches were let through (states ${JSON.stringify(states)})`);
  for (const text of away) {
    await waitFor(
      `alice to show ${JSON.stringify(text)}`,
      alice.waitForFunction(
        (t) =>
          [...document.querySelectorAll('[data-testid="messages"] [data-testid="message"] [data-testid="message-text"]')].some(
            (el) => el.textContent === t,
          ),
        text,
        { timeout: Math.max(1, RECONNECT_MS - (Date.now() - gateOpenedAt)), polling: 50 },
      ),
    );
  }
  // The conversation says she is back and what she caught up with.
  const caught = alice.locator('[data-testid="notice"][data-event="caught-up"]');
  await waitFor('alice to write the "caught up" line', caught.waitFor({ state: 'visible', timeout: WAIT_MS }));
  const lines = await alice.evaluate(() =>
    [...document.querySelectorAll('[data-testid="notice"][data-event]')].map((li) => ({
      event: li.getAttribute('data-event'),
      missed: li.getAttribute('data-missed'),
      text: li.querySelector('[data-testid="notice-text"]').textContent,
    })),
  );
  const events = lines.map((l) => l.event).join(',');
  if (events !== 'lost,back,caught-up') fail(`alice's connection lines are ${JSON.stringify(lines)}, expected lost, back, caught-up`);
  if (lines[2].missed !== String(away.length) || !lines[1].text.includes(survivor)) {
    fail(`alice's lines say ${JSON.stringify(lines)}: want "back" naming ${survivor} and ${away.length} missed`);
  }
  ok(`alice's conversation says ${lines.map((l) => JSON.stringify(l.text)).join(', then ')}`);
  // Her held message went out after the catch-up, once.
  await waitForMessage(alice, 'alice', { text: queuedText, from: 'alice' });
  await waitForMessage(bob, 'bob', { text: queuedText, from: 'alice' });
  await alice.waitForTimeout(SETTLE_MS);
  await expectOnce(alice, 'alice', queuedText);
  await expectOnce(bob, 'bob', queuedText);
  ok(`alice's message held while cut off went out by itself once she was back, and reached bob once`);
  for (const text of [before, ...away]) await expectOnce(alice, 'alice', text);
  const order = await alice.evaluate((texts) => {
    const shown = [...document.querySelectorAll('[data-testid="messages"] [data-testid="message"] [data-testid="message-text"]')].map(
      (el) => el.textContent,
    );
    return shown.filter((t) => texts.includes(t));
  }, [before, ...away, queuedText]);
  if (JSON.stringify(order) !== JSON.stringify([before, ...away, queuedText])) fail(`alice shows them out of order: ${JSON.stringify(order)}`);
  const noReload = await alice.evaluate(() => window.__noReload);
  if (noReload !== 1) fail(`alice's window.__noReload is ${JSON.stringify(noReload)}: the page was reloaded`);
  ok(`alice shows ${JSON.stringify(before)} and the ${away.length} missed messages, each exactly once and in order, without a reload`);

  // alice talks again, through the survivor.
  const back = "I'm back";
  await typeAndSend(alice, back);
  const onBob = await waitForMessage(bob, 'bob', { text: back });
  if (onBob.from !== 'alice' || onBob.instance !== survivor) {
    fail(`bob shows ${JSON.stringify(back)} with data-from=${onBob.from} data-instance=${onBob.instance}, expected alice / ${survivor}`);
  }
  await waitForMessage(alice, 'alice', { text: back, from: 'alice' });
  await bob.waitForTimeout(SETTLE_MS);
  await expectOnce(bob, 'bob', back);
  await expectOnce(alice, 'alice', back);
  ok(`alice's ${JSON.stringify(back)} reaches bob once, through ${survivor}`);

  // 7. The evidence.
  const shot = path.join(opts.out, 'reconnect-alice.png');
  await alice.screenshot({ path: shot, timeout: WAIT_MS });
  ok(`screenshots saved: ${path.join(opts.out, 'reconnect-alice-away.png')}, ${shot}`);
}

// ------------------------------------------------------------ presence

/** The member list as the page shows it, in display order. */
function shownMembers(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')].map((li) => ({
      name: li.querySelector('[data-testid="member-name"]').textContent,
      instances: [...li.querySelectorAll('[data-testid="member-instance"]')].map((b) => b.textContent),
      tabs: li.querySelector('[data-testid="member-connections"]').textContent,
    })),
  );
}

/**
 * Waits until the page lists exactly `want` ([{name, instances, tabs?}], in
 * name order; instances in any order), and returns what it shows.
 */
async function waitForMembers(page, label, want) {
  try {
    await page.waitForFunction(
      (w) => {
        const shown = [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')].map((li) => ({
          name: li.querySelector('[data-testid="member-name"]').textContent,
          instances: [...li.querySelectorAll('[data-testid="member-instance"]')].map((b) => b.textContent).sort(),
          tabs: li.querySelector('[data-testid="member-connections"]').textContent,
        }));
        return (
          shown.length === w.length &&
          w.every(
            (m, i) =>
              shown[i].name === m.name &&
              JSON.stringify(shown[i].instances) === JSON.stringify([...m.instances].sort()) &&
              (m.tabs === undefined || shown[i].tabs === m.tabs),
          )
        );
      },
      want,
      { timeout: WAIT_MS, polling: 50 },
    );
  } catch (e) {
    const shown = await shownMembers(page).catch(() => 'unreadable');
    fail(`${label}'s member list: waited for ${JSON.stringify(want)}, it shows ${JSON.stringify(shown)} (${e.message.split('\n')[0]})`);
  }
  return shownMembers(page);
}

/** The texts of the page's join/leave lines for `name`, of one kind. */
function presenceLines(page, kind, name) {
  return page.evaluate(
    ([k, n]) =>
      [...document.querySelectorAll(`[data-testid="messages"] [data-testid="presence-event"][data-kind="${k}"]`)]
        .filter((li) => li.getAttribute('data-name') === n)
        .map((li) => li.querySelector('[data-testid="presence-text"]').textContent),
    [kind, name],
  );
}

/** Waits until the page shows a join/leave line whose text is `text`. */
async function waitForPresenceLine(page, label, kind, name, text, timeout = WAIT_MS) {
  try {
    await page.waitForFunction(
      ([k, n, t]) =>
        [...document.querySelectorAll(`[data-testid="messages"] [data-testid="presence-event"][data-kind="${k}"]`)].some(
          (li) => li.getAttribute('data-name') === n && li.querySelector('[data-testid="presence-text"]').textContent === t,
        ),
      [kind, name, text],
      { timeout, polling: 50 },
    );
  } catch (e) {
    const shown = await presenceLines(page, kind, name).catch(() => 'unreadable');
    fail(`${label}: waited for the ${kind} line ${JSON.stringify(text)}; its ${kind} lines for ${name}: ${JSON.stringify(shown)} (${e.message.split('\n')[0]})`);
  }
}

/** The page's typing line ("" when nobody types). */
function typingLine(page) {
  return page.evaluate(() => document.querySelector('[data-testid="typing"]').textContent);
}

/**
 * Fails unless every presence frame the page received is one of a small
 * room's, as docs/PROTOCOL.md has them: `presence` with `count`, `offset`
 * 0, `full` true and every member listed; `presence_diff` with `count` and
 * only per-name changes; no `join` or `leave` frame.
 */
function checkSmallRoomFrames(page, label, room) {
  const frames = page.__presence;
  const snapshots = frames.filter((f) => f.type === 'presence');
  const diffs = frames.filter((f) => f.type === 'presence_diff');
  if (!snapshots.length || !diffs.length) fail(`${label} received ${snapshots.length} presence and ${diffs.length} presence_diff frames; expected some of each`);
  for (const f of frames) {
    const where = `${label}'s ${f.type} frame ${JSON.stringify(f)}`;
    if (f.room !== room) fail(`${where}: room is not ${room}`);
    if (!Number.isInteger(f.count) || f.count < 0) fail(`${where}: no count`);
    if (f.type === 'presence') {
      if (f.full !== true || f.offset !== 0 || f.more !== 0 || f.members.length !== f.count) {
        fail(`${where}: a small room's snapshot is full, from offset 0, lists all count members, more 0`);
      }
    } else if (f.type === 'presence_diff') {
      if ('members' in f || 'offset' in f) fail(`${where}: a small room's diff carries per-name changes, not a window`);
      for (const key of ['joins', 'leaves', 'changed']) {
        if (key in f && (!Array.isArray(f[key]) || f[key].length === 0)) fail(`${where}: ${key} present but not a non-empty list`);
      }
    } else {
      fail(`${where}: not a presence frame of docs/PROTOCOL.md`);
    }
  }
  const diffGaps = diffs.slice(1).map((f, i) => f.at - diffs[i].at);
  ok(`${label}: ${snapshots.length} presence and ${diffs.length} presence_diff frames, all as a small room's (shortest gap between two diffs as received: ${diffGaps.length ? Math.min(...diffGaps) : '-'} ms)`);
}

async function mainPresence(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  if (!opts.pids.has(idA)) fail(`--pids has no PID for instance ${JSON.stringify(idA)}: ${JSON.stringify([...opts.pids])}`);
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // 1. alice on A, then bob on B: both lists show both, with their instances.
  const alice = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'alice', logs);
  await waitConnected(alice, 'alice', idA);
  const bob = await openAndJoin(state.browser, opts.b, 'bob', opts.room, 'bob', logs);
  await waitConnected(bob, 'bob', idB);
  const both = [
    { name: 'alice', instances: [idA], tabs: '1 tab' },
    { name: 'bob', instances: [idB], tabs: '1 tab' },
  ];
  for (const [label, page] of [['alice', alice], ['bob', bob]]) {
    const shown = await waitForMembers(page, label, both);
    ok(`${label}'s member list: ${shown.map((m) => `${m.name} (${m.tabs}, ${m.instances.join('+')})`).join(', ')}`);
  }
  await waitForPresenceLine(alice, 'alice', 'join', 'bob', `bob joined (instance ${idB})`);
  ok(`alice's page shows "bob joined (instance ${idB})"`);
  const count = (await alice.getByTestId('members-count').textContent()).trim();
  if (count !== '2') fail(`alice's member count shows ${JSON.stringify(count)}, expected "2"`);
  const staleShown = await alice.getByTestId('members-stale').isVisible();
  if (staleShown) fail(`alice's member list says ${JSON.stringify(await alice.getByTestId('members-stale').textContent())} while all is well`);
  ok('alice\'s member count is 2 and the list is not marked out of date');
  // A name is isolated from the text around it: a right-to-left name (or
  // one ending in a direction mark) cannot reorder what follows it.
  const unisolated = await alice.evaluate(() =>
    [...document.querySelectorAll('[data-testid="member-name"], .presence-name, .msg-from')]
      .filter((e) => e.tagName !== 'BDI' && !e.querySelector(':scope > bdi'))
      .map((e) => e.outerHTML),
  );
  if (unisolated.length) fail(`names on alice's page not isolated in <bdi>: ${unisolated.join(', ')}`);
  ok("alice's page shows every name in a <bdi>");

  // 2. bob types without sending: alice sees it, bob does not see himself.
  const bobInput = bob.getByTestId('message-input');
  await bobInput.click({ timeout: WAIT_MS });
  await bobInput.pressSequentially('still think', { delay: 40, timeout: WAIT_MS });
  const typingSince = Date.now();
  await waitFor(
    'alice to show "bob is typing…"',
    alice.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent === 'bob is typing…', null, {
      timeout: WAIT_MS,
      polling: 50,
    }),
  );
  ok(`alice shows "bob is typing…" ${Date.now() - typingSince} ms after bob's last key`);
  const ownTyping = await typingLine(bob);
  if (ownTyping !== '') fail(`bob's own page shows ${JSON.stringify(ownTyping)} in its typing line`);
  await alice.screenshot({ path: path.join(opts.out, 'presence-typing.png'), timeout: WAIT_MS });
  await waitFor(
    `alice's typing line to clear within ${TYPING_GONE_MS} ms of bob's last key`,
    alice.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent === '', null, {
      timeout: Math.max(1, TYPING_GONE_MS - (Date.now() - typingSince)),
      polling: 50,
    }),
  );
  ok(`alice's typing line cleared ${Date.now() - typingSince} ms after bob stopped typing`);
  await bobInput.fill('', { timeout: WAIT_MS });

  // 3. A second tab of bob, on A: his own snapshot counts both tabs.
  const bob2 = await openAndJoin(state.browser, opts.a, 'bob', opts.room, 'bob (2nd tab)', logs);
  await waitConnected(bob2, 'bob (2nd tab)', idA);
  const shown2 = await waitForMembers(bob2, 'bob (2nd tab)', [
    { name: 'alice', instances: [idA], tabs: '1 tab' },
    { name: 'bob', instances: [idA, idB], tabs: '2 tabs' },
  ]);
  ok(`bob's 2nd tab lists bob with ${shown2[1].tabs} on instances ${shown2[1].instances.join(', ')}`);
  // alice hears of it as a change of bob (a `changed` member), not a join.
  await waitForMembers(alice, 'alice', [
    { name: 'alice', instances: [idA], tabs: '1 tab' },
    { name: 'bob', instances: [idA, idB], tabs: '2 tabs' },
  ]);
  const joinsOfBob = await presenceLines(alice, 'join', 'bob');
  if (joinsOfBob.length !== 1) fail(`alice shows bob's joins as ${JSON.stringify(joinsOfBob)} after his 2nd tab opened, expected his first only`);
  ok("alice's list follows bob's 2nd tab (2 tabs, both instances) without a second join line");

  // Screenshots: alice at desktop size; bob's 2nd tab at phone size, the
  // list collapsed to one line, then opened.
  await alice.screenshot({ path: path.join(opts.out, 'presence-alice.png'), timeout: WAIT_MS });
  await bob2.setViewportSize(PHONE);
  await bob2.waitForTimeout(300); // let the layout settle
  const list2 = bob2.getByTestId('member-list');
  if (await list2.isVisible()) fail('at phone width the member list is open before it is tapped');
  const summary = (await bob2.locator('#members-summary').textContent()).trim();
  if (summary !== 'alice, bob') fail(`at phone width the collapsed member list reads ${JSON.stringify(summary)}`);
  await bob2.screenshot({ path: path.join(opts.out, 'presence-phone.png'), timeout: WAIT_MS });
  await bob2.getByTestId('members-toggle').click({ timeout: WAIT_MS });
  await waitFor('the member list to open at phone width', list2.waitFor({ state: 'visible', timeout: WAIT_MS }));
  await bob2.screenshot({ path: path.join(opts.out, 'presence-phone-open.png'), timeout: WAIT_MS });
  ok(`at ${PHONE.width}x${PHONE.height} the member list collapses to ${JSON.stringify(summary)} and opens when tapped`);

  // 4. bob closes his 2nd tab: still in the room through the first (the
  // change reaches alice coalesced, up to half a second later).
  await bob2.context().close();
  await waitForMembers(alice, 'alice', both);
  await alice.waitForTimeout(SETTLE_MS);
  const early = await presenceLines(alice, 'leave', 'bob');
  if (early.length !== 0) fail(`alice shows ${JSON.stringify(early)} after bob closed only one of his two tabs`);
  ok("bob closed his 2nd tab: alice lists him with 1 tab on his first instance, no leave line");

  // ... then his first: gone from alice's list, one "bob left" line.
  await bob.context().close();
  await waitForMembers(alice, 'alice', [{ name: 'alice', instances: [idA], tabs: '1 tab' }]);
  await waitForPresenceLine(alice, 'alice', 'leave', 'bob', 'bob left');
  await alice.waitForTimeout(SETTLE_MS);
  const left = await presenceLines(alice, 'leave', 'bob');
  if (left.length !== 1) fail(`alice shows bob's leave as ${JSON.stringify(left)}, expected one "bob left"`);
  await alice.screenshot({ path: path.join(opts.out, 'presence-left.png'), timeout: WAIT_MS });
  ok('bob closed his last tab: alice\'s list drops him and shows "bob left" once');

  // A name is text too: in the member list, the join and leave lines and
  // the typing line.
  const mallory = await openAndJoin(state.browser, opts.b, XSS_NAME, opts.room, 'mallory', logs);
  await waitConnected(mallory, 'mallory', idB);
  await mallory.getByTestId('message-input').pressSequentially('hi', { timeout: WAIT_MS });
  await waitForMembers(alice, 'alice', [
    { name: XSS_NAME, instances: [idB] },
    { name: 'alice', instances: [idA] },
  ]);
  await waitForPresenceLine(alice, 'alice', 'join', XSS_NAME, `${XSS_NAME} joined (instance ${idB})`);
  await waitFor(
    'alice to show the markup name typing',
    alice.waitForFunction((n) => document.querySelector('[data-testid="typing"]').textContent === `${n} is typing…`, XSS_NAME, {
      timeout: WAIT_MS,
      polling: 50,
    }),
  );
  await mallory.context().close();
  await waitForPresenceLine(alice, 'alice', 'leave', XSS_NAME, `${XSS_NAME} left`);
  await alice.waitForTimeout(SETTLE_MS); // time for a parsed <img src=x> to fail and run its onerror
  const injected = await alice.evaluate(() => ({
    img: document.querySelectorAll('img').length,
    xss: typeof window.__xss === 'undefined' ? 'undefined' : String(window.__xss),
  }));
  if (injected.img !== 0) fail(`alice's page holds ${injected.img} <img> element(s) after the markup name came and went`);
  if (injected.xss !== 'undefined') fail(`alice's window.__xss is ${injected.xss}: a name ran as HTML`);
  ok('a markup name shows as literal text in the member list, join, typing and leave lines; no <img>, window.__xss undefined');

  checkSmallRoomFrames(alice, 'alice', opts.room);

  // 5. alice's instance dies: carol, on B, sees alice expire.
  const carol = await openAndJoin(state.browser, opts.b, 'carol', opts.room, 'carol', logs);
  await waitConnected(carol, 'carol', idB);
  await waitForMembers(carol, 'carol', [
    { name: 'alice', instances: [idA] },
    { name: 'carol', instances: [idB] },
  ]);
  const victimPid = opts.pids.get(idA);
  try {
    process.kill(victimPid, 'SIGKILL');
  } catch (e) {
    fail(`cannot SIGKILL instance ${idA} (pid ${victimPid}): ${e.message}`);
  }
  const killedAt = Date.now();
  // Her tab would only retry the dead instance; closing it now says nothing
  // to any server.
  await alice.context().close();
  ok(`SIGKILLed alice's instance ${idA} (pid ${victimPid})`);
  const expired = `alice left (instance ${idA} stopped answering)`;
  await waitForPresenceLine(carol, 'carol', 'leave', 'alice', expired, EXPIRE_MS);
  await waitForMembers(carol, 'carol', [{ name: 'carol', instances: [idB] }]);
  const reason = await carol.evaluate(() =>
    [...document.querySelectorAll('[data-testid="presence-event"][data-kind="leave"]')]
      .filter((li) => li.getAttribute('data-name') === 'alice')
      .map((li) => li.getAttribute('data-reason')),
  );
  if (JSON.stringify(reason) !== '["expired"]') fail(`carol's leave lines for alice have reasons ${JSON.stringify(reason)}`);
  await carol.screenshot({ path: path.join(opts.out, 'presence-expired.png'), timeout: WAIT_MS });
  ok(`carol shows ${JSON.stringify(expired)} ${Date.now() - killedAt} ms after the kill, and lists only herself`);
  checkSmallRoomFrames(carol, 'carol', opts.room);
  ok(`screenshots saved: ${['typing', 'alice', 'phone', 'phone-open', 'left', 'expired'].map((n) => path.join(opts.out, `presence-${n}.png`)).join(', ')}`);
}

// ------------------------------------------------------------ large room

const LARGE_VIEW = { width: 1000, height: 320 }; // short, so that a few members make the sidebar scroll
const WINDOW_STEP = 100; // a page at the bottom of its list asks for this many more members

/** What the member list shows: its rows' names in order, the count, and "and N more" ("" when hidden). */
function windowShown(page) {
  return page.evaluate(() => {
    const more = document.querySelector('[data-testid="members-more"]');
    return {
      names: [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')].map((li) => li.getAttribute('data-name')),
      count: document.querySelector('[data-testid="members-count"]').textContent.trim(),
      more: more.hidden ? '' : more.textContent.trim(),
    };
  });
}

/** Waits until the member list shows exactly `want` ({names, count, more}). */
async function waitForWindow(page, label, want) {
  try {
    await page.waitForFunction(
      (w) => {
        const more = document.querySelector('[data-testid="members-more"]');
        const names = [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')].map((li) => li.getAttribute('data-name'));
        return (
          JSON.stringify(names) === JSON.stringify(w.names) &&
          document.querySelector('[data-testid="members-count"]').textContent.trim() === w.count &&
          (more.hidden ? '' : more.textContent.trim()) === w.more
        );
      },
      want,
      { timeout: WAIT_MS, polling: 50 },
    );
  } catch (e) {
    const shown = await windowShown(page).catch(() => 'unreadable');
    fail(`${label}'s member list: waited for ${JSON.stringify(want)}, it shows ${JSON.stringify(shown)} (${e.message.split('\n')[0]})`);
  }
}

/**
 * Marks every row of the member list, to tell later whether a row is the
 * same node (updated in place) or a new one (the list rebuilt).
 */
function markRows(page) {
  return page.evaluate(() => {
    for (const li of document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')) li.__mark = true;
  });
}

/**
 * Fails unless the rows built since markRows are exactly those of the
 * members new in the list (`after` but not `before`): a row that stays is
 * the same node. Returns how many rows were kept.
 */
async function expectRowsUpdated(page, label, before, after, what) {
  const built = await page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')]
      .filter((li) => !li.__mark)
      .map((li) => li.getAttribute('data-name')),
  );
  const expected = after.filter((n) => !before.includes(n));
  if (JSON.stringify(built) !== JSON.stringify(expected)) {
    fail(`${label}: when ${what}, the rows built anew are ${JSON.stringify(built)}, expected only the new members' ${JSON.stringify(expected)} (the list must be updated, not rebuilt)`);
  }
  return after.length - built.length;
}

/**
 * Keeps, in the page, the largest excess of rows over the count it ever
 * showed (window.__rowsOverCount, 0 or less when the list never held more
 * members than the room has), checked at every change of the list or count.
 */
function watchRowsOverCount(page) {
  return page.evaluate(() => {
    const list = document.querySelector('[data-testid="member-list"]');
    const count = document.querySelector('[data-testid="members-count"]');
    const check = () => {
      const over = list.querySelectorAll('[data-testid="member"]').length - Number(count.textContent);
      window.__rowsOverCount = Math.max(window.__rowsOverCount ?? -Infinity, over);
    };
    check();
    const watch = new MutationObserver(check);
    watch.observe(list, { childList: true });
    watch.observe(count, { childList: true, characterData: true, subtree: true });
  });
}

/**
 * Asks the Rust side to close the bots named `names`: it closes every bot
 * named in the file (one name a line). The file is replaced whole (written
 * aside, then renamed), so that it is never read half written.
 */
async function closeBots(file, closed, names) {
  closed.push(...names);
  await writeFile(`${file}.tmp`, `${closed.join('\n')}\n`);
  await rename(`${file}.tmp`, file);
}

/** The `members` frames the page sent. */
function membersAsked(page) {
  return page.__sent.filter((f) => f.type === 'members');
}

async function mainLargeRoom(opts, logs, state) {
  const idA = await instanceId(opts.a);
  if (opts.bots.length + 1 !== opts.count) fail(`--count ${opts.count} is not the ${opts.bots.length} bots and alice`);
  if (opts.count <= opts.window) fail(`--count ${opts.count} is not more than --window ${opts.window}: not a large room`);
  if (opts.bots.some((n) => n <= 'alice')) fail('every bot must sort after "alice" (her row is the first of the window)');
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // 1. alice joins a room that the bots made large: the count is the
  // room's, the list the first members by name, and nobody's join is news.
  const alice = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'alice', logs);
  await waitConnected(alice, 'alice', idA);
  await watchRowsOverCount(alice);
  let inRoom = ['alice', ...opts.bots].sort();
  const windowOf = (names, size) => ({
    names: names.slice(0, size),
    count: String(names.length),
    more: names.length > size ? `and ${names.length - size} more` : '',
  });
  await waitForWindow(alice, 'alice', windowOf(inRoom, opts.window));
  ok(`alice's page shows ${opts.count} in the room and lists the first ${opts.window}: ${inRoom.slice(0, opts.window).join(', ')}, "and ${opts.count - opts.window} more"`);
  const joinLines = await alice.evaluate(() => document.querySelectorAll('[data-testid="presence-event"]').length);
  if (joinLines !== 0) fail(`alice's conversation has ${joinLines} join/leave lines in a large room`);
  await alice.screenshot({ path: path.join(opts.out, 'large-room-window.png'), timeout: WAIT_MS });

  // 2. Three of the first members leave: the window slides up, the count
  // drops, and the rows that stay are the same nodes. First a diff
  // interval goes by (1 s by default), so that the window alice holds is
  // the one the server last told: its changes then come as names removed
  // and added (a window given between two ticks gets the next one whole).
  await alice.waitForTimeout(1500);
  await markRows(alice);
  const closed = [];
  const firstLeavers = opts.bots.slice(0, 3);
  let before = inRoom.slice(0, opts.window);
  const leftAt = Date.now();
  await closeBots(opts.leaveFile, closed, firstLeavers);
  inRoom = inRoom.filter((n) => !closed.includes(n));
  await waitForWindow(alice, 'alice', windowOf(inRoom, opts.window));
  const tookMs = Date.now() - leftAt;
  let kept = await expectRowsUpdated(alice, 'alice', before, inRoom.slice(0, opts.window), `${firstLeavers.join(', ')} left`);
  ok(`${firstLeavers.join(', ')} left: ${tookMs} ms later alice's page shows ${inRoom.length} and the window ${inRoom.slice(0, opts.window).join(', ')} (${kept} rows kept in place)`);
  const windowChanges = alice.__presence.filter((f) => f.type === 'presence_diff' && Array.isArray(f.removed));
  if (!windowChanges.length) fail(`alice's page was not told who left her window (no presence_diff with removed): ${JSON.stringify(alice.__presence).slice(0, 600)}`);
  ok(`the window's changes came as names removed and added (${windowChanges.length} presence_diff frames), not the window whole`);
  if (membersAsked(alice).length) fail(`alice's page sent ${JSON.stringify(membersAsked(alice))} before its list was scrolled`);

  // 3. alice scrolls her member list to its bottom: one `members` frame
  // for a larger window from 0, and every member listed, in order.
  await alice.setViewportSize(LARGE_VIEW);
  await alice.waitForTimeout(300); // let the layout settle
  const scroller = await alice.evaluate(() => {
    const aside = document.querySelector('[data-testid="members"]');
    return { scrollHeight: aside.scrollHeight, clientHeight: aside.clientHeight };
  });
  if (scroller.scrollHeight <= scroller.clientHeight) {
    fail(`at ${LARGE_VIEW.width}x${LARGE_VIEW.height} alice's member list does not scroll (${JSON.stringify(scroller)}): the test cannot scroll it`);
  }
  await markRows(alice);
  before = inRoom.slice(0, opts.window);
  const box = await alice.getByTestId('member-list').boundingBox();
  await alice.mouse.move(box.x + box.width / 2, box.y + 10);
  const held = opts.window;
  for (let i = 0; i < 20 && !membersAsked(alice).length; i++) {
    await alice.mouse.wheel(0, 200);
    await alice.waitForTimeout(100);
  }
  const loaded = inRoom.slice(0, held + WINDOW_STEP);
  await waitForWindow(alice, 'alice', windowOf(inRoom, held + WINDOW_STEP));
  const asked = membersAsked(alice);
  if (asked.length !== 1 || asked[0].offset !== 0 || asked[0].limit !== held + WINDOW_STEP) {
    fail(`alice's page asked ${JSON.stringify(asked)} for more members; expected one {"type":"members","offset":0,"limit":${held + WINDOW_STEP}}`);
  }
  kept = await expectRowsUpdated(alice, 'alice', before, loaded, 'more members were loaded');
  ok(`alice scrolled her list to its bottom: the page asked ${JSON.stringify(asked[0])}, then listed all ${loaded.length}, in name order (${kept} rows kept in place)`);

  // 4. Two of the last leave, while she holds them: rows removed, count down.
  await markRows(alice);
  before = loaded;
  const lastLeavers = opts.bots.slice(-2);
  await closeBots(opts.leaveFile, closed, lastLeavers);
  inRoom = inRoom.filter((n) => !closed.includes(n));
  await waitForWindow(alice, 'alice', windowOf(inRoom, held + WINDOW_STEP));
  kept = await expectRowsUpdated(alice, 'alice', before, inRoom.slice(0, held + WINDOW_STEP), `${lastLeavers.join(', ')} left`);
  ok(`${lastLeavers.join(', ')} left: alice's page shows ${inRoom.length} and lists them all (${kept} rows kept in place)`);
  if (membersAsked(alice).length !== 1) fail(`alice's page asked for members ${membersAsked(alice).length} times; once was enough`);

  const over = await alice.evaluate(() => window.__rowsOverCount);
  if (!(over <= 0)) fail(`alice's member list once held ${over} more rows than the count it showed`);
  ok('alice\'s member list never held more rows than the count it showed');
  checkLargeRoomFrames(alice, 'alice', opts.room);
  await alice.setViewportSize(DESKTOP);
  await alice.evaluate(() => document.querySelector('[data-testid="members"]').scrollTo(0, 120));
  await alice.waitForTimeout(300);
  await alice.screenshot({ path: path.join(opts.out, 'large-room.png'), timeout: WAIT_MS });
  ok(`screenshots saved: ${['large-room-window', 'large-room'].map((n) => path.join(opts.out, `${n}.png`)).join(', ')}`);
}

/**
 * Fails unless every presence frame the page received is one of a large
 * room's, as docs/PROTOCOL.md has them: `presence` with `full` false, a
 * `count`, `offset` 0 and `more` the members not listed; `presence_diff`
 * with a `count`, and a window's changes (`offset`, `added`, `removed`) or
 * the window whole (`offset` and `members`) or nothing else.
 */
async function mainPresenceOff(opts, logs, state) {
  const [idA, idB] = [await instanceId(opts.a), await instanceId(opts.b)];
  await launch(state);
  const alice = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'alice@A', logs);
  await waitConnected(alice, 'alice@A', idA);
  const bob = await openAndJoin(state.browser, opts.b, 'bob', opts.room, 'bob@B', logs);
  await waitConnected(bob, 'bob@B', idB);
  // Typing, slowly enough that a page with presence would send `typing`.
  const input = alice.getByTestId('message-input');
  await input.pressSequentially('hello without presence', { delay: 60, timeout: WAIT_MS });
  await input.press('Enter', { timeout: WAIT_MS });
  await waitForMessage(bob, 'bob@B', { text: 'hello without presence', from: 'alice' });
  await waitForMessage(alice, 'alice@A', { text: 'hello without presence', from: 'alice' });
  ok('a message crosses instances with presence off');
  await alice.waitForTimeout(SETTLE_MS);
  for (const [page, label] of [[alice, 'alice@A'], [bob, 'bob@B']]) {
    const list = await page.evaluate(() => {
      const aside = document.querySelector('[data-testid="members"]');
      const box = aside.getBoundingClientRect();
      return {
        attr: aside.getAttribute('data-presence'),
        shown: getComputedStyle(aside).display !== 'none' && box.width > 0,
      };
    });
    if (list.attr !== 'off' || list.shown) {
      fail(`${label}: the member list shows with presence off (${JSON.stringify(list)})`);
    }
    if (page.__presence.length) fail(`${label}: presence frames with presence off: ${JSON.stringify(page.__presence)}`);
    const errors = await page.locator('[data-testid="messages"] .notice-error').count();
    if (errors) fail(`${label}: ${errors} error lines in the conversation`);
  }
  const typingSent = alice.__sent.filter((f) => f.type === 'typing' || f.type === 'members');
  if (typingSent.length) fail(`alice@A sent ${JSON.stringify(typingSent)} to a server with presence off`);
  ok('no member list, no typing or members frame, no presence frame, no error line');
  await alice.screenshot({ path: path.join(opts.out, 'presence-off.png') });
  ok(`screenshot saved: ${path.join(opts.out, 'presence-off.png')}`);
}

function checkLargeRoomFrames(page, label, room) {
  const frames = page.__presence;
  for (const f of frames) {
    const where = `${label}'s ${f.type} frame ${JSON.stringify(f).slice(0, 300)}`;
    if (f.room !== room) fail(`${where}: room is not ${room}`);
    if (!Number.isInteger(f.count) || f.count < 0) fail(`${where}: no count`);
    if (f.type === 'presence') {
      if (f.full !== false || f.offset !== 0 || !Array.isArray(f.members) || f.more !== f.count - f.members.length) {
        fail(`${where}: a large room's snapshot has full false, offset 0, more = count - listed`);
      }
    } else if (f.type === 'presence_diff') {
      if ('joins' in f || 'leaves' in f || 'changed' in f) fail(`${where}: a large room's diff has no per-name changes`);
      const windowed = 'members' in f || 'added' in f || 'removed' in f;
      if (windowed !== ('offset' in f)) fail(`${where}: a window (members, or added and removed) and offset come together`);
      if ('members' in f && ('added' in f || 'removed' in f)) fail(`${where}: a window whole or its changes, not both`);
    } else {
      fail(`${where}: not a presence frame of docs/PROTOCOL.md`);
    }
  }
  const snapshots = frames.filter((f) => f.type === 'presence').length;
  ok(`${label}: ${snapshots} presence and ${frames.length - snapshots} presence_diff frames, all as a large room's`);
}

// ------------------------------------------------------------ lab: X-ray and fault panel

const HOPS = ['typed', 'read', 'accepted', 'received', 'queued', 'sent', 'shown'];
const CUT_MS = 30_000; // a cut subscription to go down and come back, seen by the page
const PAUSE_S = 3;
const SHORT_STALL_S = 2; // a stall that ends before anything overflows
const STALL_S = 30; // longer than the test needs: the drop must come from the full buffer
const STALL_MESSAGES = 6; // each ~2 KB: more than A's --client-buffer-bytes 8192

/** The X-ray hops of the message whose text is `text`, as the page shows them. */
function xrayOf(page, text) {
  return page.evaluate((t) => {
    for (const li of document.querySelectorAll('[data-testid="messages"] [data-testid="message"]')) {
      if (li.querySelector('[data-testid="message-text"]').textContent !== t) continue;
      const box = li.querySelector('[data-testid="xray"]');
      if (!box) return { missing: true };
      return {
        via: box.getAttribute('data-via'),
        open: box.open,
        summaryShown: box.querySelector('summary').getBoundingClientRect().height > 0,
        hops: [...box.querySelectorAll('[data-testid="xray-hop"]')].map((row) => ({
          hop: row.getAttribute('data-hop'),
          us: row.getAttribute('data-us'),
          clock: row.getAttribute('data-clock'),
          label: row.querySelector('[data-testid="xray-label"]').textContent,
          time: row.querySelector('[data-testid="xray-time"]').textContent,
          delta: row.querySelector('[data-testid="xray-delta"]').textContent,
        })),
      };
    }
    return null;
  }, text);
}

/**
 * Checks an X-ray: every hop of HOPS, in order, each with a label that
 * names who did it, a time that parses and a clock; the times do not go
 * back, except the whole-ms Redis stamp, which may be up to 1 ms early.
 */
function checkXray(label, x, want) {
  if (!x || x.missing) fail(`${label}: no X-ray under the message (${JSON.stringify(x)})`);
  const order = x.hops.map((h) => h.hop);
  if (JSON.stringify(order) !== JSON.stringify(HOPS)) fail(`${label}: X-ray hops ${JSON.stringify(order)}, expected ${JSON.stringify(HOPS)}`);
  for (const h of x.hops) {
    if (!/^\d{13,17}$/.test(h.us)) fail(`${label}: hop ${h.hop} has no time: ${JSON.stringify(h)}`);
    if (!/^\d\d:\d\d:\d\d\.\d{3}/.test(h.time)) fail(`${label}: hop ${h.hop} shows its time as ${JSON.stringify(h.time)}`);
    if (!h.clock) fail(`${label}: hop ${h.hop} does not say which clock it is on`);
    if (!want[h.hop].test(h.label)) fail(`${label}: hop ${h.hop} is labelled ${JSON.stringify(h.label)}, expected ${want[h.hop]}`);
  }
  const us = Object.fromEntries(x.hops.map((h) => [h.hop, Number(h.us)]));
  const slack = { accepted: 1000 }; // Redis stamps whole milliseconds: floor(t) may be up to 1 ms before `read`
  let last = -Infinity;
  let lastName = '';
  for (const h of HOPS) {
    if (us[h] < last - (slack[h] ?? 0)) {
      fail(`${label}: hop ${h} at ${us[h]} µs is ${(last - us[h]) / 1000} ms before ${lastName}: ${JSON.stringify(x.hops)}`);
    }
    if (!(h in slack)) {
      last = Math.max(last, us[h]);
      lastName = h;
    }
  }
  // "received" must also follow "accepted" for real: it can only be later.
  if (us.received < us.accepted) fail(`${label}: received before Redis accepted it: ${JSON.stringify(x.hops)}`);
  return us;
}

/** Waits until the page has a connection line of `event` (after `after` of them), and returns its text. */
async function waitForLine(page, label, event, { count = 1, timeout = WAIT_MS } = {}) {
  await waitFor(
    `${label} to write ${count} "${event}" line(s)`,
    page.waitForFunction(
      ([e, n]) => document.querySelectorAll(`[data-testid="notice"][data-event="${e}"]`).length >= n,
      [event, count],
      { timeout, polling: 50 },
    ),
  );
  return page.evaluate(([e, n]) => {
    const li = document.querySelectorAll(`[data-testid="notice"][data-event="${e}"]`)[n - 1];
    return { text: li.querySelector('[data-testid="notice-text"]').textContent, missed: li.getAttribute('data-missed'), code: li.getAttribute('data-close-code') };
  }, [event, count]);
}

/** How many connection lines of `event` the page has. */
function lineCount(page, event) {
  return page.evaluate((e) => document.querySelectorAll(`[data-testid="notice"][data-event="${e}"]`).length, event);
}

/** Records every value the page's pill takes from now on into window.__states. */
async function watchStates(page) {
  await page.evaluate(() => {
    const status = document.querySelector('[data-testid="status"]');
    window.__states = [status.getAttribute('data-state')];
    if (window.__stateObserver) window.__stateObserver.disconnect();
    window.__stateObserver = new MutationObserver(() => {
      const st = status.getAttribute('data-state');
      if (window.__states[window.__states.length - 1] !== st) window.__states.push(st);
    });
    window.__stateObserver.observe(status, { attributes: true, attributeFilter: ['data-state'] });
  });
}

/** The texts of the page's delivered messages that start with `prefix`, in display order. */
function shownTexts(page, prefix) {
  return page.evaluate(
    (p) =>
      [...document.querySelectorAll('[data-testid="messages"] [data-testid="message"] [data-testid="message-text"]')]
        .map((el) => el.textContent)
        .filter((t) => t.startsWith(p)),
    prefix,
  );
}

/** Clicks a fault button (with its seconds, if any), and waits for the server's answer in the panel's log. */
async function pressFault(page, kind, seconds) {
  if (seconds !== undefined) await page.getByTestId(`fault-${kind}-seconds`).fill(String(seconds), { timeout: WAIT_MS });
  await page.getByTestId(`fault-${kind}`).click({ timeout: WAIT_MS });
  await waitFor(
    `the fault panel to show the answer to "${kind}"`,
    page.waitForFunction(
      () => document.querySelector('[data-testid="fault-log"] [data-testid="fault-log-entry"][data-event="done"], [data-testid="fault-log"] [data-testid="fault-log-entry"][data-event="refused"]'),
      null,
      { timeout: WAIT_MS, polling: 50 },
    ),
  );
  const answer = await page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="fault-log-entry"]')].map((li) => `${li.getAttribute('data-event')}: ${li.textContent}`),
  );
  if (!answer.some((a) => a.startsWith('done'))) fail(`the instance refused "${kind}": ${JSON.stringify(answer)}`);
  return answer;
}

/** Waits until the fault panel lists `metric` among the counters that moved, and returns what it shows. */
async function waitForCounter(page, metric) {
  const row = page.locator(`[data-testid="fault-counter"][data-metric="${metric}"]`);
  await waitFor(`the fault panel to show ${metric} moving`, row.waitFor({ state: 'visible', timeout: WAIT_MS }));
  return (await row.textContent()).trim();
}

async function mainLab(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // 1. alice turns the X-ray on with ?trace=1; bob with the toggle.
  const alice = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'alice', logs, '&trace=1');
  await waitConnected(alice, 'alice', idA);
  const bob = await openAndJoin(state.browser, opts.b, 'bob', opts.room, 'bob', logs);
  await waitConnected(bob, 'bob', idB);
  if ((await alice.getByTestId('xray-toggle').getAttribute('aria-pressed')) !== 'true') fail('?trace=1 did not turn alice\'s X-ray toggle on');
  if (!alice.__wsUrls.length || !alice.__wsUrls.every((u) => new URL(u).searchParams.get('trace') === '1')) {
    fail(`alice's WebSocket URLs lack trace=1: ${JSON.stringify(alice.__wsUrls)}`);
  }
  if (bob.__wsUrls.some((u) => new URL(u).searchParams.has('trace'))) fail(`bob asked for traces before turning them on: ${JSON.stringify(bob.__wsUrls)}`);
  ok('alice opened the page with ?trace=1: her toggle is on and her WebSocket URL has trace=1');

  await watchStates(bob);
  const bobClient = await bob.evaluate(() => window.chatDebug.client);
  await bob.getByTestId('xray-toggle').click({ timeout: WAIT_MS });
  const xrayOn = await waitForLine(bob, 'bob', 'back');
  await waitFor(
    'bob to be connected again with a new welcome',
    bob.waitForFunction(
      (old) => document.querySelector('[data-testid="status"]').getAttribute('data-state') === 'connected' && window.chatDebug.client && window.chatDebug.client !== old,
      bobClient,
      { timeout: WAIT_MS, polling: 50 },
    ),
  );
  const bobStates = await bob.evaluate(() => window.__states);
  const bobWs = bob.__wsUrls[bob.__wsUrls.length - 1];
  if (new URL(bobWs).searchParams.get('trace') !== '1') fail(`bob's new WebSocket URL lacks trace=1: ${bobWs}`);
  if (new URL(bob.url()).searchParams.get('trace') !== '1') fail(`bob's address does not keep trace=1: ${bob.url()}`);
  if (bobStates.some((st) => st === 'reconnecting' || st === 'offline') || (await lineCount(bob, 'lost')) !== 0 || !(await bob.getByTestId('offline-banner').isHidden())) {
    fail(`turning the X-ray on was not smooth for bob: states ${JSON.stringify(bobStates)}, ${await lineCount(bob, 'lost')} "lost" line(s)`);
  }
  ok(`bob turned the X-ray on with the toggle: reconnected with trace=1 (states ${JSON.stringify(bobStates)}, no outage shown), line ${JSON.stringify(xrayOn.text)}`);
  // Make before break: the room saw no leave and join, and bob still counts one tab.
  await bob.waitForTimeout(SETTLE_MS);
  await waitForMembers(bob, 'bob', [
    { name: 'alice', instances: [idA], tabs: '1 tab' },
    { name: 'bob', instances: [idB], tabs: '1 tab' },
  ]);
  const churn = [...(await presenceLines(alice, 'leave', 'bob')), ...(await presenceLines(alice, 'join', 'bob'))];
  if (churn.length !== 1) fail(`alice shows ${JSON.stringify(churn)} for bob around his toggle: expected only his first join`);
  ok("the toggle's reconnection is invisible to the room: alice shows bob's one join, bob's list counts him with 1 tab");

  // 2. The X-ray of a message typed on B and read on A.
  const probe = 'through the X-ray';
  await typeAndSend(bob, probe);
  await waitForMessage(alice, 'alice', { text: probe, from: 'bob' });
  await waitForMessage(bob, 'bob', { text: probe, from: 'bob' });
  const onAlice = await xrayOf(alice, probe);
  const fromBobOnAlice = {
    typed: /^typed in bob's tab$/,
    read: new RegExp(`^read by instance ${idB}$`),
    accepted: /Redis/,
    received: new RegExp(`^received by the subscriber of instance ${idA}$`),
    queued: new RegExp(`outbox by instance ${idA}$`),
    sent: new RegExp(`socket by instance ${idA}$`),
    shown: /^shown in this tab$/,
  };
  const us = checkXray("alice's X-ray", onAlice, fromBobOnAlice);
  if (onAlice.via !== 'pubsub') fail(`alice's X-ray says via ${JSON.stringify(onAlice.via)}, expected pubsub`);
  if (onAlice.open || !onAlice.summaryShown) fail(`the X-ray should be one compact line, closed until clicked: ${JSON.stringify({ open: onAlice.open, summary: onAlice.summaryShown })}`);
  ok(`alice's X-ray of bob's message: ${onAlice.hops.map((h) => `${h.hop} ${h.time} ${h.delta}`.trim()).join(' | ')} (total ${(us.shown - us.typed) / 1000} ms)`);
  const onBob = await xrayOf(bob, probe);
  checkXray("bob's own X-ray", onBob, {
    typed: /^typed in this tab$/,
    read: new RegExp(`^read by instance ${idB}$`),
    accepted: /Redis/,
    received: new RegExp(`^received by the subscriber of instance ${idB}$`),
    queued: new RegExp(`outbox by instance ${idB}$`),
    sent: new RegExp(`socket by instance ${idB}$`),
    shown: /^shown in this tab$/,
  });
  ok("bob's own copy has its X-ray too, every hop on instance " + idB);
  const summary = alice.locator('[data-testid="message"]', { hasText: probe }).locator('[data-testid="xray"] summary');
  await summary.click({ timeout: WAIT_MS });
  await waitFor('the X-ray to open', alice.locator('[data-testid="message"]', { hasText: probe }).locator('[data-testid="xray-hop"]').first().waitFor({ state: 'visible', timeout: WAIT_MS }));
  await alice.screenshot({ path: path.join(opts.out, 'lab-xray.png'), timeout: WAIT_MS });
  ok('the X-ray opens into its list of hops when clicked');

  // 3. The instances view: both, alice's marked, Redis up.
  try {
    await alice.waitForFunction(
      ([a, b]) => {
        const rows = [...document.querySelectorAll('[data-testid="instance-list"] [data-testid="instance-row"]')];
        const by = Object.fromEntries(rows.map((r) => [r.getAttribute('data-instance'), r]));
        return by[a] && by[b] && by[a].getAttribute('data-you') === 'true' && by[b].getAttribute('data-you') === 'false' &&
          by[a].getAttribute('data-redis') === 'up' && by[b].getAttribute('data-redis') === 'up';
      },
      [idA, idB],
      { timeout: WAIT_MS, polling: 100 },
    );
  } catch (e) {
    const rows = await alice.evaluate(() => [...document.querySelectorAll('[data-testid="instance-row"]')].map((r) => r.textContent));
    fail(`alice's instances view: waited for ${idA} (hers) and ${idB}, both Redis up; it shows ${JSON.stringify(rows)} (${e.message.split('\n')[0]})`);
  }
  const rows = await alice.evaluate(() => [...document.querySelectorAll('[data-testid="instance-row"]')].map((r) => r.textContent.replace(/\s+/g, ' ').trim()));
  ok(`alice's instances view: ${JSON.stringify(rows)}`);

  // 4. The fault panel is there (the instances run with --demo-controls).
  for (const [label, page] of [['alice', alice], ['bob', bob]]) {
    const panel = page.getByTestId('fault-panel');
    await waitFor(`${label}'s fault panel`, panel.waitFor({ state: 'visible', timeout: WAIT_MS }));
  }
  ok('both pages show the fault panel');
  // It names the tab's client id, which a stall made with curl needs.
  for (const [label, page] of [['alice', alice], ['bob', bob]]) {
    const client = await page.evaluate(() => window.chatDebug.client);
    const where = await page.getByTestId('fault-where').textContent({ timeout: WAIT_MS });
    if (!client || !where.includes(`this tab is client ${client}`)) {
      fail(`${label}'s fault panel should name its client id ${client}: "${where}"`);
    }
  }
  ok('each fault panel names its tab\'s client id');

  // 4a. Cut A's subscription while bob sends a steady stream: alice's page
  // goes "sending paused", then connected again, and shows every message
  // once, in order; what was published while A was away comes from history.
  await watchStates(alice);
  await bob.evaluate(() => {
    window.__burst = 0;
    window.__burstTimer = setInterval(() => {
      window.__burst += 1;
      document.querySelector('[data-testid="message-input"]').value = `stream ${window.__burst}`;
      document.getElementById('composer').requestSubmit();
    }, 20);
  });
  await waitForMessage(alice, 'alice', { text: 'stream 3', from: 'bob' });
  let sent = 0;
  try {
    await pressFault(alice, 'cut');
    const down = await waitForLine(alice, 'alice', 'delivery-down', { timeout: CUT_MS });
    const up = await waitForLine(alice, 'alice', 'delivery-up', { timeout: CUT_MS });
    ok(`cut: alice's page says ${JSON.stringify(down.text)}, then ${JSON.stringify(up.text)}`);
    if (!(Number(up.missed) >= 1)) fail(`alice's "up" line says ${up.missed} missed messages while bob kept sending through the cut`);
  } finally {
    sent = await bob.evaluate(() => {
      clearInterval(window.__burstTimer);
      return window.__burst;
    });
  }
  const last = `stream ${sent}`;
  await waitForMessage(alice, 'alice', { text: last, from: 'bob' });
  await alice.waitForTimeout(SETTLE_MS);
  const stream = await shownTexts(alice, 'stream ');
  const expected = Array.from({ length: sent }, (_, i) => `stream ${i + 1}`);
  if (JSON.stringify(stream) !== JSON.stringify(expected)) {
    fail(`alice shows bob's stream as ${JSON.stringify(stream)}, expected stream 1..${sent} once each, in order`);
  }
  const fromHistory = await alice.evaluate(() =>
    [...document.querySelectorAll('[data-testid="message"]')].filter((li) => li.querySelector('[data-testid="xray"][data-via="history"]')).length,
  );
  if (fromHistory < 1) fail('no message of the stream came from history: the catch-up did not show');
  const aliceStates = await alice.evaluate(() => window.__states);
  const pausedAt = aliceStates.indexOf('paused');
  if (pausedAt < 0 || aliceStates.lastIndexOf('connected') < pausedAt || aliceStates[aliceStates.length - 1] !== 'connected') {
    fail(`alice's pill went ${JSON.stringify(aliceStates)} around the cut: expected paused, then connected`);
  }
  const reconnects = await waitForCounter(alice, 'chat_redis_reconnects_total');
  const log = await alice.evaluate(() => [...document.querySelectorAll('[data-testid="fault-log-entry"]')].map((li) => li.getAttribute('data-event')));
  for (const e of ['done', 'delivery-down', 'delivery-up']) {
    if (!log.includes(e)) fail(`the fault panel's log lacks "${e}": ${JSON.stringify(log)}`);
  }
  ok(`cut: all ${sent} streamed messages shown once, in order, ${fromHistory} of them caught up from history (X-ray via=history); pill ${JSON.stringify(aliceStates)}; counter ${JSON.stringify(reconnects)}; log ${JSON.stringify(log)}`);
  await alice.screenshot({ path: path.join(opts.out, 'lab-cut.png'), timeout: WAIT_MS });

  // 4b. Pause A's delivery: bob's message arrives only when it resumes.
  await pressFault(alice, 'pause', PAUSE_S);
  const stats = await fetch(`${opts.a}/stats`, { signal: AbortSignal.timeout(WAIT_MS) }).then((r) => r.json());
  const until = stats.local && stats.local.delivery_paused_until_ms;
  if (typeof until !== 'number') fail(`${opts.a}/stats does not say until when delivery is paused: ${JSON.stringify(stats.local)}`);
  const countdown = await alice.getByTestId('fault-status').textContent();
  if (!/paused/.test(countdown)) fail(`alice's fault panel says ${JSON.stringify(countdown)} during the pause`);
  const held = 'sent during the pause';
  await typeAndSend(bob, held);
  await waitForMessage(bob, 'bob', { text: held, from: 'bob' });
  const early = Date.now() < until - 300 ? await shownTexts(alice, held) : null;
  if (early && early.length) fail(`alice shows ${JSON.stringify(held)} before the pause ends`);
  await waitForMessage(alice, 'alice', { text: held, from: 'bob' });
  const heldX = await xrayOf(alice, held);
  const heldUs = Object.fromEntries(heldX.hops.map((h) => [h.hop, Number(h.us)]));
  if (heldUs.queued < until * 1000 - 1000) fail(`A queued ${JSON.stringify(held)} for alice at ${heldUs.queued} µs, before the pause ended at ${until} ms`);
  ok(`pause: ${JSON.stringify(countdown)}; bob's message waited and was queued for alice ${((heldUs.queued - heldUs.received) / 1e6).toFixed(2)} s after A received it, once delivery resumed${early ? ' (not shown before)' : ''}`);

  // 4c. Stall alice's tab for a moment: bob's message waits in A's outbox
  // for her, and her X-ray shows that wait on its "written" row (from
  // "queued" to "written"), not between "written" and "shown".
  await pressFault(alice, 'stall', SHORT_STALL_S);
  const waited = 'sent while alice was stalled';
  await typeAndSend(bob, waited);
  await waitForMessage(bob, 'bob', { text: waited, from: 'bob' });
  await waitForMessage(alice, 'alice', { text: waited, from: 'bob' });
  const waitedX = await xrayOf(alice, waited);
  const waitedUs = checkXray("alice's X-ray after a stall", waitedX, fromBobOnAlice);
  const stallUs = SHORT_STALL_S * 1e6;
  if (waitedUs.sent - waitedUs.queued < stallUs / 2) fail(`alice's X-ray shows ${(waitedUs.sent - waitedUs.queued) / 1000} ms in the outbox during a ${SHORT_STALL_S} s stall: ${JSON.stringify(waitedX.hops)}`);
  if (waitedUs.shown - waitedUs.sent > stallUs / 2) fail(`alice's X-ray shows ${(waitedUs.shown - waitedUs.sent) / 1000} ms from "written" to "shown" after a stall: the wait is put after the socket: ${JSON.stringify(waitedX.hops)}`);
  const writtenRow = waitedX.hops.find((h) => h.hop === 'sent');
  if (!/^\+\d+\.\d\d s$/.test(writtenRow.delta)) fail(`the "written" row shows ${JSON.stringify(writtenRow.delta)}, expected the outbox wait in seconds`);
  ok(`short stall: ${waitedX.hops.map((h) => `${h.hop} ${h.delta}`.trim()).join(' | ')}`);

  // 4d. Stall alice's tab: A drops it as a slow consumer; the page says so,
  // reconnects and catches up.
  await pressFault(alice, 'stall', STALL_S);
  const stalled = await alice.getByTestId('fault-status').textContent();
  if (!/stalled/.test(stalled)) fail(`alice's fault panel says ${JSON.stringify(stalled)} during the stall`);
  const backBefore = await lineCount(alice, 'back');
  const caughtBefore = await lineCount(alice, 'caught-up');
  const big = Array.from({ length: STALL_MESSAGES }, (_, i) => `stall ${i + 1} ${'x'.repeat(1900)}`);
  for (const text of big) {
    await typeAndSend(bob, text);
    await waitForMessage(bob, 'bob', { text, from: 'bob' });
  }
  const lost = await waitForLine(alice, 'alice', 'lost', { timeout: WAIT_MS });
  if (lost.code !== '1008' || !/slow consumer/.test(lost.text)) fail(`alice's page says ${JSON.stringify(lost)} when dropped as a slow consumer`);
  const back = await waitForLine(alice, 'alice', 'back', { count: backBefore + 1, timeout: RECONNECT_MS });
  const caught = await waitForLine(alice, 'alice', 'caught-up', { count: caughtBefore + 1, timeout: RECONNECT_MS });
  if (!(Number(caught.missed) >= 1)) fail(`alice caught up ${caught.missed} messages after the slow-consumer drop`);
  for (const text of big) await waitForMessage(alice, 'alice', { text, from: 'bob' });
  await alice.waitForTimeout(SETTLE_MS);
  const stallShown = await shownTexts(alice, 'stall ');
  if (JSON.stringify(stallShown) !== JSON.stringify(big)) {
    fail(`alice shows the stall messages as ${JSON.stringify(stallShown.map((t) => t.slice(0, 8)))}, expected each once, in order`);
  }
  const dropped = await waitForCounter(alice, 'chat_slow_clients_dropped_total');
  await waitFor('alice to be connected', alice.locator('[data-testid="status"][data-state="connected"]').waitFor({ state: 'visible', timeout: WAIT_MS }));
  ok(`stall: ${JSON.stringify(lost.text)}; then ${JSON.stringify(back.text)}, ${JSON.stringify(caught.text)}; all ${big.length} messages once, in order; counter ${JSON.stringify(dropped)}`);
  await alice.screenshot({ path: path.join(opts.out, 'lab-stall.png'), timeout: WAIT_MS });
  ok(`screenshots saved: ${['xray', 'cut', 'stall'].map((n) => path.join(opts.out, `lab-${n}.png`)).join(', ')}`);
}

// ------------------------------------------------------------ older history

async function mainOlderHistory(opts, logs, state) {
  const total = opts.count;
  const want = Array.from({ length: total }, (_, n) => `old-${n}`);
  await mkdir(opts.out, { recursive: true });
  await launch(state);
  const carol = await openAndJoin(state.browser, opts.b, 'carol', opts.room, 'carol', logs);
  await waitWelcomed(carol, 'carol');
  // The newest 50 (--history-replay), and the row that offers the rest.
  await waitFor(
    'carol to show the newest 50 messages and the "Load older messages" row',
    carol.waitForFunction(
      () =>
        document.querySelectorAll('[data-testid="message"]').length === 50 &&
        !!document.querySelector('[data-testid="load-older"]'),
      null,
      { timeout: WAIT_MS, polling: 50 },
    ),
  );
  const first = await shownTexts(carol, 'old-');
  if (JSON.stringify(first) !== JSON.stringify(want.slice(total - 50))) {
    fail(`carol first shows ${JSON.stringify(first.slice(0, 3))}... expected the newest 50, ${want[total - 50]} to ${want[total - 1]}`);
  }
  const notices = await carol.evaluate(() => [...document.querySelectorAll('[data-testid="notice-text"]')].map((n) => n.textContent));
  if (notices.some((n) => n.includes('history_more') || n.includes('"type":"history"'))) {
    fail(`carol shows the server's history_more notice as text: ${JSON.stringify(notices)}`);
  }
  ok(`carol shows the newest 50 of ${total} messages and a "Load older messages" row at the top`);
  await carol.screenshot({ path: path.join(opts.out, 'older-before.png'), timeout: WAIT_MS });

  // Scrolled to the top, the page asks for the rest and keeps its place.
  const topBefore = await carol.evaluate(() => document.querySelector('[data-testid="message"]').getAttribute('data-id'));
  await carol.evaluate(() => {
    const list = document.querySelector('[data-testid="messages"]');
    list.scrollTop = 0;
    list.dispatchEvent(new Event('scroll'));
  });
  await waitFor(
    `carol to show all ${total} messages once scrolled to the top`,
    carol.waitForFunction((n) => document.querySelectorAll('[data-testid="message"]').length === n, total, {
      timeout: WAIT_MS,
      polling: 50,
    }),
  );
  const all = await shownTexts(carol, 'old-');
  if (JSON.stringify(all) !== JSON.stringify(want)) fail(`after loading older, carol shows ${JSON.stringify(all)}`);
  const after = await carol.evaluate((id) => ({
    row: !!document.querySelector('[data-testid="older"]'),
    scrollTop: document.querySelector('[data-testid="messages"]').scrollTop,
    kept: document.querySelector(`[data-testid="message"][data-id="${id}"]`).getBoundingClientRect().top,
  }), topBefore);
  if (after.row) fail('the "Load older messages" row is still there with nothing older left');
  if (after.scrollTop <= 0) fail('loading older messages jumped the view to the top instead of keeping the place');
  ok(`scrolled to the top, carol shows all ${total} messages in order, the row is gone, the view kept its place (scrollTop ${Math.round(after.scrollTop)})`);
  await carol.screenshot({ path: path.join(opts.out, 'older-after.png'), timeout: WAIT_MS });
}

// ------------------------------------------------------------ auth token

/** A first token for `user`, from the token server's sign-in (/initial). */
async function initialToken(opts, user) {
  const res = await fetch(`${opts.tokenServer}/initial?user=${encodeURIComponent(user)}`, { signal: AbortSignal.timeout(WAIT_MS) })
    .catch((e) => fail(`GET ${opts.tokenServer}/initial failed: ${e.message}`));
  const token = (await res.text()).trim();
  if (!res.ok || token.split('.').length !== 3) fail(`${opts.tokenServer}/initial?user=${user} answered HTTP ${res.status}: ${token}`);
  return token;
}

/** A JWT's claims (not verified: the server does that). */
function claimsOf(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}

/**
 * Opens `base` with `?room=` and `#token=` (no name: the token names us),
 * in a context whose cookie `session=<session>` is what the token
 * endpoint knows the user by. Records like openAndJoin, plus the frames
 * each socket sent in order (`page.__sockets`: [{url, sent: [type...]}])
 * and every dialog (none may open: the pages have a token URL).
 */
async function openWithToken(browser, base, session, token, room, label, logs, beforeLoad) {
  const context = await browser.newContext({ viewport: DESKTOP });
  await context.addCookies([{ name: 'session', value: session, domain: '127.0.0.1', path: '/' }]);
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  recordLogs(page, label, logs);
  page.__wsUrls = [];
  page.__sent = [];
  page.__presence = [];
  page.__sockets = [];
  page.__dialogs = [];
  page.on('dialog', (d) => {
    page.__dialogs.push(d.message());
    d.dismiss().catch(() => {});
  });
  page.on('websocket', (ws) => {
    page.__wsUrls.push(ws.url());
    const socket = { url: ws.url(), sent: [], closed: false };
    page.__sockets.push(socket);
    ws.on('close', () => { socket.closed = true; });
    ws.on('framesent', (f) => {
      const frame = parseFrame(f.payload);
      if (!frame) return;
      page.__sent.push(frame);
      socket.sent.push(frame.type);
    });
  });
  if (beforeLoad) await beforeLoad(page);
  const url = `${base}/?room=${encodeURIComponent(room)}#token=${token}`;
  const res = await waitFor(`${label} to load the page`, page.goto(url, { waitUntil: 'load', timeout: WAIT_MS }));
  if (!res || !res.ok()) fail(`${label}: the page answered ${res ? `HTTP ${res.status()}` : 'nothing'}`);
  return page;
}

/** Checks what a freshly welcomed token page shows: who it is, and no token in sight. */
async function checkSignedIn(page, label, want) {
  await waitFor(
    `${label} to be welcomed as ${want.user}`,
    page.waitForFunction((u) => window.chatDebug.user === u, want.user, { timeout: WAIT_MS, polling: 50 }),
  );
  const seen = await page.evaluate(() => ({
    href: window.location.href,
    myName: document.querySelector('[data-testid="my-name"]').textContent,
    auth: window.chatDebug.auth,
    expires: window.chatDebug.expires,
    nameField: document.getElementById('name-field').hidden,
    hint: document.querySelector('[data-testid="name-token-hint"]').hidden ? null : document.querySelector('[data-testid="name-token-hint"]').textContent,
  }));
  if (seen.href.includes('token') || seen.href.includes('#')) fail(`${label}: the address still shows the token: ${seen.href}`);
  if (seen.myName !== want.name) fail(`${label}: shows the name ${JSON.stringify(seen.myName)}, expected ${JSON.stringify(want.name)} (the token's)`);
  if (seen.auth !== 'token') fail(`${label}: chatDebug.auth is ${JSON.stringify(seen.auth)}`);
  if (!seen.nameField || !seen.hint) fail(`${label}: the join form still offers a name field (hidden ${seen.nameField}, hint ${JSON.stringify(seen.hint)})`);
  const sockets = page.__sockets.map((s) => s.sent[0]);
  if (sockets.some((first) => first !== 'auth')) fail(`${label}: a socket's first frame was not auth: ${JSON.stringify(page.__sockets)}`);
  if (page.__wsUrls.some((u) => new URL(u).searchParams.has('name'))) fail(`${label}: a WebSocket URL carries a name: ${JSON.stringify(page.__wsUrls)}`);
  ok(`${label} welcomed as ${want.user} (shows ${JSON.stringify(seen.myName)}, expires ${seen.expires}); the address bar has no token, the join form no name field, each socket sent auth first`);
  return seen;
}

/** The connection lines of the page, in order: {event, code, text}. */
function connLines(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="notice"][data-event]')].map((li) => ({
      event: li.getAttribute('data-event'),
      code: li.getAttribute('data-close-code'),
      reason: li.getAttribute('data-close-reason'),
      missed: li.getAttribute('data-missed'),
      text: li.querySelector('[data-testid="notice-text"]').textContent,
    })),
  );
}

async function mainToken(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  const cfg = await fetch(`${opts.a}/config.json`, { signal: AbortSignal.timeout(WAIT_MS) }).then((r) => r.json());
  const tokenUrl = `${opts.tokenServer}/token`;
  if (cfg.auth !== 'token' || cfg.auth_token_url !== tokenUrl) {
    fail(`${opts.a}/config.json says auth ${JSON.stringify(cfg.auth)}, auth_token_url ${JSON.stringify(cfg.auth_token_url)}: run the instances with --auth token --auth-token-url ${tokenUrl}`);
  }
  await mkdir(opts.out, { recursive: true });
  await launch(state);

  // bob on B, with a long token.
  const bob = await openWithToken(state.browser, opts.b, 'bob', await initialToken(opts, 'bob'), opts.room, 'bob', logs);
  await waitWelcomed(bob, 'bob');
  await checkSignedIn(bob, 'bob', { user: 'u-bob', name: 'bob' });

  // twin on B: another user, also called "alice", whose refreshes work.
  const twinToken = await initialToken(opts, 'twin');
  const twinExp = claimsOf(twinToken).exp;
  const twin = await openWithToken(state.browser, opts.b, 'twin', twinToken, opts.room, 'twin', logs);
  await waitWelcomed(twin, 'twin');
  await checkSignedIn(twin, 'twin', { user: 'u-twin', name: 'alice' });
  const twinClient = await twin.evaluate(() => window.chatDebug.client);

  // A message before alice comes: she gets it from the room's history,
  // and it is her `since` when she reconnects.
  const before = 'before the expiry';
  await typeAndSend(bob, before);
  await waitForMessage(bob, 'bob', { text: before, from: 'bob' });

  // alice on A. Her token requests go through here: the one after the
  // server closed her is held until bob has talked meanwhile.
  let openGate;
  const gate = new Promise((resolve) => {
    openGate = resolve;
  });
  let held = 0;
  const aliceToken = await initialToken(opts, 'alice');
  const aliceExp = claimsOf(aliceToken).exp;
  const alice = await openWithToken(state.browser, opts.a, 'alice', aliceToken, opts.room, 'alice', logs, async (page) => {
    await page.route(tokenUrl, async (route) => {
      const closed = await page
        .evaluate(() => !!document.querySelector('[data-testid="notice"][data-event="lost"][data-close-code="4401"]'))
        .catch(() => false);
      if (closed) {
        held += 1;
        await gate;
      }
      await route.continue().catch(() => {});
    });
  });
  const aliceOn = await waitWelcomed(alice, 'alice');
  if (aliceOn !== idA) fail(`alice is on ${aliceOn}, expected ${idA}`);
  await checkSignedIn(alice, 'alice', { user: 'u-alice', name: 'alice' });
  const firstClient = await alice.evaluate(() => window.chatDebug.client);
  const first = await waitForMessage(alice, 'alice', { text: before, from: 'bob' });
  ok(`alice shows bob's ${JSON.stringify(before)} (${first.id}), from the room's history`);

  // Her refresh fails (the endpoint's first answer to her is a 500), and
  // at exp the server closes her: 4401 "token expired".
  const refreshFailed = await waitForLine(alice, 'alice', 'token-refresh-failed', { timeout: Math.max(WAIT_MS, (aliceExp + 5) * 1000 - Date.now()) });
  ok(`alice's refresh failed before exp: ${JSON.stringify(refreshFailed.text)}`);
  const lost = await waitForLine(alice, 'alice', 'lost', { timeout: Math.max(WAIT_MS, (aliceExp + 5) * 1000 - Date.now()) });
  if (lost.code !== '4401') fail(`alice's "lost" line has close code ${lost.code}: ${JSON.stringify(lost)}`);
  const closedAt = Date.now() / 1000;
  if (closedAt < aliceExp - 0.5) fail(`alice was closed at ${closedAt}, before her token's exp ${aliceExp}`);
  const reason = await alice.evaluate(() => document.querySelector('[data-event="lost"]').getAttribute('data-close-reason'));
  if (reason !== 'token expired' || !/sign-in expired/.test(lost.text)) fail(`alice's close: reason ${JSON.stringify(reason)}, line ${JSON.stringify(lost.text)}`);
  ok(`the server closed alice at her token's exp (${(closedAt - aliceExp).toFixed(1)} s after it) with 4401 ${JSON.stringify(reason)}; her page says ${JSON.stringify(lost.text)}`);

  // bob talks while alice is signed out (her new token is held).
  const away = [1, 2, 3].map((n) => `while signed out ${n}`);
  try {
    await waitFor(
      'alice to ask the token endpoint for a new token',
      alice.waitForFunction(() => window.chatDebug.tokenFetches >= 2, null, { timeout: WAIT_MS, polling: 50 }),
    );
    for (const text of away) {
      await typeAndSend(bob, text);
      await waitForMessage(bob, 'bob', { text, from: 'bob' });
    }
    const meanwhile = await alice.evaluate(() => ({
      state: document.querySelector('[data-testid="status"]').getAttribute('data-state'),
      shown: [...document.querySelectorAll('[data-testid="message-text"]')].filter((el) => el.textContent.startsWith('while signed out')).length,
    }));
    if (meanwhile.state === 'connected' || meanwhile.shown !== 0) fail(`alice was not signed out while bob sent: ${JSON.stringify(meanwhile)}`);
    if (held < 1) fail('alice\'s request for a new token never reached the gate');
    ok(`bob sent ${away.length} messages while alice waited for her new token (alice: ${meanwhile.state})`);
    await alice.screenshot({ path: path.join(opts.out, 'token-alice-signed-out.png'), timeout: WAIT_MS });
  } finally {
    openGate();
  }

  // She is back at once, on A, as u-alice, with everything, each once.
  await waitFor(
    'alice to be welcomed again',
    alice.waitForFunction((c) => window.chatDebug.client && window.chatDebug.client !== c && window.chatDebug.state === 'connected', firstClient, {
      timeout: WAIT_MS,
      polling: 50,
    }),
  );
  await waitWelcomed(alice, 'alice (back)');
  await checkSignedIn(alice, 'alice (back)', { user: 'u-alice', name: 'alice' });
  for (const text of away) await waitForMessage(alice, 'alice', { text, from: 'bob' });
  await waitForLine(alice, 'alice', 'caught-up');
  await alice.waitForTimeout(SETTLE_MS);
  const lines = await connLines(alice);
  const events = lines.map((l) => l.event).join(',');
  if (events !== 'token-refresh-failed,lost,token-renewed,back,caught-up') {
    fail(`alice's connection lines are ${JSON.stringify(lines)}: want token-refresh-failed, lost, token-renewed, back, caught-up`);
  }
  if (lines[4].missed !== String(away.length)) fail(`alice's caught-up line says ${lines[4].missed} missed, expected ${away.length}`);
  const sinceAsked = new URL(alice.__wsUrls[alice.__wsUrls.length - 1]).searchParams.get('since');
  if (alice.__wsUrls.length !== 2 || sinceAsked !== first.id) {
    fail(`alice's sockets: ${JSON.stringify(alice.__wsUrls)}: want two, the second asking since=${first.id}`);
  }
  for (const text of [before, ...away]) await expectOnce(alice, 'alice', text);
  const order = await shownTexts(alice, '');
  const wanted = [before, ...away];
  if (JSON.stringify(order.filter((t) => wanted.includes(t))) !== JSON.stringify(wanted)) fail(`alice shows them out of order: ${JSON.stringify(order)}`);
  ok(`alice reconnected at once with since=${sinceAsked} and shows ${JSON.stringify(before)} and the ${away.length} missed messages exactly once, in order; her lines: ${lines.map((l) => JSON.stringify(l.text)).join(', ')}`);

  // twin refreshed in time: `authenticated` before her first exp, and her
  // one socket outlived it.
  await waitFor(
    `twin to outlive her first token (exp ${twinExp})`,
    twin.waitForFunction((exp) => Date.now() / 1000 > exp + 1.5, twinExp, { timeout: Math.max(WAIT_MS, (twinExp + 3) * 1000 - Date.now()), polling: 100 }),
  );
  const t = await twin.evaluate(() => ({
    authenticated: window.chatDebug.authenticated,
    authSent: window.chatDebug.authSent,
    expires: window.chatDebug.expires,
    client: window.chatDebug.client,
    state: window.chatDebug.state,
    lost: document.querySelectorAll('[data-testid="notice"][data-event="lost"]').length,
  }));
  if (t.authenticated < 1 || t.expires <= twinExp || t.client !== twinClient || t.state !== 'connected' || t.lost !== 0 || twin.__wsUrls.length !== 1) {
    fail(`twin did not keep her connection by refreshing: ${JSON.stringify(t)}, sockets ${JSON.stringify(twin.__wsUrls)}, first exp ${twinExp}`);
  }
  const twinSent = twin.__sockets[0].sent.filter((type) => type === 'auth').length;
  if (twinSent !== t.authSent || twinSent < 2) fail(`twin sent ${twinSent} auth frames (chatDebug says ${t.authSent}): want the first and at least one refresh`);
  ok(`twin refreshed in time: ${t.authenticated} authenticated answer(s), expiry now ${t.expires} (first token: ${twinExp}), one socket never closed`);

  // alice's new token is refreshed in time too.
  await waitFor(
    'alice to refresh her new token',
    alice.waitForFunction(() => window.chatDebug.authenticated >= 1, null, { timeout: WAIT_MS, polling: 100 }),
  );
  ok('alice\'s new token was refreshed before its exp (authenticated)');

  // Two members called "alice", told apart by user; only one is "you".
  const wantRows = [
    { name: 'alice', user: 'u-alice' },
    { name: 'alice', user: 'u-twin' },
    { name: 'bob', user: 'u-bob' },
  ];
  const rowsOf = (page) =>
    page.evaluate(() =>
      [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')].map((li) => ({
        name: li.querySelector('[data-testid="member-name"]').textContent,
        user: li.getAttribute('data-user'),
        tag: li.querySelector('[data-testid="user-tag"]') ? li.querySelector('[data-testid="user-tag"]').textContent : null,
        mine: li.classList.contains('mine'),
      })),
    );
  for (const [label, page, me] of [['alice', alice, 'u-alice'], ['bob', bob, 'u-bob'], ['twin', twin, 'u-twin']]) {
    await waitFor(
      `${label}'s member list to show both alices and bob`,
      page.waitForFunction(
        (w) => {
          const rows = [...document.querySelectorAll('[data-testid="member-list"] [data-testid="member"]')];
          return JSON.stringify(rows.map((li) => ({ name: li.getAttribute('data-name'), user: li.getAttribute('data-user') }))) === JSON.stringify(w);
        },
        wantRows,
        { timeout: WAIT_MS, polling: 100 },
      ),
    );
    const rows = await rowsOf(page);
    for (const row of rows) {
      if (row.tag !== `@${row.user}`) fail(`${label}: the row of ${row.name} (${row.user}) shows the tag ${JSON.stringify(row.tag)}`);
      if (row.mine !== (row.user === me)) fail(`${label}: the row of ${row.name} (${row.user}) is ${row.mine ? '' : 'not '}marked as "you"`);
    }
  }
  ok('every page lists the two "alice"s apart (@u-alice, @u-twin) and bob, and marks only its own row as "you"');

  // alice talks again; bob sees her message as u-alice's.
  const back = "alice's back";
  await typeAndSend(alice, back);
  const onBob = await waitForMessage(bob, 'bob', { text: back, from: 'alice' });
  const tag = await bob.evaluate((id) => {
    const li = document.querySelector(`[data-testid="message"][data-id="${id}"]`);
    return { user: li.getAttribute('data-user'), tag: li.querySelector('[data-testid="user-tag"]').textContent };
  }, onBob.id);
  if (tag.user !== 'u-alice' || tag.tag !== '@u-alice') fail(`bob shows alice's message as from ${JSON.stringify(tag)}`);
  await waitForMessage(alice, 'alice', { text: back, from: 'alice' });
  await expectOnce(alice, 'alice', back);
  ok(`alice's ${JSON.stringify(back)} reaches bob as from alice @u-alice`);
  for (const [label, page] of [['alice', alice], ['bob', bob], ['twin', twin]]) {
    if (page.__dialogs.length) fail(`${label} opened a dialog: ${JSON.stringify(page.__dialogs)}`);
  }
  await alice.screenshot({ path: path.join(opts.out, 'token-alice.png'), timeout: WAIT_MS });
  await bob.screenshot({ path: path.join(opts.out, 'token-bob.png'), timeout: WAIT_MS });
  ok(`screenshots saved: ${path.join(opts.out, 'token-alice.png')}, token-bob.png, token-alice-signed-out.png`);
}

const opts = parseCli();
const logs = [];
const state = { browser: null };
let exitCode = 0;
const watchdog = setTimeout(() => {
  console.error(`FAIL: the whole run took longer than ${OVERALL_MS / 1000} s`);
  if (logs.length) console.error(`---- page console logs ----\n${logs.join('\n')}`);
  process.exit(1);
}, OVERALL_MS);
watchdog.unref();

try {
  const scenarios = {
    basic: mainBasic,
    reconnect: mainReconnect,
    presence: mainPresence,
    lab: mainLab,
    'large-room': mainLargeRoom,
    'presence-off': mainPresenceOff,
    'older-history': mainOlderHistory,
    token: mainToken,
  };
  await scenarios[opts.scenario](opts, logs, state);
  console.log('all browser checks passed');
} catch (e) {
  exitCode = 1;
  const what = e instanceof CheckFailed ? e.message : `unexpected error: ${e.stack || e}`;
  console.error(`FAIL: ${what}`);
  console.error(`---- page console logs (${logs.length} lines) ----`);
  for (const line of logs) console.error(line);
} finally {
  if (state.browser) {
    await state.browser.close().catch((e) => console.error(`closing the browser failed: ${e.message}`));
  }
  clearTimeout(watchdog);
}
process.exit(exitCode);
