// The built-in chat page in headless Chromium, against two real scalechat nodes that share
// rooms through a real redis-server: messages across nodes and rooms, escaping of what users
// type, reconnecting through a node restart, room history on join, resuming after a dropped
// connection, resending unacknowledged messages, loading older messages, who is in a room (the
// member panel, live over every node, paged, on a phone), direct messages opened from it,
// refused and read-only rooms, and screenshots.
// Run by tests/browser/run.sh.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import {
  ARTIFACTS,
  WAIT_MS,
  evalAll,
  freePort,
  joinRoom,
  launchBrowser,
  markers,
  memberNames,
  messages,
  openChat,
  relay,
  roomItem,
  send,
  startNode,
  startRedis,
  status,
  stop,
  stopAll,
  switchRoom,
  waitFor,
  waitForCurrentRoom,
  waitForMembers,
  waitForMessage,
  waitForOnline,
  waitForStatus,
  waitForUnread,
  within,
} from './harness.mjs';

let redis;
let browser;
const nodes = {};

before(async () => {
  // Failure screenshots of an earlier run would only mislead.
  const old = await readdir(ARTIFACTS).catch(() => []);
  await Promise.all(
    old.filter((f) => /^failed-.*\.png$/.test(f)).map((f) => rm(join(ARTIFACTS, f))),
  );
  redis = await startRedis();
  const portA = await freePort();
  let portB = await freePort();
  while (portB === portA) portB = await freePort();
  let portC = await freePort();
  while (portC === portA || portC === portB) portC = await freePort();
  [nodes.a, nodes.b, nodes.c, browser] = await Promise.all([
    startNode({ nodeId: 'node-a', port: portA, redisPort: redis.port }),
    startNode({ nodeId: 'node-b', port: portB, redisPort: redis.port }),
    // Small rooms: a join gets the newest 3 messages, and messages published through node-c
    // keep only the newest 5, so older ones must be paged in or are gone.
    startNode({
      nodeId: 'node-c',
      port: portC,
      redisPort: redis.port,
      env: { SCALECHAT_ROOMS__HISTORY_SIZE: '5', SCALECHAT_ROOMS__HISTORY_ON_JOIN: '3' },
    }),
    launchBrowser(),
  ]);
});

after(async () => {
  await within('the browser to close', browser?.close()).catch(() => {});
  await stopAll();
});

/**
 * A test body that gets `open(node, name, options)` to open chat pages. Whatever happens, the
 * pages are closed; on failure each is screenshotted to tests/artifacts/failed-<test>-<page>.png.
 * A page that threw an uncaught error, broke its own CSP or opened a dialog fails the test.
 */
function scenario(slug, body) {
  return async () => {
    const pages = [];
    const open = (node, name, options = {}) =>
      openChat(browser, node, name, { ...options, track: (page) => pages.push(page) });
    try {
      await body(open);
      for (const page of pages) {
        assert.deepEqual(page.errors, [], `${page.label}: uncaught errors`);
        assert.deepEqual(page.cspViolations, [], `${page.label}: CSP violations`);
        assert.deepEqual(page.dialogs, [], `${page.label}: dialogs opened`);
      }
    } catch (err) {
      await mkdir(ARTIFACTS, { recursive: true });
      for (const [i, page] of pages.entries()) {
        const file = `failed-${slug}-${i}-${page.label.replace(/[^\w@.-]/g, '_')}.png`;
        await page.screenshot({ path: join(ARTIFACTS, file) }).catch(() => {});
      }
      throw err;
    } finally {
      for (const page of pages) {
        await within(`${page.label} to close`, page.context().close()).catch(() => {});
      }
    }
  };
}

/**
 * Asserts the current room shows exactly `expected` ({user, text, own}) in order, none pending,
 * each with a data-id and a time. Messages from before the page joined (history, marked
 * `.earlier`) are left out unless `earlier` is true.
 */
async function assertShown(page, expected, { earlier = false } = {}) {
  const shown = (await messages(page)).filter((m) => earlier || !m.earlier);
  assert.deepEqual(
    shown.map(({ user, text, own, pending }) => ({ user, text, own, pending })),
    expected.map((m) => ({ ...m, pending: false })),
    `${page.label}: #messages`,
  );
  for (const m of shown) {
    assert.ok(m.id, `${page.label}: ${JSON.stringify(m)} has a data-id`);
    assert.ok(m.time?.trim(), `${page.label}: ${JSON.stringify(m)} has a .time`);
  }
  return shown;
}

/** Asserts both pages show the same messages with the same data-ids. */
function assertSameIds(a, b) {
  assert.deepEqual(
    a.map((m) => m.id),
    b.map((m) => m.id),
    'both nodes number the room the same',
  );
}

