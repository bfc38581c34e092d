// socket.io-client 4.x against real scalechat processes: the original app's client code
// unchanged, each transport, acks, a Socket.IO client and a native client on two nodes sharing
// rooms through a real redis-server, and reconnection after a server restart.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { io } from 'socket.io-client';
import {
  WAIT_MS,
  freePort,
  nativeClient,
  nextEvent,
  record,
  startNode,
  startRedis,
  stop,
  stopAll,
  waitFor,
} from './harness.mjs';

const sockets = [];

/** A socket.io-client socket that is closed when the tests end. */
function connectTo(node, options) {
  const socket = io(node.url, options);
  sockets.push(socket);
  return socket;
}

after(async () => {
  for (const socket of sockets) socket.close();
  await stopAll();
});

/** Waits until `seen` (from `record`) has a `message` whose parsed `message` is `text`. */
function waitForText(label, seen, text, timeout = WAIT_MS) {
  return waitFor(
    `${label} to receive ${JSON.stringify(text)}`,
    () => seen.messages.find((m) => m.message === text),
    timeout,
  );
}

describe('one node', () => {
  let node;
  before(async () => {
    node = await startNode({ nodeId: 'sio-one', port: await freePort() });
  });

  test("the original app's client code works unchanged, polling then upgrading", async () => {
    // The original client, verbatim: io(url), emit('event:message', {message}),
    // on('message', s => JSON.parse(s).message).
    const received = { alice: [], bob: [] };
    const alice = connectTo(node);
    const bob = connectTo(node);
    alice.on('message', (s) => received.alice.push(JSON.parse(s).message));
    bob.on('message', (s) => received.bob.push(JSON.parse(s).message));
    const aliceSeen = record(alice);
    const bobSeen = record(bob);
    await waitFor('both in general', () => aliceSeen.joined.length > 0 && bobSeen.joined.length > 0);
    assert.equal(aliceSeen.joined[0].room, 'general');

    alice.emit('event:message', { message: 'hello from alice' });
    await waitFor('bob to see alice', () => received.bob.includes('hello from alice'));
    await waitFor('alice to see her own', () => received.alice.includes('hello from alice'));
    bob.emit('event:message', { message: 'hi alice' });
    await waitFor('alice to see bob', () => received.alice.includes('hi alice'));

    // The default transports: the session started on polling and upgraded to WebSocket.
    await waitFor('alice upgraded to websocket', () => alice.io.engine.transport.name === 'websocket');
    const envelope = aliceSeen.messages.find((m) => m.message === 'hi alice');
    assert.equal(envelope.type, 'message');
    assert.equal(envelope.room, 'general');
    assert.equal(typeof envelope.id, 'number');
    assert.equal(typeof aliceSeen.raw[0], 'string', 'the argument is the JSON string');
    assert.deepEqual(aliceSeen.errors, []);
  });

  test('websocket only, with emitWithAck getting the ack', async () => {
    const socket = connectTo(node, { transports: ['websocket'], auth: { name: 'carol' } });
    const seen = record(socket);
    await waitFor('carol in general', () => seen.joined.length > 0);
    assert.equal(socket.io.engine.transport.name, 'websocket');
    const ack = await socket.timeout(WAIT_MS).emitWithAck('event:message', { message: 'acked' });
    assert.equal(ack.room, 'general');
    assert.equal(typeof ack.id, 'number');
    const message = await waitForText('carol', seen, 'acked');
    assert.equal(message.id, ack.id);
    assert.equal(message.user, 'carol');

    const refused = await socket.timeout(WAIT_MS).emitWithAck('event:message', { message: '   ' });
    assert.equal(refused.error.code, 'empty_message');
    const unknown = await socket.timeout(WAIT_MS).emitWithAck('nope', {});
    assert.equal(unknown.error.code, 'unknown_type');
  });

  test('polling only, and rooms shared with native clients through join', async () => {
    const socket = connectTo(node, {
      transports: ['polling'],
      query: { name: 'dave' },
    });
    const seen = record(socket);
    await waitFor('dave in general', () => seen.joined.length > 0);
    const joined = await socket.timeout(WAIT_MS).emitWithAck('join', { room: 'dev' });
    assert.deepEqual(joined.room, 'dev');
    const native = await nativeClient(node, 'room=dev&name=erin');
    native.send({ type: 'send', room: 'dev', message: 'from native', ref: 'n1' });
    const got = await waitForText('dave', seen, 'from native');
    assert.equal(got.room, 'dev');
    assert.equal(got.user, 'erin');
    socket.emit('event:message', { message: 'from polling', room: 'dev' });
    const back = await waitFor('the native client to get the polling message', () =>
      native.messages().find((m) => m.message === 'from polling'),
    );
    assert.equal(back.user, 'dave');
    assert.equal(socket.io.engine.transport.name, 'polling');
    native.close();
  });

  test('a refused connect and an unknown namespace get CONNECT ERROR', async () => {
    const bad = connectTo(node, { transports: ['websocket'], auth: { name: ' ' } });
    const err = await nextEvent(bad, 'connect_error', 'CONNECT ERROR for a blank name');
    assert.match(err.message, /display names/);
    bad.close();
    const admin = io(`${node.url}/admin`, { transports: ['websocket'] });
    sockets.push(admin);
    const nsErr = await nextEvent(admin, 'connect_error', 'CONNECT ERROR for /admin');
    assert.equal(nsErr.message, 'Invalid namespace');
    admin.close();
  });
});

