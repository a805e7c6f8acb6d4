// The record a promoted mirror volume keeps of the regions its clients wrote (split brain):
// after a power loss at any moment it must cover every region a write may have reached, a
// region's later writes cost no metadata write, and a failed metadata write refuses writes.
import t from 'tap';
import pino from 'pino';
import { DirtyBitmap } from '../../src/native/index';
import { CrashLayerStore, type CrashMode } from '../../src/write-intent/crash-layer';
import { DivergenceLog, type DivergenceLogOptions } from '../../src/write-intent/divergence-log';
import { prng } from '../native/fixtures';

const REGION_BYTES = 64 * 1024;
const SIZE_BYTES = 3 * 2 * 1024 * 1024 * 1024 + 5 * REGION_BYTES; // 3 bitmap pages and a bit
const silent = pino({ level: 'silent' });

function options(store: CrashLayerStore): DivergenceLogOptions {
  return { store, stateDir: '/state', volumeUuid: 'vol', sizeBytes: SIZE_BYTES, regionBytes: REGION_BYTES, logger: silent };
}

/** Regions set in `needed` but not in `have`. */
function uncovered(needed: DirtyBitmap, have: DirtyBitmap): number {
  const missing = new DirtyBitmap(needed.sizeBytes, needed.regionBytes);
  missing.merge(needed);
  for (const run of have.runs(0)) missing.clearRange(run.offsetBytes, run.lengthBytes);
  return missing.count();
}

async function crashRound(seed: number, mode: CrashMode): Promise<string | null> {
  const random = prng(seed);
  const pick = (n: number): number => Math.floor(random() * n);
  let store = new CrashLayerStore();
  let log = await DivergenceLog.create(options(store));
  /** Regions a client write may have reached: its acquire resolved. */
  const written = new DirtyBitmap(SIZE_BYTES, REGION_BYTES);
  for (let cycle = 0; cycle < 3; cycle++) {
    let crashed: CrashLayerStore | undefined;
    let writtenAtCrash: DirtyBitmap | undefined;
    const crashNow = (): void => {
      if (crashed !== undefined) return;
      crashed = store.crash(mode, random);
      writtenAtCrash = new DirtyBitmap(SIZE_BYTES, REGION_BYTES);
      writtenAtCrash.merge(written);
    };
    store.onWrite = () => {
      if (random() < 0.1) crashNow();
    };
    const hot = Array.from({ length: 16 }, () => pick(SIZE_BYTES / REGION_BYTES - 8));
    const writer = async (): Promise<void> => {
      for (let op = 0; op < 30 && crashed === undefined; op++) {
        const region = random() < 0.6 ? (hot[pick(hot.length)] as number) : pick(SIZE_BYTES / REGION_BYTES - 8);
        const offsetBytes = region * REGION_BYTES + pick(16) * 4096;
        const lengthBytes = Math.min((1 + pick(40)) * 4096, SIZE_BYTES - offsetBytes);
        const acquired = log.acquire(offsetBytes, lengthBytes);
        if (acquired !== undefined) await acquired;
        if (crashed !== undefined) return;
        written.setRange(offsetBytes, lengthBytes); // the device write may land from here on
        for (let yields = pick(3); yields > 0; yields--) await Promise.resolve();
      }
    };
    await Promise.all(Array.from({ length: 8 }, writer));
    crashNow();
    store.onWrite = undefined;
    store = crashed as CrashLayerStore;
    const reopened = await DivergenceLog.open(options(store));
    const missing = uncovered(writtenAtCrash as DirtyBitmap, reopened.log.bits);
    if (missing > 0) return `cycle ${cycle}: ${missing} written region(s) missing from the record (load ${reopened.state})`;
    log = reopened.log;
  }
  return null;
}

t.test('after a power loss at any moment the record covers every region a write may have reached (seeded)', async (t) => {
  const baseSeed = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
  const rounds = Number(process.env.BM_CRASH_ROUNDS ?? 40);
  const modes: CrashMode[] = ['drop', 'tear', 'keep', 'mixed'];
  for (let round = 0; round < rounds; round++) {
    const seed = baseSeed + round;
    const mode = modes[round % modes.length] as CrashMode;
    const failure = await crashRound(seed, mode);
    if (failure !== null) t.fail(`seed ${seed} (${mode}): ${failure}; rerun with BM_CRASH_SEED=${seed} BM_CRASH_ROUNDS=1`);
  }
  t.pass(`${rounds} rounds from seed ${baseSeed}`);
});

t.test('only a region\'s first write costs a metadata write; first writes arriving during a commit share the next', async (t) => {
  const store = new CrashLayerStore();
  const log = await DivergenceLog.create(options(store));
  t.equal(log.divergedBytes, 0, 'a new record is empty');
  const syncsAfterCreate = store.counters.syncs;
  const first = [0, 1, 2, 3].map((index) => log.acquire(index * REGION_BYTES * 100, 4096));
  t.ok(first.every((promise) => promise instanceof Promise), 'first writes wait for the record');
  await Promise.all(first);
  // The first starts a commit at once; the three arriving while it runs share the second.
  t.equal(store.counters.syncs - syncsAfterCreate, 2, 'four first writes: two commits');
  t.equal(log.acquire(4096, 8192), undefined, 'a later write to a recorded region does not wait');
  t.equal(store.counters.syncs - syncsAfterCreate, 2, 'and writes nothing');
  t.equal(log.divergedBytes, 4 * REGION_BYTES);
  const reopened = await DivergenceLog.open(options(store));
  t.equal(reopened.state, 'ok');
  t.equal(reopened.log.divergedBytes, 4 * REGION_BYTES, 'the record survives a restart');
});

t.test('a lost or foreign record counts every region as written', async (t) => {
  const store = new CrashLayerStore();
  const missing = await DivergenceLog.open(options(store));
  t.equal(missing.state, 'missing');
  t.equal(missing.log.divergedBytes, SIZE_BYTES);
  await DivergenceLog.create({ ...options(store), sizeBytes: SIZE_BYTES - REGION_BYTES });
  const foreign = await DivergenceLog.open(options(store));
  t.equal(foreign.state, 'mismatch', 'a record made for another volume size is not trusted');
  t.equal(foreign.log.divergedBytes, SIZE_BYTES);
});

t.test('a failed metadata write fails the write waiting for it, and every write after it', async (t) => {
  const store = new CrashLayerStore();
  const log = await DivergenceLog.create(options(store));
  store.failNext(1);
  await t.rejects(log.acquire(0, 4096) as Promise<void>, { code: 'BM_ERR_METADATA_IO' });
  await t.rejects(Promise.resolve(log.acquire(REGION_BYTES * 7, 4096)), { code: 'BM_ERR_METADATA_IO' }, 'refused, not written unrecorded');
  await t.rejects(Promise.resolve(log.acquire(0, 4096)), { code: 'BM_ERR_METADATA_IO' }, 'even where the bit is set in memory');
});
