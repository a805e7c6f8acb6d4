// Issue 4 part 2: generation ids and split brain, between two real daemons on loop devices.
// A mirror volume promoted by hand (DR failover) and written diverges from its source. When the
// source reaches it again the mirror must stop in ERROR BM_ERR_SPLIT_BRAIN and copy nothing in
// either direction, until the admin picks the side that wins with `mirror resolve --discard`.
// Then exactly the union of both sides' changed 64 KiB regions is copied (this -> peer, or the
// peer's bytes restored here), and both devices hash equal to the winner's bytes.
//
// Region sets are computed from the writes below: A is written on the source while the link is
// down, B on the promoted target. |A| = 5, |B| = 6, |A ∩ B| = 2, |A ∪ B| = 9 regions.
import t, { type Test } from 'tap';
import { haveTool } from '../helpers/daemon';
import { NbdTestClient } from '../helpers/nbd-client';
import {
  cliOn,
  cutLink,
  deviceSha256,
  qemuIo,
  restoreLink,
  startMirrorPair,
  volumeInfo,
  waitForVolume,
  type MirrorPair,
  type MirrorStatus,
} from '../helpers/mirror-pair';

const KiB = 1024;
const MiB = 1024 * KiB;
const REGION = 64 * KiB;
const SIZE = 64 * MiB;
const skip = process.getuid?.() !== 0 ? 'needs root for loop devices' : haveTool('qemu-io') ? false : 'needs qemu-io';

interface Write {
  offset: number;
  length: number;
  pattern: number;
}

/** Set A, on the source while the link is down. The third write straddles regions 40 and 41. */
const writesA: Write[] = [
  { offset: 1 * MiB, length: 64 * KiB, pattern: 0xa1 }, // region 16
  { offset: 1136 * KiB, length: 8 * KiB, pattern: 0xa2 }, // region 17
  { offset: 2600 * KiB, length: 64 * KiB, pattern: 0xa3 }, // regions 40, 41
  { offset: 20 * MiB, length: 4 * KiB, pattern: 0xa4 }, // region 320
];
/** Set B, on the promoted target: overlaps A in 17 and 41; 48-49 lie in the random fill. */
const writesB: Write[] = [
  { offset: 1120 * KiB, length: 4 * KiB, pattern: 0xb1 }, // region 17
  { offset: 2624 * KiB, length: 4 * KiB, pattern: 0xb2 }, // region 41
  { offset: 3 * MiB, length: 128 * KiB, pattern: 0xb3 }, // regions 48, 49
  { offset: 40 * MiB, length: 64 * KiB, pattern: 0xb4 }, // region 640
  { offset: 63 * MiB, length: 4 * KiB, pattern: 0xb5 }, // region 1008
];

function regionsOf(writes: readonly Write[]): Set<number> {
  const regions = new Set<number>();
  for (const write of writes) {
    for (let region = Math.floor(write.offset / REGION); region <= Math.floor((write.offset + write.length - 1) / REGION); region++) regions.add(region);
  }
  return regions;
}

const regionsA = regionsOf(writesA);
const regionsB = regionsOf(writesB);
const union = new Set([...regionsA, ...regionsB]);
const unionBytes = union.size * REGION;

interface SplitBrain {
  detectedAt: string;
  peerDivergedBytes: number;
  peerPromoted: boolean;
  localDirtyBytes: number;
  resolving: 'this' | 'peer' | null;
  restoring: boolean;
}

/** The fields of `mirror status --json` this file reads beyond MirrorStatus. */
interface SplitBrainStatus extends MirrorStatus {
  splitBrain: SplitBrain | null;
  received?: { restoreBytes: number };
}

async function status(pair: MirrorPair): Promise<SplitBrainStatus> {
  return (await pair.status()) as SplitBrainStatus;
}

