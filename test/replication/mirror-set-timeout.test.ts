// Issue 4 parts 6 and 5: the sync-mode timeout (--sync-timeout, --on-timeout suspend|block) with a
// stalled path to the target, and `mirror set` (mirror.set) switching the mode under load, with
// the settings persisted across a restart; plus what the CLI and the daemon refuse. What users rely
// on: a slow target never hangs a write longer than the policy says, no acknowledged write is lost
// (both devices hash equal at the end), and the errors carry the documented codes.
import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import t, { type Test } from 'tap';
import { syncTimeoutMsDefault } from '../../src/control/protocol';
import { loadMirrors, mirrorsPath, mirrorsVersion, saveMirrors } from '../../src/replication/mirror-store';
import { settingsProblem, SyncDeadline, syncPolicyOf } from '../../src/replication/sync-timeout';
import { deferred, settlesWithin } from '../helpers/async';
import { haveTool, runCli, runTool } from '../helpers/daemon';
import { scratchDir } from '../helpers/loop';
import { deviceSha256, fioVerify, qemuIo, startMirrorPair, type MirrorPair, type MirrorStatus } from '../helpers/mirror-pair';

const MiB = 1024 * 1024;
const skip = haveTool('qemu-io') && haveTool('fio') ? false : 'needs qemu-io and fio';

/** The fields of `mirror status --json` this file reads beyond MirrorStatus. */
interface TimeoutStatus extends MirrorStatus {
  syncTimeoutMs: number;
  onTimeout: string;
  syncTimeouts: number;
  lastSyncTimeoutAt: string | null;
  maxRateBytesPerSec: number | null;
  onDisconnect: string;
  history: Array<{ from: string; to: string; event: string; reason: string; code: string | null }>;
}

async function status(pair: MirrorPair): Promise<TimeoutStatus> {
  return (await pair.status()) as TimeoutStatus;
}

async function expectEqualDevices(t: Test, pair: MirrorPair): Promise<void> {
  const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
  t.equal(target, source, 'source and target devices hash equal (sha256 of the whole device)');
}