test('two pages on two nodes exchange messages both ways in two rooms', { timeout: 40_000 }, scenario('two-nodes', async (open) => {
  const alice = await open(nodes.a, 'alice');
  const bob = await open(nodes.b, 'bob');
  for (const page of [alice, bob]) await waitForCurrentRoom(page, 'general');

  await joinRoom(alice, 'dev');
  await joinRoom(bob, 'dev');
  for (const page of [alice, bob]) {
    const rooms = await evalAll(page, '#rooms li', (els) => els.map((el) => el.dataset.room));
    assert.deepEqual(rooms.toSorted(), ['dev', 'general'], `${page.label}: #rooms`);
    for (const room of rooms) {
      const li = roomItem(page, room);
      assert.equal(await li.locator('.room-name').textContent(), room);
      assert.equal(await li.locator('.online').count(), 1, `${room} has .online`);
      assert.equal(await li.locator('button.leave').count(), 1, `${room} has button.leave`);
      await waitForUnread(page, room, 0);
    }
  }

  // general, alice -> bob. Bob is looking at dev, so general counts it as unread.
  await switchRoom(alice, 'general');
  const hello = 'hi bob, alice here';
  await send(alice, hello);
  await waitForMessage(alice, hello);
  await waitForUnread(bob, 'general', 1);
  assert.deepEqual(await messages(bob), [], 'bob: dev shows nothing from general');
  await switchRoom(bob, 'general');
  await waitForMessage(bob, hello);
  await waitForUnread(bob, 'general', 0);

  // general, bob -> alice.
  const reply = 'hi alice, bob on the other node';
  await send(bob, reply);
  await waitForMessage(alice, reply);
  await waitForMessage(bob, reply);

  // dev, bob -> alice while alice looks at general.
  await switchRoom(bob, 'dev');
  const news = 'the dev build is green';
  await send(bob, news);
  await waitForMessage(bob, news);
  await waitForUnread(alice, 'dev', 1);
  assert.ok(
    !(await messages(alice)).some((m) => m.text === news),
    'alice: general does not show a dev message',
  );
  await switchRoom(alice, 'dev');
  await waitForMessage(alice, news);
  await waitForUnread(alice, 'dev', 0);

  // Alice's last message comes after everything either page sent, so once both show it, any
  // duplicate of an earlier message would already be on screen.
  const thanks = 'thanks bob';
  await send(alice, thanks);
  await waitForMessage(alice, thanks);
  await waitForMessage(bob, thanks);

  const devA = await assertShown(alice, [
    { user: 'bob', text: news, own: false },
    { user: 'alice', text: thanks, own: true },
  ]);
  const devB = await assertShown(bob, [
    { user: 'bob', text: news, own: true },
    { user: 'alice', text: thanks, own: false },
  ]);
  assertSameIds(devA, devB);

  await switchRoom(alice, 'general');
  await switchRoom(bob, 'general');
  const generalA = await assertShown(alice, [
    { user: 'alice', text: hello, own: true },
    { user: 'bob', text: reply, own: false },
  ]);
  const generalB = await assertShown(bob, [
    { user: 'alice', text: hello, own: false },
    { user: 'bob', text: reply, own: true },
  ]);
  assertSameIds(generalA, generalB);
}));

test('what users type is shown as text, never run as markup', { timeout: 30_000 }, scenario('xss', async (open) => {
  const evil = '<img src=x onerror=alert(1)>';
  const evilName = '<img src=y onerror=alert(2)>';
  const alice = await open(nodes.a, 'alice');
  const mallory = await open(nodes.b, evilName);

  await send(alice, evil);
  await waitForMessage(alice, evil);
  await waitForMessage(mallory, evil);
  const note = 'that was <b>not</b> an image';
  await send(mallory, note);
  await waitForMessage(alice, note);
  await waitForMessage(mallory, note);

  for (const page of [alice, mallory]) {
    await assertShown(page, [
      { user: 'alice', text: evil, own: page === alice },
      { user: evilName, text: note, own: page === mallory },
    ]);
    assert.equal(await page.locator('#messages img, #messages b').count(), 0, `${page.label}: no markup`);
    assert.deepEqual(page.dialogs, [], `${page.label}: no dialog`);
  }

  const page = await fetch(`${nodes.a.url}/`, { signal: AbortSignal.timeout(WAIT_MS) });
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type') ?? '', /^text\/html\b/, 'content-type of /');
  assert.match(await page.text(), /app\.js/);
  const csp = page.headers.get('content-security-policy');
  assert.ok(csp, '/ has a content-security-policy header');
  const scriptSrc = csp
    .split(';')
    .map((d) => d.trim().split(/\s+/))
    .find(([name]) => name === 'script-src');
  assert.ok(scriptSrc, `CSP has script-src: ${csp}`);
  assert.ok(scriptSrc.includes("'self'"), `script-src allows 'self': ${csp}`);
  assert.ok(!scriptSrc.includes("'unsafe-inline'"), `script-src forbids inline scripts: ${csp}`);
  for (const [path, type] of [
    ['/app.js', /^(text|application)\/javascript\b/],
    ['/style.css', /^text\/css\b/],
  ]) {
    const res = await fetch(`${nodes.a.url}${path}`, { signal: AbortSignal.timeout(WAIT_MS) });
    await res.arrayBuffer();
    assert.equal(res.status, 200, `GET ${path}`);
    assert.match(res.headers.get('content-type') ?? '', type, `content-type of ${path}`);
  }
}));