async function waitStatus(pair: MirrorPair, predicate: (status: SplitBrainStatus) => boolean, what: string, timeoutMs?: number): Promise<SplitBrainStatus> {
  return (await pair.waitFor((s) => predicate(s as SplitBrainStatus), what, timeoutMs)) as SplitBrainStatus;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function copied(status: MirrorStatus): number {
  return status.sent.copyBytes + status.sent.zeroBytes;
}

async function hashes(pair: MirrorPair): Promise<{ source: string; target: string }> {
  const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
  return { source, target };
}

async function write(t: Test, uri: string, writes: readonly Write[], what: string): Promise<void> {
  const result = await qemuIo(uri, [...writes.map((w) => `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`), 'flush']);
  t.equal(result.code, 0, `${what}: qemu-io exit 0`);
  t.notMatch(result.output, /error|failed|not permitted/i, `${what}: written (${result.output.trim().split('\n').length} lines of output)`);
}

/** A CLI refusal: exit 1 and `blockmirror: <code>: ` on stderr. */
async function expectRefused(t: Test, result: Promise<{ code: number | null; stderr: string }>, code: string, what: string): Promise<void> {
  const done = await result;
  t.equal(done.code, 1, `${what}: exit 1`);
  t.match(done.stderr, new RegExp(`^blockmirror: ${code}: `), `${what}: ${code} (stderr: ${done.stderr.trim()})`);
}

/** `volume promote` on the target. Right after the link was cut, the target may still be tearing
 *  the replication session down (BM_ERR_VOLUME_BUSY); that is retried for up to 3 s. */
async function promoteTarget(t: Test, pair: MirrorPair): Promise<void> {
  const cli = cliOn(pair.target);
  const deadline = Date.now() + 3000;
  let busy = 0;
  for (;;) {
    const result = await cli('--json', 'volume', 'promote', 'vol0');
    if (result.code === 0) break;
    if (!/BM_ERR_VOLUME_BUSY/.test(result.stderr) || Date.now() > deadline) {
      t.fail(`volume promote failed: exit ${result.code}: ${result.stderr}`);
      throw new Error('promote failed');
    }
    busy++;
    await sleep(50);
  }
  if (busy > 0) t.comment(`promote answered BM_ERR_VOLUME_BUSY ${busy} time(s) right after the cut (session teardown)`);
  const info = await volumeInfo(pair.target);
  t.equal(info.promoted, true, 'volume info: promoted');
}

/** `volume demote` once the NBD clients the test used have gone (their disconnect is async). */
async function demoteTarget(t: Test, pair: MirrorPair): Promise<void> {
  await waitForVolume(pair.target, (info) => info.connections === 0, 'no NBD connection');
  const result = await cliOn(pair.target)('--json', 'volume', 'demote', 'vol0');
  t.equal(result.code, 0, `volume demote: exit 0 ${result.stderr}`);
  t.equal((await volumeInfo(pair.target)).promoted, false, 'volume info: not promoted after demote');
}

/** In sync, link cut, A written on the source, target promoted, B written there. Returns the
 *  mirror status before the promotion (the copy counters at that point). */
async function diverge(t: Test, pair: MirrorPair, options: { demote: boolean }): Promise<SplitBrainStatus> {
  await pair.addMirror({ mode: 'sync' });
  await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC');
  // Flushed first: acknowledged but unflushed regions would count as dirty on the cut.
  t.equal((await qemuIo(pair.sourceUri, ['flush'])).code, 0);
  const equalAtStart = await hashes(pair);
  t.equal(equalAtStart.target, equalAtStart.source, 'in sync: devices equal before the split');
  const refused = await qemuIo(pair.targetUri, ['write -P 0x1 0 4k']);
  t.match(refused.output, /Operation not permitted|read-only|Permission denied/i, 'before promote the mirror volume is read-only to NBD clients');

  await cutLink(pair);
  await write(t, pair.sourceUri, writesA, 'set A on the source');
  const dirty = await status(pair);
  t.equal(dirty.dirtyBytes, regionsA.size * REGION, `source dirty bytes = |A| x 64 KiB = ${regionsA.size * REGION}`);

  await promoteTarget(t, pair);
  await write(t, pair.targetUri, writesB, 'set B on the promoted target');
  if (options.demote) {
    await demoteTarget(t, pair);
    const again = await qemuIo(pair.targetUri, ['write -P 0x2 0 4k']);
    t.match(again.output, /Operation not permitted|read-only|Permission denied/i, 'after demote the mirror volume is read-only again');
  }
  return dirty;
}

/** Reconnect and expect split brain; both devices untouched for 1.5 s. Returns the hashes. */
async function detect(t: Test, pair: MirrorPair, expect: { peerPromoted: boolean; exactB: boolean }): Promise<{ status: SplitBrainStatus; source: string; target: string }> {
  const before = await hashes(pair);
  t.not(before.target, before.source, 'the two sides hold different bytes');
  restoreLink(pair);
  const split = await waitStatus(pair, (s) => s.state === 'ERROR', 'ERROR after the reconnect');
  t.equal(split.error?.code, 'BM_ERR_SPLIT_BRAIN', `error.code BM_ERR_SPLIT_BRAIN (error: ${JSON.stringify(split.error)})`);
  t.ok(typeof split.error?.reason === 'string' && split.error.reason.length > 0, `a reason is given: ${split.error?.reason}`);
  t.ok(split.splitBrain !== null && split.splitBrain !== undefined, 'mirror status: splitBrain is set');
  const sb = split.splitBrain as SplitBrain;
  if (expect.exactB) t.equal(sb?.peerDivergedBytes, regionsB.size * REGION, `splitBrain.peerDivergedBytes = |B| x 64 KiB = ${regionsB.size * REGION}`);
  else t.ok((sb?.peerDivergedBytes ?? 0) >= regionsB.size * REGION, `splitBrain.peerDivergedBytes (${sb?.peerDivergedBytes}) >= |B| x 64 KiB = ${regionsB.size * REGION}`);
  t.equal(sb?.peerPromoted, expect.peerPromoted, `splitBrain.peerPromoted = ${expect.peerPromoted}`);
  t.equal(sb?.localDirtyBytes, regionsA.size * REGION, `splitBrain.localDirtyBytes = |A| x 64 KiB = ${regionsA.size * REGION}`);
  t.equal(sb?.resolving, null, 'splitBrain.resolving = null before a resolve');
  t.ok(Number.isFinite(Date.parse(sb?.detectedAt ?? '')) && Date.parse(sb.detectedAt) <= Date.now() + 1000, `splitBrain.detectedAt is a time (${sb?.detectedAt})`);

  await sleep(1500);
  const later = await status(pair);
  t.equal(later.state, 'ERROR', 'still ERROR 1.5 s later (not retried by itself)');
  t.equal(copied(later), copied(split), 'nothing was copied by the source');
  const after = await hashes(pair);
  t.equal(after.source, before.source, 'source device unchanged since before the reconnect');
  t.equal(after.target, before.target, 'target device unchanged since before the reconnect');
  return { status: later, ...before };
}

t.test('split brain is detected on reconnect, copies nothing; resolve --discard peer resyncs exactly A ∪ B source -> target', { skip }, async (t) => {
  t.equal(union.size, 9, 'A ∪ B is 9 regions');
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 4 * MiB, proxy: true });
  await diverge(t, pair, { demote: true });

  const diverged = await volumeInfo(pair.target);
  t.equal(diverged.promoted, false);
  t.match(diverged.divergence, { generation: Number, since: String, divergedBytes: regionsB.size * REGION }, `target divergence: ${JSON.stringify(diverged.divergence)}`);
  t.ok(Number.isFinite(Date.parse(diverged.divergence?.since)), 'divergence.since is an ISO time');
  // The record survives a clean restart of the target.
  await pair.restartTarget();
  const restarted = await volumeInfo(pair.target);
  t.same({ promoted: restarted.promoted, divergence: restarted.divergence }, { promoted: false, divergence: diverged.divergence }, 'promoted and divergence survive a target restart');

  const { status: split, source: sourceHash } = await detect(t, pair, { peerPromoted: false, exactB: true });
  const human = await cliOn(pair.source)('--json', 'mirror', 'status', 'vol0');
  t.equal(human.code, 0);
  t.match(JSON.parse(human.stdout), { mirrors: [{ state: 'ERROR', error: { code: 'BM_ERR_SPLIT_BRAIN' }, splitBrain: { peerDivergedBytes: regionsB.size * REGION } }] }, 'the CLI shows the same');

  const resolve = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--peer', 'hostB', '--discard', 'peer');
  t.equal(resolve.code, 0, `mirror resolve --discard peer: exit 0 ${resolve.stderr}`);
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after resolve --discard peer');
  t.equal(done.error, null, 'no error');
  t.equal(done.splitBrain, null, 'splitBrain is null once resolved');
  const resent = copied(done) - copied(split);
  t.equal(resent, unionBytes, `copied exactly |A ∪ B| x 64 KiB = ${unionBytes} bytes (sent.copyBytes + sent.zeroBytes delta ${resent})`);
  const after = await hashes(pair);
  t.equal(after.source, sourceHash, 'the source kept its bytes');
  t.equal(after.target, sourceHash, 'the target now holds the source\'s bytes (sha256 of the whole device)');
  t.equal((await volumeInfo(pair.target)).divergence, null, 'the target\'s divergence record is gone once resolved');

  // The mirror goes on normally: a new write reaches the target live.
  await write(t, pair.sourceUri, [{ offset: 10 * MiB, length: 64 * KiB, pattern: 0xc1 }], 'a write after the resolve');
  const live = await status(pair);
  t.equal(live.state, 'INSYNC');
  const final = await hashes(pair);
  t.equal(final.target, final.source, 'devices equal after a live write');
});

