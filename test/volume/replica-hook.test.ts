// The volume's replication hook (VolumeReplica): every client write, zeroing, trim and flush is
// handed to the attached replicas inside the operation's exclusive range-lock window, and the
// client is answered only when the replicas are done. A fake replica records what it was handed
// and when, over a real O_DIRECT scratch device.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import pino from 'pino';
import { allocAligned } from '../../src/native/index';
import type { VolumeReplica } from '../../src/volume/replica';
import { Volume } from '../../src/volume/volume';
import { scratchDevice } from '../helpers/loop';
import { deferred, settlesWithin, waitFor } from '../helpers/async';

const logger = pino({ level: 'silent' });
const sizeBytes = 4 * 1024 * 1024;
const KiB = 1024;



interface DataCall {
  kind: 'write' | 'zeroes';
  offsetBytes: number;
  lengthBytes: number;
  fua: boolean;
  /** A copy of the payload as handed over (writes only). */
  data?: Buffer;
  /** Handed as a mirror's restore (restoreWrite), not a client write. */
  restore?: boolean;
  local: Promise<void>;
  localDone: boolean;
  /** Snapshot, taken when this call was made, of whether each earlier data call's local I/O had finished. */
  earlierLocalDone: boolean[];
}

type Respond = (call: DataCall) => Promise<void> | void;

class FakeReplica implements VolumeReplica {
  readonly calls: DataCall[] = [];
  flushes = 0;
  admits = 0;
  /** When set, admit() returns this promise. */
  admitGate: Promise<void> | undefined;
  /** Called inside replicateWrite/replicateZeroes; its result is what the replica returns. */
  respond: Respond = () => undefined;
  respondFlush: () => Promise<void> | void = () => undefined;

  admit(): Promise<void> | void {
    this.admits++;
    return this.admitGate;
  }

  replicateWrite(offsetBytes: number, data: Buffer, fua: boolean, local: Promise<void>, restore = false): Promise<void> {
    return this.record({ kind: 'write', offsetBytes, lengthBytes: data.length, fua, data: Buffer.from(data), local, restore });
  }

  replicateZeroes(offsetBytes: number, lengthBytes: number, fua: boolean, local: Promise<void>): Promise<void> {
    return this.record({ kind: 'zeroes', offsetBytes, lengthBytes, fua, local });
  }

  async replicateFlush(): Promise<void> {
    this.flushes++;
    await this.respondFlush();
  }

  private record(partial: Omit<DataCall, 'localDone' | 'earlierLocalDone'>): Promise<void> {
    const call: DataCall = { ...partial, localDone: false, earlierLocalDone: this.calls.map((earlier) => earlier.localDone) };
    this.calls.push(call);
    const done = (): void => {
      call.localDone = true;
    };
    call.local.then(done, done);
    return Promise.resolve(this.respond(call));
  }
}

function openVolume(t: { teardown(fn: () => void | Promise<void>): void }): Volume {
  const device = scratchDevice(t, sizeBytes);
  const volume = Volume.open({ name: 'v', uuid: 'u', devicePath: device.path, readOnly: false }, logger);
  t.teardown(() => volume.close());
  return volume;
}

async function readBack(volume: Volume, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const result = await volume.read(offsetBytes, lengthBytes);
  const copy = Buffer.from(result.data);
  result.release();
  return copy;
}



const noZeroFlags = { noHole: false, fastZero: false };

