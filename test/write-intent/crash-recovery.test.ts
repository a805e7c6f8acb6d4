// The source daemon SIGKILLed at seeded random moments under a pipelined NBD write load, in
// synchronous mode. Each round checks what users rely on: every write the client saw
// acknowledged is on the target device before the source even restarts; the restart names
// its recovery ("activity-log") and resyncs only the extents that were hot, never the whole
// volume; afterwards both devices hash equal. A clean stop and lost metadata are checked too.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { deviceSha256, startMirrorPair, type MirrorPair } from '../helpers/mirror-pair';
import { runTool } from '../helpers/daemon';
import { NbdTestClient } from '../helpers/nbd-client';
import * as P from '../../src/nbd/protocol';
import { prng } from '../native/fixtures';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const EXTENT = 4 * MiB;
/** The writer stays in extents 4..6 of the 64 MiB volume. */
const AREA_START = 4 * EXTENT;
const AREA_BYTES = 3 * EXTENT;
const QUEUE_DEPTH = 8;
const skip = process.getuid?.() === 0 ? false : 'needs root for loop devices';

interface WriteLog {
  /** Per block: the last acknowledged content, and the one in flight (at most one per block). */
  acked: Map<number, Buffer>;
  inFlight: Map<number, Buffer>;
  ackedCount: number;
}

/** Pipelined 4 KiB writes over NBD until `stop` is set or the connection dies. */
async function writeUntilKilled(socketPath: string, random: () => number, log: WriteLog, stop: { killed: boolean }): Promise<void> {
  const { client } = await NbdTestClient.open(socketPath, 'vol0');
  const byCookie = new Map<bigint, { block: number; data: Buffer }>();
  const sendOne = (): void => {
    let block: number;
    do block = Math.floor(random() * (AREA_BYTES / BLOCK));
    while (log.inFlight.has(block));
    const data = randomBytes(BLOCK);
    log.inFlight.set(block, data);
    const cookie = client.send({ type: P.NBD_CMD_WRITE, offsetBytes: AREA_START + block * BLOCK, lengthBytes: BLOCK, payload: data });
    byCookie.set(cookie, { block, data });
  };
  for (let i = 0; i < QUEUE_DEPTH; i++) sendOne();
  try {
    for (;;) {
      const reply = await client.readReply();
      const write = byCookie.get(reply.cookie);
      if (write === undefined) throw new Error(`reply for an unknown cookie ${reply.cookie}`);
      byCookie.delete(reply.cookie);
      if (reply.error !== 0) throw new Error(`write failed with NBD error ${reply.error}`);
      log.inFlight.delete(write.block);
      log.acked.set(write.block, write.data);
      log.ackedCount++;
      if (!stop.killed) sendOne();
    }
  } catch (error) {
    if (!stop.killed) throw error; // the daemon was killed: the connection drops, as expected
  } finally {
    client.destroy();
  }
}

async function readArea(devicePath: string): Promise<Buffer> {
  const result = await runTool('dd', [`if=${devicePath}`, 'iflag=direct', 'bs=1M', `skip=${AREA_START / MiB}`, `count=${AREA_BYTES / MiB}`, 'status=none']);
  if (result.code !== 0) throw new Error(`reading ${devicePath} failed: ${result.stderr}`);
  return result.stdoutBytes;
}

async function expectEqualDevices(t: Test, pair: MirrorPair): Promise<void> {
  const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
  t.equal(target, source, 'source and target devices hash equal (sha256 of the whole device)');
}