t.test('resolve --discard this restores the peer\'s bytes: both devices equal the target\'s, restoreBytes = |A ∪ B| x 64 KiB', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 4 * MiB, proxy: true });
  await diverge(t, pair, { demote: true });
  const { status: split, target: targetHash } = await detect(t, pair, { peerPromoted: false, exactB: true });

  const resolve = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--discard', 'this');
  t.equal(resolve.code, 0, `mirror resolve --discard this: exit 0 ${resolve.stderr}`);
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after resolve --discard this');
  t.equal(done.error, null, 'no error');
  t.equal(done.splitBrain, null, 'splitBrain is null once resolved');
  t.equal(done.received?.restoreBytes, unionBytes, `received.restoreBytes = |A ∪ B| x 64 KiB = ${unionBytes} (got ${JSON.stringify(done.received)})`);
  t.equal(copied(done) - copied(split), 0, 'nothing copied to the target: every restored region is clean once the source device was flushed');
  const after = await hashes(pair);
  t.equal(after.target, targetHash, 'the target kept its bytes');
  t.equal(after.source, targetHash, 'the source now holds the target\'s bytes (sha256 of the whole device)');
  t.equal((await volumeInfo(pair.target)).divergence, null, 'the target\'s divergence record is gone once resolved');

  await write(t, pair.sourceUri, [{ offset: 12 * MiB, length: 64 * KiB, pattern: 0xc2 }], 'a write after the resolve');
  t.equal((await status(pair)).state, 'INSYNC');
  const final = await hashes(pair);
  t.equal(final.target, final.source, 'devices equal after a live write');
});

