// Real-browser end-to-end check of the chat page across two instances.
//
//   node tests/browser/chat.mjs --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B \
//        --room ROOM --out DIR
//
// Opens one headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core: nothing downloads a browser) with two pages: alice on
// instance A and bob on instance B, in the same room. Checks that a message
// typed on one instance shows up on the other, that message text is never
// interpreted as HTML, and saves screenshots to DIR. Every wait has an
// explicit timeout; prints one "ok" line per check and exits 0, or prints
// what failed plus both pages' console logs and exits 1.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const WAIT_MS = 15_000; // any single wait
const SETTLE_MS = 750; // time given to a duplicate or an injected handler to show up
const OVERALL_MS = 80_000; // the whole run; the Rust side kills us at 90 s
const DESKTOP = { width: 1000, height: 700 };
const PHONE = { width: 390, height: 800 };
const XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>';

class CheckFailed extends Error {}

function fail(message) {
  throw new CheckFailed(message);
}

function ok(message) {
  console.log(`ok - ${message}`);
}

function usage(problem) {
  console.error(`chat.mjs: ${problem}`);
  console.error('usage: node chat.mjs --a <http url of instance A> --b <http url of instance B> --room <room> --out <dir>');
  process.exit(2);
}

function parseCli() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
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
  for (const key of ['a', 'b', 'room', 'out']) {
    if (!values[key]) usage(`missing --${key}`);
  }
  return {
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

async function main(opts, logs, state) {
  const [idA, idB] = await Promise.all([instanceId(opts.a), instanceId(opts.b)]);
  if (idA === idB) fail(`both instances report the same id ${JSON.stringify(idA)}: need two different instances`);
  await mkdir(opts.out, { recursive: true });

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
  await main(opts, logs, state);
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
