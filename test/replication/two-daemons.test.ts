// Replication between two real daemons on scratch devices (loop devices in CI): full copy while
// the source is written, synchronous mode, cracks and FastResync, restarts, and the failures
// that must stop in ERROR. The assertion that matters most is the last one of each test: both
// devices hash equal.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import * as P from '../../src/nbd/protocol';
import { deviceFlushCount } from '../helpers/block-stat';
import { haveTool, runCli, runTool } from '../helpers/daemon';
import { isRoot } from '../helpers/loop';
import { deviceSha256, fioVerify, qemuIo, startMirrorPair, type MirrorPair } from '../helpers/mirror-pair';
import { NbdTestClient } from '../helpers/nbd-client';

const MiB = 1024 * 1024;
const skip = haveTool('qemu-io') && haveTool('fio') ? false : 'needs qemu-io and fio';

async function expectEqualDevices(t: Test, pair: MirrorPair): Promise<void> {
  const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
  t.equal(target, source, 'source and target devices hash equal (sha256 of the whole device)');
}

t.test('full copy while the source is written, then live sync mode: fio verify and qemu-io, devices equal', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 16 * MiB });
  // A copy rate cap keeps REPLICATE going long enough to write into it.
  await pair.addMirror({ maxRateBytesPerSec: 24 * MiB });
  const during = await pair.waitFor((status) => status.state === 'REPLICATE', 'REPLICATE');
  t.ok(during.progressPercent < 100, 'the full copy is under way');
  const fioDuring = await fioVerify(t, pair.sourceUri, 8 * MiB, 8 * MiB);
  t.equal(fioDuring.code, 0, `fio verify while REPLICATE passed ${fioDuring.stderr}`);
  const written = await qemuIo(pair.sourceUri, ['write -P 0xa1 40M 1M', 'write -P 0xb2 100k 7k', 'write -z 44M 2M']);
  t.notMatch(written.output, /error|failed/i, written.output);

  const insync = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  t.equal(insync.dirtyBytes, 0, 'no dirty bytes in INSYNC');
  t.equal(insync.fullCopyDone, true);
  t.same(
    insync.history.map((entry) => entry.to).filter((state, index, all) => all.indexOf(state) === index),
    ['MAKEPARTS', 'READY', 'REPLICATE', 'INSYNC'],
    'INIT -> MAKEPARTS -> READY -> REPLICATE -> INSYNC',
  );

  // Live in sync mode: acknowledged writes are on the target when the client sees them.
  const liveBefore = insync.sent.liveWrites;
  const fioLive = await fioVerify(t, pair.sourceUri, 20 * MiB, 8 * MiB, ['--fsync=64']);
  t.equal(fioLive.code, 0, `fio verify in INSYNC passed ${fioLive.stderr}`);
  const patterns = await qemuIo(pair.sourceUri, ['write -P 0x3c 1000000 70000', 'discard 48M 1M', 'flush']);
  t.notMatch(patterns.output, /error|failed/i, patterns.output);
  const after = await pair.status();
  t.equal(after.state, 'INSYNC');
  t.ok(after.sent.liveWrites > liveBefore + 100, 'writes in INSYNC were forwarded live');
  await expectEqualDevices(t, pair);

  const refused = await qemuIo(pair.targetUri, ['write -P 0x1 0 4k']);
  t.match(refused.output, /Operation not permitted|read-only|Permission denied/i, 'the mirror volume is read-only to NBD clients');
});

