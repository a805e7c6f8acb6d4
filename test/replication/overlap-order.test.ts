// OverlapOrder: the target applies overlapping writes in arrival order (an older copy chunk must
// never land after a newer client write), everything else concurrently.
import t from 'tap';
import { OverlapOrder } from '../../src/replication/overlap-order';
import { deferred, type Deferred } from '../helpers/async';

/** Lets every pending promise callback (and a macrotask turn) run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** An operation that logs when it starts and finishes only when the test says so. */
function controlled(log: string[], name: string): { operation: () => Promise<string>; gate: Deferred<string> } {
  const gate = deferred<string>();
  return {
    gate,
    operation: () => {
      log.push(`start ${name}`);
      return gate.promise.finally(() => log.push(`end ${name}`));
    },
  };
}

t.test('constructor refuses a non-positive or fractional activeMax', async (t) => {
  for (const bad of [0, -1, 1.5, Number.NaN]) t.throws(() => new OverlapOrder(bad), { name: 'AssertionError' }, String(bad));
  t.doesNotThrow(() => new OverlapOrder(1));
});

t.test('an operation that throws instead of rejecting settles as a rejection and leaves the order', async (t) => {
  const order = new OverlapOrder(4);
  const thrown = new Error('thrown synchronously');
  const result = order.run(0, 4096, () => {
    throw thrown;
  });
  await t.rejects(result, thrown);
  await settle();
  t.equal(order.size, 0, 'no entry left behind');
  await order.drain();
  const log: string[] = [];
  const next = controlled(log, 'next');
  const nextResult = order.run(0, 4096, next.operation);
  t.same(log, ['start next'], 'an overlapping operation after it starts at once');
  next.gate.resolve('N');
  t.equal(await nextResult, 'N');
});

t.test('an overlapping operation starts only after the earlier one settled', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const resultA = order.run(0, 8192, a.operation);
  const resultB = order.run(4096, 8192, b.operation);
  t.same(log, ['start a'], 'a starts at once');
  t.equal(order.size, 2);
  await settle();
  t.same(log, ['start a'], 'b waits while a is in flight');
  a.gate.resolve('A');
  t.equal(await resultA, 'A');
  await settle();
  t.same(log, ['start a', 'end a', 'start b'], 'b starts after a ended');
  b.gate.resolve('B');
  t.equal(await resultB, 'B');
  t.equal(order.size, 0, 'settled operations are forgotten');
});

t.test('a rejected operation still releases the next overlapping one, which is unaffected', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const resultA = order.run(0, 4096, a.operation);
  const resultB = order.run(0, 4096, b.operation);
  await settle();
  t.same(log, ['start a']);
  a.gate.reject(Object.assign(new Error('device failed'), { code: 'EIO' }));
  await t.rejects(resultA, { code: 'EIO' }, 'the caller of a sees its error');
  await settle();
  t.same(log, ['start a', 'end a', 'start b'], 'b starts after a rejected');
  b.gate.resolve('B');
  t.equal(await resultB, 'B', 'b does not inherit a\'s error');
  t.equal(order.size, 0);
});

t.test('a chain of overlapping operations runs strictly in arrival order', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  // b overlaps a; c overlaps b only; d overlaps everything.
  const ops = {
    a: controlled(log, 'a'),
    b: controlled(log, 'b'),
    c: controlled(log, 'c'),
    d: controlled(log, 'd'),
  };
  const results = [
    order.run(0, 4096, ops.a.operation),
    order.run(2048, 4096, ops.b.operation),
    order.run(5000, 4096, ops.c.operation),
    order.run(0, 65536, ops.d.operation),
  ];
  await settle();
  t.same(log, ['start a']);
  // c does not overlap a, but it overlaps b, which has not even started: c waits for b.
  ops.a.gate.resolve('a');
  await settle();
  t.same(log, ['start a', 'end a', 'start b']);
  ops.b.gate.resolve('b');
  await settle();
  t.same(log, ['start a', 'end a', 'start b', 'end b', 'start c']);
  ops.c.gate.resolve('c');
  await settle();
  t.same(log, ['start a', 'end a', 'start b', 'end b', 'start c', 'end c', 'start d']);
  ops.d.gate.resolve('d');
  t.same(await Promise.all(results), ['a', 'b', 'c', 'd']);
});

