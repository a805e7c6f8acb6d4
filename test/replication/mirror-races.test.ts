// Races and failures on the replication data path, each one a review finding reproduced by an
// experiment before it was fixed: a Hello answered too late, a link dropping around a forwarded
// write (strict and crash-consistent), a local write failing after the target got the bytes, a
// volume answering before its replica let go of the payload, and an unwritable state dir. A real
// Mirror and ReplicationServer run in-process over 127.0.0.1 with in-memory volumes
// (test/helpers/fake-source.ts); link cuts go through test/helpers/tcp-proxy.ts.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import type { VolumeReplica } from '../../src/volume/replica';
import { Volume } from '../../src/volume/volume';
import { captureLogger, FakeSource, FakeTarget, settlesWithin, startMirror, startTarget, waitFor, type LogLine } from '../helpers/fake-source';
import { scratchDevice } from '../helpers/loop';
import { startTcpProxy } from '../helpers/tcp-proxy';

const KiB = 1024;

function driverDeaths(logs: LogLine[]): string[] {
  return logs.filter((line) => line.msg === 'mirror driver failed').map((line) => JSON.stringify(line.err));
}

function slice(buffer: Buffer, offsetBytes: number, lengthBytes: number): Buffer {
  return buffer.subarray(offsetBytes, offsetBytes + lengthBytes);
}

t.test('a target that answers the hello after connectTimeoutMs: RESET with ETIMEDOUT, retried until it answers in time', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  let slow = true;
  let hellos = 0;
  let answer!: () => void;
  const answered = new Promise<void>((resolve) => (answer = resolve));
  t.teardown(() => answer());
  const { port } = await startTarget(t, target, {
    logger,
    bindSource: async () => {
      hellos++;
      if (slow) await answered; // authenticated, then the Hello waits (longer than connectTimeoutMs)
    },
  });
  const source = new FakeSource();
  source.data.set(randomBytes(64 * KiB), 512 * KiB);
  const { mirror } = startMirror(t, source, () => port, { logger, timing: { connectTimeoutMs: 300 } });

  const timeouts = (): LogLine[] => logs.filter((line) => line.msg === 'mirror MAKEPARTS -> RESET' && line.code === 'ETIMEDOUT');
  await waitFor(() => timeouts().length >= 2 && hellos >= 2, 'two hellos timed out (RESET, ETIMEDOUT)', 5000);
  t.ok(
    mirror.info().history.some((entry) => entry.from === 'MAKEPARTS' && entry.to === 'RESET' && entry.code === 'ETIMEDOUT'),
    'mirror status shows MAKEPARTS -> RESET with code ETIMEDOUT',
  );
  t.ok(
    mirror.info().history.some((entry) => entry.from === 'RESET' && entry.to === 'INIT' && entry.event === 'retryDue'),
    'and a retry after the backoff',
  );
  t.same(driverDeaths(logs), [], 'the driver did not die');

  slow = false;
  answer();
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC once the target answers in time', 5000);
  t.ok(source.data.equals(target.data), 'the target holds the source');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('strict mirror: a forwarded write whose link dropped before the target applied it is acknowledged only once the target holds it', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const proxy = await startTcpProxy(t, port);
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => proxy.port, { logger, record: { onDisconnect: 'block' } });
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC after the full copy');
  t.ok(mirror.info().fullCopyDone, 'full copy done: the mirror is strict now');

  const offset = 64 * KiB;
  const W = randomBytes(4 * KiB);
  let cut = false;
  target.beforeWrite = (offsetBytes, data) => {
    if (cut || offsetBytes !== offset || data.length !== W.length) return;
    cut = true;
    proxy.cut(); // the link drops with W in flight; the target never applies it
    throw new Error('link cut before the write was applied');
  };
  // The local write is slower than the reconnect and bitmap resync.
  let targetHeldAtAck: boolean | undefined;
  const writing = source.write(offset, W, { localMs: 600 }).then(() => {
    targetHeldAtAck = slice(target.data, offset, W.length).equals(W);
  });
  const outcome = writing.then(
    () => 'ok',
    (error: Error) => error.message,
  );
  await waitFor(() => targetHeldAtAck !== undefined || cut, 'W forwarded');
  t.ok(cut, 'the link dropped with W forwarded but not applied');
  t.equal(await outcome, 'ok', 'the write succeeds once the mirror is back in sync');
  t.equal(targetHeldAtAck, true, 'when the client got its acknowledgement, the target held W');
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && source.data.equals(target.data), 'INSYNC with source == target');
  t.ok(mirror.info().history.some((entry) => entry.event === 'connectionLost'), 'the link was really lost and re-established');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a write the target acknowledged, lost in a target crash before a flush, is resent', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget({ volatile: true });
  const { port } = await startTarget(t, target, { logger });
  const proxy = await startTcpProxy(t, port);
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => proxy.port, { logger });
  await waitFor(() => mirror.info().state === 'INSYNC' && !target.hasUnflushed, 'INSYNC with the full copy flushed');

  const offset = 128 * KiB;
  const W = randomBytes(4 * KiB);
  let crashed = false;
  target.afterWrite = (offsetBytes, data) => {
    if (offsetBytes !== offset || data.length !== W.length) return;
    target.afterWrite = () => undefined;
    // The acknowledgement goes out first; then the target host crashes: unflushed writes
    // (W) are lost and the link drops, while the source's local write is still running.
    setTimeout(() => {
      target.loseUnflushed();
      proxy.cut();
      crashed = true;
    }, 30);
  };
  await source.write(offset, W, { localMs: 600 });
  t.ok(crashed, 'the target crashed after acknowledging W, before the local write finished');
  await waitFor(
    () => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && source.data.equals(target.data),
    'INSYNC, nothing dirty, source == target',
    4000,
  );
  t.ok(slice(target.data, offset, W.length).equals(W), 'the target holds W again');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a local write that fails after it was forwarded: the range is resynced to what the source holds', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger });
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC');

  const offset = 192 * KiB;
  const W = randomBytes(4 * KiB);
  let forwarded = false;
  target.beforeWrite = (offsetBytes, data) => {
    if (offsetBytes === offset && data.equals(W)) forwarded = true;
  };
  await t.rejects(source.write(offset, W, { localMs: 20, localFails: true }), { code: 'EIO' }, 'the client sees the local failure');
  t.ok(forwarded, 'W had reached the target');
  t.ok(slice(source.data, offset, W.length).equals(Buffer.alloc(W.length)), 'the source does not hold W');
  await waitFor(
    () => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && source.data.equals(target.data),
    'INSYNC, nothing dirty, source == target',
    4000,
  );
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('volume: a client write whose local write fails is answered only after the replica is done with the payload', async (t) => {
  const device = scratchDevice(t, 4 * 1024 * KiB);
  const volume = Volume.open({ name: 'v', uuid: 'u', devicePath: device.path, readOnly: false }, pino({ level: 'silent' }));
  t.teardown(() => volume.close().catch(() => undefined));
  let localSettled = false;
  let replicaDone = false;
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  t.teardown(() => release());
  const replica: VolumeReplica = {
    admit: () => undefined,
    async replicateWrite(_offsetBytes, _data, _fua, local) {
      await local.then(
        () => undefined,
        () => undefined,
      );
      localSettled = true;
      await gate; // still sending the payload
      replicaDone = true;
    },
    replicateZeroes: async () => undefined,
    replicateFlush: async () => undefined,
  };
  volume.attachReplica(replica);
  // The device write fails (an EIO from the disk).
  const file = (volume as unknown as { file: { write: (data: Buffer, offsetBytes: number, fua: boolean) => Promise<void> } }).file;
  file.write = async () => {
    await sleep(10);
    throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', syscall: 'write' });
  };

  let replicaDoneAtAnswer: boolean | undefined;
  const outcome = volume.write(0, randomBytes(4 * KiB), false).then(
    () => {
      replicaDoneAtAnswer = replicaDone;
      return undefined;
    },
    (error: unknown) => {
      replicaDoneAtAnswer = replicaDone;
      return error;
    },
  );
  await waitFor(() => localSettled, 'the local write to fail');
  t.notOk(await settlesWithin(outcome, 100), 'local write failed, replica busy: the client still waits');
  release();
  t.match(await outcome, { code: 'EIO' }, 'then the client sees the local failure');
  t.equal(replicaDoneAtAnswer, true, 'the replica was done with the payload when the client was answered');
});