test('a message sent while the node is down is delivered once when it is back', { timeout: 45_000 }, scenario('reconnect', async (open) => {
  const alice = await open(nodes.a, 'alice');
  const bob = await open(nodes.b, 'bob');
  try {
    const exit = await stop(nodes.a.child, 'SIGTERM');
    assert.notEqual(exit.signal, 'SIGKILL', 'node-a shuts down by itself on SIGTERM');
    await waitForStatus(alice, 'reconnecting');

    const offline = 'typed while node-a was down';
    await send(alice, offline);
    const pending = await waitForMessage(alice, offline, (m) => m.pending);
    assert.deepEqual(
      pending.map(({ user, own, pending }) => ({ user, own, pending })),
      [{ user: 'alice', own: true, pending: true }],
      'alice: one pending own message',
    );

    nodes.a = await startNode({ nodeId: 'node-a', port: nodes.a.port, redisPort: redis.port });
    await waitForStatus(alice, 'connected', 20_000);
    await waitForMessage(bob, offline);
    await waitForMessage(alice, offline);

    // Sent after the resend, so once both show it any duplicate would be on screen too.
    const back = 'back online';
    await send(alice, back);
    await waitForMessage(alice, back);
    await waitForMessage(bob, back);
    const shownA = await assertShown(alice, [
      { user: 'alice', text: offline, own: true },
      { user: 'alice', text: back, own: true },
    ]);
    const shownB = await assertShown(bob, [
      { user: 'alice', text: offline, own: false },
      { user: 'alice', text: back, own: false },
    ]);
    assertSameIds(shownA, shownB);
    assert.equal(await status(bob), 'connected', 'bob, on node-b, never lost his connection');
  } finally {
    // The next test needs node-a whatever happened here.
    const { child } = nodes.a;
    if (child.exitCode !== null || child.signalCode !== null) {
      nodes.a = await startNode({ nodeId: 'node-a', port: nodes.a.port, redisPort: redis.port });
    }
  }
}));

/** The lines of `#messages` in order: a message's text, or `|` and a marker's kind. */
function lines(page) {
  return evalAll(page, '#messages > li', (els) =>
    els.map((el) =>
      el.classList.contains('marker')
        ? `|${el.classList.contains('gap') ? 'gap' : 'divider'}`
        : el.querySelector('.text').textContent,
    ),
  );
}

/** Sends each of `texts` from `page` and waits until it shows each as sent. */
async function sendAll(page, texts) {
  for (const text of texts) {
    await send(page, text);
    await waitForMessage(page, text);
  }
}

/** Parsed frames the page sent through relay `net` that are `send`s of `text`. */
function sendsOf(net, text) {
  return net.sent.map((t) => JSON.parse(t)).filter((f) => f.type === 'send' && f.message === text);
}

test('a page that joins a room later sees its earlier messages once, then live ones', { timeout: 30_000 }, scenario('history', async (open) => {
  const alice = await open(nodes.a, 'alice');
  await joinRoom(alice, 'history');
  const earlier = ['first of the day', 'second', 'third'];
  await sendAll(alice, earlier);

  const bob = await open(nodes.b, 'bob');
  await joinRoom(bob, 'history');
  for (const text of earlier) await waitForMessage(bob, text, (m) => !m.pending && m.earlier);
  const live = 'and a live one';
  await send(alice, live);
  await waitForMessage(alice, live);
  await waitForMessage(bob, live);

  const fromAlice = (own) => (text) => ({ user: 'alice', text, own });
  const shownB = await assertShown(bob, [...earlier, live].map(fromAlice(false)), { earlier: true });
  assert.deepEqual(shownB.map((m) => m.earlier), [true, true, true, false], 'bob: history is marked');
  assert.deepEqual(await lines(bob), [...earlier, '|divider', live], 'bob: a divider after the history');
  assert.deepEqual(await markers(bob), [{ kind: 'divider', text: 'New messages' }]);
  const shownA = await assertShown(alice, [...earlier, live].map(fromAlice(true)));
  assertSameIds(shownA, shownB);
  await waitForUnread(bob, 'general', 0); // history of a room joined is not unread
}));

test('a page whose connection drops gets exactly what it missed, and what it typed meanwhile goes out once', { timeout: 45_000 }, scenario('resume', async (open) => {
  const net = relay();
  const alice = await open(nodes.a, 'alice', { setup: net.install });
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'resume');
  await joinRoom(bob, 'resume');
  const seen = 'seen before the drop';
  await sendAll(bob, [seen]);
  await waitForMessage(alice, seen);

  net.blocked = true;
  await net.cut();
  await waitForStatus(alice, 'reconnecting');
  const missed = ['missed one', 'missed two'];
  await sendAll(bob, missed);
  const typed = 'typed while cut off';
  await send(alice, typed);
  await waitForMessage(alice, typed, (m) => m.pending);

  const attempts = net.urls.length;
  net.blocked = false;
  await waitForStatus(alice, 'connected', 20_000);
  for (const text of [...missed, typed]) await waitForMessage(alice, text);
  await waitForMessage(bob, typed);
  const last = 'after the drop';
  await sendAll(bob, [last]);
  await waitForMessage(alice, last);

  const expected = [seen, ...missed, typed, last].map((text) => ({
    user: text === typed ? 'alice' : 'bob',
    text,
    own: text === typed,
  }));
  const shownA = await assertShown(alice, expected);
  const shownB = await assertShown(bob, expected.map((m) => ({ ...m, own: !m.own })));
  assertSameIds(shownA, shownB);
  assert.deepEqual(await lines(alice), expected.map((m) => m.text), 'alice: no marker, no duplicate');

  // The reconnect asked for what came after the last message alice had.
  const url = net.urls.at(-1);
  assert.ok(net.urls.length > attempts, 'alice reconnected');
  assert.equal(url.searchParams.get('room'), 'resume');
  assert.equal(url.searchParams.get('since'), shownA[0].id, 'since: the last id alice saw');
  assert.match(url.searchParams.get('epoch') ?? '', /^[A-Za-z0-9]+$/, 'with the room epoch');
  const sends = sendsOf(net, typed);
  assert.ok(sends.length >= 1 && sends.every((f) => f.ref === sends[0].ref), 'one ref per message');
}));