t.test('two operations waiting on the same one start in arrival order', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const c = controlled(log, 'c');
  const results = [order.run(0, 8192, a.operation), order.run(0, 4096, b.operation), order.run(4096, 4096, c.operation)];
  a.gate.resolve('a');
  await settle();
  t.same(log, ['start a', 'end a', 'start b', 'start c'], 'b and c (disjoint) both run after a, b first');
  b.gate.resolve('b');
  c.gate.resolve('c');
  t.same(await Promise.all(results), ['a', 'b', 'c']);
});

t.test('non-overlapping operations run concurrently', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const c = controlled(log, 'c');
  const resultA = order.run(0, 4096, a.operation);
  const resultB = order.run(1 << 20, 4096, b.operation);
  const resultC = order.run(1 << 30, 1, c.operation);
  t.same(log, ['start a', 'start b', 'start c'], 'all start synchronously');
  t.equal(order.size, 3);
  // Finishing out of order is fine.
  c.gate.resolve('c');
  b.gate.resolve('b');
  t.equal(await resultC, 'c');
  t.equal(await resultB, 'b');
  a.gate.resolve('a');
  t.equal(await resultA, 'a');
});

t.test('adjacent ranges (touching, not overlapping) do not wait', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const before = controlled(log, 'before');
  const after = controlled(log, 'after');
  const results = [
    order.run(4096, 4096, a.operation),
    order.run(0, 4096, before.operation), // ends where a starts
    order.run(8192, 4096, after.operation), // starts where a ends
  ];
  t.same(log, ['start a', 'start before', 'start after']);
  // One byte of overlap does wait.
  const overlapping = controlled(log, 'overlap');
  const resultOverlap = order.run(8191, 1, overlapping.operation);
  await settle();
  t.notOk(log.includes('start overlap'), 'a one-byte overlap waits');
  a.gate.resolve('a');
  before.gate.resolve('before');
  after.gate.resolve('after');
  await Promise.all(results);
  await settle();
  t.ok(log.includes('start overlap'));
  overlapping.gate.resolve('overlap');
  t.equal(await resultOverlap, 'overlap');
});

t.test('drain waits only for operations started before it was called', async (t) => {
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const later = controlled(log, 'later');
  const resultA = order.run(0, 4096, a.operation);
  const resultB = order.run(0, 4096, b.operation); // queued behind a: also "started" for drain
  let drained = false;
  const drain = order.drain().then(() => {
    drained = true;
  });
  const resultLater = order.run(1 << 20, 4096, later.operation);
  await settle();
  t.notOk(drained, 'drain waits while a and b are pending');
  a.gate.reject(new Error('a failed'));
  await t.rejects(resultA);
  await settle();
  t.notOk(drained, 'drain still waits for b');
  b.gate.resolve('b');
  await drain;
  t.ok(drained, 'drain resolved (a rejection does not make drain reject)');
  t.equal(await resultB, 'b');
  t.equal(order.size, 1, 'the later operation is still in flight: drain did not wait for it');
  later.gate.resolve('later');
  t.equal(await resultLater, 'later');
  t.equal(order.size, 0);
  await order.drain(); // nothing in flight: resolves at once
});

t.test('activeMax: a run beyond the bound is an assertion; room frees up as operations settle', async (t) => {
  const order = new OverlapOrder(2);
  const log: string[] = [];
  const a = controlled(log, 'a');
  const b = controlled(log, 'b');
  const resultA = order.run(0, 4096, a.operation);
  const resultB = order.run(0, 4096, b.operation);
  const c = controlled(log, 'c');
  t.throws(() => order.run(1 << 20, 4096, c.operation), { name: 'AssertionError', message: /too many operations in flight/ });
  t.notOk(log.includes('start c'), 'the refused operation never ran');
  t.equal(order.size, 2);
  a.gate.resolve('a');
  await resultA;
  t.equal(order.size, 1);
  const resultC = order.run(1 << 20, 4096, c.operation);
  t.ok(log.includes('start c'), 'accepted once below the bound');
  b.gate.resolve('b');
  c.gate.resolve('c');
  t.same(await Promise.all([resultB, resultC]), ['b', 'c']);
  t.equal(order.size, 0);
});

