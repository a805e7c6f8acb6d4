// The target daemon's replication listener (--listen) against a hand-written source: wrong
// secrets, unknown peers, garbage, oversized frames, writes out of range or out of order, and
// Hellos it must refuse. Every bad connection must be dropped (with a logged warning naming the
// reason and the remote address) before it touches the device, and the daemon must keep serving
// a well-behaved source afterwards.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import {
  FRAME_MAGIC,
  PAYLOAD_BYTES_MAX,
  PROTOCOL_VERSION,
  readSecretFile,
  wireMessage,
  WriteFlag,
  type ErrorCodeName,
  type Frame,
  type Hello,
} from '../../src/wire/index';
import { runCli, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { FakePeer, makeHello, type Closed } from '../helpers/fake-peer';
import { scratchDevice } from '../helpers/loop';

const KiB = 1024;
const MiB = 1024 * KiB;
const deviceBytes = 16 * MiB;

/** Known content: every 512-byte sector different, every byte within it too. */
function pattern(offset: number, length: number, seed = 0): Buffer {
  const bytes = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    const position = offset + i;
    bytes[i] = (Math.imul((position >>> 9) + seed, 0x9e3779b1) >>> 24) ^ (position & 0xff);
  }
  return bytes;
}

function sha256(bytes: Buffer): string {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

async function cliJson(daemon: RunningDaemon, args: readonly string[]): Promise<any> {
  const result = await runCli(['--socket', daemon.paths.controlSocket, '--json', ...args]);
  if (result.code !== 0) throw new Error(`blockmirror ${args.join(' ')} exited ${result.code}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

t.test('target listener against a fake source', async (t) => {
  const daemon = await startDaemon(t, { args: ['--listen', '127.0.0.1:0', '--node-name', 'hostB'] });
  const secretFile = path.join(daemon.paths.dir, 'hostA.key');
  fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  const secret = readSecretFile(secretFile);
  await cliJson(daemon, ['peer', 'add', 'hostA', '--address', '127.0.0.1:1', '--secret-file', secretFile]);

  // The mirror volume's device starts with a known pattern, written before the daemon opens it.
  const device = scratchDevice(t, deviceBytes);
  const expected = pattern(0, deviceBytes);
  const fd = fs.openSync(device.backingFile, 'r+');
  fs.writeSync(fd, expected, 0, expected.length, 0);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  await cliJson(daemon, ['volume', 'add', 'vol0', '--device', device.path, '--mirror']);
  await cliJson(daemon, ['volume', 'add', 'prim0', '--device', scratchDevice(t, MiB).path]);
  const info = await cliJson(daemon, ['volume', 'info', 'vol0']);
  t.match(info, { role: 'mirror', state: 'online', sizeBytes: deviceBytes });
  const sectorBytes: number = info.logicalSectorBytes;
  t.equal(sectorBytes, 512, 'scratch device has 512-byte logical sectors');

  const status = await cliJson(daemon, ['status']);
  t.equal(status.nodeName, 'hostB');
  const listen = /^127\.0\.0\.1:(\d+)$/.exec(status.replicationListen ?? '');
  if (listen === null) throw new Error(`status.replicationListen is ${JSON.stringify(status.replicationListen)}`);
  const port = Number(listen[1]);

  /** The source identity every well-behaved session uses (the volume binds to it). */
  const sourceUuid = crypto.randomUUID();
  const goodHello = (fields: Partial<Hello> = {}): Hello =>
    makeHello({ volumeUuid: sourceUuid, sizeBytes: deviceBytes, logicalSectorBytes: sectorBytes, targetVolumeName: 'vol0', ...fields });
  const goodAuth = { nodeName: 'hostA', secret, targetName: 'hostB' };

  const readDevice = (offset = 0, length = deviceBytes): Buffer => {
    const bytes = Buffer.alloc(length);
    const handle = fs.openSync(device.backingFile, 'r');
    try {
      fs.readSync(handle, bytes, 0, length, offset);
    } finally {
      fs.closeSync(handle);
    }
    return bytes;
  };

  /** The whole device equals the model (the pattern plus the writes that were acknowledged). */
  const assertDeviceIsModel = (tt: Test, what: string): void => {
    tt.equal(sha256(readDevice()), sha256(expected), `whole device unchanged: ${what}`);
  };

  /** Authenticated and said a good Hello: a session ready for writes. */
  const openSession = async (tt: Test, fields: Partial<Hello> = {}): Promise<FakePeer> => {
    const peer = await FakePeer.connect(tt, port);
    await peer.authenticate(goodAuth);
    const reply = await peer.hello(goodHello(fields));
    tt.match(reply, { accepted: true, protocolVersion: PROTOCOL_VERSION, nodeName: 'hostB', sizeBytes: deviceBytes, logicalSectorBytes: sectorBytes }, 'hello accepted');
    return peer;
  };

  /** A well-behaved source is still served: it authenticates, says Hello, gets a write acked and
   *  on the device, then writes the original bytes back (the model stays as it was). */
  const assertServing = async (tt: Test): Promise<void> => {
    const peer = await openSession(tt);
    const offset = 5 * MiB;
    const marker = crypto.randomBytes(8 * KiB);
    peer.send(wireMessage('write', { sequence: 1, offsetBytes: offset, lengthBytes: marker.length, flags: 0 }), marker);
    peer.send(wireMessage('flush', { sequence: 2 }));
    tt.match(await peer.expect('writeAck'), { sequence: 1, status: 'STATUS_OK' }, 'later good source: write acked');
    tt.match(await peer.expect('flushAck'), { sequence: 2, status: 'STATUS_OK' }, 'later good source: flush acked');
    tt.ok(readDevice(offset, marker.length).equals(marker), 'later good source: its write is on the device');
    const original = expected.subarray(offset, offset + marker.length);
    peer.send(wireMessage('write', { sequence: 3, offsetBytes: offset, lengthBytes: original.length, flags: WriteFlag.FUA }), original);
    tt.match(await peer.expect('writeAck'), { sequence: 3, status: 'STATUS_OK' });
    await peer.end();
  };

  /** Polls the daemon's log for a warning about `remote` matching `fields`. */
  const expectWarning = async (tt: Test, remote: string, fields: Record<string, unknown>): Promise<void> => {
    const deadline = Date.now() + 5_000;
    const matches = (entry: Record<string, unknown>): boolean => {
      if (entry.level !== 40 || entry.remote !== remote) return false;
      return Object.entries(fields).every(([key, want]) =>
        want instanceof RegExp ? typeof entry[key] === 'string' && want.test(entry[key] as string) : entry[key] === want,
      );
    };
    while (!daemon.logs().some(matches)) {
      if (Date.now() > deadline) {
        const near = daemon.logs().filter((entry) => entry.remote === remote);
        tt.fail(`no warning for ${remote} matching ${String(Object.entries(fields))}; log lines for it: ${JSON.stringify(near)}`);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    tt.pass(`daemon logged a warning for ${remote}: ${String(Object.values(fields))}`);
  };

  /** Every frame the target sent before hanging up is a refusal naming `code` (an Error frame, or
   *  a HelloReply refusing when no Hello was accepted yet); in particular no ack. */
  const assertOnlyRefusals = (tt: Test, closed: Closed, code: ErrorCodeName): void => {
    const describe = (frame: Frame): string => `${frame.message.kind} ${JSON.stringify(frame.message.body)}`;
    for (const frame of closed.frames) {
      const { message } = frame;
      const refusal =
        (message.kind === 'error' && message.body.code === code) ||
        (message.kind === 'helloReply' && !message.body.accepted && message.body.error?.code === code);
      tt.ok(refusal, `only a ${code} refusal before the close, got ${describe(frame)}`);
    }
  };

  const waitNoSessions = async (tt: Test): Promise<void> => {
    const deadline = Date.now() + 5_000;
    while ((await daemon.request('status')).replicationSessions !== 0) {
      if (Date.now() > deadline) return void tt.fail('replicationSessions did not drop to 0');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    tt.pass('no replication session left');
  };

  await t.test('a well-behaved source is accepted and binds the volume', async (t) => {
    // The first good Hello binds vol0 to sourceUuid with generation 1: nothing known yet.
    const peer = await FakePeer.connect(t, port);
    await peer.authenticate(goodAuth);
    const reply = await peer.hello(goodHello());
    t.equal(reply.accepted, true, 'first hello accepted');
    t.same(reply.generationIds, [], 'the target knows no generation of this source yet');
    await peer.end();
    await assertServing(t);
    assertDeviceIsModel(t, 'after good sessions that restored the pattern');
  });

  await t.test('1. wrong secret: authentication refused, nothing written', async (t) => {
    const peer = await FakePeer.connect(t, port);
    const error = await peer.authenticate({ ...goodAuth, secret: crypto.randomBytes(32) }).then(
      () => null,
      (failure: { code?: string }) => failure,
    );
    t.not(error, null, 'authentication fails');
    t.ok(['BM_ERR_AUTH_FAILED', 'BM_ERR_WIRE_CLOSED', 'ECONNRESET'].includes(error?.code ?? ''), `refused by Error AUTH_FAILED or a close, got ${error?.code}`);
    // Even ignoring the refusal, anything sent now goes nowhere.
    if (!peer.socket.destroyed) {
      peer.send(wireMessage('hello', goodHello()));
      peer.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 0xee));
    }
    const closed = await peer.untilClosed();
    assertOnlyRefusals(t, closed, 'ERROR_CODE_AUTH_FAILED');
    await expectWarning(t, peer.localAddress, { msg: 'replication connection refused: authentication failed', code: 'BM_ERR_AUTH_FAILED', peer: 'hostA' });
    await assertServing(t);
    assertDeviceIsModel(t, 'wrong secret');
  });

  await t.test('2. unknown peer name: refused before the secret is used', async (t) => {
    const peer = await FakePeer.connect(t, port);
    const error = await peer.authenticate({ ...goodAuth, nodeName: 'hostZ' }).then(
      () => null,
      (failure: { code?: string }) => failure,
    );
    t.not(error, null, 'authentication fails');
    t.ok(['BM_ERR_AUTH_UNKNOWN_PEER', 'BM_ERR_WIRE_CLOSED', 'ECONNRESET'].includes(error?.code ?? ''), `refused by Error UNKNOWN_PEER or a close, got ${error?.code}`);
    const closed = await peer.untilClosed();
    assertOnlyRefusals(t, closed, 'ERROR_CODE_UNKNOWN_PEER');
    await expectWarning(t, peer.localAddress, { msg: 'replication connection refused: authentication failed', code: 'BM_ERR_AUTH_UNKNOWN_PEER', peer: 'hostZ' });
    await assertServing(t);
    assertDeviceIsModel(t, 'unknown peer');
  });

  await t.test('1b. no authentication at all: Hello and Write first are refused', async (t) => {
    const straightHello = await FakePeer.connect(t, port);
    straightHello.send(wireMessage('hello', goodHello()));
    const helloClosed = await straightHello.untilClosed();
    assertOnlyRefusals(t, helloClosed, 'ERROR_CODE_PROTOCOL');
    await expectWarning(t, straightHello.localAddress, { msg: 'replication connection refused: authentication failed', code: 'BM_ERR_AUTH_PROTOCOL' });

    // Before authentication no payload is accepted at all.
    const straightWrite = await FakePeer.connect(t, port);
    straightWrite.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 0xee));
    await straightWrite.untilClosed();
    await expectWarning(t, straightWrite.localAddress, { msg: 'replication connection refused: authentication failed', code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE' });
    await assertServing(t);
    assertDeviceIsModel(t, 'unauthenticated frames');
  });

  /** A prelude announcing one byte more than the payload limit (header length plausible). */
  const oversizedPrelude = (): Buffer => {
    const prelude = Buffer.alloc(12);
    prelude.writeUInt32BE(FRAME_MAGIC, 0);
    prelude.writeUInt32BE(16, 4);
    prelude.writeUInt32BE(PAYLOAD_BYTES_MAX + 1, 8);
    return prelude;
  };
  const garbage = (): Buffer => Buffer.from('GET / HTTP/1.1\r\nHost: hostB\r\n\r\n', 'latin1');
  /** A well-framed frame whose header is `header` (no payload). */
  const frameWithHeader = (header: Buffer, headerBytesAnnounced = header.length): Buffer => {
    const prelude = Buffer.alloc(12);
    prelude.writeUInt32BE(FRAME_MAGIC, 0);
    prelude.writeUInt32BE(headerBytesAnnounced, 4);
    prelude.writeUInt32BE(0, 8);
    return Buffer.concat([prelude, header]);
  };

  await t.test('3. malformed frames after authentication: dropped, logged, device unchanged', async (t) => {
    const cases: Array<{ name: string; afterHello: boolean; bytes: () => Buffer; reason: RegExp }> = [
      { name: 'garbage (bad magic) right after auth', afterHello: false, bytes: garbage, reason: /bad frame magic 0x47455420/ },
      { name: 'payload > 32 MiB announced right after auth', afterHello: false, bytes: oversizedPrelude, reason: /payload 33554433 > 33554432/ },
      { name: 'garbage (bad magic) in a session', afterHello: true, bytes: garbage, reason: /^malformed frame \(BM_ERR_WIRE_BAD_MAGIC\): bad frame magic 0x47455420/ },
      { name: 'payload > 32 MiB announced in a session', afterHello: true, bytes: oversizedPrelude, reason: /^malformed frame \(BM_ERR_WIRE_PAYLOAD_TOO_LARGE\): payload 33554433 > 33554432/ },
      { name: 'header > 64 KiB announced in a session', afterHello: true, bytes: () => frameWithHeader(Buffer.alloc(0), 64 * KiB + 1), reason: /^malformed frame \(BM_ERR_WIRE_HEADER_TOO_LARGE\)/ },
      // Envelope field 1 (auth_challenge) announcing 5 bytes with only 1 present.
      { name: 'header that is not an Envelope in a session', afterHello: true, bytes: () => frameWithHeader(Buffer.from([0x0a, 0x05, 0x01])), reason: /^malformed frame \(BM_ERR_WIRE_DECODE\)/ },
    ];
    for (const c of cases) {
      await t.test(c.name, async (t) => {
        const peer = c.afterHello ? await openSession(t) : await FakePeer.connect(t, port);
        if (!c.afterHello) await peer.authenticate(goodAuth);
        peer.writeRaw(c.bytes());
        const closed = await peer.untilClosed();
        assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
        if (c.afterHello) {
          t.ok(closed.frames.some((frame) => frame.message.kind === 'error'), 'an Error frame says why before the close');
        }
        // Case 7: the reason and the remote address are in the daemon log.
        await expectWarning(t, peer.localAddress, {
          msg: c.afterHello ? 'replication connection dropped' : 'replication hello refused',
          reason: c.reason,
          peer: 'hostA',
        });
        await assertServing(t);
        assertDeviceIsModel(t, c.name);
      });
    }
    await waitNoSessions(t);
  });

  await t.test('3b. a message this version does not know, in a session: dropped', async (t) => {
    // docs/PROTOCOL.md (Versioning): an unknown body decodes as an empty oneof; the receiver
    // answers Error{ERROR_CODE_UNSUPPORTED_MESSAGE} and drops the connection.
    const cases = [
      { name: 'empty Envelope', header: Buffer.alloc(0) },
      // Envelope field 99 (length-delimited, empty): what a newer source's new message looks like.
      { name: 'Envelope field 99', header: Buffer.from([0x9a, 0x06, 0x00]) },
    ];
    for (const c of cases) {
      const peer = await openSession(t);
      peer.writeRaw(frameWithHeader(c.header));
      const closed = await peer.untilClosed();
      const errors = closed.frames.filter((frame) => frame.message.kind === 'error').map((frame) => (frame.message.body as { code: string }).code);
      t.ok(closed.frames.every((frame) => frame.message.kind === 'error'), `${c.name}: no ack, only an Error before the close`);
      t.same(errors.length, 1, `${c.name}: one Error frame says why`);
      t.same(errors, ['ERROR_CODE_UNSUPPORTED_MESSAGE'], `${c.name}: Error{UNSUPPORTED_MESSAGE} as documented`);
      await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: /BM_ERR_WIRE_UNKNOWN_MESSAGE/, peer: 'hostA' });
    }
    await assertServing(t);
    assertDeviceIsModel(t, 'unknown messages');
  });

  await t.test('4. bad writes after a valid Hello: dropped before they touch the device', async (t) => {
    await t.test('write past the end of the volume', async (t) => {
      const peer = await openSession(t);
      const offset = deviceBytes - 4096;
      peer.send(wireMessage('write', { sequence: 1, offsetBytes: offset, lengthBytes: 8192, flags: 0 }), Buffer.alloc(8192, 0xee));
      const closed = await peer.untilClosed();
      assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
      t.ok(readDevice(offset, 4096).equals(expected.subarray(offset)), 'the last 4 KiB (inside the volume) are unchanged');
      await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: /past the end/ });
      await assertServing(t);
      assertDeviceIsModel(t, 'write past the end');
    });

    await t.test('write-zeroes past the end of the volume (no payload)', async (t) => {
      const peer = await openSession(t);
      peer.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: deviceBytes + sectorBytes, flags: WriteFlag.ZEROES }));
      const closed = await peer.untilClosed();
      assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
      await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: /past the end/ });
      await assertServing(t);
      assertDeviceIsModel(t, 'write-zeroes past the end');
    });

    await t.test('write with unknown flag bits', async (t) => {
      const peer = await openSession(t);
      const offset = 2 * MiB;
      peer.send(wireMessage('write', { sequence: 1, offsetBytes: offset, lengthBytes: 4096, flags: 0x8 | WriteFlag.FUA }), Buffer.alloc(4096, 0xee));
      const closed = await peer.untilClosed();
      assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
      t.ok(readDevice(offset, 4096).equals(expected.subarray(offset, offset + 4096)), 'the addressed range is unchanged');
      await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: /unknown write flags 9/ });
      await assertServing(t);
      assertDeviceIsModel(t, 'unknown flags');
    });

    await t.test('an ordered write when the Hello did not ask for CAPABILITY_ORDERED_WRITES', async (t) => {
      const peer = await openSession(t); // its Hello asks for no capability
      const offset = 2 * MiB;
      peer.send(wireMessage('write', { sequence: 1, offsetBytes: offset, lengthBytes: 4096, flags: WriteFlag.ORDERED }), Buffer.alloc(4096, 0xee));
      const closed = await peer.untilClosed();
      assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
      t.ok(readDevice(offset, 4096).equals(expected.subarray(offset, offset + 4096)), 'the addressed range is unchanged');
      await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: /did not ask for CAPABILITY_ORDERED_WRITES/ });
      await assertServing(t);
      assertDeviceIsModel(t, 'ordered write without the capability');
    });

    for (const [name, second] of [['repeated', 5], ['decreasing', 3]] as const) {
      await t.test(`write with a ${name} sequence`, async (t) => {
        const peer = await openSession(t);
        const offset = 3 * MiB;
        const first = pattern(offset, 4096, name === 'repeated' ? 101 : 102);
        peer.send(wireMessage('write', { sequence: 5, offsetBytes: offset, lengthBytes: first.length, flags: WriteFlag.FUA }), first);
        t.match(await peer.expect('writeAck'), { sequence: 5, status: 'STATUS_OK' }, 'the in-order write is acked');
        first.copy(expected, offset);
        const badOffset = offset + 4096;
        peer.send(wireMessage('write', { sequence: second, offsetBytes: badOffset, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 0xee));
        const closed = await peer.untilClosed();
        assertOnlyRefusals(t, closed, 'ERROR_CODE_PROTOCOL');
        t.ok(readDevice(offset, 4096).equals(first), 'the acked write is on the device');
        t.ok(readDevice(badOffset, 4096).equals(expected.subarray(badOffset, badOffset + 4096)), 'the out-of-order write is not');
        await expectWarning(t, peer.localAddress, { msg: 'replication connection dropped', reason: new RegExp(`sequence ${second} does not follow 5`) });
        await assertServing(t);
        assertDeviceIsModel(t, `${name} sequence`);
      });
    }
    await waitNoSessions(t);
  });

  await t.test('5. Hellos the target must refuse, with the exact error code', async (t) => {
    // A fresh identity each time: a refused Hello must not bind the volume to it either.
    const cases: Array<{ name: string; fields: Partial<Hello>; code: ErrorCodeName }> = [
      { name: 'volume that does not exist', fields: { targetVolumeName: 'nosuchvol' }, code: 'ERROR_CODE_UNKNOWN_VOLUME' },
      { name: 'source larger than the target', fields: { sizeBytes: deviceBytes + sectorBytes }, code: 'ERROR_CODE_TARGET_TOO_SMALL' },
      { name: 'a primary volume', fields: { targetVolumeName: 'prim0', sizeBytes: MiB }, code: 'ERROR_CODE_NOT_A_MIRROR' },
      { name: 'other sector size', fields: { logicalSectorBytes: 4096 }, code: 'ERROR_CODE_SECTOR_SIZE_MISMATCH' },
      { name: 'other protocol version', fields: { protocolVersion: PROTOCOL_VERSION + 1 }, code: 'ERROR_CODE_UNSUPPORTED_VERSION' },
      { name: 'no generation', fields: { generationIds: [] }, code: 'ERROR_CODE_PROTOCOL' },
    ];
    for (const c of cases) {
      const peer = await FakePeer.connect(t, port);
      await peer.authenticate(goodAuth);
      const reply = await peer.hello(goodHello({ volumeUuid: crypto.randomUUID(), ...c.fields }));
      t.equal(reply.accepted, false, `${c.name}: refused`);
      t.equal(reply.error?.code, c.code, `${c.name}: ${c.code}`);
      // Writing anyway gets nowhere.
      if (!peer.socket.destroyed) peer.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 0xee));
      const closed = await peer.untilClosed();
      t.same(closed.frames.map((frame) => frame.message.kind), [], `${c.name}: nothing after the refusal`);
      await expectWarning(t, peer.localAddress, { msg: 'replication hello refused', code: c.code, peer: 'hostA' });
    }
    await assertServing(t);
    assertDeviceIsModel(t, 'refused hellos');
  });

  await t.test('6. a well-behaved session, then a second source identity is refused', async (t) => {
    const peer = await openSession(t);
    const offset = MiB;
    const data = pattern(offset, 64 * KiB, 7);
    peer.send(wireMessage('write', { sequence: 1, offsetBytes: offset, lengthBytes: data.length, flags: 0 }), data);
    peer.send(wireMessage('flush', { sequence: 2 }));
    t.same(await peer.expect('writeAck'), { sequence: 1, status: 'STATUS_OK' }, 'WriteAck STATUS_OK');
    t.same(await peer.expect('flushAck'), { sequence: 2, status: 'STATUS_OK' }, 'FlushAck STATUS_OK');
    t.ok(readDevice(offset, data.length).equals(data), 'the device holds the written pattern');
    data.copy(expected, offset);
    assertDeviceIsModel(t, 'nothing but the 64 KiB changed');
    t.equal((await daemon.request('status')).replicationSessions, 1, 'one session listed in status');

    // Same peer, another source volume: the mirror volume belongs to the first one.
    const other = await FakePeer.connect(t, port);
    await other.authenticate(goodAuth);
    const reply = await other.hello(goodHello({ volumeUuid: crypto.randomUUID(), volumeName: 'other' }));
    t.equal(reply.accepted, false, 'second identity refused');
    t.equal(reply.error?.code, 'ERROR_CODE_TARGET_BUSY');
    t.match(reply.error?.message ?? '', sourceUuid, 'the refusal names the bound source');
    await other.untilClosed();
    await expectWarning(t, other.localAddress, { msg: 'replication hello refused', code: 'ERROR_CODE_TARGET_BUSY' });

    // The bound source's session was not disturbed by the refusal.
    const more = pattern(offset + data.length, 4096, 8);
    peer.send(wireMessage('write', { sequence: 3, offsetBytes: offset + data.length, lengthBytes: more.length, flags: WriteFlag.FUA }), more);
    t.same(await peer.expect('writeAck'), { sequence: 3, status: 'STATUS_OK' }, 'the bound session still writes');
    more.copy(expected, offset + data.length);
    await peer.end();

    // A reconnect of the bound source is told its generation is known (a resume).
    const again = await FakePeer.connect(t, port);
    await again.authenticate(goodAuth);
    const resumed = await again.hello(goodHello());
    t.equal(resumed.accepted, true, 'the bound source is accepted again');
    t.same(resumed.generationIds, [1], 'the bound generation is known on reconnect');
    await again.end();
    await assertServing(t);
    assertDeviceIsModel(t, 'after the second identity');
    await waitNoSessions(t);
  });

  await t.test('7. a promoted (diverged) volume: reported in the reply, never written, resolved only when demoted', async (t) => {
    const promoted = await cliJson(daemon, ['volume', 'promote', 'vol0']);
    t.match(promoted, { promoted: true, divergence: { divergedBytes: 0 } }, 'promoted, nothing written yet');
    const own: number = promoted.divergence.generation;
    const peer = await openSession(t);
    t.equal(peer.reply?.diverged, true, 'the reply says diverged');
    t.equal(peer.reply?.promoted, true, 'and still promoted');
    t.same(peer.reply?.generationIds, [own, 1], 'its own generation first, then the source\'s');
    // A bitmap: one part, every region clean (no client wrote).
    peer.send(wireMessage('bitmapRequest', { sequence: 1 }));
    const part = await peer.expectFrame('bitmapExchange');
    t.match(part.message.body, { sequence: 1, regionBytes: 64 * KiB, firstRegion: 0, regionCount: deviceBytes / (64 * KiB), last: true });
    t.ok(part.payload?.equals(Buffer.alloc(deviceBytes / (64 * KiB) / 8)), 'no region marked');
    // Reads for a restore: the bytes on the device.
    peer.send(wireMessage('resyncRequest', { sequence: 2, ranges: [{ offsetBytes: 3 * MiB, lengthBytes: 64 * KiB }] }));
    const data = await peer.expectFrame('resyncData');
    t.match(data.message.body, { sequence: 2, offsetBytes: 3 * MiB, lengthBytes: 64 * KiB });
    t.ok(data.payload?.equals(expected.subarray(3 * MiB, 3 * MiB + 64 * KiB)), 'resync data is the device\'s bytes');
    // Resolve while promoted: refused.
    peer.send(wireMessage('resolve', { sequence: 3, generation: 1 }));
    t.same(await peer.expect('flushAck'), { sequence: 3, status: 'STATUS_READ_ONLY' }, 'no resolve while promoted');
    // A write ends the session before it touches the device.
    peer.send(wireMessage('write', { sequence: 4, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096, 0xee));
    assertOnlyRefusals(t, await peer.untilClosed(), 'ERROR_CODE_SPLIT_BRAIN');
    assertDeviceIsModel(t, 'a write to a diverged volume');

    await t.test('a resync request past the end or too large is dropped', async (t) => {
      for (const ranges of [[{ offsetBytes: deviceBytes - 4096, lengthBytes: 8192 }], [{ offsetBytes: 0, lengthBytes: 9 * MiB }]]) {
        const bad = await openSession(t);
        bad.send(wireMessage('resyncRequest', { sequence: 1, ranges }));
        assertOnlyRefusals(t, await bad.untilClosed(), 'ERROR_CODE_PROTOCOL');
      }
    });

    const demoted = await cliJson(daemon, ['volume', 'demote', 'vol0']);
    t.match(demoted, { promoted: false, divergence: { generation: own } }, 'demoted; the divergence stays');
    const resolver = await openSession(t);
    t.equal(resolver.reply?.diverged, true);
    t.equal(resolver.reply?.promoted, false);
    resolver.send(wireMessage('resolve', { sequence: 1, generation: 1 }));
    t.same(await resolver.expect('flushAck'), { sequence: 1, status: 'STATUS_OK' }, 'resolved once demoted');
    // The same session now writes like any other.
    const original = expected.subarray(0, 4096);
    resolver.send(wireMessage('write', { sequence: 2, offsetBytes: 0, lengthBytes: 4096, flags: WriteFlag.FUA }), original);
    t.same(await resolver.expect('writeAck'), { sequence: 2, status: 'STATUS_OK' }, 'writes are applied after the resolve');
    await resolver.end();
    t.match(await cliJson(daemon, ['volume', 'info', 'vol0']), { promoted: false, divergence: null }, 'the divergence is gone');
    const resumed = await openSession(t);
    t.same(resumed.reply?.generationIds, [1], 'the source\'s generation is known again');
    t.equal(resumed.reply?.diverged, false);
    await resumed.end();
    await assertServing(t);
    assertDeviceIsModel(t, 'after the split brain was resolved');
    await waitNoSessions(t);
  });

  t.ok(daemon.running, 'the daemon is still running');
  // Nothing bad reached the device layer (a failed apply would be logged at error level).
  t.same(daemon.logs().filter((entry) => (entry.level as number) >= 50), [], 'no error-level log lines');
  t.same(await daemon.stop(), { code: 0, signal: null }, 'and stops cleanly');
});
