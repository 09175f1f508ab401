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
// (scenario "presence") alice on instance A and bob on instance B: both
// member lists show alice and bob with their instances, and alice's page
// shows bob's join line; bob types without sending and alice's page shows
// "bob is typing…", gone a few seconds after he stops; a second tab of bob,
// on A, lists bob with both instances and 2 tabs; closing it leaves bob
// listed on alice's page, closing bob's first tab removes him and shows
// "bob left" once. A tab whose name is markup comes and goes: alice's page
// shows that name as text everywhere. Then carol opens on B, instance A (alice's) is SIGKILLed
// (its PID from --pids; run the instances with a short --presence-ttl-ms),
// and carol's page shows "alice left (instance A stopped answering)".
// Saves DIR/presence-*.png, one of them at 390x844.
//
// Every wait has an explicit timeout; prints one "ok" line per check and
// exits 0, or prints what failed plus both pages' console logs and exits 1.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const WAIT_MS = 15_000; // any single wait
const RECONNECT_MS = 20_000; // a tab's reconnection to a survivor, and what it missed
const MAX_PLACEMENT_TRIES = 6; // page loads through nginx to land bob on the other instance
const SETTLE_MS = 750; // time given to a duplicate or an injected handler to show up
const OVERALL_MS = 80_000; // the whole run; the Rust side kills us at 90 s
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
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!['basic', 'reconnect', 'presence'].includes(values.scenario)) usage(`unknown --scenario ${values.scenario}`);
  const required = ['a', 'b', 'room', 'out'];
  if (values.scenario === 'reconnect') required.push('proxy', 'pids');
  if (values.scenario === 'presence') required.push('pids');
  for (const key of required) {
    if (!values[key]) usage(`missing --${key}`);
  }
  return {
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

async function openAndJoin(browser, base, name, room, label, logs) {
  const context = await browser.newContext({ viewport: DESKTOP });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.setDefaultNavigationTimeout(WAIT_MS);
  recordLogs(page, label, logs);
  const url = `${base}/?name=${encodeURIComponent(name)}&room=${encodeURIComponent(room)}`;
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

  const pageA = await openAndJoin(state.browser, opts.a, 'alice', opts.room, 'page A', logs);
  const pageB = await openAndJoin(state.browser, opts.b, 'bob', opts.room, 'page B', logs);
  await waitConnected(pageA, 'page A', idA);
  await waitConnected(pageB, 'page B', idB);
  ok(`the two pages are on different instances (${idA}, ${idB})`);

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
  // say that sending is paused and disable it, instead of letting the user
  // type into the void.
  if (opts.redisPid) {
    await pageB.setViewportSize({ width: 1000, height: 700 });
    process.kill(opts.redisPid, 'SIGKILL');
    for (const [label, page] of [['page A', pageA], ['page B', pageB]]) {
      const banner = page.getByTestId('offline-banner');
      await waitFor(`${label} to show that sending is paused`, banner.waitFor({ state: 'visible', timeout: WAIT_MS }));
      const text = await banner.textContent();
      if (!/paused/.test(text) || !/Redis/.test(text)) fail(`${label}: banner says ${JSON.stringify(text)}`);
      if (!(await page.getByTestId('send-button').isDisabled())) fail(`${label}: the send button is still enabled`);
      const state = await page.getByTestId('status').getAttribute('data-state');
      if (state !== 'connected') fail(`${label}: the page lost its socket (data-state=${state}); only Redis went away`);
      ok(`${label}: Redis killed: banner ${JSON.stringify(text.trim())}, send disabled, still connected`);
      const stale = page.getByTestId('members-stale');
      await waitFor(`${label}'s member list to say it may be out of date`, stale.waitFor({ state: 'visible', timeout: WAIT_MS }));
      const staleText = await stale.textContent();
      if (!/out of date/.test(staleText)) fail(`${label}: the member list's note says ${JSON.stringify(staleText)}`);
      ok(`${label}: the member list says ${JSON.stringify(staleText.trim())}`);
    }
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
  await alice.waitForTimeout(SETTLE_MS);
  for (const text of [before, ...away]) await expectOnce(alice, 'alice', text);
  const order = await alice.evaluate((texts) => {
    const shown = [...document.querySelectorAll('[data-testid="messages"] [data-testid="message"] [data-testid="message-text"]')].map(
      (el) => el.textContent,
    );
    return shown.filter((t) => texts.includes(t));
  }, [before, ...away]);
  if (JSON.stringify(order) !== JSON.stringify([before, ...away])) fail(`alice shows them out of order: ${JSON.stringify(order)}`);
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

  // 4. bob closes his 2nd tab: still in the room through the first.
  await bob2.context().close();
  await alice.waitForTimeout(SETTLE_MS);
  await waitForMembers(alice, 'alice', both);
  const early = await presenceLines(alice, 'leave', 'bob');
  if (early.length !== 0) fail(`alice shows ${JSON.stringify(early)} after bob closed only one of his two tabs`);
  ok("bob closed his 2nd tab: alice still lists him, no leave line");

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
  ok(`screenshots saved: ${['typing', 'alice', 'phone', 'phone-open', 'left', 'expired'].map((n) => path.join(opts.out, `presence-${n}.png`)).join(', ')}`);
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
  const scenarios = { basic: mainBasic, reconnect: mainReconnect, presence: mainPresence };
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