t.test('connection cut while writing: writes go on, reconnect resends only the dirty regions', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 4 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');

  // Cut in the middle of a write load: fio must finish without an error.
  const load = fioVerify(t, pair.sourceUri, 0, 16 * MiB, ['--time_based=1', '--runtime=2']);
  await new Promise((resolve) => setTimeout(resolve, 700));
  proxy.cut();
  const loaded = await load;
  t.equal(loaded.code, 0, `fio kept writing and verifying across the cut ${loaded.stderr}`);
  await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the cut');
  await expectEqualDevices(t, pair);

  // A measured crack: the target unreachable while 4 MiB is written in 64 KiB-aligned pieces.
  // Flushed first: acknowledged but unflushed regions would count as dirty too.
  await qemuIo(pair.sourceUri, ['flush']);
  proxy.refuse(true);
  proxy.cut();
  await pair.waitFor((status) => status.state !== 'INSYNC', 'a crack');
  const cracked = await pair.status();
  const written = await qemuIo(pair.sourceUri, ['write -P 0x42 8M 1M', 'write -P 0x43 20M 1M', 'write -P 0x44 30M 2M']);
  t.notMatch(written.output, /error|failed/i, 'writes succeed while the target is gone');
  const dirty = await pair.status();
  t.ok(dirty.dirtyBytes >= 4 * MiB, `the written regions are dirty (${dirty.dirtyBytes} bytes)`);
  t.ok(dirty.dirtyBytes <= 4 * MiB + 256 * 1024, `and little else (${dirty.dirtyBytes} bytes)`);
  t.not(dirty.state, 'INSYNC');
  proxy.refuse(false);
  const resynced = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after reconnect');
  const resentBytes = resynced.sent.copyBytes + resynced.sent.zeroBytes - (cracked.sent.copyBytes + cracked.sent.zeroBytes);
  t.ok(resentBytes >= 4 * MiB, `the dirty regions were resent (${resentBytes} bytes)`);
  t.ok(resentBytes <= 1.1 * dirty.dirtyBytes, `only the dirty regions were resent (${resentBytes} <= 1.1 x ${dirty.dirtyBytes})`);
  t.ok(resynced.history.some((entry) => entry.to === 'OUTOFSYNC'), 'the crack went through OUTOFSYNC');
  await expectEqualDevices(t, pair);
});

t.test('target restarted mid-sync, then source restarted (SIGTERM) mid-sync: both recover', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 32 * MiB });
  await pair.addMirror({ maxRateBytesPerSec: 24 * MiB });
  await pair.waitFor((status) => status.state === 'REPLICATE' && status.progressPercent > 5, 'REPLICATE under way');
  await pair.restartTarget();
  await qemuIo(pair.sourceUri, ['write -P 0x61 2M 512k']);
  await pair.waitFor((status) => status.state === 'REPLICATE' || status.state === 'OUTOFSYNC', 'copying again after the target restart');

  await pair.waitFor((status) => status.progressPercent > 10 && status.state !== 'INSYNC', 'copy under way again');
  const beforeStop = await pair.status();
  t.not(beforeStop.state, 'INSYNC', 'the source stops mid-sync');
  await pair.restartSource();
  const resumed = await pair.status();
  t.equal(resumed.fullCopyDone, false, 'the interrupted full copy is remembered');
  await qemuIo(pair.sourceUri, ['write -P 0x62 50M 1M']);
  const done = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after both restarts', 30_000);
  const copiedAfterRestart = done.sent.copyBytes + done.sent.zeroBytes;
  t.ok(copiedAfterRestart < 64 * MiB, `the restarted source resumed from its saved bitmap (${copiedAfterRestart} bytes copied, not all 64 MiB)`);
  await expectEqualDevices(t, pair);

  // A clean restart in sync: nothing to copy at all.
  await pair.restartSource();
  const again = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after a clean restart');
  t.equal(again.sent.copyBytes + again.sent.zeroBytes, 0, 'a clean restart of an in-sync mirror copies nothing');
  t.equal(again.cause.event, 'alreadyInSync');
});

