// What the browser tests run against: a real redis-server and real scalechat processes on free
// ports of 127.0.0.1, headless Debian Chromium driven by playwright-core, polling helpers that
// wait on what a page shows (never fixed sleeps), and readers of the page's DOM contract.
// Every child process is killed when the test file ends, passes or fails.

import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { WAIT_MS, waitFor, within } from '../common/processes.mjs';

export * from '../common/processes.mjs';

/**
 * Headless Debian Chromium. Playwright gives every launch a new, empty --user-data-dir of its
 * own (and removes it on close); the flags keep Chromium off the network this machine lacks.
 */
export function launchBrowser() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    timeout: 3 * WAIT_MS,
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
  const context = await within(
    'a browser context',
    browser.newContext({ viewport: viewport ?? { width: 1280, height: 800 } }),
  );
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

/**
 * `page.$$eval(selector, fn)` within WAIT_MS: evaluating in the page has no timeout of its own.
 */
export function evalAll(page, selector, fn) {
  return within(`${page.label}: ${selector}`, page.$$eval(selector, fn));
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
  return evalAll(page, '#messages .msg', (els) =>
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
  return evalAll(page, '#messages .marker', (els) =>
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
      await within('the relay to close', server.close({ code: 1000, reason: 'cut by the test' }))
        .catch(() => {});
      await within('the relay to close', ws.close({ code: 4000, reason: 'cut by the test' }))
        .catch(() => {});
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
  return evalAll(page, '#rooms li[aria-current="true"]', (els) => els.map((el) => el.dataset.room));
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

/** The names in `#members`, in the order shown. */
export function memberNames(page) {
  return evalAll(page, '#members li', (els) =>
    els.map((el) => el.querySelector('.member-name')?.textContent ?? null),
  );
}

/**
 * Waits until `#members` lists exactly `names` in that order (own user first, then by name) and
 * the panel's count says `names.length` online, or `count` when given.
 */
export async function waitForMembers(page, names, count = names.length) {
  await waitFor(`${page.label}: #members to be ${JSON.stringify(names)}, ${count} online`, async () => {
    const shown = await memberNames(page);
    const said = await page.locator('#member-count').textContent();
    if (JSON.stringify(shown) !== JSON.stringify(names) || said !== `${count} online`) {
      throw new Error(`#members: ${JSON.stringify(shown)}, #member-count: ${JSON.stringify(said)}`);
    }
    return true;
  });
}

/** Waits until `room`'s online count in the room list is `count`. */
export async function waitForOnline(page, room, count) {
  await waitFor(`${page.label}: ${room}'s .online to be ${count}`, async () => {
    const online = await roomItem(page, room)
      .locator('.online')
      .evaluate((el) => ({ hidden: el.hidden, text: el.textContent.trim() }));
    if (online.hidden || online.text !== String(count)) throw new Error(`.online is ${JSON.stringify(online)}`);
    return true;
  });
}
