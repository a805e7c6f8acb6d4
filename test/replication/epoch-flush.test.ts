// Async mode's epochs are separated by a flush on the target: a write of a new epoch reaches the
// target's device only once every earlier epoch's writes are durable. Without it a target host
// losing power could keep a later write in its device's cache and lose an earlier one the source
// had acknowledged before issuing the later: a device the source never passed through.
// In-process rig (test/helpers/fake-source.ts) with a volatile target that tracks unflushed writes.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { captureLogger, FakeSource, FakeTarget, startMirror, startTarget, waitFor, type LogLine } from '../helpers/fake-source';

const KiB = 1024;
/** Distinct 64 KiB regions, so no write waits for another through an overlap. */
const offsets = Array.from({ length: 24 }, (_, index) => (256 + index * 64) * KiB);

function driverDeaths(logs: LogLine[]): string[] {
  return logs.filter((line) => line.msg === 'mirror driver failed').map((line) => JSON.stringify(line.err));
}

t.test('async mode: a write of a new epoch lands only after the earlier epochs were flushed', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget({ volatile: true });
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { mode: 'async' } });
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0, 'INSYNC in async mode');

  // At each of our writes' arrival on the device: which of our earlier writes are not durable.
  const ours = new Set(offsets);
  const undurable: string[] = [];
  target.beforeWrite = (offsetBytes) => {
    if (!ours.has(offsetBytes)) return;
    const pending = target.unflushedOffsets().filter((other) => ours.has(other));
    if (pending.length > 0) undurable.push(`write at ${offsetBytes} found ${pending.join(', ')} unflushed`);
  };
  const flushesBefore = target.flushes;
  const epochsBefore = mirror.info().async?.epochs ?? 0;
  // Dependent writes: each issued once the previous one was acknowledged (async: once local),
  // so each starts an epoch.
  for (const offset of offsets) await source.write(offset, randomBytes(4 * KiB));
  await waitFor(() => source.data.equals(target.data), 'source == target');
  const epochs = (mirror.info().async?.epochs ?? 0) - epochsBefore;
  t.ok(epochs >= offsets.length - 1, `the writes started ${epochs} epochs`);
  t.same(undurable, [], 'no write reached the device while an earlier epoch was not flushed');
  t.ok(target.flushes - flushesBefore >= offsets.length - 1, `the target flushed between the epochs (${target.flushes - flushesBefore} flushes)`);
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});

t.test('async mode: when the flush between two epochs fails, the later epoch is not applied', async (t) => {
  const { logger, logs } = captureLogger();
  const target = new FakeTarget({ volatile: true });
  const { port } = await startTarget(t, target, { logger });
  const source = new FakeSource();
  const { mirror } = startMirror(t, source, () => port, { logger, record: { mode: 'async' } });
  await waitFor(() => mirror.info().state === 'INSYNC' && mirror.info().dirtyBytes === 0 && !target.hasUnflushed, 'INSYNC in async mode, flushed');

  const [first, second] = offsets as [number, number];
  const A = randomBytes(4 * KiB);
  const B = randomBytes(4 * KiB);
  let failed = false;
  let appliedAfterFailure = false;
  target.beforeWrite = (offsetBytes) => {
    if (failed && offsetBytes === second) appliedAfterFailure = true;
  };
  await source.write(first, A);
  await waitFor(() => target.unflushedOffsets().includes(first), 'A on the target, not flushed');
  target.beforeFlush = () => {
    target.beforeFlush = () => undefined;
    failed = true;
    throw Object.assign(new Error('injected flush failure'), { code: 'EIO' });
  };
  await source.write(second, B); // a new epoch: the target must flush A first, and that fails
  await waitFor(() => failed, 'the flush between the epochs was attempted');
  await waitFor(() => logs.some((line) => line.msg === 'flushing the mirror volume between two epochs failed'), 'the failure is logged');
  // A target that cannot write is a severe failure: the mirror waits for the admin in ERROR.
  await waitFor(() => mirror.info().state === 'ERROR', 'the mirror in ERROR');
  t.equal(mirror.info().error?.code, 'BM_ERR_TARGET_IO', 'with the target I/O error as its reason');
  t.notOk(appliedAfterFailure, 'B was not written while A might not be durable');
  t.notOk(target.data.subarray(second, second + B.length).equals(B), 'the target does not hold B');
  t.ok(mirror.info().dirtyBytes > 0, 'B\'s region stays dirty at the source, to be resent');
  t.same(driverDeaths(logs), [], 'no driver failure logged');
});
