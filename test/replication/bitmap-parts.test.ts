// The target's bitmap of a split brain arrives in parts. The source checks each part before it
// keeps its bytes (a target must not make it hold more than its volume's bitmap), and merges
// only parts that tile the target's volume (a partial bitmap would hide changed regions).
import t from 'tap';
import { DirtyBitmap } from '../../src/native/index';
import { bitmapPartChecker, mergePeerBitmap } from '../../src/replication/split-brain';
import type { BitmapExchange } from '../../src/wire/index';

const MiB = 1024 * 1024;
const REGION = 64 * 1024;

function header(firstRegion: number, regionCount: number, last: boolean, regionBytes = REGION): BitmapExchange {
  return { sequence: 1, regionBytes, firstRegion, regionCount, last };
}

t.test('parts that tile the volume pass the checker and merge into the union', async (t) => {
  const size = 10 * MiB; // 160 regions
  const check = bitmapPartChecker(size);
  const first = { header: header(0, 128, false), bits: Buffer.alloc(16) };
  const second = { header: header(128, 32, true), bits: Buffer.alloc(4) };
  first.bits[0] = 0b0000_0101; // regions 0 and 2
  second.bits[3] = 0b1000_0000; // region 159
  check(first.header, first.bits.length);
  check(second.header, second.bits.length);
  const into = new DirtyBitmap(size, REGION);
  t.equal(mergePeerBitmap([first, second], size, into), 3 * REGION, 'three regions reported');
  t.equal(into.count(), 3);
  t.ok(into.testRange(0, 1) && into.testRange(2 * REGION, 1) && into.testRange(159 * REGION, 1));
  t.notOk(into.testRange(REGION, 1));
});

t.test('the checker refuses a part before its bytes are kept', async (t) => {
  const size = 10 * MiB;
  t.throws(() => bitmapPartChecker(size)(header(0, 160, true), 32 * MiB), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'a payload longer than its region count needs (here 32 MiB for 20 bytes)');
  t.throws(() => bitmapPartChecker(size)(header(0, 160, true), 19), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'a payload shorter than its region count needs');
  t.throws(() => bitmapPartChecker(size)(header(0, 161, true), 21), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'more regions than the volume has');
  t.throws(() => bitmapPartChecker(size)(header(0, 0, true), 0), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'an empty part');
  t.throws(() => bitmapPartChecker(size)(header(0, 20, true, 1000), 3), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'regions that are not a power of two');
  t.throws(() => bitmapPartChecker(size)(header(0, 20, true, 256), 3), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'regions under 512 bytes');
  const check = bitmapPartChecker(size);
  check(header(0, 64, false), 8);
  t.throws(() => check(header(80, 16, false), 2), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'a gap between parts');
  const again = bitmapPartChecker(size);
  again(header(0, 64, false), 8);
  t.throws(() => again(header(64, 64, false, 2 * REGION), 8), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'a part with other region sizes');
  const repeated = bitmapPartChecker(size);
  repeated(header(0, 100, false), 13);
  t.throws(() => repeated(header(100, 100, false), 13), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'parts that together cover more than the volume');
});

t.test('merge refuses parts that do not cover the whole volume', async (t) => {
  const size = 10 * MiB;
  const into = new DirtyBitmap(size, REGION);
  t.throws(() => mergePeerBitmap([{ header: header(0, 128, true), bits: Buffer.alloc(16) }], size, into), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, '128 of 160 regions');
  t.throws(() => mergePeerBitmap([], size, into), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'no part at all');
  t.throws(() => mergePeerBitmap([{ header: header(0, 160, false), bits: Buffer.alloc(20) }], size, into), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, 'the last part not marked last');
});
