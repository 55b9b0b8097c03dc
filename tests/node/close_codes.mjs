// Close codes as a browser's WebSocket sees them (the `ws` client, as the SDK uses in Node).
// Issue 8's findings: an oversize frame before auth dropped TCP without a close frame, one
// after auth reset the socket with unread data (the client saw 1006, not 1009), and at drain
// unauthenticated sockets were left to their auth timeout.
//
// Usage: node close_codes.mjs <ws-url> <device-token>
// Prints `ready` once the drain phase's sockets are open, then waits for the proxy under test
// to start draining; prints `codes <json>` and exits 0 when every check passes, 1 otherwise.

import WebSocket from 'ws';
import { encode, decode } from '@msgpack/msgpack';
import assert from 'node:assert/strict';

const [url, token] = process.argv.slice(2);

// Opens a socket; resolves with it and a promise of its close code.
async function open() {
  const ws = new WebSocket(url);
  ws.binaryType = 'nodebuffer';
  const frames = [];
  ws.on('message', (data) => frames.push(data.length === 0 ? { type: '<heartbeat>' } : decode(data)));
  const closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
  ws.on('error', () => {}); // a reset surfaces as close code 1006
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return { ws, frames, closed };
}

async function login() {
  const c = await open();
  c.ws.send(encode({ type: 'auth', token }));
  for (let i = 0; i < 100 && !c.frames.some((f) => f.type === 'auth'); i++) await new Promise((r) => setTimeout(r, 20));
  const reply = c.frames.find((f) => f.type === 'auth');
  assert.equal(reply?.success, true, `auth failed: ${JSON.stringify(reply)}`);
  return c;
}

const within = (p, ms, what) =>
  Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: not closed within ${ms} ms`)), ms))]);

// Over the default `limits.max_frame_bytes` (1 MiB).
const oversize = Buffer.alloc(1_200_000, 0x80);

async function main() {
  const codes = {};

  // Oversize before auth: a real close frame with 1009.
  const early = await open();
  early.ws.send(oversize);
  codes.beforeAuth = (await within(early.closed, 5000, 'oversize before auth')).code;
  assert.equal(codes.beforeAuth, 1009, 'oversize before auth');

  // Oversize after auth, with more frames behind it: the proxy drains what it has not read,
  // so the client sees the close frame and not a reset (1006).
  const late = await login();
  late.ws.send(encode({ type: 'subscribe', topic: 'chat/general/messages', qos: 1 }));
  late.ws.send(oversize);
  for (let i = 0; i < 20; i++) late.ws.send(encode({ type: 'publish', topic: 'chat/general/messages', data: 'after', qos: 0 }));
  codes.afterAuth = (await within(late.closed, 5000, 'oversize after auth')).code;
  assert.equal(codes.afterAuth, 1009, 'oversize after auth');

  // Drain: an authenticated and an unauthenticated socket are both told 1001 at once.
  const member = await login();
  const stranger = await open();
  const drainStarted = new Promise((resolve) => process.stdin.once('data', resolve));
  console.log('ready');
  await drainStarted;
  const t0 = Date.now();
  const [m, s] = await within(Promise.all([member.closed, stranger.closed]), 3000, 'drain');
  codes.drainAuthenticated = m.code;
  codes.drainUnauthenticated = s.code;
  codes.drainMs = Date.now() - t0;
  assert.equal(m.code, 1001, 'authenticated socket at drain');
  assert.equal(s.code, 1001, 'unauthenticated socket at drain');
  console.log(`codes ${JSON.stringify(codes)}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error('close codes FAILED:', err);
    process.exit(1);
  },
);
