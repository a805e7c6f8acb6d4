// What a target host's power loss leaves of an async mirror, whose device has a volatile cache.
// With replication.epochFlush the target flushes its device at every epoch boundary, so it keeps
// a prefix of the writes; by default it does not (the source resends what the target had not
// flushed when it reconnects). In-process rig (test/helpers/fake-source.ts) with a volatile
// target that tracks unflushed writes.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import type { Mirror } from '../../src/replication/mirror';
import { captureLogger, FakeSource, FakeTarget, startMirror, startTarget, waitFor, type LogLine } from '../helpers/fake-source';

const KiB = 1024;
/** Distinct 64 KiB regions, so no write waits for another through an overlap. */
const offsets = Array.from({ length: 24 }, (_, index) => (256 + index * 64) * KiB);

function driverDeaths(logs: LogLine[]): string[] {
  return logs.filter((line) => line.msg === 'mirror driver failed').map((line) => JSON.stringify(line.err));
}

/** At each of `ours`' arrival on the target's device: which earlier ones of `ours` are not durable. */
function watchUndurable(target: FakeTarget, ours: Set<number>): string[] {
  const undurable: string[] = [];
  target.beforeWrite = (offsetBytes) => {
    if (!ours.has(offsetBytes)) return;
    const pending = target.unflushedOffsets().filter((other) => ours.has(other) && other !== offsetBytes);
    if (pending.length > 0) undurable.push(`write at ${offsetBytes} found ${pending.join(', ')} unflushed`);
  };
  return undurable;
}

/** An async mirror from an in-memory source to a volatile in-memory target. */
async function asyncMirror(t: Test, epochFlush: boolean): Promise<{ logs: LogLine[]; target: FakeTarget; source: FakeSource; mirror: Mirror }> {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget({ volatile: true });
  const { port } = await startTarget(t, target, { logger, epochFlush });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { mode: 'async' } });
  return { logs, target, source, mirror };
}

/** Dependent writes at `offsets`, each issued once the previous one was acknowledged (async:
 *  once local), so each starts an epoch; returns the epochs and the target's flushes meanwhile. */
async function dependentWrites(t: Test, source: FakeSource, target: FakeTarget, mirror: Mirror): Promise<{ epochs: number; flushes: number }> {
  const flushesBefore = target.flushes;
  const epochsBefore = mirror.info().async?.epochs ?? 0;
  for (const offset of offsets) await source.write(offset, randomBytes(4 * KiB));
  await waitFor(() => source.data.equals(target.data), 'source == target');
  const epochs = (mirror.info().async?.epochs ?? 0) - epochsBefore;
  t.ok(epochs >= offsets.length - 1, `the writes started ${epochs} epochs`);
  return { epochs, flushes: target.flushes - flushesBefore };
}

t.test('async mode with epochFlush: a write of a new epoch lands only after the earlier epochs were flushed', async (t) => {
  const { logs, target, source, mirror } = await asyncMirror(t, true);
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC in async mode');

  const undurable = watchUndurable(target, new Set(offsets));
  const { flushes } = await dependentWrites(t, source, target, mirror);
  t.same(undurable, [], 'no write reached the device while an earlier epoch was not flushed');
  t.ok(flushes >= offsets.length - 1, `the target flushed between the epochs (${flushes} flushes)`);
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('async mode, default: no flush between epochs', async (t) => {
  const { logs, target, source, mirror } = await asyncMirror(t, false);
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC in async mode');
  const { epochs, flushes } = await dependentWrites(t, source, target, mirror);
  // Only the source's periodic flush (one a second) may have run meanwhile.
  t.ok(flushes < epochs / 2, `no flush per epoch (${flushes} flushes for ${epochs} epochs)`);
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('async mode with epochFlush: when the flush between two epochs fails, the later epoch is not applied', async (t) => {
  const { logs, target, source, mirror } = await asyncMirror(t, true);
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && !target.hasUnflushed, 'INSYNC in async mode, flushed');

  const [first, second] = offsets as [number, number];
  const A = randomBytes(4 * KiB);
  const B = randomBytes(4 * KiB);
  let failed = false;
  let appliedAfterFailure = false;
  target.beforeWrite = (offsetBytes) => {
    if (failed && offsetBytes === second) appliedAfterFailure = true;
  };
  // B right after A: the source's periodic flush (every second) must not take the injected failure.
  await source.write(first, A);
  target.beforeFlush = () => {
    target.beforeFlush = () => undefined;
    failed = true;
    throw Object.assign(new Error('injected flush failure'), { code: 'EIO' });
  };
  await source.write(second, B); // a new epoch: the target must flush A first, and that fails
  await waitFor(() => failed, 'the flush between the epochs was attempted');
  // Usually the epoch's flush takes the failure; rarely the source's periodic flush comes first.
  await waitFor(() => logs.some((line) => line.msg === 'flushing the mirror volume between two epochs failed' || line.msg === 'flushing the mirror volume failed'), 'the failure is logged');
  // A target that cannot write is a severe failure: the mirror waits for the admin in ERROR.
  await waitFor(() => mirror.info().state === 'ERROR', 'the mirror in ERROR');
  t.equal(mirror.info().error?.code, 'BM_ERR_TARGET_IO', 'with the target I/O error as its reason');
  t.notOk(appliedAfterFailure, 'B was not written while A might not be durable');
  t.notOk(target.data.subarray(second, second + B.length).equals(B), 'the target does not hold B');
  t.ok(mirror.info().dirtyBytes > 0, 'B\'s region stays dirty at the source, to be resent');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});
