// What the Socket.IO tests run against: a real redis-server and real scalechat processes on
// free ports of 127.0.0.1, socket.io-client and native WebSocket clients, a round-robin
// balancer, and polling helpers that wait on what a client receives (never fixed sleeps).
// Every child process is killed when the test file ends, passes or fails.

import http from 'node:http';
import net from 'node:net';
import WebSocket from 'ws';
import { freePort, waitFor, within } from '../common/processes.mjs';

export * from '../common/processes.mjs';

/** Collects what a socket.io-client socket receives: `message` arguments parsed, `joined`
 * events, and connect / disconnect counts. */
export function record(socket) {
  const seen = {
    messages: [],
    raw: [],
    joined: [],
    errors: [],
    connects: 0,
    disconnects: 0,
    /** `socket.recovered` at each connect, in order. */
    recovered: [],
    /** The reason of each disconnect, in order. */
    reasons: [],
  };
  socket.on('message', (s) => {
    seen.raw.push(s);
    seen.messages.push(JSON.parse(s));
  });
  socket.on('joined', (j) => seen.joined.push(j));
  socket.on('error', (e) => seen.errors.push(e));
  socket.on('connect', () => {
    seen.connects++;
    seen.recovered.push(socket.recovered);
  });
  socket.on('disconnect', (reason) => {
    seen.disconnects++;
    seen.reasons.push(reason);
  });
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

/**
 * The node a Socket.IO session lives on, from its id (`socket.io.engine.id`): scalechat's
 * session ids end with `.` and the owner's node id in hex.
 */
export function ownerOf(sid) {
  const hex = sid.slice(sid.lastIndexOf('.') + 1);
  return Buffer.from(hex, 'hex').toString('utf8');
}

/**
 * A balancer that sends each HTTP request, and each WebSocket upgrade, to the next of
 * `ports` in turn: the opposite of sticky sessions. Like nginx's default
 * (`proxy_next_upstream error`), a port that refuses the connection (its node is stopped or
 * was killed) is skipped for that request; nothing else is retried. `down()` makes it refuse
 * every new request and upgrade (503) until `up()`, as if the client's network were cut;
 * connections already upgraded go on.
 */
export async function roundRobin(ports) {
  let next = 0;
  let down = false;
  const upgraded = new Set();
  const agent = new http.Agent({ keepAlive: false });
  // Calls `attempt(port, skip)` with the next port; `skip()` moves on to the one after, each
  // port once, then `giveUp()`.
  const eachPort = (attempt, giveUp) => {
    let tries = 0;
    const skip = () => (tries++ < ports.length ? attempt(ports[next++ % ports.length], skip) : giveUp());
    skip();
  };
  const server = http.createServer((req, res) => {
    const fail = (status) => {
      if (res.headersSent) res.destroy();
      else res.writeHead(status).end();
    };
    if (down) {
      req.resume();
      return fail(503);
    }
    // Polling bodies are small: buffered, so that a refused port can be skipped.
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      eachPort(
        (port, skip) => {
          const upstream = http.request(
            { host: '127.0.0.1', port, method: req.method, path: req.url, headers: req.headers, agent },
            (answer) => {
              res.writeHead(answer.statusCode, answer.headers);
              answer.on('aborted', () => res.destroy());
              answer.pipe(res);
            },
          );
          upstream.on('error', (e) => (e.code === 'ECONNREFUSED' ? skip() : fail(502)));
          upstream.end(body);
        },
        () => fail(502),
      );
    });
  });
  server.on('upgrade', (req, socket, head) => {
    socket.on('error', () => socket.destroy());
    if (down) {
      socket.end('HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    upgraded.add(socket);
    socket.on('close', () => upgraded.delete(socket));
    eachPort(
      (port, skip) => {
        const upstream = net.connect(port, '127.0.0.1');
        upstream.once('error', (e) => (e.code === 'ECONNREFUSED' ? skip() : socket.destroy()));
        upstream.once('connect', () => {
          upstream.on('error', () => socket.destroy());
          socket.on('close', () => upstream.destroy());
          const lines = [`${req.method} ${req.url} HTTP/1.1`];
          for (let i = 0; i < req.rawHeaders.length; i += 2) {
            lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
          }
          upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
          upstream.write(head);
          upstream.pipe(socket);
          socket.pipe(upstream);
        });
      },
      () => socket.destroy(),
    );
  });
  const port = await freePort();
  await new Promise((done) => server.listen(port, '127.0.0.1', done));
  return {
    url: `http://127.0.0.1:${port}`,
    down: () => {
      down = true;
    },
    up: () => {
      down = false;
    },
    close: () => {
      server.close();
      server.closeAllConnections();
      for (const socket of upgraded) socket.destroy();
    },
  };
}
