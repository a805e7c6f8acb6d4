// BlockFile on a plain file (always) and a loop device (root), with every available engine.
import t from 'tap';

import {
  allocAligned,
  availableIoEngines,
  BlockFile,
  type IoEngine,
  NativeError,
} from '../../src/native/index';
import { deviceFlushCount } from '../helpers/block-stat';
import { isRoot, loopDevice, prng, sparseFile } from './fixtures';

const SIZE_BYTES = 16 * 1024 * 1024;
const BLOCK_BYTES = 4096;

type Target = 'file' | 'loop';
const targets: Target[] = isRoot ? ['file', 'loop'] : ['file'];

function openTarget(tt: tap.Test, target: Target, engine: IoEngine, readOnly = false): BlockFile {
  const filePath = target === 'file' ? sparseFile(tt, SIZE_BYTES) : loopDevice(tt, SIZE_BYTES);
  const file = BlockFile.open(filePath, { readOnly, exclusive: true, ioEngine: engine });
  tt.teardown(async () => {
    await file.close().catch(() => undefined);
  });
  return file;
}

function pattern(sizeBytes: number, seed: number): Buffer {
  const buffer = allocAligned(sizeBytes);
  const random = prng(seed);
  for (let i = 0; i < sizeBytes; i += 4) buffer.writeUInt32LE((random() * 0x100000000) >>> 0, i);
  return buffer;
}

async function rejectsCode(tt: tap.Test, promise: Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await promise;
    tt.fail(`${what}: expected ${code}, resolved`);
  } catch (error) {
    tt.ok(error instanceof NativeError, `${what}: NativeError`);
    tt.equal((error as NativeError).code, code, `${what}: ${code}`);
  }
}

