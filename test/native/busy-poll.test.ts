// Busy polling (native/busy_poll.h): off unless asked for, spins where queue depth 1 would
// sleep, keeps data intact when it reaps from the check handle, and stops costing CPU once the
// loop's waits are longer than the maximum (an idle daemon must not burn a core).
import path from 'node:path';

import t from 'tap';

import { availableIoEngines, BUSY_POLL_MICROS_MAX, setBusyPoll } from '../../src/native/index';
import { runTsChild, sparseFile } from './fixtures';

const child = path.join(__dirname, 'child-busy-poll.ts');
const hasUring = availableIoEngines.includes('io_uring');

async function runChild(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Record<string, any>> {
  const result = await runTsChild(child, args, env);
  if (result.code !== 0) throw new Error(`child ${args.join(' ')} exited ${result.code}: ${result.stderr.slice(-1000)}`);
  return JSON.parse(result.stdout);
}

/** Whether polling catches anything depends on the machine answering within 1 ms at least once
 *  in hundreds of tries; on a machine that busy, try again before calling it a failure. */
async function runChildUntil(args: string[], caught: (out: Record<string, any>) => boolean): Promise<Record<string, any>> {
  let out: Record<string, any> = {};
  for (let attempt = 0; attempt < 3; attempt++) {
    out = await runChild(args);
    if (caught(out)) break;
  }
  return out;
}

t.test('setBusyPoll takes whole microseconds 0..1000 and refuses anything else', async (tt) => {
  for (const bad of [-1, 1.5, BUSY_POLL_MICROS_MAX + 1, Number.NaN, Infinity]) {
    tt.throws(() => setBusyPoll(bad), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }, String(bad));
  }
  tt.throws(() => setBusyPoll('32' as unknown as number), { code: 'ERR_OUT_OF_RANGE' });
});

t.test('off by default: lone writes never poll', { skip: !hasUring && 'io_uring unavailable' }, async (tt) => {
  const out = await runChild(['lone-writes', sparseFile(tt, 1024 * 1024), '0']);
  tt.equal(out.mismatches, 0);
  tt.same(out.stats, { maxMicros: 0, eventPolls: 0, eventPollHits: 0, completionPolls: 0, completionPollHits: 0 });
});

t.test('lone writes: completions are caught by polling and every byte reads back', { skip: !hasUring && 'io_uring unavailable' }, async (tt) => {
  // 600 ops, each started by the completion of the one before: the chain is polled for op after
  // op (up to 8 in one loop phase), not only every other op.
  const chained = (o: Record<string, any>): boolean => o.stats.completionPolls > 400;
  const out = await runChildUntil(['lone-writes', sparseFile(tt, 1024 * 1024), String(BUSY_POLL_MICROS_MAX)], chained);
  tt.equal(out.applied, true);
  tt.equal(out.mismatches, 0, '300 writes read back intact');
  tt.equal(out.stats.maxMicros, BUSY_POLL_MICROS_MAX);
  tt.ok(out.stats.completionPolls > 0, `polled for completions (${JSON.stringify(out.stats)})`);
  tt.ok(out.stats.completionPollHits > 0, 'and caught some');
  tt.ok(chained(out), 'a chain of ops is polled for op after op');
});

t.test('events that arrive while nothing is in flight are caught by polling', { skip: !hasUring && 'io_uring unavailable' }, async (tt) => {
  const out = await runChildUntil(['ping-pong', String(BUSY_POLL_MICROS_MAX)], (o) => o.stats.eventPollHits > 0);
  tt.ok(out.stats.eventPolls > 0, `polled for events (${JSON.stringify(out.stats)})`);
  tt.ok(out.stats.eventPollHits > 0, 'and caught some');
});

t.test('waits longer than the maximum switch polling off: timers 2 ms apart cost no spinning', { skip: !hasUring && 'io_uring unavailable' }, async (tt) => {
  const out = await runChildUntil(['idle', String(BUSY_POLL_MICROS_MAX)], (o) => o.stats.eventPolls > 0);
  tt.ok(out.stats.eventPolls > 0, 'the ping-pong before grew the budget');
  // A poller that did not adapt would spin up to 1 ms at each of the 250 wake-ups.
  tt.ok(out.idle.polls <= 25, `at most one poll in ten wake-ups (${out.idle.polls})`);
  tt.ok(out.idle.cpuMs < 125, `CPU over 500 ms of timers stays low (${out.idle.cpuMs.toFixed(1)} ms)`);
});

t.test('the thread-pool engine does not poll: setBusyPoll reports false', async (tt) => {
  const out = await runChild(['lone-writes', sparseFile(tt, 1024 * 1024), '32'], { ...process.env, BLOCKMIRROR_IO_ENGINE: 'threadpool' });
  tt.equal(out.applied, false);
  tt.equal(out.mismatches, 0);
  tt.equal(out.stats.completionPolls + out.stats.eventPolls, 0);
});
