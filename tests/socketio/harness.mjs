// What the Socket.IO tests run against: a real redis-server and real scalechat processes on
// free ports of 127.0.0.1, socket.io-client and native WebSocket clients, and polling helpers
// that wait on what a client receives (never fixed sleeps). Every child process is killed when
// the test file ends, passes or fails.

import WebSocket from 'ws';
import { waitFor, within } from '../common/processes.mjs';

export * from '../common/processes.mjs';

/** Collects what a socket.io-client socket receives: `message` arguments parsed, `joined`
 * events, and connect / disconnect counts. */
export function record(socket) {
  const seen = { messages: [], raw: [], joined: [], errors: [], connects: 0, disconnects: 0 };
  socket.on('message', (s) => {
    seen.raw.push(s);
    seen.messages.push(JSON.parse(s));
  });
  socket.on('joined', (j) => seen.joined.push(j));
  socket.on('error', (e) => seen.errors.push(e));
  socket.on('connect', () => seen.connects++);
  socket.on('disconnect', () => seen.disconnects++);
  return seen;
}

/** A native scalechat client (`/ws`) collecting the frames it receives. */
export async function nativeClient(node, query = '') {
  const ws = new WebSocket(`ws://127.0.0.1:${node.port}/ws?${query}`);
  const frames = [];
  ws.on('message', (data) => frames.push(JSON.parse(data.toString())));
  await within(
    'the native client to open',
    new Promise((ok, fail) => {
      ws.once('open', ok);
      ws.once('error', fail);
    }),
  );
  await waitFor('the native client to be joined', () => frames.some((f) => f.type === 'joined'));
  return {
    ws,
    frames,
    send: (frame) => ws.send(JSON.stringify(frame)),
    messages: () => frames.filter((f) => f.type === 'message'),
    close: () => ws.close(),
  };
}