for (const target of targets) {
  for (const engine of availableIoEngines) {
    t.test(`${target} / ${engine}`, async (tt) => {
      const file = openTarget(tt, target, engine);

      tt.test('info', async (ttt) => {
        ttt.equal(file.engine, engine);
        ttt.equal(file.info.sizeBytes, SIZE_BYTES);
        ttt.equal(file.info.isBlockDevice, target === 'loop');
        ttt.equal(file.info.readOnly, false);
        ttt.ok(file.info.logicalSectorBytes >= 512 && file.info.logicalSectorBytes <= 4096);
        ttt.ok(file.info.physicalSectorBytes >= file.info.logicalSectorBytes);
      });

      tt.test('round-trip patterns at many offsets and sizes', async (ttt) => {
        const sector = file.info.logicalSectorBytes;
        const cases: Array<[number, number]> = [
          [0, sector],
          [sector, sector],
          [BLOCK_BYTES * 3, BLOCK_BYTES],
          [65536 - sector, 2 * sector],
          [1024 * 1024, 1024 * 1024],
          [SIZE_BYTES - BLOCK_BYTES, BLOCK_BYTES],
          [SIZE_BYTES - 4 * 1024 * 1024, 4 * 1024 * 1024],
        ];
        for (let i = 0; i < 24; i++) cases.push([(i * 613 + 7) * 4096 % (SIZE_BYTES - 65536), (1 + (i % 16)) * sector]);
        let seed = 1;
        for (const [offsetBytes, lengthBytes] of cases) {
          const source = pattern(lengthBytes, seed++);
          await file.write(source, offsetBytes, false);
          const target2 = allocAligned(lengthBytes);
          await file.read(target2, offsetBytes);
          ttt.ok(source.equals(target2), `@${offsetBytes}+${lengthBytes}`);
        }
      });

      tt.test('fua writes and flush', async (ttt) => {
        // On a block device the block layer counts flushes: proof that FUA and fdatasync reach
        // stable storage, which reading the data back could never show.
        const isDevice = file.info.isBlockDevice;
        const flushes = (): number => (isDevice ? deviceFlushCount(file.info.path) : 0);
        const start = flushes();
        const source = pattern(65536, 99);
        await file.write(source, 2 * 1024 * 1024, true);
        const afterFua = flushes();
        await file.flush();
        if (isDevice) {
          ttt.ok(afterFua > start, 'FUA write issued a device flush');
          ttt.ok(flushes() > afterFua, 'flush issued a device flush');
        }
        const back = allocAligned(65536);
        await file.read(back, 2 * 1024 * 1024);
        ttt.ok(source.equals(back));
      });

      tt.test('discard and writeZeroes read back as zeroes', async (ttt) => {
        const zeroes = Buffer.alloc(256 * 1024);
        for (const [name, op] of [
          ['discard', (o: number, l: number) => file.discard(o, l)],
          ['writeZeroes', (o: number, l: number) => file.writeZeroes(o, l, false)],
          ['writeZeroes mayDeallocate', (o: number, l: number) => file.writeZeroes(o, l, true)],
        ] as const) {
          const offsetBytes = 4 * 1024 * 1024;
          await file.write(pattern(zeroes.length, 5), offsetBytes, false);
          await op(offsetBytes, zeroes.length);
          const back = allocAligned(zeroes.length);
          await file.read(back, offsetBytes);
          ttt.ok(back.equals(zeroes), name);
        }
        await file.discard(0, 0);
      });

      tt.test('validation errors', async (ttt) => {
        const sector = file.info.logicalSectorBytes;
        const buffer = allocAligned(BLOCK_BYTES);
        await rejectsCode(ttt, file.read(buffer, 1), 'BM_ERR_UNALIGNED', 'unaligned offset');
        await rejectsCode(ttt, file.write(allocAligned(sector + 1), 0, false), 'BM_ERR_UNALIGNED', 'unaligned length');
        // Buffer.alloc memory is at best 16-byte aligned, so +1 is never sector-aligned.
        await rejectsCode(ttt, file.write(Buffer.alloc(BLOCK_BYTES + 1).subarray(1), 0, false), 'BM_ERR_UNALIGNED', 'Buffer.alloc write');
        await rejectsCode(ttt, file.read(Buffer.alloc(BLOCK_BYTES + 1).subarray(1), 0), 'BM_ERR_UNALIGNED', 'Buffer.alloc read');
        await rejectsCode(ttt, file.read(allocAligned(2 * BLOCK_BYTES).subarray(8, 8 + BLOCK_BYTES), 0), 'BM_ERR_UNALIGNED', 'aligned-length view at +8');
        await rejectsCode(ttt, file.read(buffer, SIZE_BYTES), 'BM_ERR_OUT_OF_RANGE', 'read at end');
        await rejectsCode(ttt, file.write(buffer, SIZE_BYTES - sector, false), 'BM_ERR_OUT_OF_RANGE', 'write across end');
        await rejectsCode(ttt, file.discard(SIZE_BYTES - sector, 2 * sector), 'BM_ERR_OUT_OF_RANGE', 'discard across end');
        await rejectsCode(ttt, file.writeZeroes(sector / 2, sector, false), 'BM_ERR_UNALIGNED', 'writeZeroes unaligned');
        await rejectsCode(ttt, file.allocationMap(SIZE_BYTES, 1), 'BM_ERR_OUT_OF_RANGE', 'allocationMap past end');
        const error = await file.read(buffer, SIZE_BYTES).catch((e: NativeError) => e);
        ttt.match(error, { offsetBytes: SIZE_BYTES, lengthBytes: BLOCK_BYTES, errno: 0 });
        ttt.rejects(file.read(buffer, -4096), RangeError);
        ttt.rejects(file.read(buffer, 0.5), RangeError);
      });

      tt.test('1000s of concurrent random ops match a model', async (ttt) => {
        const seed = 0xb10c + (target === 'loop' ? 1 : 0) + (engine === 'io_uring' ? 2 : 0);
        ttt.comment(`reproduce with seed=${seed}`);
        const random = prng(seed);
        const model = Buffer.alloc(SIZE_BYTES);
        const initial = allocAligned(SIZE_BYTES);
        await file.read(initial, 0);
        initial.copy(model);
        const blockCount = SIZE_BYTES / BLOCK_BYTES;
        for (let batch = 0; batch < 3; batch++) {
          // Ops in one batch never overlap, so their completion order cannot matter.
          const order = Array.from({ length: blockCount }, (_, i) => i);
          for (let i = order.length - 1; i > 0; i--) {
            const j = Math.floor(random() * (i + 1));
            [order[i], order[j]] = [order[j], order[i]];
          }
          const ops: Promise<void>[] = [];
          const reads: Array<{ buffer: Buffer; offsetBytes: number; expected: Buffer }> = [];
          const opCount = 3000; // more than the CQ holds: exercises the overflow FIFO
          for (let i = 0; i < opCount; i++) {
            const offsetBytes = order[i] * BLOCK_BYTES;
            if (random() < 0.5) {
              const data = pattern(BLOCK_BYTES, seed * 7919 + batch * 10007 + i);
              data.copy(model, offsetBytes);
              ops.push(file.write(data, offsetBytes, random() < 0.05));
            } else {
              const buffer = allocAligned(BLOCK_BYTES);
              reads.push({ buffer, offsetBytes, expected: Buffer.from(model.subarray(offsetBytes, offsetBytes + BLOCK_BYTES)) });
              ops.push(file.read(buffer, offsetBytes));
            }
          }
          await Promise.all(ops);
          const bad = reads.filter((r) => !r.buffer.equals(r.expected)).length;
          ttt.equal(bad, 0, `batch ${batch}: reads match the model`);
        }
        const final = allocAligned(SIZE_BYTES);
        await file.read(final, 0);
        ttt.ok(final.equals(model), 'final contents match the model');
      });

      tt.test('close waits for in-flight ops, then EBADF', async (ttt) => {
        const other = openTarget(ttt, target, engine);
        const settled: string[] = [];
        const writes = Array.from({ length: 200 }, (_, i) =>
          other.write(pattern(BLOCK_BYTES, i), i * BLOCK_BYTES, false).then(() => settled.push(`w${i}`)),
        );
        const closed = other.close().then(() => settled.push('close'));
        await Promise.all([...writes, closed]);
        ttt.equal(settled.length, 201);
        ttt.equal(settled[settled.length - 1], 'close', 'close settles last');
        const buffer = allocAligned(BLOCK_BYTES);
        await rejectsCode(ttt, other.read(buffer, 0), 'EBADF', 'read after close');
        await rejectsCode(ttt, other.write(buffer, 0, false), 'EBADF', 'write after close');
        await rejectsCode(ttt, other.flush(), 'EBADF', 'flush after close');
        await rejectsCode(ttt, other.close(), 'EBADF', 'second close');
      });

      tt.test('read-only', async (ttt) => {
        const readOnly = openTarget(ttt, target, engine, true);
        ttt.equal(readOnly.info.readOnly, true);
        const buffer = allocAligned(BLOCK_BYTES);
        await readOnly.read(buffer, 0);
        await rejectsCode(ttt, readOnly.write(buffer, 0, false), 'BM_ERR_READ_ONLY', 'write');
        await rejectsCode(ttt, readOnly.discard(0, BLOCK_BYTES), 'BM_ERR_READ_ONLY', 'discard');
        await rejectsCode(ttt, readOnly.writeZeroes(0, BLOCK_BYTES, true), 'BM_ERR_READ_ONLY', 'writeZeroes');
      });
    });
  }
}

