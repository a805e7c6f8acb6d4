import t from 'tap';
import { RangeLock, RangeLockHandle } from '../../src/volume/range-lock';

async function take(lock: RangeLock, start: number, end: number, exclusive: boolean): Promise<RangeLockHandle> {
  return await lock.acquire(start, end, exclusive);
}

t.test('shared ranges do not wait for each other', async (t) => {
  const lock = new RangeLock();
  const a = lock.acquire(0, 4096, false);
  const b = lock.acquire(0, 4096, false);
  t.notOk(a instanceof Promise, 'first shared granted at once');
  t.notOk(b instanceof Promise, 'overlapping shared granted at once');
  t.equal(lock.heldCount, 2);
});

t.test('exclusive waits for overlapping shared holders, not for disjoint ones', async (t) => {
  const lock = new RangeLock();
  const shared = await take(lock, 0, 4096, false);
  const disjoint = lock.acquire(8192, 12288, true);
  t.notOk(disjoint instanceof Promise, 'disjoint exclusive granted');
  let granted = false;
  const waiting = take(lock, 2048, 6144, true).then((h) => { granted = true; return h; });
  await new Promise((r) => setImmediate(r));
  t.notOk(granted, 'overlapping exclusive waits');
  lock.release(shared);
  const handle = await waiting;
  t.ok(granted);
  t.equal(handle.startBytes, 2048);
});

t.test('shared requests queue behind a waiting exclusive (no starvation)', async (t) => {
  const lock = new RangeLock();
  const first = await take(lock, 0, 4096, false);
  const order: string[] = [];
  const exclusive = take(lock, 0, 4096, true).then((h) => { order.push('exclusive'); return h; });
  const later = lock.acquire(0, 4096, false);
  t.ok(later instanceof Promise, 'later shared request waits behind the exclusive one');
  const laterDone = (later as Promise<RangeLockHandle>).then((h) => { order.push('shared'); return h; });
  lock.release(first);
  const ex = await exclusive;
  await new Promise((r) => setImmediate(r));
  t.same(order, ['exclusive']);
  lock.release(ex);
  await laterDone;
  t.same(order, ['exclusive', 'shared']);
});

t.test('release of a range not held is a programming error', async (t) => {
  const lock = new RangeLock();
  t.throws(() => lock.release({ startBytes: 0, endBytes: 1, exclusive: false }));
});