t.test('target too small -> ERROR with that reason, kept across a restart; target untouched', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 32 * MiB, targetSizeBytes: 16 * MiB, fillBytes: 1 * MiB });
  const targetBefore = await deviceSha256(pair.targetDevice.path);
  await pair.addMirror();
  const failed = await pair.waitFor((status) => status.state === 'ERROR', 'ERROR');
  t.equal(failed.error?.code, 'BM_ERR_TARGET_TOO_SMALL');
  t.match(failed.error?.reason, /16777216 bytes.*33554432/);
  // ERROR waits for the admin: it is not retried by itself.
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.equal((await pair.status()).state, 'ERROR');
  await pair.restartSource();
  const restored = await pair.status();
  t.equal(restored.state, 'ERROR', 'ERROR survives a restart');
  t.equal(restored.error?.code, 'BM_ERR_TARGET_TOO_SMALL');
  t.equal(await deviceSha256(pair.targetDevice.path), targetBefore, 'nothing was written to the target');

  // Admin commands in the wrong state get a clear error.
  const suspend = await pair.source.request('mirror.suspend', { volume: 'vol0' }).catch((error: unknown) => error);
  t.match(suspend, { code: 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED' });
  const removeVolume = await pair.source.request('volume.remove', { name: 'vol0' }).catch((error: unknown) => error);
  t.match(removeVolume, { code: 'BM_ERR_VOLUME_BUSY' });
  const removePeer = await pair.source.request('peer.remove', { name: 'hostB' }).catch((error: unknown) => error);
  t.match(removePeer, { code: 'BM_ERR_PEER_BUSY' });
  await pair.source.request('mirror.remove', { volume: 'vol0' });
  t.same((await pair.source.request('mirror.list')).mirrors, []);
});

t.test('wrong secret -> refused, ERROR BM_ERR_AUTH_FAILED, nothing written, logged with the address', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, fillBytes: 1 * MiB, wrongSecret: true });
  const targetBefore = await deviceSha256(pair.targetDevice.path);
  await pair.addMirror();
  const failed = await pair.waitFor((status) => status.state === 'ERROR', 'ERROR');
  t.equal(failed.error?.code, 'BM_ERR_AUTH_FAILED');
  t.equal(await deviceSha256(pair.targetDevice.path), targetBefore, 'nothing was written to the target');
  const refusal = pair.target.logs().find((line) => line.msg === 'replication connection refused: authentication failed');
  t.ok(refusal, 'the target logged the refusal');
  t.match(refusal, { remote: /^127\.0\.0\.1:\d+$/, code: 'BM_ERR_AUTH_FAILED' });

  // The admin fixes the secret and resumes: the mirror copies and gets in sync.
  const reset = await pair.source.request('mirror.reset', { volume: 'vol0', peer: 'nobody' }).catch((error: unknown) => error);
  t.match(reset, { code: 'BM_ERR_MIRROR_NOT_FOUND' });
  writeFileSync(pair.sourceSecretFile, readFileSync(pair.targetSecretFile));
  const resumed = await runCli(['--socket', pair.source.paths.controlSocket, 'mirror', 'resume', 'vol0']);
  t.equal(resumed.code, 0, resumed.stderr);
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after the secret was fixed');
  await expectEqualDevices(t, pair);
});