t.test('SIGKILL of a promoted target: promoted and the written regions survive; split brain still detected; resolve refuses while promoted', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 4 * MiB, proxy: true });
  await diverge(t, pair, { demote: false });
  await pair.crashTarget();
  const info = await volumeInfo(pair.target);
  t.equal(info.promoted, true, 'still promoted after SIGKILL and restart');
  t.ok(info.divergence !== null && typeof info.divergence === 'object', `divergence kept: ${JSON.stringify(info.divergence)}`);
  t.ok((info.divergence?.divergedBytes ?? 0) >= regionsB.size * REGION, `divergedBytes ${info.divergence?.divergedBytes} >= |B| x 64 KiB = ${regionsB.size * REGION} (covers every written region)`);
  t.ok((info.divergence?.divergedBytes ?? 0) % REGION === 0, 'whole 64 KiB regions');

  const { source: sourceHash, target: targetHash } = await detect(t, pair, { peerPromoted: true, exactB: false });

  // Resolving in favour of the source while the peer is still promoted goes back to split brain.
  const errorBefore = await status(pair);
  const early = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--discard', 'peer');
  t.comment(`resolve --discard peer while the peer is promoted: exit ${early.code} ${early.stderr.trim()}`);
  const back = await waitStatus(
    pair,
    (s) => s.state === 'ERROR' && (early.code !== 0 || JSON.stringify(s.history) !== JSON.stringify(errorBefore.history)),
    'ERROR again after resolving against a promoted peer',
  );
  t.equal(back.error?.code, 'BM_ERR_SPLIT_BRAIN');
  t.match(back.error?.reason, /promoted/i, `the reason says the peer is still promoted: ${back.error?.reason}`);
  t.equal(back.splitBrain?.resolving, null, 'the choice is forgotten in ERROR: the admin resolves again once the peer is demoted');
  const untouched = await hashes(pair);
  t.same(untouched, { source: sourceHash, target: targetHash }, 'neither device was touched');

  await demoteTarget(t, pair);
  const resolve = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--discard', 'peer');
  t.equal(resolve.code, 0, `resolve --discard peer after demote: exit 0 ${resolve.stderr}`);
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after demote and resolve');
  t.equal(done.splitBrain, null);
  // The recorded regions R cover B (R ⊇ B, maybe more after a crash): the resync copies A ∪ R,
  // so at least |A ∪ B| and at most |A ∪ B| plus the regions recorded beyond B.
  const recordedExtra = (info.divergence?.divergedBytes ?? 0) - regionsB.size * REGION;
  const resent = copied(done) - copied(back);
  t.ok(resent >= unionBytes && resent <= unionBytes + recordedExtra, `copied |A ∪ R| x 64 KiB: ${unionBytes} <= ${resent} <= ${unionBytes + recordedExtra}`);
  const after = await hashes(pair);
  t.equal(after.source, sourceHash, 'the source kept its bytes');
  t.equal(after.target, sourceHash, 'the target holds the source\'s bytes');
});

