// socket.io-client behind a round-robin balancer (no sticky sessions) over three scalechat
// nodes and a real redis-server: a thousand clients with the default transports (polling, then
// the upgrade) connect and chat, each request going to any node and relayed to the session's
// owner; a client whose node is killed gets its session recovered on another node with every
// message it missed; and a rolling restart of every node under steady traffic loses and
// repeats nothing.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { io } from 'socket.io-client';
import {
  freePort,
  ownerOf,
  record,
  roundRobin,
  startNode,
  startRedis,
  stop,
  stopAll,
  waitFor,
} from './harness.mjs';

/** Generous waits: three debug-built nodes and a thousand clients share two busy cores. */
const SLOW_MS = 60_000;

const sockets = [];
const balancers = [];

/** A socket.io-client socket through `balancer`, closed when the tests end. */
function connectVia(balancer, options) {
  const socket = io(balancer.url, options);
  sockets.push(socket);
  return socket;
}

after(async () => {
  for (const socket of sockets) socket.close();
  for (const balancer of balancers) balancer.close();
  await stopAll();
});

/**
 * A redis-server, three nodes on it and a round-robin balancer in front. The nodes' defaults
 * put no limit on connections or handshakes per client address (every request here comes from
 * 127.0.0.1), so none is raised.
 */
async function cluster(prefix) {
  const redis = await startRedis();
  const nodes = [];
  for (const name of ['a', 'b', 'c']) {
    const port = await freePort();
    nodes.push(await startNode({ nodeId: `${prefix}-${name}`, port, redisPort: redis.port }));
  }
  const balancer = await roundRobin(nodes.map((n) => n.port));
  balancers.push(balancer);
  return { redis, nodes, balancer };
}