test('messages whose echo and ack were lost are resent with the same ref and shown once', { timeout: 40_000 }, scenario('resend', async (open) => {
  const net = relay();
  const alice = await open(nodes.a, 'alice', { setup: net.install });
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'resend');
  await joinRoom(bob, 'resend');
  const first = 'the first one';
  await sendAll(alice, [first]);
  await waitForMessage(bob, first);

  // The server takes the message but alice never hears back: she cannot tell if it got through.
  const text = 'did this get through?';
  let held = 0;
  net.drop = (frame) => {
    const f = JSON.parse(frame);
    const hold = f.room === 'resend' && (f.type === 'ack' || (f.type === 'message' && f.message === text));
    if (hold) held += 1;
    return hold;
  };
  await send(alice, text);
  await waitForMessage(bob, text);
  await waitFor('the echo and the ack to be held back', () => held >= 2);
  await waitForMessage(alice, text, (m) => m.pending);
  net.drop = () => false;
  await net.cut();

  await waitForMessage(alice, text);

  // Again, but the echo does not come back with the missed messages either (as when they could
  // not all be recovered): the resend's duplicate ack alone tells alice it was delivered.
  const lost = 'its echo never comes';
  held = 0;
  const echoOf = (frame, t) => {
    const f = JSON.parse(frame);
    return f.type === 'message' && f.message === t;
  };
  net.drop = (frame) => {
    const hold = echoOf(frame, lost) || JSON.parse(frame).type === 'ack';
    if (hold) held += 1;
    return hold;
  };
  await send(alice, lost);
  await waitForMessage(bob, lost);
  await waitFor('the echo and the ack to be held back', () => held >= 2);
  net.drop = (frame) => echoOf(frame, lost);
  await net.cut();
  await waitForMessage(alice, lost);
  net.drop = () => false;

  const after = 'and one more';
  await send(alice, after);
  await waitForMessage(alice, after);
  await waitForMessage(bob, after);

  const expected = [first, text, lost, after].map((t) => ({ user: 'alice', text: t, own: true }));
  const shownA = await assertShown(alice, expected);
  const shownB = await assertShown(bob, expected.map((m) => ({ ...m, own: false })));
  assertSameIds(shownA, shownB);
  for (const t of [text, lost]) {
    const sends = sendsOf(net, t);
    assert.equal(sends.length, 2, `alice sent ${JSON.stringify(t)} again after reconnecting`);
    assert.equal(sends[1].ref, sends[0].ref, 'with the same ref');
  }
}));

test('older messages are loaded on demand until there are no more', { timeout: 40_000 }, scenario('older', async (open) => {
  const alice = await open(nodes.a, 'alice');
  await joinRoom(alice, 'older');
  const texts = Array.from({ length: 8 }, (_, i) => `older ${i + 1}`);
  await sendAll(alice, texts);

  // node-c sends only the newest 3 on join.
  const bob = await open(nodes.c, 'bob');
  await joinRoom(bob, 'older');
  await waitForMessage(bob, texts[7], (m) => !m.pending && m.earlier);
  assert.deepEqual((await messages(bob)).map((m) => m.text), texts.slice(5));
  const button = bob.locator('#load-older');
  await button.waitFor({ state: 'visible' });
  assert.equal((await button.textContent()).trim(), 'Load older messages');
  await mkdir(ARTIFACTS, { recursive: true });
  await bob.screenshot({ path: join(ARTIFACTS, 'chat-history.png') });

  // By keyboard: once everything is loaded the button goes, and focus stays in the list.
  await button.focus();
  await bob.keyboard.press('Enter');
  await waitForMessage(bob, texts[0]);
  await button.waitFor({ state: 'hidden' });
  const focused = await within('bob: the focused element', bob.evaluate(() => document.activeElement?.id));
  assert.equal(focused, 'messages', 'bob: focus');
  const shownB = await assertShown(bob, texts.map((text) => ({ user: 'alice', text, own: false })), { earlier: true });
  const shownA = await assertShown(alice, texts.map((text) => ({ user: 'alice', text, own: true })));
  assertSameIds(shownA, shownB);
  assert.deepEqual(await lines(bob), [...texts, '|divider'], 'bob: older ones above, once each');
  // Rooms whose whole history is on screen offer nothing to load.
  await switchRoom(alice, 'older');
  assert.ok(await alice.locator('#load-older').isHidden(), 'alice: nothing older than message 1');
}));

test('scrolling to the top of the list loads older messages, keeping the view in place', { timeout: 40_000 }, scenario('scroll-back', async (open) => {
  const alice = await open(nodes.a, 'alice');
  await joinRoom(alice, 'scroll');
  const texts = Array.from({ length: 8 }, (_, i) => `scroll ${i + 1}\nsecond line\nthird line`);
  await sendAll(alice, texts);

  // A short window, so the 3 messages node-c sends on join already overflow the list.
  const bob = await open(nodes.c, 'bob', { viewport: { width: 800, height: 420 } });
  await joinRoom(bob, 'scroll');
  await waitForMessage(bob, texts[7], (m) => !m.pending && m.earlier);
  const list = bob.locator('#messages');
  const overflows = await list.evaluate((m) => m.scrollHeight > m.clientHeight);
  assert.ok(overflows, 'bob: the list scrolls');
  const top = bob.locator('#messages .msg').first();
  assert.equal(await top.locator('.text').textContent(), texts[5]);

  await list.evaluate((m) => { m.scrollTop = 0; });
  await waitForMessage(bob, texts[0]);
  await bob.locator('#load-older').waitFor({ state: 'hidden' });
  assert.deepEqual((await messages(bob)).map((m) => m.text), texts, 'bob: all, in order, once');
  // What was at the top before stays where it was on screen instead of jumping away.
  const previousTop = bob.locator('#messages .msg').nth(5);
  const [listBox, msgBox] = [await list.boundingBox(), await previousTop.boundingBox()];
  assert.ok(msgBox.y + msgBox.height > listBox.y && msgBox.y < listBox.y + listBox.height,
    `bob: ${JSON.stringify(texts[5])} is still in view: ${JSON.stringify({ listBox, msgBox })}`);
}));

