// Asynchronous consistency mode: writes are acknowledged once local and reach the target in
// order, so at every moment (here: whenever the source is SIGKILLed) the target holds a prefix
// of the source's write sequence. When the bounded buffer fills the mirror falls back to its
// dirty bitmap, catches up, and sends in order again.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as P from '../../src/nbd/protocol';
import { runTool } from '../helpers/daemon';
import { deviceSha256, qemuIo, startMirrorPair } from '../helpers/mirror-pair';
import { NbdTestClient } from '../helpers/nbd-client';
import { prng } from '../native/fixtures';

const MiB = 1024 * 1024;
const BLOCK = 4096;
/** A small area, so blocks are overwritten often and a wrong order would show. */
const AREA_START = 8 * MiB;
const AREA_BLOCKS = 256;
const skip = process.getuid?.() === 0 ? false : 'needs root for loop devices';

interface Written {
  block: number;
  data: Buffer;
}

/** Dependent writes (each issued after the previous one was acknowledged), each block stamped
 *  with its sequence number, until the connection dies. */
async function writeSequence(socketPath: string, log: Written[], stop: { killed: boolean }, random: () => number): Promise<void> {
  const { client } = await NbdTestClient.open(socketPath, 'vol0');
  try {
    while (!stop.killed) {
      const block = Math.floor(random() * AREA_BLOCKS);
      const data = randomBytes(BLOCK);
      data.writeUInt32LE(log.length + 1, 0); // sequence, 1-based
      data.writeUInt32LE(block, 4);
      const reply = await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: AREA_START + block * BLOCK, lengthBytes: BLOCK, payload: data });
      if (reply.error !== 0) throw new Error(`write failed: NBD error ${reply.error}`);
      log.push({ block, data });
    }
  } catch (error) {
    if (!stop.killed) throw error;
  } finally {
    client.destroy();
  }
}

/** The longest prefix of `log` the area matches, or a description of why none does. */
function matchPrefix(area: Buffer, log: readonly Written[]): number | string {
  let newest = 0;
  for (let block = 0; block < AREA_BLOCKS; block++) {
    const held = area.subarray(block * BLOCK, (block + 1) * BLOCK);
    const sequence = held.readUInt32LE(0);
    if (sequence === 0 && held.every((byte) => byte === 0)) continue; // never written
    const entry = log[sequence - 1];
    if (entry === undefined || entry.block !== block || !entry.data.equals(held)) {
      // Written after the last acknowledged one: it must be the write in flight at the kill.
      if (sequence === log.length + 1 && held.readUInt32LE(4) === block) {
        newest = Math.max(newest, sequence);
        continue;
      }
      return `block ${block} holds bytes no logged write put there (sequence field ${sequence})`;
    }
    newest = Math.max(newest, sequence);
  }
  // Every block must hold its last write at or before `newest`.
  const expected = new Map<number, number>();
  for (let sequence = 1; sequence <= Math.min(newest, log.length); sequence++) expected.set((log[sequence - 1] as Written).block, sequence);
  for (let block = 0; block < AREA_BLOCKS; block++) {
    const held = area.readUInt32LE(block * BLOCK);
    const want = expected.get(block) ?? 0;
    if (held !== want && !(held === log.length + 1 && newest === log.length + 1)) {
      return `block ${block} holds write ${held} but the prefix up to ${newest} ends with write ${want} there`;
    }
  }
  return newest;
}

/** A write of the concurrent workload: `frontier` is how many writes the client had seen
 *  acknowledged when it issued this one (it may depend on all of them). */
interface Issued {
  id: number;
  block: number;
  frontier: number;
  data: Buffer;
}

interface ConcurrentLog {
  /** Every write issued, by id. */
  byId: Map<number, Issued>;
  /** Per block, its writes in order (one writer per block, one write at a time). */
  perBlock: Issued[][];
  /** Writes in the order the client saw them acknowledged. */
  acked: Issued[];
}

