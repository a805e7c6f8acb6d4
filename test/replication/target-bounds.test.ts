// The target's memory bound when a source asks for data and does not read it: every ResyncData
// stays counted against the session's in-flight bytes until the socket took it, so the session
// stops reading requests instead of growing its write buffer without limit. A real
// ReplicationServer in-process (test/helpers/fake-source.ts), driven by the hand-written source
// of test/helpers/fake-peer.ts.
import t from 'tap';
import crypto from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Socket } from 'node:net';
import { wireMessage } from '../../src/wire/index';
import { FakePeer, makeHello } from '../helpers/fake-peer';
import { captureLogger, FakeTarget, secret, SIZE_BYTES, startTarget } from '../helpers/fake-source';

const MiB = 1024 * 1024;
/** The session's in-flight byte bound (target-server.ts SESSION_BYTES_MAX). */
const SESSION_BYTES_MAX = 64 * MiB;

t.test('a source that requests resync data and never reads it: the target buffers at most its session bound', async (t) => {
  const { logger } = captureLogger();
  const target = new FakeTarget();
  const { server, port } = await startTarget(t, target, { logger });
  const peer = await FakePeer.connect(t, port);
  await peer.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  const reply = await peer.hello(makeHello({ volumeUuid: crypto.randomUUID(), sizeBytes: SIZE_BYTES, targetVolumeName: 'tgt' }));
  t.equal(reply.sizeBytes, SIZE_BYTES, 'session accepted');

  // 64 requests for the whole 4 MiB volume: 256 MiB asked for, none of it read by us.
  const requests = 64;
  for (let i = 0; i < requests; i++) {
    peer.send(wireMessage('resyncRequest', { sequence: 10 + i, ranges: [{ offsetBytes: 0, lengthBytes: SIZE_BYTES }] }));
  }
  // Let the target read what it will and fill every buffer on the way.
  let buffered = 0;
  const session = (server as unknown as { sessions: Map<string, { channel: { stream: Socket } }> }).sessions.get('tgt');
  if (session === undefined) throw new Error('no session for tgt');
  for (let i = 0; i < 20; i++) {
    await sleep(100);
    buffered = Math.max(buffered, session.channel.stream.writableLength);
  }
  t.comment(`largest target write buffer seen: ${(buffered / MiB).toFixed(1)} MiB of ${(requests * SIZE_BYTES) / MiB} MiB requested`);
  t.ok(buffered <= SESSION_BYTES_MAX + SIZE_BYTES, `the target's write buffer stays within the session bound (${buffered} <= ${SESSION_BYTES_MAX + SIZE_BYTES})`);
  t.equal(server.sessionCount, 1, 'the session is still up: a slow reader is not an error');
  peer.socket.destroy();
  await peer.closed;
});

t.test('connections beyond maxConnections are closed at once', async (t) => {
  const { logger, logs } = captureLogger();
  const { port } = await startTarget(t, new FakeTarget(), { logger, maxConnections: 2 });
  // Two authenticated connections hold the slots (adopted sockets, which net.Server itself no
  // longer counts); each waits for its hello.
  const held: FakePeer[] = [];
  for (let i = 0; i < 2; i++) {
    const peer = await FakePeer.connect(t, port);
    await peer.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
    held.push(peer);
  }
  const refused = await FakePeer.connect(t, port);
  const closedInTime = await Promise.race([refused.closed.then(() => true), sleep(2000).then(() => false)]);
  t.ok(closedInTime, 'the third connection was closed by the target at once');
  t.ok(logs.some((line) => line.msg === 'replication connection refused: too many connections'), 'and the refusal logged');
  // A slot that frees up is usable again: authentication on a new connection works.
  held[0]!.socket.destroy();
  await held[0]!.closed;
  await sleep(50);
  const next = await FakePeer.connect(t, port);
  await next.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  t.pass('a new connection authenticates once a slot is free');
  for (const peer of [held[1]!, next]) peer.socket.destroy();
});