t.test('open errors', async (tt) => {
  tt.throws(() => BlockFile.open('/nonexistent/bm-device', { readOnly: false, exclusive: true }), { code: 'ENOENT', syscall: 'stat' });
  tt.throws(() => BlockFile.open('/dev/null', { readOnly: false, exclusive: true }), { code: 'BM_ERR_NOT_BLOCK_OR_FILE' });
  // Options are explicit: a missing flag is a programming error, not a default.
  tt.throws(() => BlockFile.open('/dev/null', { readOnly: false } as never), TypeError);
  const filePath = sparseFile(tt, 1024 * 1024);
  tt.throws(() => BlockFile.open(filePath, { readOnly: false, exclusive: false, ioEngine: 'bogus' as IoEngine }), RangeError);
  // procfs has no O_DIRECT: the open fails loudly with its errno, never falls back to the page cache.
  tt.throws(() => BlockFile.open('/proc/self/status', { readOnly: true, exclusive: false }), {
    code: 'EINVAL',
    errno: 22,
    syscall: 'open',
    message: /O_DIRECT/,
  });
});

t.test('O_EXCL: a second exclusive open of a block device fails with EBUSY', { skip: !isRoot && 'needs root for losetup' }, async (tt) => {
  const device = loopDevice(tt, SIZE_BYTES);
  const first = BlockFile.open(device, { readOnly: false, exclusive: true });
  tt.teardown(() => first.close().catch(() => undefined));
  tt.throws(() => BlockFile.open(device, { readOnly: false, exclusive: true }), { code: 'EBUSY', syscall: 'open', path: device });
  await first.close();
  const again = BlockFile.open(device, { readOnly: true, exclusive: true });
  await again.close();
});

t.test('allocationMap', async (tt) => {
  tt.test('sparse file', async (ttt) => {
    const filePath = sparseFile(ttt, 4 * 1024 * 1024);
    const file = BlockFile.open(filePath, { readOnly: false, exclusive: false });
    ttt.teardown(() => file.close().catch(() => undefined));
    ttt.same(await file.allocationMap(0, 4 * 1024 * 1024), [{ offsetBytes: 0, lengthBytes: 4 * 1024 * 1024, hole: true }]);
    await file.write(pattern(65536, 3), 1024 * 1024, false);
    await file.flush();
    const extents = await file.allocationMap(0, 4 * 1024 * 1024);
    ttt.same(extents, [
      { offsetBytes: 0, lengthBytes: 1024 * 1024, hole: true },
      { offsetBytes: 1024 * 1024, lengthBytes: 65536, hole: false },
      { offsetBytes: 1024 * 1024 + 65536, lengthBytes: 3 * 1024 * 1024 - 65536, hole: true },
    ]);
    // A sub-range is covered exactly, starting and ending mid-extent.
    ttt.same(await file.allocationMap(1024 * 1024 - 100, 200), [
      { offsetBytes: 1024 * 1024 - 100, lengthBytes: 100, hole: true },
      { offsetBytes: 1024 * 1024, lengthBytes: 100, hole: false },
    ]);
    ttt.same(await file.allocationMap(0, 0), []);
    await file.discard(1024 * 1024, 65536);
    ttt.same(await file.allocationMap(0, 4 * 1024 * 1024), [{ offsetBytes: 0, lengthBytes: 4 * 1024 * 1024, hole: true }]);
  });
  tt.test('block device: one data extent', { skip: !isRoot && 'needs root for losetup' }, async (ttt) => {
    const device = loopDevice(ttt, SIZE_BYTES);
    const file = BlockFile.open(device, { readOnly: true, exclusive: true });
    ttt.teardown(() => file.close().catch(() => undefined));
    ttt.same(await file.allocationMap(4096, 8192), [{ offsetBytes: 4096, lengthBytes: 8192, hole: false }]);
  });
});