t.test('every client write, zeroing, trim and flush reaches the replica with its range and fua', async (t) => {
  const volume = openVolume(t);
  const sector = volume.info().logicalSectorBytes;
  const replica = new FakeReplica();
  volume.attachReplica(replica);

  const aligned = randomBytes(8 * KiB);
  await volume.write(16 * KiB, aligned, false);
  const unaligned = randomBytes(1000);
  await volume.write(100, unaligned, true);
  await volume.writeZeroes(64 * KiB, 12 * KiB, { fua: true, ...noZeroFlags });
  await volume.writeZeroes(128 * KiB + 7, 3000, { fua: false, ...noZeroFlags });
  // Trim on a mirrored volume: whole sectors inside the range, as zeroing.
  await volume.trim(256 * KiB + 10, 4 * sector, true);
  await volume.trim(320 * KiB, 8 * sector, false);
  // A trim that covers no whole sector does nothing, locally or remotely.
  await volume.trim(384 * KiB + 1, sector - 2, false);
  await volume.flush();

  const summary = replica.calls.map(({ kind, offsetBytes, lengthBytes, fua }) => ({ kind, offsetBytes, lengthBytes, fua }));
  t.same(summary, [
    { kind: 'write', offsetBytes: 16 * KiB, lengthBytes: 8 * KiB, fua: false },
    { kind: 'write', offsetBytes: 100, lengthBytes: 1000, fua: true },
    { kind: 'zeroes', offsetBytes: 64 * KiB, lengthBytes: 12 * KiB, fua: true },
    { kind: 'zeroes', offsetBytes: 128 * KiB + 7, lengthBytes: 3000, fua: false },
    { kind: 'zeroes', offsetBytes: 256 * KiB + sector, lengthBytes: 3 * sector, fua: true },
    { kind: 'zeroes', offsetBytes: 320 * KiB, lengthBytes: 8 * sector, fua: false },
  ]);
  t.ok(replica.calls[0]?.data?.equals(aligned), 'the aligned payload is handed over');
  t.ok(replica.calls[1]?.data?.equals(unaligned), 'the unaligned payload is handed over');
  t.ok(replica.calls.every((call) => call.localDone), 'every local promise settled');
  for (const call of replica.calls) await call.local; // and none of them rejected
  t.equal(replica.flushes, 1, 'flush reached the replica');
  t.equal(replica.admits, 6, 'every write, zeroing and non-empty trim went through admit');

  t.ok((await readBack(volume, 16 * KiB, 8 * KiB)).equals(aligned), 'local device has the aligned write');
  t.ok((await readBack(volume, 100, 1000)).equals(unaligned), 'local device has the unaligned write');
});

t.test('a replica that throws instead of rejecting: the write fails, its range stays locked until the local write is done', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const thrown = new Error('replica threw');
  replica.respond = (call) => {
    if (call.offsetBytes === 0 && replica.calls.length === 1) throw thrown;
  };
  const first = randomBytes(8 * KiB);
  const second = randomBytes(8 * KiB);
  const firstWrite = volume.write(0, first, false);
  const secondWrite = volume.write(4 * KiB, second, false);
  await t.rejects(firstWrite, thrown, 'the write that the replica refused by throwing fails with that error');
  await secondWrite;
  t.equal(replica.calls.length, 2);
  t.same(replica.calls[1]?.earlierLocalDone, [true], 'the overlapping write was handed over only after the first local write finished');
  const expected = Buffer.concat([first.subarray(0, 4 * KiB), second]);
  t.ok((await readBack(volume, 0, 12 * KiB)).equals(expected), 'the device holds both writes in order');
});

t.test('with two replicas, one that throws does not stop the other being handed the write and waited for', async (t) => {
  const volume = openVolume(t);
  const throwing = new FakeReplica();
  const slow = new FakeReplica();
  volume.attachReplica(throwing);
  volume.attachReplica(slow);
  const thrown = new Error('replica threw');
  throwing.respond = () => {
    throw thrown;
  };
  const gate = deferred<void>();
  slow.respond = () => gate.promise;
  const write = volume.write(0, randomBytes(8 * KiB), false);
  await waitFor(() => slow.calls.length === 1, 'the second replica handed the write');
  t.notOk(await settlesWithin(write, 100), 'the write waits for the replica still sending its data');
  gate.resolve();
  await t.rejects(write, thrown, 'then fails with the thrown error');
});

t.test('the client is answered only after the replica is done', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);

  for (const operation of ['write', 'writeZeroes', 'trim'] as const) {
    const gate = deferred();
    replica.respond = () => gate.promise;
    const before = replica.calls.length;
    const pending =
      operation === 'write'
        ? volume.write(0, randomBytes(4 * KiB), false)
        : operation === 'writeZeroes'
          ? volume.writeZeroes(0, 4 * KiB, { fua: false, ...noZeroFlags })
          : volume.trim(0, 4 * KiB, false);
    await waitFor(() => replica.calls.length > before, `${operation} to reach the replica`);
    await replica.calls[before]?.local;
    t.notOk(await settlesWithin(pending, 40), `${operation}: local I/O done, replica not: client still waits`);
    gate.resolve();
    await pending;
    t.pass(`${operation}: answered once the replica resolved`);
  }

  const flushGate = deferred();
  replica.respondFlush = () => flushGate.promise;
  const flushing = volume.flush();
  t.notOk(await settlesWithin(flushing, 40), 'flush waits for the replica\'s flush');
  flushGate.resolve();
  await flushing;
  replica.respondFlush = () => undefined;

  // A replica that fails a write (a strict mirror shutting down) fails the client's write, after
  // the local write: the local device has the data either way.
  const gate = deferred();
  replica.respond = () => gate.promise;
  const data = randomBytes(4 * KiB);
  const outcome = volume.write(8 * KiB, data, false).then(
    () => undefined,
    (error: unknown) => error,
  );
  await waitFor(() => replica.calls.at(-1)?.offsetBytes === 8 * KiB, 'the write to reach the replica');
  await replica.calls.at(-1)?.local;
  gate.reject(Object.assign(new Error('mirror stopping'), { code: 'ESHUTDOWN' }));
  t.match(await outcome, { code: 'ESHUTDOWN' }, 'the replica\'s error reaches the client');
  t.ok((await readBack(volume, 8 * KiB, 4 * KiB)).equals(data));
  t.equal(volume.failure(), undefined, 'a replica error does not mark the volume failed');
});

