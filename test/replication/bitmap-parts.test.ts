// The target's bitmap of a split brain arrives in parts. The source takes each part as it
// arrives, keeps none of its bytes (only the regions, in a bitmap of its own volume's size, so a
// target claiming a huge volume cannot make it hold more), and accepts only parts that tile the
// target's volume (a partial bitmap would hide changed regions).
import t from 'tap';
import { PeerBitmapReceiver } from '../../src/replication/split-brain';
import type { BitmapExchange } from '../../src/wire/index';

const MiB = 1024 * 1024;
const REGION = 64 * 1024;
const own = { sizeBytes: 10 * MiB, regionBytes: REGION };

function header(firstRegion: number, regionCount: number, last: boolean, regionBytes = REGION): BitmapExchange {
  return { sequence: 1, regionBytes, firstRegion, regionCount, last };
}

function bits(regionCount: number, set: number[] = []): Buffer {
  const buffer = Buffer.alloc(Math.ceil(regionCount / 8));
  for (const region of set) buffer[region >> 3]! |= 1 << (region & 7);
  return buffer;
}

t.test('parts that tile the volume give the union of their regions on our volume', async (t) => {
  const receiver = new PeerBitmapReceiver(10 * MiB, own); // 160 regions
  receiver.take(header(0, 128, false), bits(128, [0, 2]));
  receiver.take(header(128, 32, true), bits(32, [31]));
  receiver.finish();
  t.equal(receiver.peerBytes, 3 * REGION, 'three regions reported');
  t.equal(receiver.union.count(), 3);
  t.ok(receiver.union.testRange(0, 1) && receiver.union.testRange(2 * REGION, 1) && receiver.union.testRange(159 * REGION, 1));
  t.notOk(receiver.union.testRange(REGION, 1));
});

t.test('a target larger than our volume: its regions past our end are counted, not kept', async (t) => {
  const receiver = new PeerBitmapReceiver(1024 * MiB, own); // 16384 regions of 64 KiB
  receiver.take(header(0, 16384, true), bits(16384, [1, 16383]));
  receiver.finish();
  t.equal(receiver.peerBytes, 2 * REGION);
  t.equal(receiver.union.sizeBytes, own.sizeBytes, 'the union is our volume\'s size');
  t.equal(receiver.union.count(), 1, 'only the region inside our volume');
});

t.test('each malformed part is refused as it arrives', async (t) => {
  const refuse = (what: string, feed: (receiver: PeerBitmapReceiver) => void): void => {
    t.throws(() => feed(new PeerBitmapReceiver(10 * MiB, own)), { code: 'BM_ERR_REPLICATION_PROTOCOL' }, what);
  };
  refuse('a payload longer than its region count needs (32 MiB for 20 bytes)', (r) => r.take(header(0, 160, true), Buffer.alloc(32 * MiB)));
  refuse('a payload shorter than its region count needs', (r) => r.take(header(0, 160, true), Buffer.alloc(19)));
  refuse('more regions than the volume has', (r) => r.take(header(0, 161, true), bits(161)));
  refuse('an empty part', (r) => r.take(header(0, 0, true), Buffer.alloc(0)));
  refuse('regions that are not a power of two', (r) => r.take(header(0, 20, true, 1000), bits(20)));
  refuse('regions under 512 bytes', (r) => r.take(header(0, 20, true, 256), bits(20)));
  refuse('a gap between parts', (r) => {
    r.take(header(0, 64, false), bits(64));
    r.take(header(80, 80, true), bits(80));
  });
  refuse('a part with other region sizes', (r) => {
    r.take(header(0, 64, false), bits(64));
    r.take(header(64, 48, true, 2 * REGION), bits(48));
  });
  refuse('the last part not marked last', (r) => r.take(header(0, 160, false), bits(160)));
  refuse('a part marked last before the end', (r) => r.take(header(0, 128, true), bits(128)));
  refuse('a part after the last one', (r) => {
    r.take(header(0, 160, true), bits(160));
    r.take(header(160, 1, true), bits(1));
  });
  refuse('finish before the whole volume was covered', (r) => {
    r.take(header(0, 128, false), bits(128));
    r.finish();
  });
  refuse('finish with no part at all', (r) => r.finish());
});