test('a page that could not get everything it missed says that messages may be missing', { timeout: 45_000 }, scenario('gap', async (open) => {
  const net = relay();
  // On node-c a room keeps only its newest 5 messages.
  const alice = await open(nodes.c, 'alice', { setup: net.install });
  const bob = await open(nodes.c, 'bob');
  await joinRoom(alice, 'gap');
  await joinRoom(bob, 'gap');
  const seen = 'seen by alice';
  await sendAll(bob, [seen]);
  await waitForMessage(alice, seen);

  net.blocked = true;
  await net.cut();
  await waitForStatus(alice, 'reconnecting');
  const missed = Array.from({ length: 8 }, (_, i) => `gap ${i + 1}`);
  await sendAll(bob, missed);
  net.blocked = false;
  await waitForStatus(alice, 'connected', 20_000);

  // Too many to recover: alice gets the 5 the room still keeps, and a notice where the
  // others would be.
  for (const text of missed.slice(3)) await waitForMessage(alice, text);
  const notice = alice.locator('#messages .marker.gap');
  await notice.waitFor({ state: 'visible' });
  assert.match(await notice.textContent(), /may be missing/);
  assert.deepEqual(await lines(alice), [seen, '|gap', ...missed.slice(3)]);
  await mkdir(ARTIFACTS, { recursive: true });
  await alice.screenshot({ path: join(ARTIFACTS, 'chat-gap.png') });
}));

/** Width and height from a PNG's IHDR, after checking its signature. */
function pngSize(bytes) {
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  assert.ok(bytes.subarray(0, 8).equals(signature), 'a PNG signature');
  assert.equal(bytes.toString('latin1', 12, 16), 'IHDR');
  return { width: bytes.readUInt32BE(16), height: bytes.readUInt32BE(20) };
}

test('screenshots of a conversation, on a desktop and a phone', { timeout: 30_000 }, scenario('screenshots', async (open) => {
  const alice = await open(nodes.a, 'alice');
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'dev');
  await switchRoom(alice, 'general');
  const lines = [
    [alice, 'Morning! Is the deploy still on for today?'],
    [bob, 'Yes, after lunch. Redis is upgraded already.'],
    [alice, 'Great, I will watch #dev for the build.'],
  ];
  for (const [page, text] of lines) {
    await send(page, text);
    await waitForMessage(alice, text);
    await waitForMessage(bob, text);
  }

  const desktop = join(ARTIFACTS, 'chat.png');
  const phone = join(ARTIFACTS, 'chat-phone.png');
  await mkdir(ARTIFACTS, { recursive: true });
  await Promise.all([rm(desktop, { force: true }), rm(phone, { force: true })]);

  await alice.screenshot({ path: desktop });
  await alice.setViewportSize({ width: 390, height: 844 });
  // What a phone user needs: no sideways scrolling, and the message box on screen.
  const overflow = await within(
    'alice: the page width',
    alice.evaluate(() => document.documentElement.scrollWidth),
  );
  assert.ok(overflow <= 390, `no horizontal scrolling at 390 px (scrollWidth ${overflow})`);
  const box = await alice.locator('#message-input').boundingBox();
  assert.ok(
    box && box.x >= 0 && box.y >= 0 && box.x + box.width <= 390 && box.y + box.height <= 844,
    `#message-input is on screen at 390x844: ${JSON.stringify(box)}`,
  );
  await alice.screenshot({ path: phone });

  assert.deepEqual(pngSize(await readFile(desktop)), { width: 1280, height: 800 });
  assert.deepEqual(pngSize(await readFile(phone)), { width: 390, height: 844 });
}));

/** Clicks the leave button of `room` in the room list and waits until it is gone. */
async function leave(page, room) {
  await roomItem(page, room).locator('button.leave').click();
  await roomItem(page, room).waitFor({ state: 'detached' });
}

