// Races and failures on the replication data path, each one a review finding reproduced by an
// experiment before it was fixed: a Hello answered too late, a link dropping around a forwarded
// write (strict and crash-consistent), a local write failing after the target got the bytes, a
// volume answering before its replica let go of the payload, an unwritable state dir, a strict
// mirror's held write when the target forgot the generation, one write the target never
// finishes while others are acknowledged, a source read failing during the copy, a sync write
// overtaking async writes still in flight after a mode switch, and restored regions counted
// clean before the restore was flushed, a target failing to record a resolve (client writes
// held across the retry), and a mirror loaded in ERROR persisting from its constructor. A real Mirror and ReplicationServer run in-process
// over 127.0.0.1 with in-memory volumes
// (test/helpers/fake-source.ts); link cuts go through test/helpers/tcp-proxy.ts.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import type { VolumeDivergence } from '../../src/daemon/volume-manager';
import { DirtyBitmap } from '../../src/native/index';
import { REGION_BYTES } from '../../src/replication/mirror';
import { Capability } from '../../src/wire/index';
import type { VolumeReplica } from '../../src/volume/replica';
import { Volume } from '../../src/volume/volume';
import { deferred } from '../helpers/async';
import { captureLogger, FakeSource, FakeTarget, SIZE_BYTES, settlesWithin, startMirror, startTarget, waitFor, type LogLine } from '../helpers/fake-source';
import { scratchDevice } from '../helpers/loop';
import { startTcpProxy } from '../helpers/tcp-proxy';

const KiB = 1024;

function driverDeaths(logs: LogLine[]): string[] {
  return logs.filter((line) => line.msg === 'mirror driver failed').map((line) => JSON.stringify(line.err));
}

function slice(buffer: Buffer, offsetBytes: number, lengthBytes: number): Buffer {
  return buffer.subarray(offsetBytes, offsetBytes + lengthBytes);
}

/** A target promoted and written while apart: 0xee everywhere, its divergence record covering
 *  the first `dirtyBytes`. */
function divergedTarget(dirtyBytes: number, generation: number): { target: FakeTarget; divergence: VolumeDivergence } {
  const target = new FakeTarget();
  target.data.fill(0xee);
  const bits = new DirtyBitmap(SIZE_BYTES, REGION_BYTES);
  bits.setRange(0, dirtyBytes);
  return { target, divergence: { generation, promoted: false, bits } };
}

/** A mirror record saved in ERROR split brain, after its full copy. */
const inSplitBrain = { fullCopyDone: true, error: { code: 'BM_ERR_SPLIT_BRAIN' as const, reason: 'split brain (test)' } };

