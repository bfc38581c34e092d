// What the browser tests run against: a real redis-server and real scalechat processes on free
// ports of 127.0.0.1, headless Debian Chromium driven by playwright-core, polling helpers that
// wait on what a page shows (never fixed sleeps), and readers of the page's DOM contract.
// Every child process is killed when the test file ends, passes or fails.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/** The repository root. */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

/** Where screenshots go (gitignored). */
export const ARTIFACTS = join(ROOT, 'tests/artifacts');

/** The scalechat binary under test: $SCALECHAT_BIN, else the debug build. */
export const SCALECHAT_BIN = resolve(ROOT, process.env.SCALECHAT_BIN ?? 'target/debug/scalechat');

/** How long a test waits for something a page or a process should show before failing. */
export const WAIT_MS = 10_000;

/** How long a process may take to become ready. */
const READY_MS = 15_000;

const children = new Set();

// A last resort if the file dies without running its `after` hooks: no orphaned servers.
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(130));
}

/**
 * Polls `probe` until it returns something other than `undefined`/`false` and returns that;
 * a probe that throws counts as not yet. Fails after `timeout` ms naming `what` and the last
 * value or error seen.
 */
export async function waitFor(what, probe, timeout = WAIT_MS) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
      last = value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const seen = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last seen: ${seen}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A TCP port that was free on 127.0.0.1 a moment ago. */
export async function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** A child process that keeps its stderr tail for error messages and dies with the tests. */
function launch(name, cmd, args, options) {
  const child = spawn(cmd, args, { ...options, stdio: ['ignore', 'ignore', 'pipe'] });
  child.label = name;
  child.stderrTail = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    child.stderrTail = (child.stderrTail + chunk).slice(-4000);
  });
  child.exited = new Promise((ok) =>
    child.on('exit', (code, signal) => {
      children.delete(child);
      ok({ code, signal });
    }),
  );
  child.on('error', (err) => {
    child.stderrTail += `\nspawn failed: ${err.message}`;
  });
  children.add(child);
  return child;
}

/** Throws if `child` has exited, with what it printed. */
function assertAlive(child) {
  if (child.exitCode !== null || child.signalCode !== null) {
    throw new Error(
      `${child.label} exited (${child.exitCode ?? child.signalCode}):\n${child.stderrTail}`,
    );
  }
}

/** Sends `signal` and waits for the exit, escalating to SIGKILL after `graceMs`. */
export async function stop(child, signal = 'SIGTERM', graceMs = 15_000) {
  if (child.exitCode !== null || child.signalCode !== null) return child.exited;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  const status = await child.exited;
  clearTimeout(timer);
  return status;
}

/** Kills every child still running and waits for them. */
export async function stopAll() {
  await Promise.all([...children].map((child) => stop(child, 'SIGKILL')));
}

/** A scratch directory, removed when the process exits. */
function scratch(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A redis-server of the tests' own on a free port, keeping nothing on disk. */
export async function startRedis() {
  const port = await freePort();
  const dir = scratch('scalechat-browser-redis-');
  const child = launch(
    'redis-server',
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
    { cwd: dir },
  );
  await waitFor(
    `redis-server on port ${port} to answer PING`,
    () => {
      assertAlive(child);
      return redisPing(port);
    },
    READY_MS,
  );
  return { port, child };
}

/** True when a Redis server on `port` answers PING with PONG. */
function redisPing(port) {
  return new Promise((ok) => {
    const sock = connect(port, '127.0.0.1');
    let reply = '';
    sock.setTimeout(1000, () => sock.destroy());
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      reply += d;
      if (reply.includes('\r\n')) sock.end();
    });
    sock.on('close', () => ok(reply.startsWith('+PONG')));
    sock.on('error', () => ok(false));
  });
}

/**
 * Starts the real scalechat binary as node `nodeId` on `port`, with the Redis transport, and
 * waits until `GET /readyz` answers 200. It runs in a scratch directory, so it never reads the
 * repository's config/scalechat.toml, and without the caller's scalechat/Redis variables.
 */
