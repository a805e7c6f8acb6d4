// On-disk formats of the write-intent metadata: activity-log slots and bitmap pages, checksummed
// so a torn write is detected and costs only what it covered.
import t from 'tap';
import { DirtyBitmap } from '../../src/native/index';
import { decodeActivityLog, encodeSlot, SLOT_BYTES, ACTIVITY_LOG_EXTENTS_MAX } from '../../src/write-intent/activity-log-format';
import { BITMAP_PAGE_BYTES, BitmapFile, REGIONS_PER_PAGE } from '../../src/write-intent/bitmap-file';
import { CrashLayerStore } from '../../src/write-intent/crash-layer';

const geometry = { sizeBytes: 1 << 30, extentBytes: 4 << 20 };

function runsOf(bitmap: DirtyBitmap) {
  return (): ReturnType<DirtyBitmap['runs']> => bitmap.runs(0);
}

t.test('activity log: the valid slot with the higher sequence wins; a torn slot falls back to the other', async (t) => {
  const older = encodeSlot(geometry, { sequence: 7, clean: false, tracked: true, extents: [1, 2, 3] });
  const newer = encodeSlot(geometry, { sequence: 8, clean: true, tracked: true, extents: [] });
  const both = Buffer.concat([older, newer]);
  t.same(decodeActivityLog(geometry, both), { state: 'ok', slot: 1, latest: { sequence: 8, clean: true, tracked: true, extents: [] } });

  // Tear the newer slot: one sector of it never reached the disk.
  const torn = Buffer.from(both);
  torn.fill(0xff, SLOT_BYTES + 512, SLOT_BYTES + 1024);
  t.same(decodeActivityLog(geometry, torn), { state: 'ok', slot: 0, latest: { sequence: 7, clean: false, tracked: true, extents: [1, 2, 3] } });

  const bothBad = Buffer.from(torn);
  bothBad[100] = (bothBad[100] as number) ^ 1;
  const lost = decodeActivityLog(geometry, bothBad);
  t.equal(lost.state, 'lost');
  t.match((lost as { reason: string }).reason, /checksum/);
  t.same(decodeActivityLog(geometry, undefined), { state: 'missing' });
  t.equal(decodeActivityLog({ ...geometry, sizeBytes: 2 << 30 }, both).state, 'lost', 'a log of another geometry is not trusted');
  t.same(decodeActivityLog(geometry, Buffer.concat([older, Buffer.alloc(100)])).state, 'ok', 'a short second slot is just invalid');
});

t.test('activity log: an extent past the end or too many extents are refused', async (t) => {
  const past = encodeSlot(geometry, { sequence: 1, clean: false, tracked: true, extents: [256] });
  t.equal(decodeActivityLog(geometry, past).state, 'lost');
  t.throws(() => encodeSlot(geometry, { sequence: 1, clean: false, tracked: true, extents: new Array(ACTIVITY_LOG_EXTENTS_MAX + 1).fill(0) }), RangeError);
  const untracked = encodeSlot(geometry, { sequence: 3, clean: false, tracked: false, extents: [] });
  t.same(decodeActivityLog(geometry, untracked), { state: 'ok', slot: 0, latest: { sequence: 3, clean: false, tracked: false, extents: [] } });
});

t.test('bitmap file: round trip, only changed pages rewritten, a torn page costs only its regions', async (t) => {
  const store = new CrashLayerStore();
  const regionBytes = 4096;
  const sizeBytes = regionBytes * (REGIONS_PER_PAGE * 3 + 100); // 4 pages, the last one short
  const file = new BitmapFile(store.open('/s/m.dirty'), sizeBytes, regionBytes);
  t.equal(file.pageCount, 4);

  const bits = new DirtyBitmap(sizeBytes, regionBytes);
  bits.setRange(0, regionBytes); // page 0
  bits.setRange(REGIONS_PER_PAGE * regionBytes - regionBytes, 3 * regionBytes); // spans pages 0 and 1
  bits.setRange(sizeBytes - regionBytes, regionBytes); // last region of page 3
  t.equal(await file.persist(runsOf(bits)), 4, 'the first persist writes every page');
  t.equal(await file.persist(runsOf(bits)), 0, 'nothing changed: nothing written');
  bits.clearRange(0, regionBytes);
  const writesBefore = store.counters.writes;
  t.equal(await file.persist(runsOf(bits)), 1, 'one bit cleared in page 0: one page written');
  t.equal(store.counters.writes - writesBefore, 1);

  const reloaded = await new BitmapFile(store.open('/s/m.dirty'), sizeBytes, regionBytes).load();
  t.equal(reloaded.state, 'ok');
  t.same(reloaded.bitmap.runs(0), bits.runs(0), 'the same bits come back');

  // A crash tears a rewrite of page 2 (which held no bits): its first sector (the checksum)
  // lands, the sector with the new bit does not. Page 2 counts as all dirty, the others keep
  // their exact bits.
  bits.setRange(2 * REGIONS_PER_PAGE * regionBytes + 30000 * regionBytes, regionBytes);
  let crashed: CrashLayerStore | undefined;
  store.onWrite = () => {
    let sector = 0;
    crashed = store.crash('tear', () => (sector++ === 0 ? 0.1 : 0.9));
  };
  await file.persist(runsOf(bits), [2]);
  store.onWrite = undefined;
  const afterCrash = await new BitmapFile((crashed as CrashLayerStore).open('/s/m.dirty'), sizeBytes, regionBytes).load();
  t.equal(afterCrash.state, 'damaged');
  t.equal(afterCrash.damagedPages, 1);
  const expected = new DirtyBitmap(sizeBytes, regionBytes);
  expected.merge(bits);
  expected.setRange(2 * REGIONS_PER_PAGE * regionBytes, REGIONS_PER_PAGE * regionBytes);
  t.same(afterCrash.bitmap.runs(0), expected.runs(0), 'page 2 all dirty, pages 0, 1 and 3 exact');

  t.equal((await new BitmapFile(store.open('/s/none'), sizeBytes, regionBytes).load()).state, 'missing');
  const other = await new BitmapFile(store.open('/s/m.dirty'), sizeBytes + regionBytes, regionBytes).load();
  t.equal(other.state, 'mismatch', 'a file for another volume size is not trusted');
  t.equal(other.bitmap.dirtyBytes(), sizeBytes + regionBytes);
  t.equal(BITMAP_PAGE_BYTES, 4096);
});