t.test('SIGKILL under load in sync mode: acknowledged writes are on the target; the restart resyncs only the hot extents', { skip }, async (t) => {
  const seed = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
  const rounds = Number(process.env.BM_CRASH_ROUNDS ?? 3);
  t.comment(`seed ${seed}; rerun with BM_CRASH_SEED=${seed}`);
  const random = prng(seed);
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 4 * MiB });
  await pair.addMirror({ mode: 'sync' });
  const first = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC after the full copy');
  t.equal(first.recovery.kind, 'new');
  t.ok(first.writeIntent !== null && first.writeIntent.capacityExtents > 0, 'write-intent recording is on by default');

  for (let round = 0; round < rounds; round++) {
    const log: WriteLog = { acked: new Map(), inFlight: new Map(), ackedCount: 0 };
    const stop = { killed: false };
    const writing = writeUntilKilled(pair.source.paths.nbdSocket, random, log, stop);
    const killAfterMs = 150 + Math.floor(random() * 600);
    await new Promise((resolve) => setTimeout(resolve, killAfterMs));
    const before = await pair.status();
    const hotBefore = before.writeIntent?.hotExtents ?? -1;
    stop.killed = true;
    await pair.crashSource(async () => {
      await writing;
      // Acknowledged means on the target: check before the source comes back and resyncs.
      await new Promise((resolve) => setTimeout(resolve, 200));
      const area = await readArea(pair.targetDevice.path);
      let wrong = 0;
      for (const [block, data] of log.acked) {
        const onTarget = area.subarray(block * BLOCK, (block + 1) * BLOCK);
        const inFlight = log.inFlight.get(block);
        if (!onTarget.equals(data) && (inFlight === undefined || !onTarget.equals(inFlight))) wrong++;
      }
      t.ok(log.ackedCount > 100, `round ${round}: ${log.ackedCount} writes acknowledged before the SIGKILL at ${killAfterMs} ms`);
      t.equal(wrong, 0, `round ${round}: every acknowledged write (${log.acked.size} blocks) is on the target`);
    });
    const restarted = await pair.status();
    t.equal(restarted.recovery.kind, 'activity-log', `round ${round}: the restart recovered from the activity log (${restarted.recovery.detail})`);
    t.ok(restarted.recovery.dirtyBytesAtStart > 0 && restarted.recovery.dirtyBytesAtStart <= AREA_BYTES,
      `round ${round}: only the hot extents count as dirty (${restarted.recovery.dirtyBytesAtStart / MiB} MiB; ${hotBefore} hot before the kill), not the 64 MiB volume`);
    const insync = await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the crash');
    const resent = insync.sent.copyBytes + insync.sent.zeroBytes;
    t.ok(resent <= AREA_BYTES, `round ${round}: resent ${resent / MiB} MiB, at most the ${AREA_BYTES / MiB} MiB the writer could touch`);
    await expectEqualDevices(t, pair);
  }

  // A clean stop: nothing to resync.
  await pair.restartSource();
  const clean = await pair.status();
  t.equal(clean.recovery.kind, 'clean-shutdown');
  t.equal(clean.recovery.dirtyBytesAtStart, 0, 'a clean stop in sync leaves nothing dirty');

  // Metadata lost after a crash (the activity log removed): the whole volume is resynced, and
  // status says why.
  await pair.crashSource(() => {
    const dir = path.join(pair.source.paths.stateDir, 'write-intent');
    for (const name of fs.readdirSync(dir)) fs.rmSync(path.join(dir, name));
  });
  const lost = await pair.status();
  t.equal(lost.recovery.kind, 'metadata-lost');
  t.equal(lost.recovery.dirtyBytesAtStart, 64 * MiB);
  t.ok(pair.source.logs().some((line) => typeof line.msg === 'string' && line.msg.startsWith('mirror recovery: no write-intent log')), 'the log says why');
  await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the full resync');
  await expectEqualDevices(t, pair);
});

t.test('target replaced by a blank volume, source SIGKILLed just after the new full copy started: the restart still copies everything', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 64 * MiB, fillBytes: 16 * MiB });
  await pair.addMirror({ mode: 'sync' });
  await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC');
  await pair.restartSource(); // the on-disk bitmap is clean and the log says so
  await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC again');
  await pair.source.request('mirror.set', { volume: 'vol0', maxRateBytesPerSec: 1 * MiB }); // keep the copy slow
  // The target's volume is replaced: binding gone, device blank.
  await pair.crashTarget(() => {
    const file = path.join(pair.target.paths.stateDir, 'volumes.json');
    const document = JSON.parse(fs.readFileSync(file, 'utf8')) as { volumes: Array<Record<string, unknown>> };
    for (const volume of document.volumes) delete volume.mirrorSource;
    fs.writeFileSync(file, JSON.stringify(document));
    const fd = fs.openSync(pair.targetDevice.path, 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * MiB), 0, 64 * MiB, 0);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
  });
  await pair.waitFor((status) => status.state === 'REPLICATE', 'REPLICATE: the target lost the copy');
  await new Promise((resolve) => setTimeout(resolve, 300));
  await pair.crashSource();
  const after = await pair.status();
  await pair.source.request('mirror.set', { volume: 'vol0', maxRateBytesPerSec: null });
  const done = await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the restart', 60_000);
  t.ok(done.sent.copyBytes + done.sent.zeroBytes >= 60 * MiB, `the restart copied the volume again (${(done.sent.copyBytes + done.sent.zeroBytes) / MiB} MiB; recovery ${after.recovery.kind})`);
  await expectEqualDevices(t, pair);
});