test('the member panel shows who is in the room and how many, live over every node', { timeout: 45_000 }, scenario('members', async (open) => {
  const alice = await open(nodes.a, 'alice');
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'crew');
  await joinRoom(bob, 'crew');

  // On a desktop the panel is beside the messages, open, its button saying so.
  const toggle = alice.locator('#members-toggle');
  assert.equal(await toggle.getAttribute('aria-expanded'), 'true');
  assert.equal(await toggle.getAttribute('aria-controls'), 'members-panel');
  assert.ok(await alice.locator('#members-panel').isVisible(), 'alice: the member panel is shown');
  assert.equal(await alice.locator('#members').evaluate((el) => el.tagName), 'UL', 'the members are a list');

  // Each sees both, their own user first and marked.
  await waitForMembers(alice, ['alice', 'bob']);
  await waitForMembers(bob, ['bob', 'alice']);
  assert.equal(await alice.locator('#members li.own .member-you').textContent(), '(you)');
  assert.equal(await alice.locator('#members li.own .member-name').textContent(), 'alice');
  assert.equal((await toggle.textContent()).replace(/\s+/g, ' ').trim(), 'Members 2');
  for (const page of [alice, bob]) await waitForOnline(page, 'crew', 2);

  // A third, on a third node, with a name that is markup: shown as text to both.
  const carolName = 'carol <i>x</i>';
  const carol = await open(nodes.c, carolName);
  await joinRoom(carol, 'crew');
  await waitForMembers(alice, ['alice', 'bob', carolName]);
  await waitForMembers(bob, ['bob', 'alice', carolName]);
  await waitForMembers(carol, [carolName, 'alice', 'bob']);
  for (const page of [alice, bob, carol]) await waitForOnline(page, 'crew', 3);
  for (const page of [alice, bob]) {
    assert.equal(await page.locator('#members i').count(), 0, `${page.label}: no markup in #members`);
  }
  await mkdir(ARTIFACTS, { recursive: true });
  await alice.screenshot({ path: join(ARTIFACTS, 'chat-members.png') });

  // Leaving the room takes her off the list, while she stays in general with the others.
  await leave(carol, 'crew');
  await waitForMembers(alice, ['alice', 'bob']);
  await waitForMembers(bob, ['bob', 'alice']);
  for (const page of [alice, bob]) await waitForOnline(page, 'crew', 2);

  // Closing the page is leaving too. A room being looked at away from keeps its count live.
  await switchRoom(alice, 'general');
  await within('bob to close', bob.context().close());
  await waitForOnline(alice, 'crew', 1);
  await switchRoom(alice, 'crew');
  await waitForMembers(alice, ['alice']);

  // The panel closes and opens again with its button.
  await toggle.click();
  assert.equal(await toggle.getAttribute('aria-expanded'), 'false');
  await alice.locator('#members-panel').waitFor({ state: 'hidden' });
  await toggle.click();
  assert.equal(await toggle.getAttribute('aria-expanded'), 'true');
  await waitForMembers(alice, ['alice']);
}));

test('after a dropped connection the page asks for presence again and lists who is there now', { timeout: 45_000 }, scenario('members-reconnect', async (open) => {
  const net = relay();
  const alice = await open(nodes.a, 'alice', { setup: net.install });
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'again');
  await joinRoom(bob, 'again');
  await waitForMembers(alice, ['alice', 'bob']);

  net.blocked = true;
  await net.cut();
  await waitForStatus(alice, 'reconnecting');
  await leave(bob, 'again');
  const dave = await open(nodes.c, 'dave');
  await joinRoom(dave, 'again');
  await waitForMembers(dave, ['dave']); // alice's connection closed with the cut
  const note = alice.locator('#members-note');
  await note.waitFor({ state: 'visible' });
  assert.match(await note.textContent(), /out of date/);

  const sentBefore = net.sent.length;
  net.blocked = false;
  await waitForStatus(alice, 'connected', 20_000);
  await waitForMembers(alice, ['alice', 'dave']);
  await waitForMembers(dave, ['dave', 'alice']);
  await waitForOnline(alice, 'again', 2);
  await note.waitFor({ state: 'hidden' });

  // The first room came back with presence in the query, the other in its `join`, and the
  // list was asked for again.
  const url = net.urls.at(-1);
  assert.equal(url.searchParams.get('room'), 'again');
  assert.equal(url.searchParams.get('presence'), '1');
  const frames = net.sent.slice(sentBefore).map((t) => JSON.parse(t));
  const joins = frames.filter((f) => f.type === 'join');
  assert.deepEqual(joins.map((f) => [f.room, f.presence]), [['general', true]], 'rejoins');
  assert.ok(
    frames.some((f) => f.type === 'presence' && f.room === 'again' && f.cursor === undefined),
    `a presence request for "again" after reconnecting: ${JSON.stringify(frames)}`,
  );
}));

test('a member list longer than one page is paged in whole', { timeout: 60_000 }, scenario('members-paged', async (open) => {
  // 540 other users on node-b and node-c, from three browser contexts (a browser holds about
  // 255 WebSockets per context): more than one page, and more than Redis lists in one HSCAN.
  const crowd = Array.from({ length: 540 }, (_, i) => `crowd-${String(i).padStart(3, '0')}`);
  const contexts = [];
  try {
    const groups = [[nodes.b, crowd.slice(0, 180)], [nodes.c, crowd.slice(180, 360)], [nodes.b, crowd.slice(360)]];
    for (const [node, names] of groups) {
      const context = await within('a browser context', browser.newContext());
      contexts.push(context);
      const page = await within('a blank page', context.newPage());
      const ws = node.url.replace(/^http/, 'ws');
      await within(`${names.length} sockets on ${node.nodeId}`, page.evaluate(
        ({ ws, names }) => Promise.all(names.map((name) => new Promise((resolve, reject) => {
          const socket = new WebSocket(`${ws}/ws?room=crowd&name=${name}`);
          socket.onmessage = (e) => { if (JSON.parse(e.data).type === 'joined') resolve(); };
          socket.onerror = () => reject(new Error(`${name}: WebSocket error`));
          (window.sockets ??= []).push(socket);
        }))),
        { ws, names },
      ), 30_000);
    }

    const net = relay();
    const alice = await open(nodes.a, 'alice', { setup: net.install });
    await joinRoom(alice, 'crowd');
    await waitForMembers(alice, ['alice', ...crowd]);
    assert.ok(await alice.locator('#members-more').isHidden(), 'alice: nobody left unlisted');
    await waitForOnline(alice, 'crowd', 541);
    const requests = net.sent.map((t) => JSON.parse(t)).filter((f) => f.type === 'presence' && f.room === 'crowd');
    assert.ok(requests.length >= 2, `more than one page asked for: ${JSON.stringify(requests)}`);
    assert.equal(requests[0].cursor, undefined, `the first page: ${JSON.stringify(requests)}`);
    assert.equal(typeof requests[1].cursor, 'string', `the next with the cursor given: ${JSON.stringify(requests)}`);

    // The crowd leaves at once: the list follows.
    await within('the crowd to leave', Promise.all(contexts.map((c) => c.close())));
    await waitForMembers(alice, ['alice']);
    assert.equal((await memberNames(alice)).length, 1);
  } finally {
    for (const context of contexts) await within('a context to close', context.close()).catch(() => {});
  }
}));

