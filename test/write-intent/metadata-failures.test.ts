// Two ways the write-intent log could lose a region that differs, each followed by a power loss
// (the crash layer drops every unsynced write): an eviction whose bitmap page write failed, and
// a restart that read a bitmap page the killed process wrote but never synced.
import t from 'tap';
import pino from 'pino';
import { DirtyBitmap } from '../../src/native/index';
import { CrashLayerStore } from '../../src/write-intent/crash-layer';
import { openWriteIntentLog, recoverMirror, type VolumeMetadataOptions } from '../../src/write-intent/recovery';
import { EXTENT_BYTES } from '../../src/write-intent/write-intent-log';

const REGION_BYTES = 65536;
const SIZE_BYTES = 128 * EXTENT_BYTES;
const CAPACITY = 34;
const silent = pino({ level: 'silent' });

function options(store: CrashLayerStore): VolumeMetadataOptions {
  return { store, stateDir: '/state', volumeUuid: 'vol', sizeBytes: SIZE_BYTES, regionBytes: REGION_BYTES, capacityExtents: CAPACITY, logger: silent };
}

/** Opens the log and the mirror's bitmap as a daemon start does, with `dirty` as the mirror's. */
async function openAndStart(store: CrashLayerStore, dirty?: DirtyBitmap) {
  const { log, loaded } = await openWriteIntentLog(options(store));
  const recovered = await recoverMirror(options(store), 'mirror', loaded);
  const bits = dirty ?? recovered.initialDirty;
  log.addTracker({ id: 'mirror', file: recovered.file, mayDiffer: (start) => bits.runs(start) });
  await log.start();
  return { log, recovered, bits };
}

async function recoverAfterPowerLoss(store: CrashLayerStore): Promise<DirtyBitmap> {
  const after = store.crash('drop', () => 0.5);
  const { loaded } = await openWriteIntentLog(options(after));
  return (await recoverMirror(options(after), 'mirror', loaded)).initialDirty;
}

t.test('an eviction whose bitmap page write fails keeps its extent in the log', async (t) => {
  const store = new CrashLayerStore();
  const { log, bits } = await openAndStart(store, new DirtyBitmap(SIZE_BYTES, REGION_BYTES));
  // Fill the log; extent 0 gets a write the mirror lacks (its link is down).
  for (let extent = 0; extent < CAPACITY; extent++) {
    await log.acquire(extent * EXTENT_BYTES, 4096);
    if (extent === 0) bits.setRange(0, 4096);
    log.release(extent * EXTENT_BYTES, 4096);
  }
  store.failNext(1); // evicting extent 0: writing its bitmap page fails
  await t.rejects(Promise.resolve(log.acquire(CAPACITY * EXTENT_BYTES, 4096)), { code: 'BM_ERR_METADATA_IO' }, 'the write that needed the eviction fails');
  // The disk works again: the next write must not be granted by a log that forgot extent 0.
  await log.acquire((CAPACITY + 1) * EXTENT_BYTES, 4096);
  const recovered = await recoverAfterPowerLoss(store);
  t.ok(recovered.testRange(0, 4096), 'after a power loss the region that differs is still dirty');
});

t.test('a restart syncs the bitmap pages it read before it empties the log', async (t) => {
  const store = new CrashLayerStore();
  {
    // Run 1: whole extents written while the mirror is behind, then an eviction whose page
    // write reaches the page cache and the process is killed before its fdatasync.
    const { log, bits } = await openAndStart(store, new DirtyBitmap(SIZE_BYTES, REGION_BYTES));
    for (let extent = 0; extent < CAPACITY; extent++) {
      await log.acquire(extent * EXTENT_BYTES, EXTENT_BYTES);
      bits.setRange(extent * EXTENT_BYTES, EXTENT_BYTES);
      log.release(extent * EXTENT_BYTES, EXTENT_BYTES);
    }
    store.onWrite = () => {
      store.onWrite = undefined;
      store.failNext(1); // the sync after this write never happens: run 1 is dead from here
    };
    await Promise.resolve(log.acquire(CAPACITY * EXTENT_BYTES, 4096)).catch(() => undefined);
  }
  // Run 2 on the same store (SIGKILL, not a power loss: the page cache still has the page).
  const run2 = await openAndStart(store);
  t.ok(run2.recovered.initialDirty.testRange(0, CAPACITY * EXTENT_BYTES), 'run 2 finds every written extent dirty');
  // Power is lost before the kernel wrote that page back on its own.
  const recovered = await recoverAfterPowerLoss(store);
  t.ok(recovered.testRange(0, CAPACITY * EXTENT_BYTES), 'after the power loss every written extent is still dirty');
});