t.test('trim on a mirrored volume zeroes whole sectors and keeps the unaligned edges', async (t) => {
  const volume = openVolume(t);
  const sector = volume.info().logicalSectorBytes;
  const replica = new FakeReplica();
  const data = randomBytes(64 * KiB);
  await volume.write(0, data, false); // before attaching: not forwarded
  volume.attachReplica(replica);

  const trimStart = 1000;
  const trimLength = 40000;
  await volume.trim(trimStart, trimLength, false);
  const zeroStart = Math.ceil(trimStart / sector) * sector;
  const zeroEnd = Math.floor((trimStart + trimLength) / sector) * sector;
  const expected = Buffer.from(data);
  expected.fill(0, zeroStart, zeroEnd);
  t.ok((await readBack(volume, 0, 64 * KiB)).equals(expected), 'whole sectors read back as zeros, edges keep their data');
  t.same(
    replica.calls.map(({ kind, offsetBytes, lengthBytes, fua }) => ({ kind, offsetBytes, lengthBytes, fua })),
    [{ kind: 'zeroes', offsetBytes: zeroStart, lengthBytes: zeroEnd - zeroStart, fua: false }],
    'the replica is handed the same zeroing (replicateZeroes)',
  );
});

t.test('overlapping writes reach the replica in local order, each after the previous local write finished', async (t) => {
  const volume = openVolume(t);
  const sector = volume.info().logicalSectorBytes;
  const replica = new FakeReplica();
  volume.attachReplica(replica);

  // Every range contains [35K + 1, 35K + 101): all overlap pairwise. Some are unaligned
  // (read-modify-write).
  const ranges: Array<[number, number]> = [
    [0, 64 * KiB],
    [32 * KiB, 64 * KiB],
    [16 * KiB + 3, 20 * KiB],
    [30 * KiB, 10 * KiB + 1],
    [0, 128 * KiB],
    [35 * KiB, sector],
    [24 * KiB, 16 * KiB],
    [35 * KiB + 1, 100],
  ];
  const writes = ranges.map(([offsetBytes, lengthBytes]) => ({ offsetBytes, data: randomBytes(lengthBytes) }));
  await Promise.all(writes.map(({ offsetBytes, data }) => volume.write(offsetBytes, data, false)));

  t.equal(replica.calls.length, writes.length);
  t.same(
    replica.calls.map((call) => call.offsetBytes),
    writes.map((write) => write.offsetBytes),
    'handed over in arrival order',
  );
  replica.calls.forEach((call, i) => {
    t.same(call.earlierLocalDone, new Array(i).fill(true), `write ${i}: every earlier overlapping write had finished locally`);
  });
  // The device holds the writes applied in the order the replica saw them: the mirror, applying
  // them in that order, ends up equal.
  const model = Buffer.alloc(128 * KiB);
  for (const call of replica.calls) call.data?.copy(model, call.offsetBytes);
  t.ok((await readBack(volume, 0, 128 * KiB)).equals(model), 'local device equals the replica\'s order applied');
});

t.test('disjoint writes are not serialized against each other', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const gate = deferred();
  replica.respond = (call) => (call.offsetBytes === 0 ? gate.promise : undefined);
  const first = volume.write(0, randomBytes(4 * KiB), false);
  const second = volume.write(64 * KiB, randomBytes(4 * KiB), false);
  t.ok(await settlesWithin(second, 1000), 'a disjoint write completes while the first still waits for its replica');
  t.notOk(await settlesWithin(first, 10));
  gate.resolve();
  await first;
});