test('on a phone the member list opens as a drawer from its button', { timeout: 40_000 }, scenario('members-phone', async (open) => {
  const viewport = { width: 390, height: 844 };
  const alice = await open(nodes.a, 'alice', { viewport });
  const bob = await open(nodes.b, 'bob');
  await joinRoom(alice, 'pocket');
  await joinRoom(bob, 'pocket');

  const toggle = alice.locator('#members-toggle');
  const panel = alice.locator('#members-panel');
  await toggle.waitFor({ state: 'visible' });
  assert.equal(await toggle.getAttribute('aria-expanded'), 'false', 'closed at first on a phone');
  assert.ok(await panel.isHidden(), 'alice: no member panel until asked for');
  await waitFor('alice: the count on the members button', async () => {
    const text = (await toggle.textContent()).replace(/\s+/g, ' ').trim();
    if (text !== 'Members 2') throw new Error(`#members-toggle: ${JSON.stringify(text)}`);
    return true;
  });

  await toggle.click();
  assert.equal(await toggle.getAttribute('aria-expanded'), 'true');
  await panel.waitFor({ state: 'visible' });
  await waitForMembers(alice, ['alice', 'bob']);
  const box = await panel.boundingBox();
  assert.ok(
    box && box.x >= 0 && box.y >= 0 && box.x + box.width <= viewport.width && box.y + box.height <= viewport.height,
    `#members-panel is on screen at 390x844: ${JSON.stringify(box)}`,
  );
  const overflow = await within('alice: the page width', alice.evaluate(() => document.documentElement.scrollWidth));
  assert.ok(overflow <= viewport.width, `no horizontal scrolling (scrollWidth ${overflow})`);
  const focused = await within('alice: the focused element', alice.evaluate(() => document.activeElement?.id));
  assert.equal(focused, 'members-close', 'focus moves into the drawer');
  await mkdir(ARTIFACTS, { recursive: true });
  await alice.screenshot({ path: join(ARTIFACTS, 'chat-members-phone.png') });

  // Escape closes it and gives focus back to its button; the close button does too.
  await alice.keyboard.press('Escape');
  await panel.waitFor({ state: 'hidden' });
  assert.equal(await toggle.getAttribute('aria-expanded'), 'false');
  const back = await within('alice: the focused element', alice.evaluate(() => document.activeElement?.id));
  assert.equal(back, 'members-toggle', 'focus back on the button');
  await toggle.click();
  await panel.waitFor({ state: 'visible' });
  await alice.locator('#members-close').click();
  await panel.waitFor({ state: 'hidden' });
  assert.equal(await toggle.getAttribute('aria-expanded'), 'false');
}));

/** The direct-message room with `peer` in the page's "Direct messages" list. */
function directItem(page, peer) {
  return page.locator(`#directs li[data-dm="${peer}"]`);
}

/** Waits until the direct-message room with `peer` is the current room; returns its name. */
async function waitForDirect(page, peer) {
  const item = directItem(page, peer);
  await waitFor(`${page.label}: the conversation with ${peer} as the current room`, async () =>
    (await item.getAttribute('aria-current')) === 'true');
  return item.getAttribute('data-room');
}

/** Clicks `peer` in the member list and waits until their direct-message room is current. */
async function openDirect(page, peer) {
  await page.getByRole('button', { name: `Message ${peer}`, exact: true }).click();
  return waitForDirect(page, peer);
}

