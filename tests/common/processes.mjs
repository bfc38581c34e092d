// What the Node.js test suites (tests/browser, tests/socketio) run against: a real
// redis-server and real scalechat processes on free ports of 127.0.0.1, and polling helpers
// that wait on what a client sees (never fixed sleeps). Only Node's own modules are used, so
// each suite imports this file from its own package. Every child process is killed when the
// test file ends, passes or fails.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

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
      // A probe that never settles counts as failing once the time is up.
      const left = Math.max(deadline - Date.now(), 1);
      const value = await within(`${what} (one probe)`, Promise.resolve(probe()), left);
      if (value !== undefined && value !== false) return value;
      last = value;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      const seen = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last seen: ${seen}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Settles as `promise` does, or fails after `timeout` ms naming `what`: for every wait on an
 * event or a reply, so that one that never comes fails the test instead of hanging it.
 */
export function within(what, promise, timeout = WAIT_MS) {
  let timer;
  const expired = new Promise((_, fail) => {
    timer = setTimeout(
      () => fail(new Error(`timed out after ${timeout} ms waiting for ${what}`)),
      timeout,
    );
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

/** The first `event` of `emitter` (its listener's first argument), within `timeout` ms. */
export function nextEvent(emitter, event, what, timeout = WAIT_MS) {
  return within(what, new Promise((ok) => emitter.once(event, ok)), timeout);
}

/** A TCP port that was free on 127.0.0.1 a moment ago. */
export async function freePort() {
  const port = new Promise((ok, fail) => {
    const srv = createServer();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
  return within('a free port', port);
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
  const dir = scratch('scalechat-test-redis-');
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
 * Starts the real scalechat binary as node `nodeId` on `port` (the Redis transport when
 * `redisPort` is given, else the embedded one) and waits until `GET /readyz` answers 200. It
 * runs in a scratch directory, without the caller's scalechat/Redis variables; `env` adds some.
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
    SCALECHAT_TRANSPORT: redisPort ? 'redis' : 'memory',
    RUST_LOG: 'warn',
    ...extra,
  });
  if (redisPort) {
    Object.assign(env, { REDIS_HOST: '127.0.0.1', REDIS_PORT: String(redisPort) });
  }
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