/** `writers` clients on their own connections, each writing its own blocks one write at a time
 *  (dependent within a writer, concurrent across writers), until the connection dies. */
async function writeConcurrently(socketPath: string, writers: number, log: ConcurrentLog, stop: { killed: boolean }, random: () => number): Promise<void> {
  const blocksPerWriter = AREA_BLOCKS / writers;
  let nextId = 1;
  await Promise.all(
    Array.from({ length: writers }, async (_, writer) => {
      const { client } = await NbdTestClient.open(socketPath, 'vol0');
      try {
        while (!stop.killed) {
          const block = writer * blocksPerWriter + Math.floor(random() * blocksPerWriter);
          const entry: Issued = { id: nextId++, block, frontier: log.acked.length, data: randomBytes(BLOCK) };
          entry.data.writeUInt32LE(entry.id, 0);
          entry.data.writeUInt32LE(block, 4);
          log.byId.set(entry.id, entry);
          (log.perBlock[block] as Issued[]).push(entry);
          const reply = await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: AREA_START + block * BLOCK, lengthBytes: BLOCK, payload: entry.data });
          if (reply.error !== 0) throw new Error(`write failed: NBD error ${reply.error}`);
          log.acked.push(entry);
        }
      } catch (error) {
        if (!stop.killed) throw error;
      } finally {
        client.destroy();
      }
    }),
  );
}

/** Crash consistency with concurrent writers: every write the area holds was issued by the
 *  client, and for the newest frontier among them, every write acknowledged before it is there
 *  (or a later write to its block). Returns that frontier, or why the area is inconsistent. */
function checkDependencies(area: Buffer, log: ConcurrentLog): number | string {
  const held = new Array<number>(AREA_BLOCKS).fill(-1); // index into perBlock, -1: never written
  let frontier = 0;
  for (let block = 0; block < AREA_BLOCKS; block++) {
    const bytes = area.subarray(block * BLOCK, (block + 1) * BLOCK);
    if (bytes.every((byte) => byte === 0)) continue;
    const entry = log.byId.get(bytes.readUInt32LE(0));
    if (entry === undefined || entry.block !== block || !entry.data.equals(bytes)) return `block ${block} holds bytes no issued write put there`;
    held[block] = (log.perBlock[block] as Issued[]).indexOf(entry);
    frontier = Math.max(frontier, entry.frontier);
  }
  for (const needed of log.acked.slice(0, frontier)) {
    const index = (log.perBlock[needed.block] as Issued[]).indexOf(needed);
    if ((held[needed.block] as number) < index) {
      return `the target holds a write issued after write ${needed.id} (block ${needed.block}) was acknowledged, but not write ${needed.id}`;
    }
  }
  return frontier;
}

async function readArea(devicePath: string): Promise<Buffer> {
  const result = await runTool('dd', [`if=${devicePath}`, 'iflag=direct', 'bs=1M', `skip=${AREA_START / MiB}`, `count=${(AREA_BLOCKS * BLOCK) / MiB}`, 'status=none']);
  if (result.code !== 0) throw new Error(`reading ${devicePath} failed: ${result.stderr}`);
  return result.stdoutBytes;
}