test('a name in the member list opens a direct conversation that both see and that survives a reconnect', { timeout: 60_000 }, scenario('direct', async (open) => {
  const net = relay();
  const alice = await open(nodes.a, 'alice', { setup: net.install });
  const bob = await open(nodes.b, 'bob');
  await waitForMembers(alice, ['alice', 'bob']);
  await waitForMembers(bob, ['bob', 'alice']);
  assert.equal(await alice.locator('#members li.own button').count(), 0, 'alice: her own name is no button');
  assert.equal(await alice.locator('#directs-title').isVisible(), false, 'no direct messages yet');

  // alice opens it from the member list and writes; the list and the title name bob.
  const room = await openDirect(alice, 'bob');
  assert.match(room, /^dm-[0-9a-f]{32}$/);
  assert.equal(await alice.locator('#room-title').textContent(), 'Direct messages with bob');
  assert.equal(await directItem(alice, 'bob').locator('.room-name').textContent(), 'bob');
  assert.equal(await alice.locator('#directs-title').textContent(), 'Direct messages');
  assert.equal(await alice.locator(`#rooms li[data-room="${room}"]`).count(), 0, 'not among the rooms');
  const hello = 'hello bob, just you and me';
  await sendAll(alice, [hello]);

  // bob sees nothing until he opens it from his member list too; then alice's message is there.
  assert.equal(await bob.locator('#directs li').count(), 0, 'bob: no direct messages before opening one');
  assert.equal(await openDirect(bob, 'alice'), room, 'the same room for both');
  assert.equal(await directItem(bob, 'alice').locator('.room-name').textContent(), 'alice');
  assert.equal(await bob.locator('#room-title').textContent(), 'Direct messages with alice');
  await waitForMessage(bob, hello);
  const reply = 'hi alice';
  await sendAll(bob, [reply]);
  await waitForMessage(alice, reply);
  await waitForMembers(alice, ['alice', 'bob']);
  await waitForOnline(alice, 'general', 2);

  // Cut off, alice misses a message; back, she gets it once, having rejoined with `dm`.
  const sentBefore = net.sent.length;
  net.blocked = true;
  await net.cut();
  await waitForStatus(alice, 'reconnecting');
  const missed = 'sent while alice was away';
  await sendAll(bob, [missed]);
  net.blocked = false;
  await waitForStatus(alice, 'connected', 20_000);
  await waitForMessage(alice, missed);
  const last = 'and one more';
  await sendAll(bob, [last]);
  await waitForMessage(alice, last);
  const expected = [hello, reply, missed, last];
  assert.deepEqual(await lines(alice), expected, 'alice: each message once, no marker');
  assert.deepEqual((await lines(bob)).filter((t) => !t.startsWith('|')), expected, 'bob');
  const url = net.urls.at(-1);
  assert.equal(url.searchParams.get('room'), 'general', 'the query names a room joined by name');
  const joins = net.sent.slice(sentBefore).map((t) => JSON.parse(t)).filter((f) => f.type === 'join');
  const rejoin = joins.find((f) => f.dm === 'bob');
  assert.ok(rejoin && rejoin.room === undefined, `rejoined with dm: ${JSON.stringify(joins)}`);
  assert.ok(Number.isInteger(rejoin.since) && /^[A-Za-z0-9]+$/.test(rejoin.epoch ?? ''), 'with since and epoch');

  // A reload keeps the conversation, still labelled by bob's name, and its messages.
  await alice.reload();
  await waitForStatus(alice, 'connected');
  await directItem(alice, 'bob').locator('.room-name').click();
  assert.equal(await waitForDirect(alice, 'bob'), room);
  assert.equal(await directItem(alice, 'bob').locator('.room-name').textContent(), 'bob');
  await waitForMessage(alice, last);
  assert.deepEqual((await lines(alice)).filter((t) => !t.startsWith('|')), expected, 'after the reload');
  await mkdir(ARTIFACTS, { recursive: true });
  await alice.screenshot({ path: join(ARTIFACTS, 'chat-direct.png') });

  // A direct-message room's name is not joinable with the join form: refused, said so.
  const carol = await open(nodes.c, 'carol');
  await joinRoomAs(carol, room);
  await waitFor('carol: the refusal shown', async () =>
    /^You may not join dm-/.test(await carol.locator('#error').textContent()));
  assert.equal(await carol.locator(`li[data-room="${room}"]`).count(), 0, 'carol: not in the room list');
}));

/** Types `room` into the join form and presses Enter, without waiting for the result. */
async function joinRoomAs(page, room) {
  const input = page.locator('#join-input');
  await input.fill(room);
  await input.press('Enter');
}

/** An HS256 JWT for `claims`, valid for an hour. */
function token(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ ...claims, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

test('a room the token does not list is refused, and one it may only read has no composer', { timeout: 40_000 }, scenario('access', async (open) => {
  const secret = 'a browser test secret of 32 bytes or more';
  const node = await startNode({ nodeId: 'node-auth', port: await freePort(), env: { SCALECHAT_AUTH__JWT_SECRET: secret } });
  try {
    const jwt = token(secret, { name: 'ann', rooms: ['general'], read_only_rooms: ['news'] });
    const ann = await open(node, 'ann', {
      setup: (context) => context.addCookies([{ name: 'scalechat_token', value: jwt, url: node.url }]),
    });

    await joinRoomAs(ann, 'secret');
    await waitFor('ann: the refusal shown', async () =>
      (await ann.locator('#error').textContent()) === 'You may not join #secret.');
    assert.equal(await roomItem(ann, 'secret').count(), 0, 'not in the room list');

    await joinRoom(ann, 'news');
    const note = ann.locator('#compose-note');
    await note.waitFor({ state: 'visible' });
    assert.equal(await note.textContent(), 'You may read #news but not write in it.');
    assert.ok(await ann.locator('#message-input').isDisabled(), 'the message box is disabled');
    assert.ok(await ann.locator('#send-button').isDisabled(), 'the send button is disabled');

    await switchRoom(ann, 'general');
    await note.waitFor({ state: 'hidden' });
    assert.ok(await ann.locator('#message-input').isEnabled(), 'general: the message box is enabled');
    await sendAll(ann, ['ann may write here']);
  } finally {
    await stop(node.child);
  }
}));