function cliFor(pair: MirrorPair): (...args: string[]) => ReturnType<typeof runCli> {
  return (...args) => runCli(['--socket', pair.source.paths.controlSocket, ...args]);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** 64 KiB of the target device at offsetBytes, read with O_DIRECT. */
async function targetBlock(pair: MirrorPair, offsetBytes: number): Promise<Buffer> {
  const read = await runTool('dd', [`if=${pair.targetDevice.path}`, 'iflag=direct', 'bs=64k', `skip=${offsetBytes / (64 * 1024)}`, 'count=1', 'status=none']);
  return read.stdoutBytes;
}

t.test('--on-timeout suspend (default): a write to a stalled target completes after the sync timeout, the mirror cracks with BM_ERR_SYNC_TIMEOUT, then resyncs', { skip }, async (t) => {
  // ackTimeoutMs 3000 (the pair's default): a write that waited for the ack timeout would take >= 3 s.
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  const cli = cliFor(pair);
  const added = await cli('--json', 'mirror', 'add', 'vol0', '--peer', 'hostB', '--target', 'vol0', '--sync-timeout', '800ms');
  t.equal(added.code, 0, added.stderr);
  t.match(JSON.parse(added.stdout), { mode: 'sync', syncTimeoutMs: 800, onTimeout: 'suspend', syncTimeouts: 0, lastSyncTimeoutAt: null });
  await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC');
  t.equal((await qemuIo(pair.sourceUri, ['flush'])).code, 0);

  proxy.stall();
  const started = performance.now();
  const written = await qemuIo(pair.sourceUri, ['write -P 0x5a 2M 1M']);
  const tookMs = performance.now() - started;
  t.equal(written.code, 0, written.output);
  t.notMatch(written.output, /error|failed/i, 'the write succeeds (locally)');
  t.ok(tookMs >= 700, `it waited for the target up to the sync timeout (${Math.round(tookMs)} ms)`);
  t.ok(tookMs < 800 + 1200, `and not longer: ${Math.round(tookMs)} ms < sync timeout 800 ms + 1200 ms slack (the ack timeout is 3000 ms)`);

  const cracked = await status(pair);
  t.not(cracked.state, 'INSYNC', `the mirror is out of sync (${cracked.state})`);
  t.ok(cracked.syncTimeouts >= 1, `status counts the timeout (${cracked.syncTimeouts})`);
  t.ok(cracked.lastSyncTimeoutAt !== null && Date.parse(cracked.lastSyncTimeoutAt) > Date.now() - 10_000, 'and says when it happened');
  const crack = cracked.history.find((entry) => entry.event === 'connectionLost' && entry.from === 'INSYNC');
  t.match(crack, { to: 'OUTOFSYNC', code: 'BM_ERR_SYNC_TIMEOUT', reason: /sync timeout.*800 ms.*--on-timeout suspend/ }, 'INSYNC -> OUTOFSYNC, caused by the sync timeout');
  t.ok(cracked.dirtyBytes >= 1 * MiB, `the unacknowledged write is in the dirty bitmap (${cracked.dirtyBytes} bytes)`);
  t.ok(pair.source.logs().some((line) => line.msg === 'the target is slower than the sync timeout; cracking the link (--on-timeout suspend)'), 'logged');

  // With the link cracked, further writes are only marked dirty: they do not wait at all.
  const again = performance.now();
  t.equal((await qemuIo(pair.sourceUri, ['write -P 0x5b 6M 64k', 'flush'])).code, 0);
  t.ok(performance.now() - again < 700, 'writes while cracked complete at local speed');
  const human = await cli('mirror', 'status', 'vol0');
  t.match(human.stdout, /^sync timeout:\s+800 ms, on timeout suspend; [1-9]\d* timed out, last at /m, 'the human status shows the setting and the timeouts');

  proxy.resume();
  const back = await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after the stall');
  t.ok(back.history.some((entry) => entry.to === 'OUTOFSYNC' || entry.to === 'MAKEPARTS'), 'it reconnected');
  t.ok((await targetBlock(pair, 2 * MiB)).every((byte) => byte === 0x5a), 'the timed-out write reached the target by the resync');
  await expectEqualDevices(t, pair);
});

t.test('--on-timeout block: a write to a stalled target waits past the sync timeout and the ack timeout, held until the mirror is in sync again', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  const added = (await pair.source.request('mirror.add', { volume: 'vol0', peer: 'hostB', target: 'vol0', syncTimeoutMs: 500, onTimeout: 'block' })) as TimeoutStatus;
  t.match(added, { syncTimeoutMs: 500, onTimeout: 'block', onDisconnect: 'continue' });
  await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC');
  t.equal((await qemuIo(pair.sourceUri, ['flush'])).code, 0);

  proxy.stall();
  let finishedAtMs: number | undefined;
  const started = performance.now();
  const write = qemuIo(pair.sourceUri, ['write -P 0x3c 3M 64k']).then((result) => {
    finishedAtMs = performance.now();
    return result;
  });
  await sleep(1500);
  t.equal(finishedAtMs, undefined, 'still waiting 1.5 s after the write, three times the sync timeout');
  const delayed = await status(pair);
  t.ok(delayed.syncTimeouts >= 1, `the timeout was counted (${delayed.syncTimeouts})`);
  t.ok(pair.source.logs().some((line) => line.msg === 'the target is slower than the sync timeout; writes keep waiting for it (--on-timeout block)'), 'and logged');
  // The ack timeout (3000 ms) cracks the link; the write is then held like --on-disconnect block holds.
  await pair.waitFor((s) => s.state !== 'INSYNC', 'the ack timeout cracked the link', 6000);
  await sleep(500);
  t.equal(finishedAtMs, undefined, 'still held after the crack, while the target is unreachable');
  // New writes after the crack are not forwarded (on-disconnect continue): they go on, dirty.
  const other = performance.now();
  t.equal((await qemuIo(pair.sourceUri, ['write -P 0x3d 8M 64k'])).code, 0);
  t.ok(performance.now() - other < 1000, 'a write issued while the link is down is not held (--on-disconnect continue)');

  const resumedAtMs = performance.now();
  proxy.resume();
  const result = await write;
  t.notMatch(result.output, /error|failed/i, 'the held write succeeds once the mirror is back in sync');
  t.ok((finishedAtMs ?? 0) >= resumedAtMs, `it completed only after the path resumed (${Math.round((finishedAtMs ?? 0) - started)} ms after it was issued)`);
  t.ok((await targetBlock(pair, 3 * MiB)).every((byte) => byte === 0x3c), 'and its data is on the target');
  await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC');
  await expectEqualDevices(t, pair);
});