t.test('connections that never authenticate cannot keep a real source out', async (t) => {
  const { logger, logs } = captureLogger();
  const { port } = await startTarget(t, new FakeTarget(), { logger, maxConnections: 4 });
  // At most half the slots may be authenticating: two idle connections fill that share.
  const idle = [await FakePeer.connect(t, port), await FakePeer.connect(t, port)];
  await sleep(50);
  const source = await FakePeer.connect(t, port);
  await source.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  t.pass('the source authenticates while idle connections hold every authenticating slot');
  const evicted = await Promise.race([idle[0]!.closed.then(() => true), sleep(2000).then(() => false)]);
  t.ok(evicted, 'the oldest idle connection was dropped for it');
  t.ok(logs.some((line) => line.msg === 'replication connection dropped: still not authenticated, and a newer connection needs its slot'), 'and that logged');
  for (const peer of [idle[1]!, source]) peer.socket.destroy();
});

t.test('a source that floods barriers and never reads: replies stay bounded, the session stays up', async (t) => {
  const { logger } = captureLogger();
  const { server, port } = await startTarget(t, new FakeTarget(), { logger });
  const peer = await FakePeer.connect(t, port);
  await peer.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  await peer.hello(makeHello({ volumeUuid: crypto.randomUUID(), sizeBytes: SIZE_BYTES, targetVolumeName: 'tgt' }));
  peer.socket.pause(); // the source stops reading
  const session = (server as unknown as { sessions: Map<string, { channel: { stream: Socket } }> }).sessions.get('tgt');
  if (session === undefined) throw new Error('no session for tgt');
  let largest = 0;
  // 1.2 million barriers: about 20 MiB of replies, more than the kernel buffers of both ends hold.
  for (let sequence = 10; sequence < 1_200_010; sequence++) {
    peer.send(wireMessage('barrier', { sequence }));
    if (sequence % 50_000 === 0) {
      await sleep(20);
      largest = Math.max(largest, session.channel.stream.writableLength);
    }
  }
  // The target works through them for a few seconds; without a bound its replies pile up.
  for (let i = 0; i < 60; i++) {
    await sleep(100);
    largest = Math.max(largest, session.channel.stream.writableLength);
  }
  t.ok(largest <= 2 * MiB, `the target's unread replies stay bounded (${(largest / MiB).toFixed(2)} MiB at most)`);
  t.equal(server.sessionCount, 1, 'the session is still up');
  peer.socket.destroy();
  await peer.closed;
});


t.test('two reconnects of the same source racing past a stale session: exactly one session is admitted', async (t) => {
  const { logger } = captureLogger();
  const target = new FakeTarget();
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  target.beforeWrite = () => gate;
  const { server, port } = await startTarget(t, target, { logger });
  const volumeUuid = crypto.randomUUID();
  const hello = (): ReturnType<typeof makeHello> => makeHello({ volumeUuid, sizeBytes: SIZE_BYTES, targetVolumeName: 'tgt' });
  // A session whose write is stuck: closing it waits for that write.
  const stale = await FakePeer.connect(t, port);
  await stale.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  await stale.hello(hello());
  stale.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 1));
  await sleep(100);
  const peers: FakePeer[] = [];
  for (let i = 0; i < 2; i++) {
    const peer = await FakePeer.connect(t, port);
    await peer.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
    peers.push(peer);
  }
  const replies = peers.map((peer) => peer.hello(hello()).then((reply) => reply.accepted, () => false));
  await sleep(200);
  release();
  const accepted = await Promise.all(replies);
  t.same(accepted.sort(), [false, true], 'one reconnect is admitted, the other refused (or replaced by it)');
  t.equal(server.sessionCount, 1, 'one session writes the volume');
  for (const peer of [stale, ...peers]) peer.socket.destroy();
});

t.test('a bitmap request for a volume that has not diverged ends the session (each would cost a whole-volume bitmap)', async (t) => {
  const { logger } = captureLogger();
  const { server, port } = await startTarget(t, new FakeTarget(), { logger });
  const peer = await FakePeer.connect(t, port);
  await peer.authenticate({ nodeName: 'hostA', secret, targetName: 'hostB' });
  await peer.hello(makeHello({ volumeUuid: crypto.randomUUID(), sizeBytes: SIZE_BYTES, targetVolumeName: 'tgt' }));
  for (let sequence = 10; sequence < 20; sequence++) peer.send(wireMessage('bitmapRequest', { sequence }));
  const error = await peer.expect('error');
  t.match(error.message, /has not diverged/, 'refused with the reason');
  await peer.closed;
  await sleep(50);
  t.equal(server.sessionCount, 0, 'the session ended');
});
