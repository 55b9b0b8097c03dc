// Drives cuttle the way a browser app does: the `ws` WebSocket client and @msgpack/msgpack with
// its default options (the NoLag SDK's codec). An independent implementation of the wire
// format: str-vs-bin mistakes hide when both ends share one codec.
//
// Usage: node e2e.mjs <ws-url> <device-token> <other-scope-device-token> <same-scope-user-jwt>
// Exits 0 when every check passes; prints the first failure and exits 1 otherwise.

import WebSocket from 'ws';
import { encode, decode } from '@msgpack/msgpack';
import assert from 'node:assert/strict';

const [url, token, otherScopeToken, userToken] = process.argv.slice(2);

function client() {
  const ws = new WebSocket(url);
  ws.binaryType = 'nodebuffer';
  const frames = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    assert.ok(isBinary, 'the server must send binary frames only');
    // Empty frames are heartbeats.
    const frame = data.length === 0 ? { type: '<heartbeat>' } : decode(data);
    frames.push(frame);
    waiters.splice(0).forEach((w) => w());
  });
  const opened = new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return {
    ws,
    opened,
    send: (obj) => ws.send(encode(obj)),
    sendRaw: (bytes) => ws.send(bytes),
    // Next frame matching `pred` within `ms`.
    async next(pred, ms = 5000) {
      const deadline = Date.now() + ms;
      for (;;) {
        const i = frames.findIndex(pred);
        if (i >= 0) return frames.splice(i, 1)[0];
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no matching frame within ${ms} ms; have ${JSON.stringify(frames)}`);
        await new Promise((resolve) => {
          waiters.push(resolve);
          setTimeout(resolve, left);
        });
      }
    },
    async none(pred, ms) {
      await new Promise((r) => setTimeout(r, ms));
      assert.equal(frames.filter(pred).length, 0, `unexpected frame: ${JSON.stringify(frames.filter(pred))}`);
    },
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ofType = (t) => (f) => f.type === t;

async function login(tok) {
  const c = client();
  await c.opened;
  // Exactly what the SDK sends: no protocolVersion, str keys.
  c.send({ type: 'auth', token: tok });
  const reply = await c.next(ofType('auth'));
  assert.equal(reply.success, true, `auth failed: ${JSON.stringify(reply)}`);
  return [c, reply];
}

async function main() {
  const [sub, reply] = await login(token);
  // Every field of the success reply, with the types the SDK expects.
  assert.equal(typeof reply.actorTokenId, 'string');
  assert.equal(typeof reply.projectId, 'string');
  assert.equal(reply.actorType, 'device');
  assert.equal(reply.protocolVersion, 1);
  assert.deepEqual(reply.restoredSubscriptions, []);

  const [pub] = await login(token);
  const [other] = await login(otherScopeToken);

  // The SDK's subscribe: qos always sent; undefined fields arrive as nil.
  sub.send({ type: 'subscribe', topic: 'chat/general/messages', qos: 1, loadBalance: undefined });
  assert.equal((await sub.next(ofType('subscribed'))).topic, 'chat/general/messages');
  other.send({ type: 'subscribe', topic: 'chat/general/messages', qos: 1 });
  await other.next(ofType('subscribed'));
  await sleep(250);

  // The SDK's emit: topic, data, qos, echo. A Uint8Array must come back as a Uint8Array.
  const payload = { text: 'héllo', bytes: new Uint8Array([0, 159, 146, 150, 255]), n: 3.5, nothing: null, when: new Date(0) };
  pub.send({ type: 'publish', topic: 'chat/general/messages', data: payload, qos: 1, echo: true });
  const m = await sub.next(ofType('message'));
  assert.equal(m.topic, 'chat/general/messages');
  assert.equal(m.data.text, 'héllo');
  assert.ok(m.data.bytes instanceof Uint8Array, 'bin stays bin');
  assert.deepEqual(Array.from(m.data.bytes), [0, 159, 146, 150, 255]);
  assert.equal(m.data.n, 3.5);
  assert.equal(m.data.nothing, null);
  assert.ok(m.data.when instanceof Date, 'ext -1 (Date) survives');
  // Another tenant sees nothing.
  await other.none(ofType('message'), 400);

  // echo:false skips only the sending socket.
  sub.send({ type: 'publish', topic: 'chat/general/messages', data: 'quiet', qos: 1, echo: false });
  await sub.none((f) => f.type === 'message' && f.data === 'quiet', 400);

  // Denials surface as error frames with the SDK's strings.
  sub.send({ type: 'subscribe', topic: 'chat/vip/messages', qos: 1 });
  const denied = await sub.next(ofType('error'));
  assert.equal(denied.error, 'not_authorized');
  assert.equal(denied.topic, 'chat/vip/messages');

  // Oversized payload: 42930 (the reference e2e's check).
  pub.send({ type: 'publish', topic: 'chat/general/messages', data: { blob: 'x'.repeat(1_000_000) }, qos: 1, echo: true });
  const tooLarge = await pub.next(ofType('error'));
  assert.match(tooLarge.error, /too_large/);
  assert.equal(tooLarge.code, 42930);

  // Heartbeat: an empty binary frame is answered with one.
  sub.sendRaw(Buffer.alloc(0));
  await sub.next(ofType('<heartbeat>'));

  // Garbage then a healthy request on the same socket.
  sub.sendRaw(Buffer.from([0xc1]));
  assert.equal((await sub.next(ofType('error'))).error, 'invalid_frame');
  sub.send({ type: 'unsubscribe', topic: 'chat/general/messages' });
  assert.equal((await sub.next(ofType('unsubscribed'))).topic, 'chat/general/messages');

  // A bad token: success:false with a string error, then the close.
  const bad = client();
  await bad.opened;
  const closed = new Promise((r) => bad.ws.once('close', (code) => r(code)));
  bad.send({ type: 'auth', token: 'not-a-token' });
  const refused = await bad.next(ofType('auth'));
  assert.equal(refused.success, false);
  assert.equal(refused.error, 'access_denied');
  assert.equal(await closed, 1008);

  for (const c of [sub, pub, other]) c.ws.close(1000, 'Client disconnect');
  await presence();
}

// Presence and lobbies (docs/PROTOCOL.md §11–§12), as the SDK drives them: room.setPresence sends only
// the room slug, fetchPresence reads `presenceList`, events are keyed by actor_token_id.
async function presence() {
  const isPresence = (event, actor) => (f) =>
    f.type === 'presence' && f.event === event && (f.data.actorTokenId || f.data.actor_token_id) === actor;
  const [tab1, auth] = await login(token);
  const me = auth.actorTokenId;
  const [user, userAuth] = await login(userToken);
  const them = userAuth.actorTokenId;
  const [stranger] = await login(otherScopeToken);

  // A lobby follower in the same namespace.
  user.send({ type: 'lobbySubscribe', lobbyId: 'hall' });
  const subscribed = await user.next(ofType('lobbySubscribed'));
  assert.equal(subscribed.lobbyId, 'hall');
  assert.deepEqual(Object.keys(subscribed.presence.general), []);

  // First entry: join then update, sender included.
  tab1.send({ type: 'presence', roomId: 'general', data: { status: 'online' } });
  const join = await tab1.next(isPresence('join', me));
  assert.deepEqual(join.data.presence, { status: 'online' });
  await tab1.next(isPresence('update', me));
  // The lobby follower gets lobbyPresence with the lobby and room slugs.
  const lp = await user.next((f) => f.type === 'lobbyPresence' && f.event === 'join');
  assert.equal(lp.lobbyId, 'hall');
  assert.equal(lp.roomId, 'general');
  assert.equal(lp.actorId, me);
  assert.deepEqual(lp.data, { status: 'online' });

  // The user enters: both see the user's join; the device sees it once.
  user.send({ type: 'presence', roomId: 'general', data: { status: 'here' } });
  await tab1.next(isPresence('join', them));
  await user.next(isPresence('join', them));

  // fetchPresence: presenceList with the same roomId, camelCase entries, unix-second joinedAt.
  user.send({ type: 'getPresence', roomId: 'general' });
  const list = await user.next((f) => f.type === 'presenceList' && f.roomId === 'general');
  const ids = list.data.map((e) => e.actorTokenId).sort();
  assert.deepEqual(ids, [me, them].sort());
  for (const e of list.data) {
    assert.equal(e.status, 'online');
    assert.ok(Math.abs(e.joinedAt - Date.now() / 1000) < 60, `joinedAt in seconds: ${e.joinedAt}`);
  }

  // A second tab of the same actor is not a second member; closing it leaves nothing.
  const [tab2] = await login(token);
  tab2.send({ type: 'presence', roomId: 'general', data: { status: 'online' } });
  await tab2.next(isPresence('join', me));
  await user.none(isPresence('join', me), 300);
  tab2.ws.close(1000, 'Client disconnect');
  await user.none(isPresence('leave', me), 400);

  // Another scope is another namespace: its list is its own, and it never hears ours.
  stranger.send({ type: 'getPresence', roomId: 'general' });
  const theirs = await stranger.next(ofType('presenceList'));
  assert.deepEqual(theirs.data, []);
  await stranger.none(ofType('presence'), 200);

  // getLobbyPresence, then lobbyUnsubscribe.
  user.send({ type: 'getLobbyPresence', lobbyId: 'hall' });
  const lobbyList = await user.next(ofType('lobbyPresenceList'));
  assert.deepEqual(Object.keys(lobbyList.presence.general).sort(), [me, them].sort());
  assert.equal(lobbyList.presence.general[me].actorTokenId, me);
  user.send({ type: 'lobbyUnsubscribe', lobbyId: 'hall' });
  assert.equal((await user.next(ofType('lobbyUnsubscribed'))).lobbyId, 'hall');
  // A lobby that does not exist: not_authorized with lobbyId.
  user.send({ type: 'lobbySubscribe', lobbyId: 'nope' });
  const noLobby = await user.next(ofType('error'));
  assert.equal(noLobby.error, 'not_authorized');
  assert.equal(noLobby.lobbyId, 'nope');

  // The last connection's clean close (disconnect()): leave, at once.
  tab1.ws.close(1000, 'Client disconnect');
  await user.next(isPresence('leave', me), 2000);
  for (const c of [user, stranger]) c.ws.close(1000, 'Client disconnect');
}

main().then(
  () => {
    console.log('node e2e: all checks passed');
    process.exit(0);
  },
  (err) => {
    console.error('node e2e FAILED:', err);
    process.exit(1);
  },
);