t.test('mirror set releases a write held by --on-timeout block; a mode change is refused while the mirror connects', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true, timing: { ackTimeoutMs: 1500 } });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  const cli = cliFor(pair);
  await pair.source.request('mirror.add', { volume: 'vol0', peer: 'hostB', target: 'vol0', syncTimeoutMs: 300, onTimeout: 'block' });
  await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC');
  t.equal((await qemuIo(pair.sourceUri, ['flush'])).code, 0);

  proxy.stall();
  let finishedAtMs: number | undefined;
  const write = qemuIo(pair.sourceUri, ['write -P 0x61 5M 64k']).then((result) => {
    finishedAtMs = performance.now();
    return result;
  });
  // The ack timeout cracks the link; reconnecting through the stalled proxy then sits in
  // MAKEPARTS until the connect timeout (2 s).
  await pair.waitFor((s) => s.state === 'MAKEPARTS', 'reconnecting (MAKEPARTS)', 8000);
  const refused = await cli('mirror', 'set', 'vol0', '--mode', 'stack');
  t.equal(refused.code, 1);
  t.match(refused.stderr, /^blockmirror: BM_ERR_MIRROR_COMMAND_NOT_ALLOWED: set-mode is not allowed while the mirror is MAKEPARTS/, 'a mode change waits until the mirror left MAKEPARTS');
  t.equal((await status(pair)).mode, 'sync', 'the refused change changed nothing');
  t.equal(finishedAtMs, undefined, 'the write is held');

  const set = await cli('--json', 'mirror', 'set', 'vol0', '--on-timeout', 'suspend', '--max-rate', '10M');
  t.equal(set.code, 0, set.stderr);
  t.match(JSON.parse(set.stdout), { onTimeout: 'suspend', maxRateBytesPerSec: 10 * MiB, mode: 'sync' }, 'other settings change in any state');
  t.ok(await settlesWithin(write, 1000), 'the held write completes at once after --on-timeout suspend (the path is still stalled)');
  const result = await write;
  t.notMatch(result.output, /error|failed/i, 'and succeeds');
  t.ok((await status(pair)).dirtyBytes >= 64 * 1024, 'its region is dirty');

  proxy.resume();
  await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after the stall');
  await expectEqualDevices(t, pair);
});