t.test('suspend and resume from the CLI: writes while suspended are dirty, then only they are sent; human and --json status', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, fillBytes: 2 * MiB });
  const cli = (...args: string[]): ReturnType<typeof runCli> => runCli(['--socket', pair.source.paths.controlSocket, ...args]);
  const added = await cli('mirror', 'add', 'vol0', '--peer', 'hostB', '--target', 'vol0', '--max-rate', '64M');
  t.equal(added.code, 0, added.stderr);
  t.match(added.stdout, /^mirror:\s+vol0 -> hostB:vol0$/m);
  t.match(added.stdout, /^mode:\s+sync, on disconnect continue, copy capped at 64\.0 MiB\/s, fast resync on$/m);
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');

  const suspended = await cli('mirror', 'suspend', 'vol0');
  t.equal(suspended.code, 0, suspended.stderr);
  const paused = await pair.waitFor((status) => status.state === 'INIT', 'INIT (suspended)');
  t.equal(paused.linkUp, false);
  const written = await qemuIo(pair.sourceUri, ['write -P 0x21 3M 128k', 'flush']);
  t.notMatch(written.output, /error|failed/i, 'writes go on while suspended');
  const human = await cli('mirror', 'status', 'vol0');
  t.match(human.stdout, /^state:\s+INIT \(suspended\) since /m);
  t.match(human.stdout, /^progress:\s+.*128 KiB to go of 16\.0 MiB\)$/m);
  const list = await cli('mirror', 'list');
  t.match(list.stdout, /^vol0\s+hostB\s+vol0\s+INIT \(suspended\)\s+sync\s+/m);
  const twice = await cli('mirror', 'suspend', 'vol0');
  t.equal(twice.code, 1);
  t.match(twice.stderr, /BM_ERR_MIRROR_COMMAND_NOT_ALLOWED/);

  const before = await pair.status();
  t.equal((await cli('mirror', 'resume', 'vol0')).code, 0);
  const insync = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after resume');
  const resent = insync.sent.copyBytes + insync.sent.zeroBytes - (before.sent.copyBytes + before.sent.zeroBytes);
  t.equal(resent, 128 * 1024, 'only the two 64 KiB regions written while suspended were sent');
  const json = JSON.parse((await cli('--json', 'mirror', 'status', 'vol0')).stdout);
  t.match(json.mirrors, [{ volume: 'vol0', peer: 'hostB', target: 'vol0', state: 'INSYNC', dirtyBytes: 0, progressPercent: 100, suspended: false }]);
  await expectEqualDevices(t, pair);
  const removed = await cli('mirror', 'remove', 'vol0');
  t.equal(removed.code, 0, removed.stderr);
  t.equal(removed.stdout, 'removed mirror of vol0 on hostB\n');
});

t.test('--on-disconnect block holds writes while the target is gone, releases them in sync', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  await pair.addMirror({ onDisconnect: 'block' });
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  proxy.refuse(true);
  proxy.cut();
  await pair.waitFor((status) => status.state !== 'INSYNC', 'a crack');
  let finished = false;
  const write = qemuIo(pair.sourceUri, ['write -P 0x7e 1M 64k', 'flush']).then((result) => {
    finished = true;
    return result;
  });
  await new Promise((resolve) => setTimeout(resolve, 800));
  t.equal(finished, false, 'the write is held while the mirror is not in sync');
  proxy.refuse(false);
  const result = await write;
  t.notMatch(result.output, /error|failed/i, 'the held write succeeds once the mirror is back in sync');
  t.equal((await pair.status()).state, 'INSYNC');
  await expectEqualDevices(t, pair);
});

t.test('a mirror volume being written is not removable; a mirror whose source is offline is listed and removable', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB });
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  const busy = await pair.target.request('volume.remove', { name: 'vol0', force: true }).catch((error: unknown) => error);
  t.match(busy, { code: 'BM_ERR_VOLUME_BUSY', message: /peer hostA is replicating into it/ });
  const refusedRemove = await pair.source.request('mirror.remove', { volume: 'vol0', peer: 'nobody' }).catch((error: unknown) => error);
  t.match(refusedRemove, { code: 'BM_ERR_MIRROR_NOT_FOUND' });

  // The source device is gone at the next start (its path now names nothing): the mirror is
  // kept, shown, and removable.
  await pair.source.stop('SIGTERM');
  const registry = join(pair.source.paths.stateDir, 'volumes.json');
  const document = JSON.parse(readFileSync(registry, 'utf8'));
  document.volumes[0].device = join(pair.source.paths.dir, 'missing-device');
  writeFileSync(registry, JSON.stringify(document));
  await pair.restartSource();
  const listed = (await pair.source.request('mirror.list')).mirrors;
  t.match(listed, [{ volume: 'vol0', peer: 'hostB', state: 'INIT', cause: { reason: /not online/ } }]);
  await pair.source.request('mirror.remove', { volume: 'vol0' });
  t.same((await pair.source.request('mirror.list')).mirrors, []);
  const removed = await pair.source.request('volume.remove', { name: 'vol0' });
  t.equal(removed.name, 'vol0', 'with the mirror gone, the volume can be removed');
});

