// WriteIntentLog scheduling: group commit, no lost wakeups, eviction never takes what the
// admitted request itself needs, closed logs write nothing (regressions from review).
import t from 'tap';
import pino from 'pino';
import { CrashLayerStore } from '../../src/write-intent/crash-layer';
import { openWriteIntentLog } from '../../src/write-intent/recovery';
import { EXTENT_BYTES, type WriteIntentLog } from '../../src/write-intent/write-intent-log';

const silent = pino({ level: 'silent' });

async function openLog(store: CrashLayerStore, extents: number): Promise<WriteIntentLog> {
  const { log } = await openWriteIntentLog({ store, stateDir: '/s', volumeUuid: 'u', sizeBytes: extents * EXTENT_BYTES, regionBytes: 65536, capacityExtents: 34, logger: silent });
  await log.start();
  return log;
}

function within<T>(promise: Promise<T> | T, ms: number): Promise<T | 'stuck'> {
  return Promise.race([Promise.resolve(promise), new Promise<'stuck'>((resolve) => setTimeout(() => resolve('stuck'), ms))]);
}

t.test('hot extents cost nothing; concurrent misses share one transaction', async (t) => {
  const store = new CrashLayerStore();
  const log = await openLog(store, 64);
  const before = log.stats().transactions;
  await Promise.all(Array.from({ length: 20 }, (_, extent) => log.acquire(extent * EXTENT_BYTES, 4096)));
  t.equal(log.stats().transactions - before, 1, '20 new extents at once: one slot write (group commit)');
  for (let extent = 0; extent < 20; extent++) log.release(extent * EXTENT_BYTES, 4096);
  t.equal(log.acquire(5 * EXTENT_BYTES, 4096), undefined, 'a hot extent is granted at once, without a promise');
  log.release(5 * EXTENT_BYTES, 4096);
  t.equal(log.stats().transactions - before, 1);
});

t.test('an acquire issued while the commit loop finishes is not forgotten', async (t) => {
  const log = await openLog(new CrashLayerStore(), 64);
  await log.acquire(0, 4096);
  const second = log.acquire(EXTENT_BYTES, 4096); // in the granted waiter's continuation
  t.equal(await within(Promise.resolve(second).then(() => 'granted'), 2000), 'granted');
});

t.test('eviction never takes an extent the admitted request needs', async (t) => {
  const log = await openLog(new CrashLayerStore(), 256);
  for (let extent = 0; extent < 34; extent++) {
    await log.acquire(extent * EXTENT_BYTES, 4096);
    log.release(extent * EXTENT_BYTES, 4096);
  }
  await log.acquire(34 * EXTENT_BYTES, 4096); // evicts extent 0 (least recently used)
  log.release(34 * EXTENT_BYTES, 4096);
  const before = log.stats().transactions;
  await log.acquire(0, 17 * EXTENT_BYTES); // extents 0..16: 1..16 hot and idle, 0 missing
  t.equal(log.stats().transactions - before, 1, 'one transaction brings in the one missing extent');
});

t.test('a failing metadata disk fails the waiting writes with BM_ERR_METADATA_IO; later ones succeed again', async (t) => {
  const store = new CrashLayerStore();
  const log = await openLog(store, 64);
  store.failNext(1);
  await t.rejects(Promise.resolve(log.acquire(0, 4096)), { code: 'BM_ERR_METADATA_IO' });
  t.match(log.stats().lastError, /injected EIO/);
  await log.acquire(0, 4096);
  t.equal(log.stats().lastError, null, 'the next transaction worked');
});

t.test('a removed log writes nothing more, and its waiters fail instead of hanging', async (t) => {
  const store = new CrashLayerStore();
  const log = await openLog(store, 64);
  await log.remove();
  const writes = store.counters.writes;
  const outcome = await within(Promise.resolve(log.acquire(0, 4096)).then(() => 'granted', (error: Error) => (error as { code?: string }).code), 2000);
  t.equal(outcome, 'BM_ERR_METADATA_IO');
  t.equal(store.counters.writes, writes, 'no write after remove');
  t.equal(await store.open('/s/write-intent/u.log').read(), undefined, 'the file stays removed');
});