t.test('mirror set switches between sync, async and stack under fio load without losing writes; the settings survive a restart', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 4 * MiB });
  await pair.addMirror();
  const first = await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC');

  const modes = ['stack', 'sync', 'async', 'stack', 'async', 'sync'] as const;
  let switching = true;
  const seen: string[] = [];
  const switcher = (async () => {
    try {
      for (const mode of modes) {
        await sleep(300);
        const info = (await pair.source.request('mirror.set', { volume: 'vol0', mode })) as TimeoutStatus;
        seen.push(info.mode);
      }
    } finally {
      switching = false;
    }
  })();
  let rounds = 0;
  while (switching || rounds === 0) {
    const fio = await fioVerify(t, pair.sourceUri, 8 * MiB + (rounds % 4) * 8 * MiB, 8 * MiB);
    t.equal(fio.code, 0, `fio round ${rounds} (writes, then verifies) passed ${fio.stderr}`);
    rounds++;
  }
  await switcher;
  t.same(seen, modes, 'each mirror.set answered with the new mode');
  t.ok(rounds >= 2, `fio ran ${rounds} rounds while the mode switched ${modes.length} times`);

  const settled = await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after the switches', 30_000);
  t.equal(settled.mode, 'sync');
  t.ok(settled.sent.liveWrites > first.sent.liveWrites, 'writes were forwarded live in sync mode');
  t.ok(settled.sent.copyBytes > first.sent.copyBytes, 'and regions written in stack mode were shipped by the copier');
  await expectEqualDevices(t, pair);

  // Every setting is persisted and survives a restart.
  const cli = cliFor(pair);
  const set = await cli('--json', 'mirror', 'set', 'vol0', '--mode', 'stack', '--sync-timeout', '1.5s', '--on-timeout', 'block', '--max-rate', '40M');
  t.equal(set.code, 0, set.stderr);
  t.match(JSON.parse(set.stdout), { mode: 'stack', syncTimeoutMs: 1500, onTimeout: 'block', maxRateBytesPerSec: 40 * MiB });
  const onDisk = JSON.parse(readFileSync(mirrorsPath(pair.source.paths.stateDir), 'utf8')) as { mirrors: Array<Record<string, unknown>> };
  t.match(onDisk.mirrors[0], { mode: 'stack', syncTimeoutMs: 1500, onTimeout: 'block', maxRateBytesPerSec: 40 * MiB }, 'written to mirrors.json');
  await pair.restartSource();
  const restarted = (await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC after the restart')) as TimeoutStatus;
  t.match(restarted, { mode: 'stack', syncTimeoutMs: 1500, onTimeout: 'block', maxRateBytesPerSec: 40 * MiB }, 'the settings survived the restart');
  t.equal((await qemuIo(pair.sourceUri, ['write -P 0x42 20M 1M', 'flush'])).code, 0);
  const human = await cli('mirror', 'set', 'vol0', '--mode', 'sync', '--max-rate', 'none');
  t.equal(human.code, 0, human.stderr);
  t.match(human.stdout, /^mode:\s+sync, on disconnect continue, fast resync on$/m, 'the human output shows the new mode and no cap');
  t.match(human.stdout, /^sync timeout:\s+1500 ms, on timeout block; /m);
  await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC in sync mode again');
  await expectEqualDevices(t, pair);
});