t.test('async mode: acknowledged once local; the target holds a prefix of the writes whenever the source dies', { skip }, async (t) => {
  const rounds = Number(process.env.BM_CRASH_ROUNDS ?? 3);
  const seed = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
  t.comment(`seed ${seed}; rerun with BM_CRASH_SEED=${seed}`);
  const random = prng(seed);
  const pair = await startMirrorPair(t, { sizeBytes: 32 * MiB, fillBytes: 4 * MiB });
  const added = await pair.addMirror({ mode: 'async' });
  t.equal(added.mode, 'async');
  const insync = await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  t.same(insync.async?.ordered, true, 'in sync: writes travel ordered');
  for (let round = 0; round < rounds; round++) {
    const log: Written[] = [];
    const stop = { killed: false };
    const writing = writeSequence(pair.source.paths.nbdSocket, log, stop, random);
    const killAfterMs = 150 + Math.floor(random() * 500);
    await new Promise((resolve) => setTimeout(resolve, killAfterMs));
    stop.killed = true;
    await pair.crashSource(async () => {
      await writing;
      await new Promise((resolve) => setTimeout(resolve, 300)); // let the target apply what it received
      const verdict = matchPrefix(await readArea(pair.targetDevice.path), log);
      t.type(verdict, 'number', `round ${round} (kill at ${killAfterMs} ms, ${log.length} writes acknowledged): target is a prefix of the write sequence: ${verdict}`);
      if (typeof verdict === 'number') t.ok(verdict >= log.length - 4096, `round ${round}: the prefix (${verdict}) is recent`);
    });
    // Reset the area's history for the next round: resync, then both sides equal.
    await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0, 'INSYNC after the restart');
    const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
    t.equal(target, source, `round ${round}: devices equal after the resync`);
    // The next round's log starts at 1 again: clear the area on both sides through the mirror.
    await qemuIo(pair.sourceUri, [`write -z ${AREA_START} ${AREA_BLOCKS * BLOCK}`]);
    await pair.waitFor((status) => status.dirtyBytes === 0 && status.async?.bufferedWrites === 0, 'area cleared on the target');
  }
});

t.test('async mode: SIGKILL of the target while its writes finish out of order (fault delay): its device is still a prefix', { skip }, async (t) => {
  const rounds = Number(process.env.BM_CRASH_ROUNDS ?? 3);
  const seed = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
  t.comment(`seed ${seed}; rerun with BM_CRASH_SEED=${seed}`);
  const random = prng(seed);
  // Each replicated write waits a random 0..4 ms on the target before it is issued: writes that
  // were allowed to run concurrently would land out of order.
  const pair = await startMirrorPair(t, { sizeBytes: 32 * MiB, fillBytes: 4 * MiB, targetEnv: { BLOCKMIRROR_FAULT_TARGET_DELAY_MS: '4' } });
  await pair.addMirror({ mode: 'async' });
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  for (let round = 0; round < rounds; round++) {
    const log: Written[] = [];
    const stop = { killed: false };
    const writing = writeSequence(pair.source.paths.nbdSocket, log, stop, random);
    const killAfterMs = 150 + Math.floor(random() * 400);
    await new Promise((resolve) => setTimeout(resolve, killAfterMs));
    await pair.crashTarget(async () => {
      stop.killed = true;
      await writing;
      const verdict = matchPrefix(await readArea(pair.targetDevice.path), log);
      t.type(verdict, 'number', `round ${round} (target killed at ${killAfterMs} ms, ${log.length} writes acknowledged): target is a prefix: ${verdict}`);
    });
    await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0 && status.async?.bufferedWrites === 0, 'INSYNC after the target restart');
    const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
    t.equal(target, source, `round ${round}: devices equal after the resync`);
    await qemuIo(pair.sourceUri, [`write -z ${AREA_START} ${AREA_BLOCKS * BLOCK}`]);
    await pair.waitFor((status) => status.dirtyBytes === 0 && status.async?.bufferedWrites === 0, 'area cleared on the target');
  }
});

