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

t.test('connections beyond maxConnections are closed at once, authenticated or not', async (t) => {
  const { logger, logs } = captureLogger();
  const { port } = await startTarget(t, new FakeTarget(), { logger, maxConnections: 2 });
  // Two idle connections hold the slots (adopted sockets, which net.Server itself no longer counts).
  const held = [await FakePeer.connect(t, port), await FakePeer.connect(t, port)];
  await sleep(50);
  const refused = await FakePeer.connect(t, port);
  // At once, not after the unauthenticated connection's timeout.
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