t.test('CLI and control validation: durations, modes, policies and their combinations', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 8 * MiB });
  const cli = cliFor(pair);
  const add = (...extra: string[]): ReturnType<typeof runCli> => cli('--json', 'mirror', 'add', 'vol0', '--peer', 'hostB', '--target', 'vol0', ...extra);
  const refused = async (result: Promise<{ code: number | null; stderr: string }>, exitCode: number, code: string, what: string): Promise<void> => {
    const done = await result;
    t.equal(done.code, exitCode, `${what}: exit ${exitCode}`);
    t.match(done.stderr, new RegExp(`^blockmirror: ${code}: `), `${what}: ${code}`);
  };
  for (const bad of ['5x', '0s', '0ms', '5', '-1s', '2h', '5ms', 'soon', '1.0001s']) {
    await refused(add('--sync-timeout', bad), 2, 'BM_ERR_USAGE', `--sync-timeout ${bad}`);
  }
  await refused(add('--mode', 'semi-sync'), 1, 'BM_ERR_INVALID_ARGUMENT', 'unknown mode');
  await refused(add('--mode', 'async', '--on-disconnect', 'block'), 1, 'BM_ERR_INVALID_ARGUMENT', 'async with on-disconnect block');
  await refused(add('--mode', 'sync', '--async-buffer', '8M'), 1, 'BM_ERR_INVALID_ARGUMENT', 'async buffer without async mode');
  await refused(add('--on-timeout', 'maybe'), 1, 'BM_ERR_INVALID_ARGUMENT', 'unknown on-timeout policy');
  await refused(add('--on-disconnect', 'block', '--on-timeout', 'suspend'), 1, 'BM_ERR_INVALID_ARGUMENT', 'on-disconnect block with on-timeout suspend');
  await refused(add('--mode', 'stack', '--on-disconnect', 'block'), 1, 'BM_ERR_INVALID_ARGUMENT', 'stack with on-disconnect block');
  await refused(add('--max-rate', 'fast'), 2, 'BM_ERR_USAGE', 'bad rate');
  t.same((await pair.source.request('mirror.list')).mirrors, [], 'nothing was added by the refused commands');

  // Defaults: 5 s, suspend; with --on-disconnect block, on-timeout defaults to block.
  const strict = await add('--on-disconnect', 'block');
  t.equal(strict.code, 0, strict.stderr);
  t.match(JSON.parse(strict.stdout), { onDisconnect: 'block', onTimeout: 'block', syncTimeoutMs: syncTimeoutMsDefault });
  t.equal((await cli('mirror', 'remove', 'vol0', '--force')).code, 0);
  const plain = await add('--sync-timeout', '2m');
  t.equal(plain.code, 0, plain.stderr);
  t.match(JSON.parse(plain.stdout), { onDisconnect: 'continue', onTimeout: 'suspend', syncTimeoutMs: 120_000 });
  await pair.waitFor((s) => s.state === 'INSYNC', 'INSYNC');

  const set = (...args: string[]): ReturnType<typeof runCli> => cli('--json', 'mirror', 'set', 'vol0', ...args);
  await refused(set(), 2, 'BM_ERR_USAGE', 'mirror set with nothing to change');
  await refused(set('--peer', 'hostB'), 2, 'BM_ERR_USAGE', 'mirror set with only --peer');
  await refused(set('--mode', 'semi-sync'), 1, 'BM_ERR_INVALID_ARGUMENT', 'mirror set unknown mode');
  await refused(set('--sync-timeout', 'abc'), 2, 'BM_ERR_USAGE', 'mirror set bad duration');
  await refused(set('--on-timeout', 'later'), 1, 'BM_ERR_INVALID_ARGUMENT', 'mirror set unknown policy');
  await refused(set('--peer', 'nobody', '--mode', 'stack'), 1, 'BM_ERR_MIRROR_NOT_FOUND', 'mirror set on a peer without a mirror');
  await refused(cli('mirror', 'set', 'vol9', '--mode', 'stack'), 1, 'BM_ERR_MIRROR_NOT_FOUND', 'mirror set on a volume without a mirror');
  await refused(set('--on-disconnect', 'block'), 1, 'BM_ERR_INVALID_ARGUMENT', 'on-disconnect block while on-timeout is suspend');
  const strictNow = await set('--on-disconnect', 'block', '--on-timeout', 'block');
  t.equal(strictNow.code, 0, strictNow.stderr);
  t.match(JSON.parse(strictNow.stdout), { onDisconnect: 'block', onTimeout: 'block' });
  await refused(set('--mode', 'stack'), 1, 'BM_ERR_INVALID_ARGUMENT', 'stack while on-disconnect is block');
  await refused(set('--mode', 'async'), 1, 'BM_ERR_INVALID_ARGUMENT', 'async while on-disconnect is block');
  await refused(set('--on-timeout', 'suspend'), 1, 'BM_ERR_INVALID_ARGUMENT', 'on-timeout suspend while on-disconnect is block');
  const toStack = await set('--mode', 'stack', '--on-disconnect', 'continue');
  t.equal(toStack.code, 0, toStack.stderr);
  t.match(JSON.parse(toStack.stdout), { mode: 'stack', onDisconnect: 'continue', onTimeout: 'block' });

  // The control method itself checks types and ranges (the CLI is not the only client).
  for (const params of [{ syncTimeoutMs: 5 }, { syncTimeoutMs: 1.5 }, { syncTimeoutMs: 3_600_001 }, { mode: 'semi-sync' }, { onTimeout: 'wait' }, { maxRateBytesPerSec: 0 }, { bogus: 1 }, {}]) {
    const error = await pair.source.request('mirror.set', { volume: 'vol0', ...params }).catch((caught: unknown) => caught);
    t.match(error, { code: 'BM_ERR_INVALID_ARGUMENT' }, `mirror.set ${JSON.stringify(params)} refused`);
  }
  const unchanged = await status(pair);
  t.match(unchanged, { mode: 'stack', onDisconnect: 'continue', onTimeout: 'block', syncTimeoutMs: 120_000 }, 'refused changes changed nothing');
});