t.test('a mirror whose record cannot be persisted still reaches INSYNC and keeps replicating', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const proxy = await startTcpProxy(t, port);
  const source = new FakeSource();
  let persistFailures = 0;
  const { mirror } = startMirror(t, source, () => proxy.port, {
    logger,
    persist: (record) => {
      if (record.fullCopyDone) {
        persistFailures++;
        throw Object.assign(new Error('ENOSPC writing mirrors.json'), { code: 'BM_ERR_STATE_WRITE' });
      }
    },
  });
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC despite the failed persist', 5000);
  t.ok(persistFailures > 0, 'persisting the finished full copy failed');
  t.ok(mirror.info().fullCopyDone, 'the full copy counts as done (until a restart)');

  const first = randomBytes(8 * KiB);
  await source.write(256 * KiB, first);
  t.ok(slice(target.data, 256 * KiB, first.length).equals(first), 'a write in INSYNC reaches the target');

  // The driver is alive: a dropped link is noticed and re-established.
  proxy.cut();
  await waitFor(
    () => mirror.info().history.some((entry) => entry.event === 'connectionLost') && mirror.info().state === 'INSYNC' && mirror.info().linkUp,
    'the link lost and INSYNC again',
  );
  const second = randomBytes(8 * KiB);
  await source.write(320 * KiB, second);
  t.ok(slice(target.data, 320 * KiB, second.length).equals(second), 'and writes reach the target after the reconnect');
  t.ok(source.data.equals(target.data), 'source == target');
  t.same(driverDeaths(logs), [], 'the driver did not die');
});