describe('two nodes and redis', () => {
  let redis;
  let nodeA;
  let nodeB;
  before(async () => {
    redis = await startRedis();
    nodeA = await startNode({ nodeId: 'sio-a', port: await freePort(), redisPort: redis.port });
    nodeB = await startNode({ nodeId: 'sio-b', port: await freePort(), redisPort: redis.port });
  });

  test('a Socket.IO client on node A and a native client on node B talk both ways', async () => {
    const socket = connectTo(nodeA, { query: { name: 'sio-user' } });
    const seen = record(socket);
    await waitFor('the Socket.IO client in general', () => seen.joined.length > 0);
    const native = await nativeClient(nodeB, 'name=native-user');

    socket.emit('event:message', { message: 'A to B' });
    const atB = await waitFor('node B to deliver A to B', () =>
      native.messages().find((m) => m.message === 'A to B'),
    );
    assert.equal(atB.user, 'sio-user');

    native.send({ type: 'send', message: 'B to A', ref: 'b1' });
    const atA = await waitForText('the Socket.IO client', seen, 'B to A');
    assert.equal(atA.user, 'native-user');
    assert.equal(atA.id, atB.id + 1, 'one id sequence for the room, whichever node sent');
    native.close();
  });

  test("a polling session's id on the other node is relayed to the node that owns it", async () => {
    const signal = AbortSignal.timeout(WAIT_MS);
    const open = await fetch(`${nodeA.url}/socket.io/?EIO=4&transport=polling`, { signal });
    const { sid } = JSON.parse((await open.text()).slice(1));
    const wrong = await fetch(`${nodeB.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, {
      signal,
    });
    // Relayed to node A, which owns the session: its first poll gets the open packet's
    // successor (nothing yet: a noop or a ping comes when due), not an error.
    assert.equal(wrong.status, 200);
    await wrong.arrayBuffer();
  });
});

describe('server restart', () => {
  test('a client whose server restarts reconnects by itself', async () => {
    const port = await freePort();
    let node = await startNode({ nodeId: 'sio-restart', port });
    const socket = connectTo(node);
    const seen = record(socket);
    await waitFor('connected once', () => seen.connects === 1 && seen.joined.length === 1);
    await stop(node.child, 'SIGTERM');
    await waitFor('the client to notice', () => seen.disconnects === 1);
    node = await startNode({ nodeId: 'sio-restart', port });
    await waitFor('the client to reconnect', () => seen.connects === 2 && seen.joined.length === 2, 30_000);
    socket.emit('event:message', { message: 'after restart' });
    await waitForText('the reconnected client', seen, 'after restart');
  });
});