t.test('SIGKILL of the source in the middle of resolve --discard this: the restart resumes it; both devices end with the target\'s bytes', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 4 * MiB, proxy: true });
  await diverge(t, pair, { demote: false });
  // A large change on the promoted target, so the restore takes a while.
  await write(t, pair.targetUri, [{ offset: 24 * MiB, length: 32 * MiB, pattern: 0xe1 }], '32 MiB more on the promoted target');
  await demoteTarget(t, pair);
  const { target: targetHash } = await detect(t, pair, { peerPromoted: false, exactB: false });
  const resolve = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--discard', 'this');
  t.equal(resolve.code, 0, `mirror resolve --discard this: exit 0 ${resolve.stderr}`);
  const killAfterMs = Math.floor(Math.random() * 120);
  await sleep(killAfterMs);
  const atKill = await status(pair).catch(() => undefined);
  await pair.crashSource();
  t.comment(`source SIGKILLed ${killAfterMs} ms after the resolve (state ${atKill?.state}, ${atKill?.received?.restoreBytes ?? '?'} bytes restored)`);
  const restarted = await status(pair);
  t.ok(restarted.splitBrain === null || restarted.splitBrain.resolving === 'this', `after the restart the choice is kept or already done: ${JSON.stringify(restarted.splitBrain)}`);
  if ((atKill?.received?.restoreBytes ?? 0) > 0 && restarted.splitBrain !== null) {
    t.equal(restarted.splitBrain.restoring, true, 'the restore had begun: after the restart client writes are still held (restoring)');
  }
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after the restarted resolve', 30_000);
  t.equal(done.splitBrain, null, 'resolved');
  const after = await hashes(pair);
  t.equal(after.target, targetHash, 'the target kept its bytes');
  t.equal(after.source, targetHash, 'the source holds the target\'s bytes (sha256 of the whole device)');
  t.equal((await volumeInfo(pair.target)).divergence, null, 'the target\'s divergence record is gone');
});