t.test('readForCopy reads only between writes: onRead runs after an overlapping write finished locally', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const lengthBytes = 64 * KiB;
  const data = randomBytes(lengthBytes);
  const buffer = allocAligned(lengthBytes, 4096);
  let copy: Promise<void> | undefined;
  let seenAtRead: { writeForwarded: boolean; writeLocalDone: boolean; bufferHoldsWrite: boolean } | undefined;
  // Start the copy read while the write holds its range (inside replicateWrite: local write
  // issued, not finished).
  replica.respond = (call) => {
    t.notOk(call.localDone, 'the write is still in progress when the copy read is issued');
    copy = volume.readForCopy(0, buffer, () => {
      seenAtRead = {
        writeForwarded: replica.calls.length === 1,
        writeLocalDone: call.localDone,
        bufferHoldsWrite: buffer.equals(data),
      };
    });
  };
  await volume.write(0, data, false);
  t.ok(copy !== undefined);
  await copy;
  t.same(seenAtRead, { writeForwarded: true, writeLocalDone: true, bufferHoldsWrite: true });
});

t.test('a write that arrives during a copy read is forwarded after onRead', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const old = randomBytes(32 * KiB);
  await volume.write(0, old, false);
  replica.calls.length = 0;

  const buffer = allocAligned(32 * KiB, 4096);
  const events: string[] = [];
  const newer = randomBytes(8 * KiB);
  replica.respond = (call) => {
    events.push(`forward ${call.offsetBytes}`);
  };
  const copy = volume.readForCopy(0, buffer, () => {
    events.push('onRead');
  });
  // Issued while the copy holds the range; the unaligned one must also wait.
  const write = volume.write(4 * KiB, newer, false);
  const unaligned = volume.write(20 * KiB + 5, Buffer.from('x'), false);
  await Promise.all([copy, write, unaligned]);
  t.same(events, ['onRead', `forward ${4 * KiB}`, `forward ${20 * KiB + 5}`], 'onRead comes before the later writes are forwarded');
  t.ok(buffer.equals(old), 'the copy read the data from before the writes');
});

t.test('admit() holding a write delays its local write', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const gate = deferred();
  replica.admitGate = gate.promise;
  const data = randomBytes(8 * KiB);
  const write = volume.write(4 * KiB, data, false);
  const zeroing = volume.writeZeroes(64 * KiB, 4 * KiB, { fua: false, ...noZeroFlags });
  t.notOk(await settlesWithin(write, 50), 'the write waits for admit');
  t.ok((await readBack(volume, 4 * KiB, 8 * KiB)).equals(Buffer.alloc(8 * KiB)), 'device unchanged while admit holds');
  t.equal(replica.calls.length, 0, 'nothing forwarded while admit holds');
  t.equal(volume.stats().writeOps, 0, 'the write has not started');
  replica.admitGate = undefined;
  gate.resolve();
  await Promise.all([write, zeroing]);
  t.ok((await readBack(volume, 4 * KiB, 8 * KiB)).equals(data), 'written once admitted');
  t.equal(replica.calls.length, 2);

  // An admit that rejects (a strict mirror stopping) fails the write without touching the device.
  replica.admitGate = Promise.reject(Object.assign(new Error('stopping'), { code: 'ESHUTDOWN' }));
  await t.rejects(volume.write(4 * KiB, randomBytes(8 * KiB), false), { code: 'ESHUTDOWN' });
  replica.admitGate = undefined;
  t.ok((await readBack(volume, 4 * KiB, 8 * KiB)).equals(data), 'device unchanged by the refused write');
  t.equal(replica.calls.length, 2, 'the refused write was not forwarded');
});