t.test('mirrors.json written before the sync timeout existed loads with the defaults', async (t) => {
  const dir = scratchDir(t);
  mkdirSync(dir, { recursive: true });
  const base = {
    volume: 'vol0',
    peer: 'hostB',
    target: 'vol0',
    mode: 'sync',
    maxRateBytesPerSec: null,
    generation: 7,
    fullCopyDone: true,
    suspended: false,
    error: null,
    createdAt: new Date().toISOString(),
  };
  const old = [
    { ...base, id: randomUUID(), onDisconnect: 'continue' },
    { ...base, id: randomUUID(), peer: 'hostC', onDisconnect: 'block' },
  ];
  writeFileSync(mirrorsPath(dir), JSON.stringify({ version: mirrorsVersion, mirrors: old }));
  const loaded = loadMirrors(dir);
  t.equal(loaded.length, 2);
  t.same(loaded.map((record) => syncPolicyOf(record)), [
    { syncTimeoutMs: syncTimeoutMsDefault, onTimeout: 'suspend' },
    { syncTimeoutMs: syncTimeoutMsDefault, onTimeout: 'block' },
  ], 'defaults: 5 s; suspend, or block for an --on-disconnect block mirror');
  saveMirrors(dir, [{ ...(loaded[0] as (typeof loaded)[number]), syncTimeoutMs: 250, onTimeout: 'block' }]);
  t.match(loadMirrors(dir)[0], { syncTimeoutMs: 250, onTimeout: 'block' }, 'new fields round-trip');
  writeFileSync(mirrorsPath(dir), JSON.stringify({ version: mirrorsVersion, mirrors: [{ ...old[0], syncTimeoutMs: 0 }] }));
  t.throws(() => loadMirrors(dir), { code: 'BM_ERR_STATE_CORRUPT' }, 'an out-of-range timeout is refused');
  t.equal(settingsProblem({ mode: 'sync', onDisconnect: 'continue', syncTimeoutMs: 100, onTimeout: 'block' }), undefined, 'continue + block is a valid combination');
});

t.test('SyncDeadline reports each operation once, when it passes the timeout, and never a settled one', async (t) => {
  const expired: Array<{ count: number; waitedMs: number }> = [];
  let timeoutMs = 80;
  const deadline = new SyncDeadline(() => timeoutMs, (count, waitedMs) => expired.push({ count, waitedMs }));
  t.teardown(() => deadline.close());
  const quick = deferred<string>();
  void deadline.track(quick.promise);
  quick.resolve('ok');
  const stuck = [deferred<string>(), deferred<string>()];
  for (const entry of stuck) void deadline.track(entry.promise);
  await sleep(40);
  t.same(expired, [], 'nothing before the timeout');
  await sleep(120);
  const total = (): number => expired.reduce((sum, report) => sum + report.count, 0);
  t.equal(total(), 2, 'both waiting operations were reported, the settled one not');
  t.ok(expired.every((report) => report.waitedMs >= 80), 'not before they waited the timeout');
  const reports = expired.length;
  await sleep(150);
  t.equal(expired.length, reports, 'an expired operation is not reported again');
  for (const entry of stuck) entry.resolve('ok');
  // A longer timeout set at run time applies to operations already waiting.
  timeoutMs = 10_000;
  const later = deferred<string>();
  void deadline.track(later.promise);
  deadline.rearm();
  await sleep(150);
  t.equal(expired.length, reports, 'the new, longer timeout applies');
  later.resolve('ok');
});