const skipUnlessLoop = skip !== false ? skip : isRoot ? false : 'needs loop devices (root) to read the block layer flush counter';

t.test('sync mode: FLUSH and FUA reach the target device before the client sees them acknowledged', { skip: skipUnlessLoop }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB });
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  // An in-process client, so nothing else is sent (qemu-io flushes when it closes the image).
  // The mirror also flushes the target once a second while it holds unflushed data, so each
  // check is repeated: a pass by coincidence in all rounds is very unlikely.
  const { client } = await NbdTestClient.open(pair.source.paths.nbdSocket, 'vol0');
  t.teardown(() => client.destroy());
  for (let round = 0; round < 3; round++) {
    const beforeFua = deviceFlushCount(pair.targetDevice.path);
    const fua = await client.request({ type: P.NBD_CMD_WRITE, flags: P.NBD_CMD_FLAG_FUA, offsetBytes: (8 + round) * MiB, payload: Buffer.alloc(64 * 1024, 0x40 + round) });
    t.equal(fua.error, 0);
    t.ok(deviceFlushCount(pair.targetDevice.path) > beforeFua, `round ${round}: a FUA write was durable on the target before its reply`);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: round * MiB, payload: Buffer.alloc(256 * 1024, 0x30 + round) })).error, 0);
    const beforeFlush = deviceFlushCount(pair.targetDevice.path);
    t.equal((await client.request({ type: P.NBD_CMD_FLUSH })).error, 0);
    t.ok(deviceFlushCount(pair.targetDevice.path) > beforeFlush, `round ${round}: NBD FLUSH flushed the target device before its reply`);
  }
  // And the data is there when the target daemon dies at once.
  await pair.target.stop('SIGKILL');
  const head = await runTool('dd', [`if=${pair.targetDevice.path}`, 'iflag=direct', 'bs=64k', 'skip=128', 'count=1', 'status=none']);
  t.ok(head.stdoutBytes.length === 64 * 1024 && head.stdoutBytes.every((byte) => byte === 0x40), 'the FUA write is on the target device after SIGKILL');
});

t.test('a stalled link: writes go on after the ack timeout, the mirror recovers when the path resumes', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  proxy.stall();
  const started = performance.now();
  const written = await qemuIo(pair.sourceUri, ['write -P 0x55 1M 1M']);
  const waitedMs = performance.now() - started;
  t.notMatch(written.output, /error|failed/i, 'the write succeeds locally');
  t.ok(waitedMs >= 2000, `it waited for the target until the ack timeout (${Math.round(waitedMs)} ms)`);
  const cracked = await pair.waitFor((status) => status.state !== 'INSYNC', 'a crack');
  t.ok(cracked.dirtyBytes >= 1 * MiB, 'the unacknowledged write is dirty');
  proxy.resume();
  await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the stall');
  await expectEqualDevices(t, pair);
});

t.test('volume set --fast-resync off: a reconnect copies the whole volume; on: only the dirty regions', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 8 * MiB, fillBytes: 1 * MiB });
  const cli = (...args: string[]): ReturnType<typeof runCli> => runCli(['--socket', pair.source.paths.controlSocket, ...args]);
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  const bad = await cli('volume', 'set', 'vol0', '--fast-resync', 'maybe');
  t.equal(bad.code, 2);
  const off = await cli('volume', 'set', 'vol0', '--fast-resync', 'off');
  t.equal(off.code, 0, off.stderr);
  t.match(off.stdout, /^fast resync:\s+off$/m);
  t.equal((await pair.status()).fastResync, false, 'mirror status shows the setting');

  const resyncOnce = async (): Promise<number> => {
    t.equal((await cli('mirror', 'suspend', 'vol0')).code, 0);
    await pair.waitFor((status) => status.state === 'INIT', 'suspended');
    await qemuIo(pair.sourceUri, ['write -P 0x77 2M 64k']);
    const before = await pair.status();
    t.equal((await cli('mirror', 'resume', 'vol0')).code, 0);
    const after = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
    return after.sent.copyBytes + after.sent.zeroBytes - (before.sent.copyBytes + before.sent.zeroBytes);
  };
  t.equal(await resyncOnce(), 8 * MiB, 'FastResync off: the whole volume was copied again');
  t.ok((await pair.status()).history.some((entry) => entry.event === 'fullCopyNeeded' && /FastResync is off/.test(entry.reason)));

  // The setting persists across a restart, and turning it on goes back to dirty regions only.
  await pair.restartSource();
  t.equal((await pair.source.request('volume.info', { name: 'vol0' })).fastResync, false, 'kept across a restart');
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after the restart');
  t.equal((await cli('volume', 'set', 'vol0', '--fast-resync', 'on')).code, 0);
  t.equal(await resyncOnce(), 64 * 1024, 'FastResync on: only the dirty region was sent');
  await expectEqualDevices(t, pair);
});