t.test('async mode, concurrent writers: a killed target never holds a write without those acknowledged before it was issued (fault delay)', { skip }, async (t) => {
  const rounds = Number(process.env.BM_CRASH_ROUNDS ?? 3);
  const seed = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
  t.comment(`seed ${seed}; rerun with BM_CRASH_SEED=${seed}`);
  const random = prng(seed);
  const pair = await startMirrorPair(t, { sizeBytes: 32 * MiB, targetEnv: { BLOCKMIRROR_FAULT_TARGET_DELAY_MS: '4' } });
  await pair.addMirror({ mode: 'async' });
  await pair.waitFor((status) => status.state === 'INSYNC', 'INSYNC');
  let grouped = 0;
  for (let round = 0; round < rounds; round++) {
    const log: ConcurrentLog = { byId: new Map(), perBlock: Array.from({ length: AREA_BLOCKS }, () => []), acked: [] };
    const stop = { killed: false };
    const before = await pair.status();
    const writing = writeConcurrently(pair.source.paths.nbdSocket, 4, log, stop, random);
    const killAfterMs = 200 + Math.floor(random() * 400);
    await new Promise((resolve) => setTimeout(resolve, killAfterMs));
    const during = await pair.status();
    // Writes issued with none acknowledged in between share an epoch and may land in any order.
    grouped += (during.async?.writes ?? 0) - (before.async?.writes ?? 0) - ((during.async?.epochs ?? 0) - (before.async?.epochs ?? 0));
    await pair.crashTarget(async () => {
      stop.killed = true;
      await writing;
      const verdict = checkDependencies(await readArea(pair.targetDevice.path), log);
      t.type(verdict, 'number', `round ${round} (target killed at ${killAfterMs} ms, ${log.acked.length} writes acknowledged): ${verdict}`);
    });
    await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0 && status.async?.bufferedWrites === 0, 'INSYNC after the target restart');
    const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
    t.equal(target, source, `round ${round}: devices equal after the resync`);
    await qemuIo(pair.sourceUri, [`write -z ${AREA_START} ${AREA_BLOCKS * BLOCK}`]);
    await pair.waitFor((status) => status.dirtyBytes === 0 && status.async?.bufferedWrites === 0, 'area cleared on the target');
  }
  t.ok(grouped > 0, `some writes shared an epoch with an earlier one (${grouped}), so the target had writes to reorder`);
});

t.test('async mode: a full buffer falls back to the dirty bitmap, catches up, and returns to ordered mode', { skip }, async (t) => {
  const pair = await startMirrorPair(t, { sizeBytes: 32 * MiB, fillBytes: 1 * MiB, proxy: true });
  const proxy = pair.proxy;
  if (proxy === undefined) throw new Error('proxy expected');
  await pair.addMirror({ mode: 'async', asyncBufferBytes: 1 * MiB });
  await pair.waitFor((status) => status.state === 'INSYNC' && status.async?.ordered === true, 'INSYNC, ordered');

  proxy.stall();
  const started = performance.now();
  const written = await qemuIo(pair.sourceUri, ['write -P 0x3c 2M 4M', 'flush']);
  const tookMs = performance.now() - started;
  t.notMatch(written.output, /error|failed/i);
  t.ok(tookMs < 2000, `writes and flush did not wait for the stalled target (${Math.round(tookMs)} ms)`);
  const fallback = await pair.status();
  t.same(fallback.async?.ordered, false, 'buffer full: the mirror tracks writes in its bitmap');
  t.ok((fallback.async?.overflows ?? 0) >= 1, `overflow counted (${fallback.async?.overflows})`);
  t.ok((fallback.async?.bufferedBytes ?? 0) <= 1 * MiB, `never more than the buffer in flight (${fallback.async?.bufferedBytes} bytes)`);
  t.ok(fallback.dirtyBytes > 0, 'what did not fit is dirty');

  proxy.resume();
  const caughtUp = await pair.waitFor((status) => status.state === 'INSYNC' && status.dirtyBytes === 0 && status.async?.ordered === true, 'caught up and ordered again');
  t.equal(caughtUp.async?.bufferedWrites, 0);
  const [source, target] = await Promise.all([deviceSha256(pair.sourceDevice.path), deviceSha256(pair.targetDevice.path)]);
  t.equal(target, source, 'source and target devices hash equal (sha256 of the whole device)');
  const live = await qemuIo(pair.sourceUri, ['write -P 0x4d 0 64k']);
  t.notMatch(live.output, /error|failed/i);
  const after = await pair.waitFor((status) => status.sent.liveWrites > caughtUp.sent.liveWrites, 'a live ordered write');
  t.same(after.async?.ordered, true, 'new writes travel ordered again');
});