export async function startNode({ nodeId, port, redisPort, env: extra = {} }) {
  const env = Object.fromEntries(
    Object.entries(process.env).filter(
      ([k]) => !k.startsWith('SCALECHAT_') && k !== 'PORT' && !k.startsWith('REDIS_'),
    ),
  );
  Object.assign(env, {
    PORT: String(port),
    SCALECHAT_SERVER__HOST: '127.0.0.1',
    SCALECHAT_SERVER__NODE_ID: nodeId,
    SCALECHAT_TRANSPORT: 'redis',
    REDIS_HOST: '127.0.0.1',
    REDIS_PORT: String(redisPort),
    RUST_LOG: 'warn',
    ...extra,
  });
  const child = launch(nodeId, SCALECHAT_BIN, [], { cwd: scratch(`scalechat-${nodeId}-`), env });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(
    `${nodeId} to answer GET /readyz with 200`,
    async () => {
      assertAlive(child);
      const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      return res.status === 200;
    },
    READY_MS,
  );
  return { nodeId, port, url, child };
}

/**
 * Headless Debian Chromium. Playwright gives every launch a new, empty --user-data-dir of its
 * own (and removes it on close); the flags keep Chromium off the network this machine lacks.
 */
export function launchBrowser() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/**
 * Opens the chat page as `name` on `node` in a fresh browser context (its own storage), and
 * waits until it is connected. `track` gets the page as soon as it exists, so a caller can
 * screenshot it even if loading fails. On the page, `errors` collects uncaught errors,
 * `cspViolations` the console's Content-Security-Policy reports, and `dialogs` every dialog
 * that opened (each is dismissed).
 */