t.test('SIGTERM while the target is stalled: the source stops in time, saves its bitmap, and resyncs only that later', { skip }, async (t) => {
  // An ack timeout longer than the daemon's shutdown limit (25 s): only the shutdown's own bound
  // on waiting for the target can make the stop finish in time.
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, proxy: true, timing: { ackTimeoutMs: 60_000 } });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  await pair.addMirror();
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  await qemuIo(pair.sourceUri, ['flush']);
  proxy.stall();
  // A write that waits for the stalled target (sync mode) while the daemon is asked to stop.
  const write = qemuIo(pair.sourceUri, ['write -P 0x6d 5M 64k']);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const started = performance.now();
  const exit = await pair.source.stop('SIGTERM');
  const stoppedMs = performance.now() - started;
  t.same(exit, { code: 0, signal: null }, 'a clean exit, not the shutdown deadline');
  t.ok(stoppedMs < 15_000, `stopped in ${Math.round(stoppedMs)} ms`);
  await write;
  t.ok(pair.source.logs().some((line) => line.msg === 'mirrors stopped; dirty bitmaps saved, write-intent log marked clean'), 'the dirty bitmap was saved');

  proxy.resume();
  await pair.restartSource();
  const resynced = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after the restart');
  const sentBytes = resynced.sent.copyBytes + resynced.sent.zeroBytes;
  t.ok(sentBytes <= 256 * 1024, `only the regions the stalled write touched were resent (${sentBytes} bytes)`);
  await expectEqualDevices(t, pair);
});

t.test('stack mode: writes and flushes never wait for the target; the copier ships dirty regions in the background', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 16 * MiB, fillBytes: 1 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  const strict = await pair.addMirror({ mode: 'stack', onDisconnect: 'block' }).catch((error: unknown) => error);
  t.match(strict, { code: 'BM_ERR_INVALID_ARGUMENT' }, 'stack mode cannot hold writes for the target');
  const added = await pair.addMirror({ mode: 'stack' });
  t.equal(added.mode, 'stack');
  const insync = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');

  // With the path to the target stalled, writes and flushes still complete at local speed.
  proxy.stall();
  const started = performance.now();
  const written = await qemuIo(pair.sourceUri, ['write -P 0x5e 4M 1M', 'flush']);
  const tookMs = performance.now() - started;
  t.notMatch(written.output, /error|failed/i);
  t.ok(tookMs < 1500, `write and flush did not wait for the stalled target (${Math.round(tookMs)} ms)`);
  const lagging = await pair.status();
  t.equal(lagging.sent.liveWrites, 0, 'stack mode forwards nothing live');
  const owed = lagging.dirtyBytes + (lagging.sent.copyBytes - insync.sent.copyBytes);
  t.ok(owed >= 1 * MiB, `the write is dirty or already on its way by the copier (${owed} bytes)`);

  proxy.resume();
  const caughtUp = await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'caught up');
  t.ok(caughtUp.sent.copyBytes - insync.sent.copyBytes >= 1 * MiB, 'the copier shipped the written regions');
  await expectEqualDevices(t, pair);
});
