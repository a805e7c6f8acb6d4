import t from 'tap';

import { DirtyBitmap, NativeError } from '../../src/native/index';
import { prng } from './fixtures';

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 * 1024 * MiB;

t.test('geometry', async (tt) => {
  const bitmap = new DirtyBitmap(10 * MiB + 100);
  tt.equal(bitmap.regionBytes, 65536);
  tt.equal(bitmap.sizeBytes, 10 * MiB + 100);
  tt.equal(bitmap.regionCount, 161);
  for (const [size, region] of [
    [MiB, 3000],
    [MiB, 256],
    [0, 65536],
    [-1, 65536],
    [1.5, 65536],
    [MiB, 65536 * 3],
  ]) {
    tt.throws(() => new DirtyBitmap(size, region), { code: 'BM_ERR_BITMAP_GEOMETRY' }, `${size}/${region}`);
  }
  // Past the 2^31 region bound the native side refuses too.
  tt.throws(() => new DirtyBitmap(2 ** 52, 512), { code: 'BM_ERR_BITMAP_GEOMETRY' });
});

t.test('1 TiB at 64 KiB regions fits in 2 MiB', async (tt) => {
  const bitmap = new DirtyBitmap(TiB);
  tt.equal(bitmap.regionCount, 16 * 1024 * 1024);
  tt.ok(bitmap.memoryBytes() <= 2 * MiB + 4096, `memoryBytes ${bitmap.memoryBytes()}`);
  tt.equal(bitmap.setRange(0, TiB), 16 * 1024 * 1024);
  tt.equal(bitmap.dirtyBytes(), TiB);
  tt.equal(bitmap.serialize().length, 32 + 2 * MiB + 4);
});