/** `scalechat_socketio_relayed_total` of `node`. */
async function relayedTotal(node) {
  const text = await (await fetch(`${node.url}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
  return Number(/^scalechat_socketio_relayed_total (\d+)/m.exec(text)?.[1] ?? 0);
}

/** Texts of the `message` events `seen` got in `room`, in the order they came. */
const textsIn = (seen, room) => seen.messages.filter((m) => m.room === room).map((m) => m.message);

/**
 * Emits `event:message` until it is acked, resending with the same `ref` after a timeout, a
 * disconnect or a refusal that may pass (the server delivers a repeated `ref` once and acks it
 * again with the first id). The ack.
 */
async function sendUntilAcked(socket, message, ref) {
  let last;
  for (let attempt = 0; attempt < 30; attempt++) {
    let ack;
    try {
      ack = await socket.timeout(5_000).emitWithAck('event:message', { message, ref });
    } catch (err) {
      // No ack within the timeout, or the connection dropped before it came.
      last = err.message;
      continue;
    }
    if (!ack.error) return ack;
    if (!['rate_limited', 'unavailable'].includes(ack.error.code)) {
      throw new Error(`${message} refused: ${JSON.stringify(ack.error)}`);
    }
    last = ack.error.code;
    await new Promise((r) => setTimeout(r, 500)); // paces the resend, synchronises nothing
  }
  throw new Error(`${message} was never acked; last: ${last}`);
}

describe('a thousand clients through a round-robin balancer', () => {
  let nodes;
  let balancer;
  before(async () => {
    ({ nodes, balancer } = await cluster('rr'));
  });

  test('connect with the default transports, never "Session ID unknown", and chat across nodes', async () => {
    const total = 1000;
    const wave = 100;
    const clients = [];
    const errors = [];
    // In waves, so that a thousand handshakes do not all time out on a loaded machine; each
    // client's requests and upgrade go to whichever node is next.
    for (let start = 0; start < total; start += wave) {
      const batch = [];
      for (let i = start; i < start + wave; i++) {
        const socket = connectVia(balancer, { reconnection: false, query: { name: `rr-${i}` } });
        socket.on('connect_error', (e) => errors.push(`client ${i}: ${e.message}`));
        batch.push({ socket, seen: record(socket) });
      }
      clients.push(...batch);
      await waitFor(
        `clients ${start} to ${start + wave - 1} to connect`,
        () => errors.length > 0 || batch.every((c) => c.socket.connected && c.seen.joined.length === 1),
        SLOW_MS,
      );
      assert.deepEqual(errors, [], 'no connect error (no "Session ID unknown")');
    }
    const upgraded = () => clients.filter((c) => c.socket.io.engine.transport.name === 'websocket').length;
    // Upgrades go through the balancer too (to any node, relayed to the owner). A client
    // whose probe is slow keeps polling, which is correct; nearly all must have upgraded.
    await waitFor('the clients to upgrade', () => upgraded() >= total * 0.95, SLOW_MS).catch((e) => {
      throw new Error(`${e.message} (${upgraded()} of ${total} upgraded)`);
    });

    // One sender on each node; every client, wherever its session lives, gets all three.
    const byOwner = new Map();
    for (const c of clients) {
      const owner = ownerOf(c.socket.io.engine.id);
      byOwner.set(owner, [...(byOwner.get(owner) ?? []), c]);
    }
    assert.deepEqual(
      [...byOwner.keys()].sort(),
      nodes.map((n) => n.nodeId).sort(),
      'sessions live on every node',
    );
    const texts = [];
    for (const [owner, [sender]] of byOwner) {
      const text = `from a session on ${owner}`;
      texts.push(text);
      const ack = await sender.socket.timeout(SLOW_MS).emitWithAck('event:message', { message: text });
      assert.equal(typeof ack.id, 'number', JSON.stringify(ack));
    }
    await waitFor(
      'every client to get the three messages',
      () => clients.every((c) => texts.every((t) => c.seen.messages.some((m) => m.message === t))),
      SLOW_MS,
    ).catch((e) => {
      const short = clients
        .filter((c) => !texts.every((t) => c.seen.messages.some((m) => m.message === t)))
        .map((c) => ({
          sid: c.socket.io.engine.id,
          transport: c.socket.io.engine.transport?.name,
          connected: c.socket.connected,
          disconnects: c.seen.reasons,
          got: textsIn(c.seen, 'general'),
        }));
      throw new Error(`${e.message}: ${short.length} clients short: ${JSON.stringify(short.slice(0, 5))}`);
    });
    for (const [i, c] of clients.entries()) {
      assert.deepEqual(
        textsIn(c.seen, 'general').filter((t) => texts.includes(t)),
        texts,
        `client ${i}: each once, in the order sent`,
      );
      assert.equal(c.seen.disconnects, 0, `client ${i} was never disconnected`);
    }
    assert.deepEqual(errors, []);
    const relayed = await Promise.all(nodes.map(relayedTotal));
    assert.ok(relayed.every((n) => n > 0), `every node relayed requests: ${relayed}`);
    for (const c of clients) c.socket.close();
  });
});

describe('a killed node', () => {
  let nodes;
  let balancer;
  before(async () => {
    ({ nodes, balancer } = await cluster('kill'));
  });

  test('its client reconnects through the balancer and recovers what it missed, once, in order', async () => {
    const room = 'recover';
    const victim = connectVia(balancer, { query: { name: 'victim', room } });
    const seen = record(victim);
    await waitFor(
      'the victim to connect and upgrade',
      () => victim.connected && victim.io.engine.transport.name === 'websocket',
      SLOW_MS,
    );
    const owner = nodes.find((n) => n.nodeId === ownerOf(victim.io.engine.id));
    const others = nodes.filter((n) => n !== owner);
    // Two talkers straight on the other nodes, so their sessions outlive the kill.
    const talkers = others.map((node, i) => {
      const socket = io(node.url, { query: { name: `talker-${i}`, room } });
      sockets.push(socket);
      return { socket, seen: record(socket) };
    });
    await waitFor('the talkers to connect', () => talkers.every((t) => t.socket.connected), SLOW_MS);
    await sendUntilAcked(talkers[0].socket, 'before the kill', 'before');
    const got = (text) => () => textsIn(seen, room).includes(text);
    await waitFor('the victim to get the first message', got('before the kill'), SLOW_MS);
    assert.equal(seen.recovered[0], false, 'a first connect recovers nothing');

    // The client's network is cut while its node dies, so that it cannot reconnect before the
    // others have spoken; it keeps retrying (default reconnection) meanwhile.
    balancer.down();
    await stop(owner.child, 'SIGKILL');
    await waitFor('the victim to notice', () => seen.disconnects === 1, SLOW_MS);
    const missed = [];
    for (let i = 0; i < 10; i++) {
      const text = `missed ${i}`;
      await sendUntilAcked(talkers[i % 2].socket, text, `missed-${i}`);
      missed.push(text);
    }
    assert.equal(victim.connected, false, 'still disconnected while the others spoke');
    balancer.up();

    await waitFor('the victim to reconnect', () => seen.connects === 2, SLOW_MS);
    assert.equal(victim.recovered, true, 'socket.recovered');
    assert.notEqual(ownerOf(victim.io.engine.id), owner.nodeId, 'now on another node');
    await sendUntilAcked(talkers[1].socket, 'after the reconnect', 'after');
    await waitFor('the victim to get live messages again', got('after the reconnect'), SLOW_MS);
    assert.deepEqual(
      textsIn(seen, room),
      ['before the kill', ...missed, 'after the reconnect'],
      'every missed message once, in order, then live ones',
    );
    const ids = seen.messages.filter((m) => m.room === room).map((m) => m.id);
    assert.deepEqual(ids, [...ids].sort((a, b) => a - b), 'ids in order');
    assert.deepEqual(seen.errors, []);
  });
});

describe('a rolling restart', () => {
  let nodes;
  let balancer;
  let redis;
  before(async () => {
    ({ nodes, balancer, redis } = await cluster('roll'));
  });

  test('under steady traffic, every client gets every acked message once, in order', async () => {
    // What the history covers: a recovering client's missed messages come from the room's
    // history, its newest rooms.history_size messages (200 by default; each kept
    // rooms.history_ttl_secs, a day). Fewer messages than that in the whole run means every
    // one is still there for any client at any moment, so all of them must arrive. (A resent
    // `ref` is recognised for rooms.dedupe_window_secs, far longer than a resend takes.)
    const historySize = 200;
    const cap = historySize - 20;
    const room = 'deploy';
    const clients = [];
    for (let i = 0; i < 30; i++) {
      const socket = connectVia(balancer, { query: { name: `member-${i}`, room } });
      clients.push({ socket, seen: record(socket) });
    }
    const publisher = connectVia(balancer, { query: { name: 'publisher', room } });
    const all = [...clients, { socket: publisher, seen: record(publisher) }];
    await waitFor('every client to connect', () => all.every((c) => c.socket.connected), SLOW_MS);

    // Numbered messages, one every 150 ms (the default limit is 10 a second), each resent
    // with its ref until acked.
    const acked = [];
    let publishing = true;
    const published = (async () => {
      for (let n = 1; n <= cap && publishing; n++) {
        const ack = await sendUntilAcked(publisher, String(n), `deploy-${n}`);
        acked.push({ n, id: ack.id });
        await new Promise((r) => setTimeout(r, 150)); // the traffic's pace
      }
    })();
    published.catch(() => {}); // awaited below; a failure must not surface as unhandled first
    // A client recovers from the offset of the last message it got: each must have one
    // before its first reconnect.
    const everyClient = (has) => () => all.every((c) => has(c));
    const hasOne = everyClient((c) => textsIn(c.seen, room).length > 0);
    await waitFor('every client to get a message', hasOne, SLOW_MS);

    for (const [i, node] of nodes.entries()) {
      const before = acked.length;
      const status = await stop(node.child, 'SIGTERM');
      assert.equal(status.code, 0, `${node.nodeId} shut down cleanly`);
      nodes[i] = await startNode({ nodeId: node.nodeId, port: node.port, redisPort: redis.port });
      const back = everyClient((c) => c.socket.connected);
      await waitFor(`every client back after restarting ${node.nodeId}`, back, SLOW_MS);
      const more = () => acked.length >= Math.min(before + 10, cap);
      await waitFor(`traffic after restarting ${node.nodeId}`, more, SLOW_MS);
    }
    publishing = false;
    await published;
    assert.ok(acked.length < historySize, `${acked.length} messages stay within the history`);
    const expected = acked.map((a) => String(a.n));
    await waitFor(
      'every client to get the last acked message',
      () => all.every((c) => textsIn(c.seen, room).includes(expected.at(-1))),
      SLOW_MS,
    );
    // Every client lost its connection at least once: its session's node, or the node that
    // relayed its WebSocket, restarted.
    const reconnects = all.reduce((sum, c) => sum + c.seen.connects - 1, 0);
    assert.ok(reconnects >= all.length, `clients reconnected during the restarts (${reconnects})`);
    for (const [i, c] of all.entries()) {
      const who = i < clients.length ? `member-${i}` : 'publisher';
      assert.deepEqual(textsIn(c.seen, room), expected, `${who}: every acked message once, in order`);
      assert.deepEqual(
        c.seen.messages.filter((m) => m.room === room).map((m) => m.id),
        acked.map((a) => a.id),
        `${who}: the acked ids`,
      );
      assert.ok(
        c.seen.recovered.slice(1).every((r) => r === true),
        `${who}: every reconnect recovered (${c.seen.recovered})`,
      );
    }
  });
});