export async function openChat(browser, node, name, { viewport, track = () => {}, setup } = {}) {
  const context = await browser.newContext({ viewport: viewport ?? { width: 1280, height: 800 } });
  context.setDefaultTimeout(WAIT_MS);
  await setup?.(context);
  const page = await context.newPage();
  page.label = `${name}@${node.nodeId}`;
  page.errors = [];
  page.cspViolations = [];
  page.dialogs = [];
  track(page);
  page.on('pageerror', (err) => page.errors.push(err.message));
  page.on('console', (msg) => {
    if (/Content.Security.Policy/i.test(msg.text())) page.cspViolations.push(msg.text());
  });
  page.on('dialog', (dialog) => {
    page.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  const res = await page.goto(`${node.url}/?name=${encodeURIComponent(name)}`);
  if (!res?.ok()) throw new Error(`${page.label}: GET / answered ${res?.status()}`);
  await page.locator('#chat').waitFor({ state: 'visible' });
  await waitForStatus(page, 'connected');
  return page;
}

/** `#status`'s data-state. */
export function status(page) {
  return page.locator('#status').getAttribute('data-state');
}

/** Waits until `#status[data-state]` is `state`. */
export async function waitForStatus(page, state, timeout = WAIT_MS) {
  await waitFor(
    `${page.label}: #status[data-state="${state}"]`,
    async () => {
      const now = await status(page);
      if (now !== state) throw new Error(`data-state is ${JSON.stringify(now)}`);
      return true;
    },
    timeout,
  );
}

/** The `.msg` elements of `#messages`, as data. */
export function messages(page) {
  return page.$$eval('#messages .msg', (els) =>
    els.map((el) => ({
      id: el.dataset.id ?? null,
      user: el.querySelector('.user')?.textContent ?? null,
      time: el.querySelector('.time')?.textContent ?? null,
      text: el.querySelector('.text')?.textContent ?? null,
      own: el.classList.contains('own'),
      pending: el.classList.contains('pending'),
      earlier: el.classList.contains('earlier'),
    })),
  );
}

/** Waits until `#messages` shows a message with exactly `text` that `accept` takes; returns all
 * messages with that text. */
export async function waitForMessage(page, text, accept = (m) => !m.pending) {
  return waitFor(`${page.label}: a message ${JSON.stringify(text)} in #messages`, async () => {
    const all = await messages(page);
    const found = all.filter((m) => m.text === text);
    if (!found.some(accept)) throw new Error(`#messages: ${JSON.stringify(all)}`);
    return found;
  });
}

/** The marker lines of `#messages` (history divider, missing-messages notice) as data. */
export function markers(page) {
  return page.$$eval('#messages .marker', (els) =>
    els.map((el) => ({ kind: el.classList.contains('gap') ? 'gap' : 'divider', text: el.textContent })),
  );
}

/**
 * Puts the test between a context's pages and the server: every WebSocket of the context goes
 * through a relay that records the URLs it was opened with and the frames the page sent, can
 * hold back server frames (`drop(text)` returning true), can `cut()` every open socket as a
 * network failure would, and while `blocked` refuses new ones. Install with `openChat`'s `setup`.
 */
export function relay() {
  const r = { urls: [], sent: [], open: new Set(), blocked: false, drop: () => false };
  r.install = (context) =>
    context.routeWebSocket(/\/ws(\?|$)/, (ws) => {
      r.urls.push(new URL(ws.url()));
      if (r.blocked) return ws.close({ code: 4000, reason: 'blocked by the test' });
      const server = ws.connectToServer();
      const pair = { ws, server };
      r.open.add(pair);
      ws.onMessage((text) => {
        r.sent.push(text);
        server.send(text);
      });
      server.onMessage((text) => {
        if (!r.drop(text)) ws.send(text);
      });
      // Only codes a WebSocket's close() accepts are passed on; the page ignores the code.
      const code = (c) => (c === 1000 || (c >= 3000 && c <= 4999) ? c : 1000);
      ws.onClose((c, reason) => {
        r.open.delete(pair);
        server.close({ code: code(c), reason }).catch(() => {});
      });
      server.onClose((c, reason) => {
        r.open.delete(pair);
        ws.close({ code: code(c), reason }).catch(() => {});
      });
    });
  r.cut = async () => {
    const pairs = [...r.open];
    r.open.clear();
    for (const { ws, server } of pairs) {
      await server.close({ code: 1000, reason: 'cut by the test' }).catch(() => {});
      await ws.close({ code: 4000, reason: 'cut by the test' }).catch(() => {});
    }
  };
  return r;
}

/** Types `text` into `#message-input` and presses Enter. */
export async function send(page, text) {
  const input = page.locator('#message-input');
  await input.fill(text);
  await input.press('Enter');
}

/** The room list entry of `room`. */
export function roomItem(page, room) {
  return page.locator(`#rooms li[data-room="${room}"]`);
}

/** Joins `room` with the join form and waits until it is the current room. */
export async function joinRoom(page, room) {
  const input = page.locator('#join-input');
  await input.fill(room);
  await input.press('Enter');
  await waitForCurrentRoom(page, room);
}

/** Clicks `room` in the room list and waits until it is the current room. */
export async function switchRoom(page, room) {
  await roomItem(page, room).locator('.room-name').click();
  await waitForCurrentRoom(page, room);
}

/** The current room: the one `li` with aria-current="true". */
export async function currentRooms(page) {
  return page.$$eval('#rooms li[aria-current="true"]', (els) => els.map((el) => el.dataset.room));
}

/** Waits until `room`, and only it, is marked current. */
export async function waitForCurrentRoom(page, room) {
  await waitFor(`${page.label}: ${room} as the only aria-current room`, async () => {
    const current = await currentRooms(page);
    if (current.length !== 1 || current[0] !== room) {
      throw new Error(`aria-current rooms: ${JSON.stringify(current)}`);
    }
    return true;
  });
}

/** A room's unread badge: `{ hidden, text }`. */
export function unread(page, room) {
  return roomItem(page, room)
    .locator('.unread')
    .evaluate((el) => ({ hidden: el.hidden, text: el.textContent.trim() }));
}

/** Waits until `room`'s unread badge shows `count` (0: hidden). */
export async function waitForUnread(page, room, count) {
  await waitFor(`${page.label}: ${room}'s .unread to be ${count || 'hidden'}`, async () => {
    const badge = await unread(page, room);
    const ok = count === 0 ? badge.hidden : !badge.hidden && badge.text === String(count);
    if (!ok) throw new Error(`.unread is ${JSON.stringify(badge)}`);
    return true;
  });
}
