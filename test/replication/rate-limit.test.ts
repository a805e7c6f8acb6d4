// RateLimit (--max-rate): a token bucket whose burst is one second of rate (at least one chunk).
// Most tests drive the bucket with an injected clock; the sleeps between refills stay real, so a
// frozen clock must keep a take() waiting however much real time passes.
import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { RateLimit } from '../../src/replication/rate-limit';
import { settlesWithin } from '../helpers/async';

class FakeClock {
  ms = 1000;
  readonly now = (): number => this.ms;
}


async function pollUntil(condition: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() > deadline) return false;
    await sleep(2);
  }
  return true;
}

t.test('bytesPerSecond must be a positive integer', async (t) => {
  for (const bad of [0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    t.throws(() => new RateLimit(bad, 1024), { name: 'AssertionError' }, String(bad));
  }
});

t.test('the burst (one second of rate) goes at once, then take waits for the clock', async (t) => {
  const clock = new FakeClock();
  // 100 kB/s: the refill sleep for 1000 bytes is 10 ms of real time.
  const limit = new RateLimit(100_000, 4096, clock.now);
  t.equal(limit.bytesPerSecond, 100_000);
  const started = performance.now();
  for (let i = 0; i < 10; i++) await limit.take(10_000);
  t.ok(performance.now() - started < 50, 'the whole burst is spent without waiting');

  let done = false;
  const waiting = limit.take(1000).then(() => {
    done = true;
  });
  t.notOk(await settlesWithin(waiting, 60), 'with the clock frozen, take keeps waiting across several refill sleeps');
  clock.ms += 5; // 500 bytes of tokens: not enough yet
  t.notOk(await settlesWithin(waiting, 40), 'half the tokens are not enough');
  clock.ms += 5; // 1000 bytes: enough
  t.ok(await pollUntil(() => done, 500), 'take resolves once the clock supplies the tokens');
  await waiting;
  // The tokens were spent: the next byte waits again.
  const again = limit.take(1);
  t.notOk(await settlesWithin(again, 30), 'bucket empty again');
  clock.ms += 1;
  await again;
});

t.test('tokens accumulate up to the burst and no further', async (t) => {
  const clock = new FakeClock();
  const limit = new RateLimit(100_000, 4096, clock.now);
  await limit.take(100_000);
  clock.ms += 60_000; // a minute idle: still only one second of burst
  await limit.take(100_000);
  const pending = limit.take(1);
  t.notOk(await settlesWithin(pending, 30), 'idle time beyond one second buys nothing');
  clock.ms += 1;
  await pending;
  t.pass('resolved after the clock moved');
});

t.test('a chunk larger than a second of rate still goes: the burst is at least one chunk', async (t) => {
  const clock = new FakeClock();
  const limit = new RateLimit(1000, 4096, clock.now);
  t.ok(await settlesWithin(limit.take(4096), 20), 'a full chunk is within the burst although the rate is 1000 B/s');
  const next = limit.take(1);
  t.notOk(await settlesWithin(next, 30), 'the burst is spent: the next byte waits');
  clock.ms += 1; // one byte at 1000 B/s
  t.ok(await settlesWithin(next, 200), 'resolves once the clock supplies it');

  // A whole chunk now waits ~4 s; abort it rather than keep the test alive.
  const controller = new AbortController();
  const chunk = limit.take(4096, controller.signal);
  t.notOk(await settlesWithin(chunk, 20), 'the next chunk waits');
  controller.abort();
  await t.rejects(chunk, { name: 'AbortError' });
});

t.test('an abort while waiting rejects with AbortError, and spends nothing', async (t) => {
  const clock = new FakeClock();
  const limit = new RateLimit(100_000, 4096, clock.now);
  await limit.take(100_000);
  const controller = new AbortController();
  const waiting = limit.take(50_000, controller.signal);
  t.notOk(await settlesWithin(waiting, 20), 'waiting for tokens');
  controller.abort();
  await t.rejects(waiting, { name: 'AbortError', code: 'ABORT_ERR' });
  clock.ms += 500; // 50 000 bytes
  t.ok(await settlesWithin(limit.take(50_000), 20), 'the aborted take did not consume the refill');

  const already = new AbortController();
  already.abort();
  await t.rejects(limit.take(1, already.signal), { name: 'AbortError' }, 'a signal aborted before the wait rejects at once');
});

t.test('real time: the average rate over many takes stays within bytesPerSecond', async (t) => {
  const bytesPerSecond = 1_000_000;
  const chunkBytes = 10_000;
  const limit = new RateLimit(bytesPerSecond, chunkBytes);
  await limit.take(bytesPerSecond); // spend the burst so what follows is paced
  const takes = 50; // 500 000 bytes: 500 ms at the configured rate
  const started = performance.now();
  for (let i = 0; i < takes; i++) await limit.take(chunkBytes);
  const elapsedMs = performance.now() - started;
  const rate = (takes * chunkBytes * 1000) / elapsedMs;
  t.comment(`${takes * chunkBytes} bytes in ${elapsedMs.toFixed(1)} ms = ${Math.round(rate)} B/s`);
  t.ok(rate <= bytesPerSecond * 1.02, `average ${Math.round(rate)} B/s is not above ${bytesPerSecond} B/s`);
  t.ok(rate >= bytesPerSecond * 0.5, `average ${Math.round(rate)} B/s is not far below ${bytesPerSecond} B/s`);
});