t.test('ranges across bucket edges and wide ranges still find every overlap', async (t) => {
  const MiB = 1 << 20;
  const order = new OverlapOrder(16);
  const log: string[] = [];
  const straddle = controlled(log, 'straddle'); // the last 4 KiB of one MiB and the first of the next
  const next = controlled(log, 'next');
  const wide = controlled(log, 'wide'); // 100 MiB: kept apart from the buckets
  const inside = controlled(log, 'inside');
  const far = controlled(log, 'far');
  const results = [
    order.run(MiB - 4096, 8192, straddle.operation),
    order.run(MiB + 4095, 1, next.operation), // overlaps straddle's last byte, in the next bucket
    order.run(0, 100 * MiB, wide.operation), // overlaps both
    order.run(50 * MiB, 4096, inside.operation), // overlaps only wide
    order.run(200 * MiB, 4096, far.operation), // overlaps nothing
  ];
  t.same(log, ['start straddle', 'start far']);
  straddle.gate.resolve('straddle');
  await settle();
  t.same(log, ['start straddle', 'start far', 'end straddle', 'start next']);
  next.gate.resolve('next');
  await settle();
  t.ok(log.includes('start wide'), 'wide starts once both are done');
  t.notOk(log.includes('start inside'), 'inside waits for the wide range');
  wide.gate.resolve('wide');
  await settle();
  t.ok(log.includes('start inside'));
  inside.gate.resolve('inside');
  far.gate.resolve('far');
  t.same(await Promise.all(results), ['straddle', 'next', 'wide', 'inside', 'far']);
  t.equal(order.size, 0);
});

t.test('random ranges and completion order: overlaps keep arrival order, drain is exact (seeded)', async (t) => {
  let seed = Number(process.env.OVERLAP_SEED ?? 20261204);
  t.comment(`seed ${seed}`);
  const random = (): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  const MiB = 1 << 20;
  const order = new OverlapOrder(64);
  interface Op { start: number; end: number; started: boolean; ended: boolean; gate: Deferred<void> }
  const ops: Op[] = [];
  const drains: Array<{ upTo: number; done: boolean }> = [];
  let violations = 0;
  for (let step = 0; step < 600; step++) {
    if (order.size < 60 && random() < 0.6) {
      // Mostly small writes in a 16 MiB span, some across bucket edges, a few wide.
      const wide = random() < 0.03;
      const start = wide ? Math.floor(random() * 4) * MiB : Math.floor(random() * 16 * MiB);
      const length = wide ? 80 * MiB : 1 + Math.floor(random() * 256 * 1024);
      const op: Op = { start, end: start + length, started: false, ended: false, gate: deferred<void>() };
      const index = ops.length;
      ops.push(op);
      void order.run(start, length, () => {
        // Every earlier overlapping operation must have ended already.
        for (let earlier = 0; earlier < index; earlier++) {
          const other = ops[earlier] as Op;
          if (other.start < op.end && op.start < other.end && !other.ended) violations++;
        }
        op.started = true;
        return op.gate.promise.finally(() => {
          op.ended = true;
        });
      });
      if (random() < 0.1) {
        const entry = { upTo: ops.length, done: false };
        drains.push(entry);
        void order.drain().then(() => {
          entry.done = true;
          // Exact: every operation before the drain has ended.
          for (let i = 0; i < entry.upTo; i++) if (!(ops[i] as Op).ended) violations++;
        });
      }
    } else {
      const running = ops.filter((op) => op.started && !op.ended);
      if (running.length > 0) (running[Math.floor(random() * running.length)] as Op).gate.resolve();
      await settle();
    }
  }
  for (;;) {
    const running = ops.filter((op) => op.started && !op.ended);
    if (running.length === 0) break;
    for (const op of running) op.gate.resolve();
    await settle();
  }
  t.equal(violations, 0, 'no operation started before an earlier overlapping one ended; no drain resolved early');
  t.ok(ops.every((op) => op.ended), `all ${ops.length} operations ran`);
  t.ok(drains.every((entry) => entry.done), `all ${drains.length} drains resolved`);
  t.equal(order.size, 0);
});
