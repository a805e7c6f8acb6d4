import t from 'tap';

import { BACKOFF_MAX_MS_LIMIT, ExponentialBackoff, seededRandom } from '../../src/replication/backoff';

t.test('options are validated with a stable code', async (t) => {
  const random = seededRandom(1);
  for (const [baseMs, maxMs] of [
    [0, 100],
    [1.5, 100],
    [100, 50],
    [1, BACKOFF_MAX_MS_LIMIT + 1],
    [Number.NaN, 100],
  ]) {
    t.throws(() => new ExponentialBackoff({ baseMs, maxMs, random }), { code: 'BM_ERR_BACKOFF_OPTIONS' }, `${baseMs}/${maxMs}`);
  }
  t.doesNotThrow(() => new ExponentialBackoff({ baseMs: 100, maxMs: 100, random }));
});

t.test('ceiling doubles from baseMs and saturates at maxMs', async (t) => {
  const backoff = new ExponentialBackoff({ baseMs: 100, maxMs: 1000, random: () => 0.5 });
  const ceilings: number[] = [];
  for (let i = 0; i < 8; i++) {
    ceilings.push(backoff.ceilingMs());
    backoff.nextDelayMs();
  }
  t.same(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
  t.equal(backoff.attempts, 8);
});

t.test('delays are full jitter: within [0, ceiling], both ends reachable', async (t) => {
  const low = new ExponentialBackoff({ baseMs: 100, maxMs: 1000, random: () => 0 });
  const high = new ExponentialBackoff({ baseMs: 100, maxMs: 1000, random: () => 1 - Number.EPSILON });
  for (let i = 0; i < 6; i++) {
    const ceilingMs = high.ceilingMs();
    t.equal(low.nextDelayMs(), 0);
    t.equal(high.nextDelayMs(), ceilingMs);
  }
  const seeded = new ExponentialBackoff({ baseMs: 50, maxMs: 5000, random: seededRandom(7) });
  for (let i = 0; i < 200; i++) {
    const ceilingMs = seeded.ceilingMs();
    const delayMs = seeded.nextDelayMs();
    t.ok(Number.isInteger(delayMs) && delayMs >= 0 && delayMs <= ceilingMs, `attempt ${i}: ${delayMs} <= ${ceilingMs}`);
  }
});

t.test('the same seed gives the same delays, another seed other delays', async (t) => {
  const run = (seed: number) => {
    const backoff = new ExponentialBackoff({ baseMs: 10, maxMs: 60_000, random: seededRandom(seed) });
    return Array.from({ length: 20 }, () => backoff.nextDelayMs());
  };
  t.same(run(42), run(42));
  t.notSame(run(42), run(43));
});

t.test('reset after success starts again at baseMs', async (t) => {
  const backoff = new ExponentialBackoff({ baseMs: 100, maxMs: 10_000, random: seededRandom(3) });
  for (let i = 0; i < 5; i++) backoff.nextDelayMs();
  t.equal(backoff.ceilingMs(), 3200);
  backoff.reset();
  t.equal(backoff.attempts, 0);
  t.equal(backoff.ceilingMs(), 100);
  t.ok(backoff.nextDelayMs() <= 100);
});

t.test('bounded after very many failures (no overflow to Infinity)', async (t) => {
  const backoff = new ExponentialBackoff({ baseMs: 1, maxMs: BACKOFF_MAX_MS_LIMIT, random: () => 1 - Number.EPSILON });
  let delayMs = 0;
  for (let i = 0; i < 5000; i++) delayMs = backoff.nextDelayMs();
  t.equal(delayMs, BACKOFF_MAX_MS_LIMIT);
  t.equal(backoff.ceilingMs(), BACKOFF_MAX_MS_LIMIT);
});

t.test('a random source out of [0, 1) is a programming error', async (t) => {
  for (const value of [1, -0.1, Number.NaN]) {
    const backoff = new ExponentialBackoff({ baseMs: 1, maxMs: 10, random: () => value });
    t.throws(() => backoff.nextDelayMs(), { code: 'ERR_ASSERTION' }, String(value));
    t.equal(backoff.attempts, 0, 'a refused draw does not count');
  }
});

t.test('seededRandom stays in [0, 1)', async (t) => {
  const random = seededRandom(0);
  let min = 1;
  let max = 0;
  for (let i = 0; i < 10_000; i++) {
    const value = random();
    min = Math.min(min, value);
    max = Math.max(max, value);
  }
  t.ok(min >= 0 && min < 0.01, `min ${min}`);
  t.ok(max < 1 && max > 0.99, `max ${max}`);
});