t.test('a target that does not answer within connectTimeoutMs (stalled path): RESET with BM_ERR_AUTH_TIMEOUT, retried until it answers in time', async (t) => {
  // (The target records a binding only at the first flush now, so the Hello itself cannot be
  // slowed from the target side; a stalled path times out the same connection step.)
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const proxy = await startTcpProxy(t, port);
  proxy.stall();
  const source = new FakeSource();
  source.data.set(randomBytes(64 * KiB), 512 * KiB);
  const { mirror } = startMirror(t, source, () => proxy.port, { logger, timing: { connectTimeoutMs: 300 } });

  const timeouts = (): LogLine[] => logs.filter((line) => line.msg === 'mirror MAKEPARTS -> RESET' && line.code === 'BM_ERR_AUTH_TIMEOUT');
  await waitFor(() => timeouts().length >= 2, 'two connection attempts timed out (RESET, BM_ERR_AUTH_TIMEOUT)', 5000);
  t.ok(
    mirror.info().history.some((entry) => entry.from === 'MAKEPARTS' && entry.to === 'RESET' && entry.code === 'BM_ERR_AUTH_TIMEOUT'),
    'mirror status shows MAKEPARTS -> RESET with code BM_ERR_AUTH_TIMEOUT',
  );
  t.ok(
    mirror.info().history.some((entry) => entry.from === 'RESET' && entry.to === 'INIT' && entry.event === 'retryDue'),
    'and a retry after the backoff',
  );
  t.same(driverDeaths(logs), [], 'the driver did not die');

  proxy.resume();
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

t.test('strict mirror: a client flush while the mirror resyncs with the link up completes only once it is INSYNC again', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { onDisconnect: 'block' } });
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC after the full copy');

  // Suspended (the admin's explicit choice to run unprotected): the write only marks its region.
  mirror.suspend();
  const offset = 1024 * KiB;
  const W = randomBytes(4 * KiB);
  await source.write(offset, W);
  t.ok(mirror.info().dirtyBytes > 0, 'the write is dirty, not on the target');
  // The copier is slow to deliver that region.
  target.beforeWrite = (offsetBytes) => (offsetBytes === offset ? sleep(400).then(() => undefined) : undefined);
  mirror.resume(); // strict again
  await waitFor(() => mirror.info().linkUp && (mirror.info().state === 'OUTOFSYNC' || mirror.info().state === 'REPLICATE'), 'resyncing with the link up');
  let stateAtFlush: string | undefined;
  let targetHeldW: boolean | undefined;
  await source.clientFlush().then(() => {
    stateAtFlush = mirror.info().state;
    targetHeldW = slice(target.data, offset, W.length).equals(W);
  });
  t.equal(stateAtFlush, 'INSYNC', 'the flush completed only once the mirror was INSYNC');
  t.equal(targetHeldW, true, 'and the target held the write it covers');
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

t.test('strict mirror: a write held because its forward was lost goes on once the reconnect starts a full copy (the target forgot the generation), not after the copy', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port, forget } = await startTarget(t, target, { logger });
  const proxy = await startTcpProxy(t, port);
  const source = new FakeSource();
  source.data.set(randomBytes(512 * KiB), 1024 * KiB);
  // ackTimeoutMs well above how long the test keeps the copy's writes waiting on the target.
  const { mirror } = startMirror(t, source, () => proxy.port, { logger, record: { onDisconnect: 'block' }, timing: { ackTimeoutMs: 5000 } });
  const copyGate = deferred();
  t.teardown(() => copyGate.resolve());
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC after the full copy');
  t.ok(mirror.info().fullCopyDone, 'full copy done: the mirror is strict now');

  const offset = 64 * KiB;
  const W = randomBytes(4 * KiB);
  let cut = false;
  target.beforeWrite = async (offsetBytes, data) => {
    if (!cut) {
      if (offsetBytes !== offset || data.length !== W.length) return;
      cut = true;
      // The target volume is removed and added again (it forgets our generation) and the link
      // drops with W forwarded but not applied; for a while the target is unreachable.
      forget();
      proxy.refuse(true);
      proxy.cut();
      throw new Error('link cut before the write was applied');
    }
    await copyGate.promise; // the next full copy's writes wait until the test lets them go
  };
  // What the mirror and the target were doing when the client got its answer.
  let atAnswer: { state: string; targetHeldW: boolean } | undefined;
  const outcome = source.write(offset, W).then(
    () => {
      atAnswer = { state: mirror.info().state, targetHeldW: slice(target.data, offset, W.length).equals(W) };
      return 'ok';
    },
    (error: Error) => error.message,
  );
  await waitFor(() => cut, 'W forwarded and the link cut');
  t.notOk(await settlesWithin(outcome, 300), 'while the target is unreachable the strict mirror holds W');

  proxy.refuse(false);
  await waitFor(() => mirror.info().state === 'REPLICATE', 'REPLICATE: the reconnect found the generation forgotten, full copy', 3000);
  t.notOk(mirror.info().fullCopyDone, 'the full copy starts again: the mirror is not strict until it is done');
  t.ok(await settlesWithin(outcome, 1500), 'W is answered once the full copy starts, without waiting for it');
  copyGate.resolve(); // (if W was still held, it is answered at the end of the copy: no hang)
  t.equal(await outcome, 'ok', 'W succeeds');
  t.equal(atAnswer?.state, 'REPLICATE', 'the full copy was still running when W was answered');
  t.equal(atAnswer?.targetHeldW, false, 'the target did not hold W yet (the copy had not got there)');
  await waitFor(
    () => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && source.data.equals(target.data),
    'INSYNC with source == target after the full copy',
    5000,
  );
  // From the log: mirror status keeps only the last 10 transitions, and the retries while the
  // target was unreachable may have pushed these out.
  const lost = logs.findIndex((line) => line.msg === 'mirror INSYNC -> OUTOFSYNC' && line.event === 'connectionLost');
  t.ok(lost >= 0, 'the link was lost in INSYNC');
  t.ok(
    logs.slice(lost + 1).some((line) => line.msg === 'mirror READY -> REPLICATE' && line.event === 'fullCopyNeeded'),
    'and the reconnect started a full copy',
  );
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a write the target never finishes cracks the link within about 2 x ackTimeoutMs while other writes are acknowledged; it completes for the client and the devices end equal', async (t) => {
  const ackTimeoutMs = 800;
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, timing: { ackTimeoutMs } });
  const stuck = deferred();
  let writing = true;
  t.teardown(() => {
    writing = false;
    stuck.resolve(); // else the target server waits for the stuck write at close
  });
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC after the full copy');

  const offset = 64 * KiB;
  const W = randomBytes(4 * KiB);
  let stuckAtMs: number | undefined;
  target.beforeWrite = async (offsetBytes) => {
    if (offsetBytes !== offset || stuckAtMs !== undefined) return;
    stuckAtMs = performance.now();
    await stuck.promise; // the target's device never finishes this write (until the test says so)
  };
  const outcome = source.write(offset, W).then(
    () => 'ok',
    (error: Error) => error.message,
  );
  await waitFor(() => stuckAtMs !== undefined, 'W reached the target');
  const appliedAtStuck = target.writes;
  // Other writes keep being acknowledged (continue mode: each is answered once the target acks).
  const background = (async () => {
    for (let i = 0; writing; i++) {
      await source.write(1024 * KiB + (i % 16) * 64 * KiB, randomBytes(4 * KiB));
      await sleep(40);
    }
  })();
  await waitFor(() => !mirror.info().linkUp, `the link cracked within 2 x ackTimeoutMs (${2 * ackTimeoutMs} ms) and a bit`, 2 * ackTimeoutMs + 1200);
  const crackedAfterMs = performance.now() - (stuckAtMs ?? 0);
  const othersAcked = target.writes - appliedAtStuck;
  writing = false;
  await background;
  t.ok(crackedAfterMs <= 2 * ackTimeoutMs + 800, `cracked ${Math.round(crackedAfterMs)} ms after W reached the target (2 x ackTimeoutMs = ${2 * ackTimeoutMs})`);
  t.ok(othersAcked >= 10, `meanwhile the target acknowledged ${othersAcked} other writes`);
  t.ok(logs.some((line) => line.msg === 'target did not acknowledge in time; closing the link'), 'the ack timeout closed the link');
  t.ok(
    mirror.info().history.some((entry) => entry.from === 'INSYNC' && entry.to === 'OUTOFSYNC' && entry.event === 'connectionLost'),
    'INSYNC -> OUTOFSYNC (connectionLost)',
  );
  t.ok(await settlesWithin(outcome, 1000), 'the stuck write is answered once the link cracked');
  t.equal(await outcome, 'ok', 'and succeeds (continue mode: its region is dirty for the resync)');

  // The target's device recovers: the old session drains, the source reconnects and resyncs.
  stuck.resolve();
  await waitFor(
    () => mirror.info().state === 'INSYNC' && mirror.info().linkUp && mirror.info().dirtyBytes === 0 && source.data.equals(target.data),
    'INSYNC with source == target after the target recovered',
    5000,
  );
  t.ok(slice(target.data, offset, W.length).equals(W), 'the target holds W');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a source read failing during the copy: ERROR BM_ERR_SOURCE_IO naming the offset, not a retry loop', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  source.data.set(randomBytes(4 * 1024 * KiB));
  const badOffset = 2048 * KiB;
  let broken = true;
  let failedReads = 0;
  source.beforeRead = (offsetBytes, lengthBytes) => {
    if (!broken || badOffset < offsetBytes || badOffset >= offsetBytes + lengthBytes) return;
    failedReads++;
    throw Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO', syscall: 'read' });
  };
  const { mirror, saved } = startMirror(t, source, () => port, { logger });

  await waitFor(() => mirror.info().state === 'ERROR', 'ERROR after the failed read', 3000);
  const info = mirror.info();
  t.equal(info.error?.code, 'BM_ERR_SOURCE_IO', 'error code BM_ERR_SOURCE_IO');
  t.match(info.error?.reason ?? '', /\b2097152\b/, `the reason names the offset: ${info.error?.reason ?? ''}`);
  t.equal(saved().error?.code, 'BM_ERR_SOURCE_IO', 'the error is persisted (it survives a restart)');
  // Many backoff periods (20..200 ms): a retrying mirror would read again and again.
  await sleep(600);
  t.equal(failedReads, 1, 'the failing range was read once, not retried in a loop');
  t.equal(mirror.info().state, 'ERROR', 'the mirror waits in ERROR for the admin');
  t.equal(mirror.info().error?.code, 'BM_ERR_SOURCE_IO', 'still with BM_ERR_SOURCE_IO');

  // The admin repairs the source and resumes: the copy completes.
  broken = false;
  mirror.resume();
  await waitFor(
    () => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && source.data.equals(target.data),
    'INSYNC with source == target after the resume',
    5000,
  );
  t.equal(mirror.info().error, null, 'the error is cleared');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('async -> sync under load: a sync write acknowledged to the client is on the target after the async writes acknowledged before it', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { mode: 'async' } });
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC in async mode');

  const asyncOffset = 128 * KiB;
  const syncOffset = 1024 * KiB; // another region: only the epoch can order the two
  const A = randomBytes(4 * KiB);
  const S = randomBytes(4 * KiB);
  // The target is slow to apply the async write: it is still in flight after the switch.
  target.beforeWrite = (offsetBytes) => (offsetBytes === asyncOffset ? sleep(300).then(() => undefined) : undefined);
  await source.write(asyncOffset, A); // async: acknowledged once local
  t.notOk(slice(target.data, asyncOffset, A.length).equals(A), 'the async write is acknowledged and not yet on the target');
  mirror.set({ mode: 'sync' });
  await source.write(syncOffset, S); // sync: acknowledged once the target has it
  t.ok(slice(target.data, syncOffset, S.length).equals(S), 'the sync write is on the target when acknowledged');
  t.ok(slice(target.data, asyncOffset, A.length).equals(A), 'and so is the async write acknowledged before it was issued');
  await waitFor(() => source.data.equals(target.data), 'source == target');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('async mode: a catch-up copy never lands on the target before an async write acknowledged before the copied write was issued', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget();
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { mode: 'async', asyncBufferBytes: 1024 * KiB } });
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC in async mode');

  const asyncOffset = 0;
  const copiedOffset = 2048 * KiB; // another region: only ordering can keep the copy behind the async write
  const A = randomBytes(1024 * KiB); // fills the async buffer
  const B = randomBytes(4 * KiB);
  let asyncOnTargetWhenCopyLanded: boolean | undefined;
  // The target applies the async write only once the copy of B's region was sent, so an
  // unordered copy would land first.
  const copiedBefore = mirror.info().sent.copyBytes + mirror.info().sent.zeroBytes;
  target.beforeWrite = async (offsetBytes) => {
    if (offsetBytes !== asyncOffset) return;
    const deadline = Date.now() + 3000;
    while (mirror.info().sent.copyBytes + mirror.info().sent.zeroBytes === copiedBefore && Date.now() < deadline) await sleep(5);
    await sleep(100); // time for the copy to arrive (and, unordered, to land)
  };
  target.afterWrite = (offsetBytes) => {
    if (offsetBytes === copiedOffset) asyncOnTargetWhenCopyLanded ??= slice(target.data, asyncOffset, A.length).equals(A);
  };
  await source.write(asyncOffset, A); // acknowledged once local, in flight to the target
  await source.write(copiedOffset, B); // issued after A was acknowledged: the buffer is full, so it only marks its region
  t.ok(mirror.info().dirtyBytes > 0, 'the second write went to the bitmap (buffer full)');
  await waitFor(() => asyncOnTargetWhenCopyLanded !== undefined, 'the copy of the second write landed');
  t.equal(asyncOnTargetWhenCopyLanded, true, 'when the copy carrying B landed, A was already on the target');
  await waitFor(() => mirror.info().dirtyBytes === 0 && mirror.info().async?.ordered === true && source.data.equals(target.data), 'caught up: source == target, ordered');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a target without ordered writes (an older daemon): an async mirror goes to ERROR BM_ERR_TARGET_UNSUPPORTED, and a sync one cannot be switched to async', async (t) => {
  const { logger, logs } = captureLogger();
  const olderTarget = new FakeTarget();
  const { port } = await startTarget(t, olderTarget, { logger, capabilities: Capability.BITMAP_EXCHANGE });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger });
  await waitFor(() => mirror.info().state === 'INSYNC', 'INSYNC in sync mode');
  t.throws(() => mirror.set({ mode: 'async' }), { code: 'BM_ERR_TARGET_UNSUPPORTED' }, 'the switch to async is refused');
  t.equal(mirror.info().mode, 'sync', 'the mirror stays in sync mode');

  const other = new FakeTarget();
  const second = await startTarget(t, other, { logger, capabilities: Capability.BITMAP_EXCHANGE });
  const { mirror: asyncMirror } = startMirror(t, new FakeSource(), () => second.port, { logger, record: { mode: 'async' } });
  await waitFor(() => asyncMirror.info().state === 'ERROR', 'ERROR at connect');
  t.equal(asyncMirror.info().error?.code, 'BM_ERR_TARGET_UNSUPPORTED');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('resolve --discard this: the restored regions stay dirty until the source device is flushed', async (t) => {
  const { logger, logs } = captureLogger();
  const diverged = divergedTarget(1024 * KiB, 77);
  const target = diverged.target;
  let divergence: VolumeDivergence | undefined = diverged.divergence;
  const { port } = await startTarget(t, target, {
    logger,
    divergence: () => divergence,
    resolveDivergence: async () => {
      divergence = undefined;
    },
  });
  const source = new FakeSource();
  source.data.fill(0x11);
  let dirtyAtFlush: number | undefined;
  const { mirror } = startMirror(t, source, () => port, { logger, record: inSplitBrain });
  source.onFlushLocal = () => {
    dirtyAtFlush ??= mirror.info().dirtyBytes;
  };
  t.equal(mirror.info().state, 'ERROR', 'starts in ERROR split brain');
  mirror.resolve('this');
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC after the restore');
  t.equal(dirtyAtFlush, SIZE_BYTES, 'when the source device was flushed, every restored region was still dirty');
  t.ok(source.data.equals(target.data), 'the source holds the target\'s bytes');
  t.equal(divergence, undefined, 'the target resolved its divergence');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('resolve --discard this: a target that fails to record the resolve (I/O error) is retried, with client writes held until it succeeds', async (t) => {
  const { logger, logs } = captureLogger();
  const diverged = divergedTarget(256 * KiB, 78);
  const target = diverged.target;
  let divergence: VolumeDivergence | undefined = diverged.divergence;
  const W = randomBytes(4 * KiB);
  let clientWrite: Promise<void> | undefined;
  let clientDone = false;
  let doneAtRetry: boolean | undefined;
  let calls = 0;
  const { port } = await startTarget(t, target, {
    logger,
    divergence: () => divergence,
    resolveDivergence: async () => {
      calls++;
      if (calls === 1) {
        // The restore is complete and not acknowledged: a client write now must wait, or the
        // retry would restore over it.
        clientWrite = source.write(64 * KiB, W).finally(() => (clientDone = true));
        await sleep(50);
        throw Object.assign(new Error('writing the registry failed (test)'), { code: 'BM_ERR_STATE_WRITE' });
      }
      doneAtRetry = clientDone;
      divergence = undefined;
    },
  });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: inSplitBrain });
  const logsBefore = logs.length;
  mirror.resolve('this');
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && clientDone, 'INSYNC after the retried resolve, client write done');
  await clientWrite;
  t.equal(calls, 2, 'the resolve was retried once');
  t.equal(doneAtRetry, false, 'the client write was still waiting when the retry reached the target');
  const transitions = logs.slice(logsBefore).map((line) => line.msg).filter((msg) => /^mirror \w+ -> \w+$/.test(msg));
  t.ok(transitions.includes('mirror READY -> RESET'), `the failed resolve went READY -> RESET: ${transitions.join(', ')}`);
  t.notOk(transitions.some((msg) => msg.endsWith('-> ERROR')), 'and never to ERROR');
  t.ok(slice(source.data, 64 * KiB, W.length).equals(W), 'the client write survived the retried restore');
  await waitFor(() => source.data.equals(target.data), 'source == target');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('a mirror loaded in ERROR with a resolve choice left from before forgets it without persisting from its constructor', async (t) => {
  // The manager registers a mirror only after constructing it: a persist from the constructor
  // would rewrite mirrors.json without it (and without every mirror loaded after it).
  const { logger, logs } = captureLogger();
  const source = new FakeSource();
  let persisted = 0;
  const splitBrain = { detectedAt: new Date().toISOString(), peerDivergedBytes: 65536, peerPromoted: true, localDirtyBytes: 0 };
  const { mirror } = startMirror(t, source, () => 1, {
    logger,
    record: { fullCopyDone: true, error: { code: 'BM_ERR_SPLIT_BRAIN', reason: 'the target was promoted again (test)' }, resolve: 'this', splitBrain },
    persist: () => persisted++,
  });
  await sleep(100);
  t.equal(mirror.info().state, 'ERROR', 'ERROR, as saved');
  t.equal(mirror.info().splitBrain?.resolving, null, 'the old choice is not applied to the next attempt');
  t.equal(persisted, 0, 'nothing persisted while loading');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('resolve --discard this: a target that keeps failing to record the resolve: ERROR after 3 tries, and the held client write fails with EIO', async (t) => {
  const { logger, logs } = captureLogger();
  const { target, divergence } = divergedTarget(128 * KiB, 79);
  let calls = 0;
  let clientWrite: Promise<string> | undefined;
  const { port } = await startTarget(t, target, {
    logger,
    divergence: () => divergence,
    resolveDivergence: async () => {
      calls++;
      clientWrite ??= source.write(64 * KiB, randomBytes(4 * KiB)).then(
        () => 'ok',
        (error: NodeJS.ErrnoException) => error.code ?? error.message,
      );
      throw Object.assign(new Error('the state dir is read-only (test)'), { code: 'BM_ERR_STATE_WRITE' });
    },
  });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: inSplitBrain });
  mirror.resolve('this');
  await waitFor(() => mirror.info().state === 'ERROR' && calls > 0, 'ERROR after the failed resolves');
  t.equal(calls, 3, 'tried 3 times');
  t.equal(mirror.info().error?.code, 'BM_ERR_SPLIT_BRAIN');
  t.match(mirror.info().error?.reason, /failed to record the resolve 3 times/, `the reason says so: ${mirror.info().error?.reason}`);
  t.equal(await clientWrite, 'EIO', 'the client write held by the restore fails with EIO instead of waiting without bound');
  t.equal(mirror.info().splitBrain?.restoring, true, 'still restoring: a later resolve must complete before writes go on');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});