t.test('resolve --discard this cut mid-restore: client writes wait across the outage; one issued then survives the retried restore', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 4 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('needs the proxy');
  await diverge(t, pair, { demote: false });
  await write(t, pair.targetUri, [{ offset: 24 * MiB, length: 32 * MiB, pattern: 0xe1 }], '32 MiB more on the promoted target');
  await demoteTarget(t, pair);
  const { target: targetHash } = await detect(t, pair, { peerPromoted: false, exactB: false });

  // Stall the link once the restore is under way: the target's bytes flow down through the proxy
  // (the bitmap exchange before it is a few hundred bytes).
  proxy.resetCounters();
  const resolve = await cliOn(pair.source)('--json', 'mirror', 'resolve', 'vol0', '--discard', 'this');
  t.equal(resolve.code, 0, `mirror resolve --discard this: exit 0 ${resolve.stderr}`);
  const deadline = Date.now() + 10_000;
  while (proxy.bytesDown < 2 * MiB && Date.now() < deadline) await new Promise((resolve) => setImmediate(resolve));
  proxy.stall();
  t.ok(proxy.bytesDown >= 2 * MiB, `the restore was under way when the link stalled (${proxy.bytesDown} bytes down)`);
  const mid = await status(pair);
  t.equal(mid.splitBrain?.restoring, true, `splitBrain.restoring while the restore runs (restored ${mid.received?.restoreBytes} bytes)`);

  // A client write into the restored range, issued mid-restore: it must not land before the
  // restore is complete, or the retry would overwrite it with the target's older bytes.
  let writeDone = false;
  const clientWrite = qemuIo(pair.sourceUri, ['write -P 0xd1 30M 64k', 'flush']).finally(() => (writeDone = true));
  await sleep(500);
  t.equal(writeDone, false, 'the client write waits while the restore is stalled');
  await cutLink(pair);
  proxy.resume();
  await sleep(1000);
  t.equal(writeDone, false, 'the client write still waits with the link down (the restore is unfinished)');
  const down = await status(pair);
  t.equal(down.splitBrain?.restoring, true, 'splitBrain.restoring with the link down');
  t.equal(down.splitBrain?.resolving, 'this', 'the choice is kept for the retry');

  restoreLink(pair);
  const written = await clientWrite;
  t.equal(written.code, 0, 'the client write completes once the resolve is done');
  t.notMatch(written.output, /error|failed/i, 'and succeeds');
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after the retried resolve', 30_000);
  t.equal(done.splitBrain, null, 'resolved');
  const check = await qemuIo(pair.sourceUri, ['read -P 0xd1 30M 64k']);
  t.notMatch(check.output, /Pattern verification failed/i, 'the source holds the client write (not the target\'s older bytes)');
  const after = await hashes(pair);
  t.equal(after.target, after.source, 'devices equal afterwards');
  t.not(after.source, targetHash, 'and differ from the target\'s bytes at the split (the client write is there)');
});