t.test('discarded snapshots are collected: the words count as memory V8 must reclaim', async (tt) => {
  // A mirror takes a snapshot at every target flush. 80 snapshots of a 4 TiB bitmap (8 MiB of
  // words each) are 640 MiB of garbage that V8 sees as a few hundred bytes unless told.
  const bitmap = new DirtyBitmap(4 * TiB);
  const before = process.memoryUsage().rss;
  let peak = before;
  let snapshot: DirtyBitmap | undefined;
  for (let i = 0; i < 80; i++) {
    snapshot = bitmap.snapshotAndClear();
    bitmap.setRange(i * MiB, MiB);
    await new Promise((resolve) => setTimeout(resolve, 1));
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  tt.ok(snapshot !== undefined);
  const grownMiB = (peak - before) / MiB;
  tt.ok(grownMiB < 320, `resident memory grew by ${grownMiB.toFixed(0)} MiB over 80 discarded 8 MiB snapshots`);
});

t.test('set / test / clear / count / dirtyBytes', async (tt) => {
  const region = 64 * KiB;
  const bitmap = new DirtyBitmap(MiB + 512, region); // 17 regions, the last one 512 bytes
  tt.equal(bitmap.regionCount, 17);
  tt.equal(bitmap.setRange(0, 1), 1, 'one byte touches one region');
  tt.equal(bitmap.setRange(0, region), 0, 'already set');
  tt.equal(bitmap.setRange(region - 1, 2), 1, 'a range across a boundary touches both');
  tt.equal(bitmap.count(), 2);
  tt.equal(bitmap.setRange(5 * region, 0), 0, 'empty range sets nothing');
  tt.notOk(bitmap.testRange(2 * region, 3 * region));
  tt.ok(bitmap.testRange(region + 100, 1));
  tt.ok(bitmap.testRange(0, MiB + 512));
  tt.notOk(bitmap.testRange(0, 0), 'empty range is never dirty');

  bitmap.clearRange(1, 2 * region - 2);
  tt.equal(bitmap.count(), 2, 'partial regions are not cleared');
  bitmap.clearRange(0, region + 1);
  tt.equal(bitmap.count(), 1, 'region 0 fully inside: cleared');
  bitmap.clearRange(region, region);
  tt.equal(bitmap.count(), 0);

  tt.equal(bitmap.setRange(MiB, 512), 1, 'the short last region');
  tt.equal(bitmap.dirtyBytes(), 512, 'dirtyBytes clamps the last region');
  bitmap.clearRange(MiB, 512);
  tt.equal(bitmap.count(), 0, 'reaching sizeBytes clears the short last region');

  tt.equal(bitmap.setRange(0, MiB + 512), 17);
  tt.equal(bitmap.dirtyBytes(), MiB + 512);
  tt.throws(() => bitmap.setRange(MiB, 1024), { code: 'BM_ERR_OUT_OF_RANGE' });
  tt.throws(() => bitmap.clearRange(MiB + 513, 0), { code: 'BM_ERR_OUT_OF_RANGE' });
  tt.throws(() => bitmap.testRange(-1, 1), RangeError);
});

t.test('runs', async (tt) => {
  const region = 4096;
  const bitmap = new DirtyBitmap(100 * region + 100, region); // 101 regions
  tt.same(bitmap.runs(), []);
  bitmap.setRange(0, 1);
  bitmap.setRange(2 * region, 3 * region); // regions 2..4
  bitmap.setRange(63 * region, 3 * region); // across a word boundary: 63..65
  bitmap.setRange(100 * region, 1); // the short last region
  tt.same(bitmap.runs(), [
    { offsetBytes: 0, lengthBytes: region },
    { offsetBytes: 2 * region, lengthBytes: 3 * region },
    { offsetBytes: 63 * region, lengthBytes: 3 * region },
    { offsetBytes: 100 * region, lengthBytes: 100 },
  ]);
  tt.same(bitmap.runs(3 * region + 5, 2), [
    { offsetBytes: 3 * region, lengthBytes: 2 * region },
    { offsetBytes: 63 * region, lengthBytes: 3 * region },
  ], 'from the region holding start, bounded by maxRuns');
  tt.same(bitmap.runs(bitmap.sizeBytes), []);
  tt.throws(() => bitmap.runs(bitmap.sizeBytes + 1), { code: 'BM_ERR_OUT_OF_RANGE' });
});

t.test('runs and counts agree with a model under random ops', async (tt) => {
  const seed = 4242;
  tt.comment(`reproduce with seed=${seed}`);
  const random = prng(seed);
  const region = 512;
  const regionCount = 1000;
  const sizeBytes = regionCount * region - 17;
  const bitmap = new DirtyBitmap(sizeBytes, region);
  const model = new Uint8Array(regionCount);
  for (let i = 0; i < 2000; i++) {
    const offsetBytes = Math.floor(random() * sizeBytes);
    const lengthBytes = Math.floor(random() * Math.min(40 * region, sizeBytes - offsetBytes));
    if (random() < 0.6) {
      let newly = 0;
      if (lengthBytes > 0) {
        for (let r = Math.floor(offsetBytes / region); r <= Math.floor((offsetBytes + lengthBytes - 1) / region); r++) {
          if (model[r] === 0) newly++;
          model[r] = 1;
        }
      }
      if (bitmap.setRange(offsetBytes, lengthBytes) !== newly) tt.fail(`setRange newly set, op ${i}`);
    } else {
      const first = Math.ceil(offsetBytes / region);
      const end = offsetBytes + lengthBytes === sizeBytes ? regionCount : Math.floor((offsetBytes + lengthBytes) / region);
      for (let r = first; r < end; r++) model[r] = 0;
      bitmap.clearRange(offsetBytes, lengthBytes);
    }
  }
  tt.equal(bitmap.count(), model.reduce((a, b) => a + b, 0));
  const expected: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  for (let r = 0; r < regionCount; r++) {
    if (model[r] === 0) continue;
    let end = r;
    while (end < regionCount && model[end] === 1) end++;
    expected.push({ offsetBytes: r * region, lengthBytes: Math.min(end * region, sizeBytes) - r * region });
    r = end;
  }
  tt.same(bitmap.runs(), expected);
});

t.test('merge', async (tt) => {
  const a = new DirtyBitmap(MiB, 4096);
  const b = new DirtyBitmap(MiB, 4096);
  a.setRange(0, 8192);
  b.setRange(4096, 8192);
  a.merge(b);
  tt.equal(a.count(), 3);
  tt.equal(b.count(), 2, 'the source is unchanged');
  tt.throws(() => a.merge(new DirtyBitmap(MiB, 8192)), { code: 'BM_ERR_BITMAP_GEOMETRY' });
  tt.throws(() => a.merge(new DirtyBitmap(2 * MiB, 4096)), { code: 'BM_ERR_BITMAP_GEOMETRY' });
  tt.throws(() => a.merge({} as DirtyBitmap), TypeError);
});

t.test('snapshotAndClear', async (tt) => {
  const bitmap = new DirtyBitmap(MiB, 4096);
  bitmap.setRange(8192, 4096);
  const snapshot = bitmap.snapshotAndClear();
  tt.equal(bitmap.count(), 0);
  tt.equal(snapshot.count(), 1);
  tt.same(snapshot.runs(), [{ offsetBytes: 8192, lengthBytes: 4096 }]);
  tt.equal(snapshot.sizeBytes, MiB);
  tt.equal(snapshot.regionBytes, 4096);
  tt.ok(snapshot instanceof DirtyBitmap);
  // Both stay fully usable and independent.
  bitmap.setRange(0, 1);
  snapshot.setRange(MiB - 1, 1);
  tt.equal(bitmap.count(), 1);
  tt.equal(snapshot.count(), 2);
  snapshot.merge(bitmap);
  tt.equal(snapshot.count(), 3);
});

t.test('serialize / deserialize', async (tt) => {
  const bitmap = new DirtyBitmap(3 * MiB + 4096, 65536);
  bitmap.setRange(0, 1);
  bitmap.setRange(MiB, MiB);
  bitmap.setRange(3 * MiB, 4096);
  const bytes = bitmap.serialize();
  tt.equal(bytes.readUInt32LE(0), 0x42444d42, 'magic');
  tt.equal(bytes.readUInt32LE(4), 1, 'version');
  const back = DirtyBitmap.deserialize(bytes);
  tt.equal(back.sizeBytes, bitmap.sizeBytes);
  tt.equal(back.regionBytes, bitmap.regionBytes);
  tt.equal(back.count(), bitmap.count());
  tt.same(back.runs(), bitmap.runs());
  back.setRange(2 * MiB, 1);
  tt.equal(back.count(), bitmap.count() + 1);

  const corrupt = (mutate: (b: Buffer) => Buffer, what: string): void => {
    const copy = mutate(Buffer.from(bytes));
    tt.throws(() => DirtyBitmap.deserialize(copy), { code: 'BM_ERR_BITMAP_CORRUPT' }, what);
  };
  corrupt((b) => (b.writeUInt32LE(0x12345678, 0), b), 'bad magic');
  corrupt((b) => (b.writeUInt32LE(2, 4), b), 'bad version');
  corrupt((b) => ((b[40] ^= 1), b), 'flipped bit in the words');
  corrupt((b) => ((b[b.length - 1] ^= 0xff), b), 'bad checksum');
  corrupt((b) => b.subarray(0, b.length - 8), 'truncated');
  corrupt((b) => Buffer.concat([b, Buffer.alloc(8)]), 'too long');
  corrupt(() => Buffer.alloc(10), 'too short');
  corrupt((b) => (b.writeBigUInt64LE(3000n, 16), b), 'bad region size');
  const error = (() => {
    try {
      DirtyBitmap.deserialize(Buffer.alloc(10));
    } catch (e) {
      return e;
    }
  })();
  tt.ok(error instanceof NativeError);
});