t.test('admission is asked again after any wait; drainAdmitted waits for what was let in; a restore skips admission', async (t) => {
  const volume = openVolume(t);
  const a = new FakeReplica();
  const b = new FakeReplica();
  volume.attachReplica(a);
  volume.attachReplica(b);
  // a lets the write in, b holds it; meanwhile a begins holding (a restore starting): once b
  // lets go, a must be asked again.
  const gateB = deferred();
  b.admitGate = gateB.promise;
  const write = volume.write(0, randomBytes(4 * KiB), false);
  t.notOk(await settlesWithin(write, 40), 'held by b');
  const gateA = deferred();
  a.admitGate = gateA.promise;
  b.admitGate = undefined;
  gateB.resolve();
  t.notOk(await settlesWithin(write, 40), 'still held: a was asked again after b let go');
  a.admitGate = undefined;
  gateA.resolve();
  await write;
  t.equal(a.calls.length, 1, 'written once both let it in');

  // A write let in and still running (b slow to answer) keeps drainAdmitted pending.
  const slow = deferred();
  b.respond = () => slow.promise;
  const running = volume.write(64 * KiB, randomBytes(4 * KiB), false);
  await waitFor(() => b.calls.length === 2, 'the second write handed to b');
  const drained = volume.drainAdmitted();
  t.notOk(await settlesWithin(drained, 40), 'drainAdmitted waits for the admitted write');
  slow.resolve();
  await running;
  t.ok(await settlesWithin(drained, 200), 'and settles once it is done');
  b.respond = () => undefined;

  // A restore is not a client write: it does not wait in admit() and is handed over as such.
  const holding = deferred();
  a.admitGate = holding.promise;
  const admitsBefore = a.admits;
  await volume.restoreWrite(128 * KiB, allocAligned(4 * KiB, 4096).fill(7));
  t.equal(a.admits, admitsBefore, 'restoreWrite does not ask admit()');
  t.equal(a.calls.at(-1)?.restore, true, 'handed with restore = true');
  t.equal(b.calls.at(-1)?.restore, true, 'to every replica');
  t.equal(a.calls[0]?.restore, false, 'client writes are handed with restore = false');
  a.admitGate = undefined;
  holding.resolve();
});

t.test('two replicas: both are handed every operation, the client waits for both', async (t) => {
  const volume = openVolume(t);
  const a = new FakeReplica();
  const b = new FakeReplica();
  volume.attachReplica(a);
  volume.attachReplica(b);
  t.throws(() => volume.attachReplica(a), { name: 'AssertionError' }, 'attaching the same replica twice is a bug');
  const gate = deferred();
  b.respond = () => gate.promise;
  const write = volume.write(0, randomBytes(4 * KiB), true);
  t.notOk(await settlesWithin(write, 40), 'waits for the slower replica');
  gate.resolve();
  await write;
  await volume.flush();
  t.equal(a.calls.length, 1);
  t.equal(b.calls.length, 1);
  t.equal(a.flushes, 1);
  t.equal(b.flushes, 1);
});

t.test('detachReplica stops forwarding', async (t) => {
  const volume = openVolume(t);
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  await volume.write(0, randomBytes(4 * KiB), false);
  volume.detachReplica(replica);
  const data = randomBytes(4 * KiB);
  await volume.write(0, data, false);
  await volume.write(10, Buffer.from('unaligned'), true);
  await volume.writeZeroes(64 * KiB, 4 * KiB, { fua: false, ...noZeroFlags });
  await volume.trim(128 * KiB, 4 * KiB, false);
  await volume.flush();
  t.equal(replica.calls.length, 1, 'only the write before detaching was forwarded');
  t.equal(replica.flushes, 0);
  t.equal(replica.admits, 1);
  t.ok((await readBack(volume, 0, 4 * KiB)).subarray(19).equals(data.subarray(19)), 'writes still reach the local device');
  t.doesNotThrow(() => volume.detachReplica(replica), 'detaching again is harmless');
});

t.test('a long zeroing reaches the replicas and the write-intent log in pieces of at most 64 MiB, in order', async (t) => {
  const bigBytes = 160 * 1024 * KiB;
  const device = scratchDevice(t, bigBytes);
  const volume = Volume.open({ name: 'big', uuid: 'u2', devicePath: device.path, readOnly: false }, logger);
  t.teardown(() => volume.close());
  const replica = new FakeReplica();
  volume.attachReplica(replica);
  const intents: Array<[string, number, number]> = [];
  volume.setWriteIntent({
    acquire: (offsetBytes, lengthBytes) => void intents.push(['acquire', offsetBytes, lengthBytes]),
    release: (offsetBytes, lengthBytes) => void intents.push(['release', offsetBytes, lengthBytes]),
  });
  await volume.writeZeroes(4 * KiB, bigBytes - 8 * KiB, { fua: false, noHole: false, fastZero: false });
  const pieces = replica.calls.map((call) => [call.offsetBytes, call.lengthBytes]);
  t.ok(pieces.length >= 3, `${pieces.length} pieces`);
  t.ok(pieces.every(([, length]) => (length as number) <= 64 * 1024 * KiB), 'none longer than 64 MiB');
  let next = 4 * KiB;
  for (const [offset, length] of pieces) {
    t.equal(offset, next, 'pieces are contiguous and in order');
    next = (offset as number) + (length as number);
  }
  t.equal(next, bigBytes - 4 * KiB, 'together they cover the range');
  t.same(intents, pieces.flatMap(([offset, length]) => [['acquire', offset, length], ['release', offset, length]]), 'each piece takes and releases its own extents');
});