t.test('refusals: resolve on a healthy mirror, bad --discard, promote of a primary, demote of a non-promoted mirror, promote while replicating', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: SIZE, fillBytes: 1 * MiB });
  await pair.addMirror({ mode: 'sync' });
  await pair.waitFor((s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC');
  t.equal((await qemuIo(pair.sourceUri, ['flush'])).code, 0);
  const sourceCli = cliOn(pair.source);
  const targetCli = cliOn(pair.target);

  await expectRefused(t, sourceCli('mirror', 'resolve', 'vol0', '--discard', 'peer'), 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED', 'resolve --discard peer on an INSYNC mirror');
  await expectRefused(t, sourceCli('mirror', 'resolve', 'vol0', '--discard', 'this'), 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED', 'resolve --discard this on an INSYNC mirror');
  const missing = await sourceCli('mirror', 'resolve', 'vol0');
  t.equal(missing.code, 2, `resolve without --discard: usage error, exit 2 (stderr: ${missing.stderr.trim()})`);
  t.match(missing.stderr, /discard/);
  const invalid = await sourceCli('mirror', 'resolve', 'vol0', '--discard', 'both');
  t.equal(invalid.code, 2, `resolve --discard both: usage error, exit 2 (stderr: ${invalid.stderr.trim()})`);
  t.match(invalid.stderr, /discard/);
  t.equal((await status(pair)).state, 'INSYNC', 'the refused commands changed nothing');

  await expectRefused(t, sourceCli('volume', 'promote', 'vol0'), 'BM_ERR_VOLUME_ROLE', 'promote of a primary volume');
  await expectRefused(t, targetCli('volume', 'demote', 'vol0'), 'BM_ERR_VOLUME_ROLE', 'demote of a mirror volume that is not promoted');
  await expectRefused(t, targetCli('volume', 'promote', 'vol0'), 'BM_ERR_VOLUME_BUSY', 'promote while the source replicates into it');
  t.equal((await volumeInfo(pair.target)).promoted, false, 'the refused promote changed nothing');
  await write(t, pair.sourceUri, [{ offset: 2 * MiB, length: 64 * KiB, pattern: 0xd1 }], 'a write after the refused promote');
  const still = await status(pair);
  t.equal(still.state, 'INSYNC', 'the mirror was not disturbed');
  const equal = await hashes(pair);
  t.equal(equal.target, equal.source, 'and the write was replicated');

  // --force cuts the session; a promoted peer is a split brain even before anything is written.
  const forced = await targetCli('--json', 'volume', 'promote', 'vol0', '--force');
  t.equal(forced.code, 0, `promote --force: exit 0 ${forced.stderr}`);
  t.equal((await volumeInfo(pair.target)).promoted, true);
  const split = await waitStatus(pair, (s) => s.state === 'ERROR', 'ERROR after the forced promote');
  t.equal(split.error?.code, 'BM_ERR_SPLIT_BRAIN');
  t.match(split.splitBrain, { peerPromoted: true, peerDivergedBytes: 0, localDirtyBytes: 0 }, `splitBrain: ${JSON.stringify(split.splitBrain)}`);
  await expectRefused(t, targetCli('volume', 'promote', 'vol0'), 'BM_ERR_VOLUME_ROLE', 'promote of a promoted volume');

  // demote refuses while an NBD client is connected, unless --force (which disconnects it).
  const { client } = await NbdTestClient.open(pair.target.paths.nbdSocket, 'vol0');
  t.teardown(() => client.destroy());
  await waitForVolume(pair.target, (info) => info.connections === 1, 'one NBD connection');
  await expectRefused(t, targetCli('volume', 'demote', 'vol0'), 'BM_ERR_VOLUME_BUSY', 'demote with an NBD client connected');
  t.equal((await volumeInfo(pair.target)).promoted, true, 'still promoted');
  const demoted = await targetCli('--json', 'volume', 'demote', 'vol0', '--force');
  t.equal(demoted.code, 0, `demote --force: exit 0 ${demoted.stderr}`);
  const closedInTime = await Promise.race([client.closed.then(() => true), sleep(2000).then(() => false)]);
  t.ok(closedInTime, 'demote --force disconnected the NBD client');
  t.equal((await volumeInfo(pair.target)).promoted, false);

  // Nothing was written on either side: resolving copies nothing and ends in sync.
  const resolve = await sourceCli('--json', 'mirror', 'resolve', 'vol0', '--discard', 'peer');
  t.equal(resolve.code, 0, `resolve --discard peer: exit 0 ${resolve.stderr}`);
  const done = await waitStatus(pair, (s) => s.state === 'INSYNC' && s.dirtyBytes === 0, 'INSYNC after resolve');
  t.equal(copied(done) - copied(split), 0, 'nothing changed on either side: nothing copied');
  const final = await hashes(pair);
  t.equal(final.target, final.source, 'devices equal');
});
