// Replication benchmark: two blockmirrord daemons over 127.0.0.1, tmpfs-backed loop devices
// (direct I/O) on both sides, each figure measured against a peer figure taken in the same run:
//
//   1. full sync of a volume filled with random data (no zero-detection shortcut) vs the raw copy
//      limit min(fio O_DIRECT seq read of the source device, seq write of the target device);
//   2. 4k randwrite QD32 through NBD on the mirrored volume (INSYNC, sync mode) vs an unmirrored
//      volume on an equal device in the same daemon, alternating round by round;
//   3. 1M seqwrite QD8, likewise;
//   4. resync after a suspension: bytes resent vs the bytes the mirror recorded dirty.
//   5. 4k randwrite QD32 with the mirror switched to async mode (ordered writes) vs unmirrored.
//
// Beside each ratio, the machine's ceilings for it (bench/ceiling.ts): the ratio the source side
// reaches while a spare device takes the same writes at the same rate, (a) written by fio
// directly, with no network and no target daemon: an upper bound for any replicator on this
// machine; (b) through the target daemon's NBD export over TCP: a client mirroring by itself,
// everything a mirror costs except the source daemon's forwarding.
//
// Prints a table (figure, peer, ratio, bar, PASS/FAIL, CPU used) and writes
// bench/results/replication-<timestamp>.json. Needs root (losetup) and fio with its nbd engine.
// On a small VM every other process skews the figures: the CPU that processes outside the
// benchmark used is measured per figure and reported. Environment:
//   BENCH_DEVICE_MIB (1024)    volume size
//   BENCH_RUNTIME (5)          seconds per NBD fio job (plus 1 s ramp)
//   BENCH_ROUNDS (3)           rounds of the NBD jobs (medians are reported)
//   BENCH_SYNC_ROUNDS (3)      full syncs (mirror remove and add between them; the median counts)
//   BENCH_RAW_RUNTIME (3)      seconds per raw-device fio job (and per machine-ceiling step)
//   BENCH_CEILING_STEPS (3)    fixed-point steps of each machine ceiling
//   BENCH_DAEMON_NODE_FLAGS    extra node flags for both daemons, e.g. "--cpu-prof --cpu-prof-dir=/tmp/p"
//   BENCH_STRICT=1             exit 1 when a bar fails
//   BENCH_EPOCH_FLUSH=1        the target daemon with flushes at async epoch boundaries (config replication.epochFlush)
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { ControlClient } from '../src/control/client';
import type { MirrorInfo } from '../src/control/protocol';
import { type Ceiling, machineCeiling } from './ceiling';
import {
  BenchResources,
  cpuCores,
  cpuSnapshot,
  createLoopDevice,
  type FioSide,
  ForeignCpu,
  formatCores,
  inSync,
  log,
  type LoopDevice,
  median,
  MiB,
  mirrorStatus,
  p50Us,
  repoRoot,
  requireRootAndCommands,
  runFio,
  sleep,
  timestampForFile,
  waitForMirror,
} from './lib';

const pollIntervalMs = 20;
const deviceBytes = Number(process.env.BENCH_DEVICE_MIB ?? 1024) * MiB;
const runtimeSeconds = Number(process.env.BENCH_RUNTIME ?? 5);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const syncRounds = Number(process.env.BENCH_SYNC_ROUNDS ?? 3);
const warmupSeconds = 2;
const rawRuntimeSeconds = Number(process.env.BENCH_RAW_RUNTIME ?? 3);
const strict = process.env.BENCH_STRICT === '1';
const resyncRegionBytes = 64 * 1024;
/** Fixed-point steps of each machine ceiling (bench/ceiling.ts). */
const ceilingSteps = Number(process.env.BENCH_CEILING_STEPS ?? 3);
/** 1% of the volume, in 64 KiB writes (164 for 1 GiB). */
const resyncWrites = Math.max(1, Math.round((deviceBytes * 0.01) / resyncRegionBytes));
const mirrored = 'vol0';
const plain = 'plain0';

interface NbdJob {
  name: string;
  rw: 'randwrite' | 'write';
  blockSize: string;
  blockBytes: number;
  ioDepth: number;
  unit: 'IOPS' | 'MB/s';
  bar: number;
}

const nbdJobs: NbdJob[] = [
  { name: '4k randwrite QD32', rw: 'randwrite', blockSize: '4k', blockBytes: 4096, ioDepth: 32, unit: 'IOPS', bar: 0.5 },
  { name: '1M seqwrite QD8', rw: 'write', blockSize: '1M', blockBytes: MiB, ioDepth: 8, unit: 'MB/s', bar: 0.7 },
];

/** One fio run through NBD, with the CPU the daemons used meanwhile. */
interface NbdSample {
  value: number;
  p50Us: number;
  cores: Record<string, number>;
  /** CPU both daemons used per write (4k job) or per MB (1M job), in microseconds: cores over the
   *  run divided by the rate. Unlike the rate, this hardly moves when other processes compete
   *  for the CPU, so it compares builds measured at different times. */
  daemonCpuUs: number;
  /** Mirrored runs only: writes forwarded live, and whether the mirror stayed INSYNC throughout. */
  liveWrites?: number;
  fioWrites?: number;
  stayedInSync?: boolean;
}

interface Row {
  figure: string;
  value: number;
  peerName: string;
  peer: number;
  unit: string;
  ratio: number;
  bar: string;
  pass: boolean;
  /** The machine's ceilings for this ratio (bench/ceiling.ts), when measured: the target's
   *  writes straight to a device, and through the target daemon over TCP. */
  ceiling?: number;
  ceilingTcp?: number;
  note: string;
}

/** fio options of a sequential 1M O_DIRECT job on a device (after its --name). */
const rawJobArgs = (device: string, rw: 'read' | 'write'): string[] =>
  [`--filename=${device}`, '--ioengine=io_uring', '--direct=1', `--rw=${rw}`, '--bs=1M', '--iodepth=8', `--size=${deviceBytes}`];

function rawFio(device: string, rw: 'read' | 'write', output: string, onePass = false): Promise<FioSide> {
  const args = [`--name=raw-${rw}`, ...rawJobArgs(device, rw)];
  if (!onePass) args.push('--time_based', `--runtime=${rawRuntimeSeconds}`);
  return runFio(args, rw, output);
}

/** fio options of one NBD job (after its --name). */
const nbdJobArgs = (uri: string, job: NbdJob): string[] => ['--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.blockSize}`, `--iodepth=${job.ioDepth}`];

/** fio options of the same job's writes straight to a device (a mirror target's device work). */
const deviceJobArgs = (device: string, job: NbdJob): string[] =>
  [`--filename=${device}`, '--ioengine=io_uring', '--direct=1', `--rw=${job.rw}`, `--bs=${job.blockSize}`, `--iodepth=${job.ioDepth}`, `--size=${deviceBytes}`];

function nbdFio(uri: string, job: NbdJob, output: string, seconds = runtimeSeconds): Promise<FioSide> {
  return runFio(['--name=nbd', ...nbdJobArgs(uri, job), '--time_based', `--runtime=${seconds}`, '--ramp_time=1'], 'write', output);
}

/** When the mirror last entered INSYNC, from its history (ms since the epoch), if not before notBeforeMs. */
function inSyncAtMs(info: MirrorInfo, notBeforeMs: number, state = 'INSYNC'): number | undefined {
  const entry = [...info.history].reverse().find((e) => e.to === state);
  if (entry === undefined) return undefined;
  const at = Date.parse(entry.at);
  return at >= notBeforeMs ? at : undefined;
}

const sentCopy = (info: MirrorInfo): number => info.sent.copyBytes + info.sent.zeroBytes;

function fmt(value: number, unit: string): string {
  return unit === 'bytes' ? `${(value / MiB).toFixed(2)} MiB` : `${value.toFixed(0)} ${unit}`;
}

/** Byte-compares the backing files (the devices' contents, through tmpfs). */
function identical(a: LoopDevice, b: LoopDevice): boolean {
  try {
    execFileSync('cmp', ['-s', a.backingFile, b.backingFile]);
    return true;
  } catch {
    return false;
  }
}

async function main(): Promise<void> {
  requireRootAndCommands(['fio', 'losetup']);
  const startedMs = Date.now();
  const loadAtStart = loadavg()[0];
  // Other sessions' tests, builds or daemons skew every figure on a 2-vCPU machine: measure them.
  const foreign = new ForeignCpu();
  const resources = new BenchResources();
  const sampler = resources.every(500, () => foreign.sample());
  const work = resources.tempDir('/dev/shm', 'bm-repl-');
  const { devices, children, clients } = resources;
  try {
    const fioOut = join(work, 'fio.json');
    const source = createLoopDevice(work, 'source.img', deviceBytes, { allocate: true });
    devices.push(source);
    const target = createLoopDevice(work, 'target.img', deviceBytes, { allocate: true });
    devices.push(target);
    const plainDevice = createLoopDevice(work, 'plain.img', deviceBytes, { allocate: true });
    devices.push(plainDevice);
    // Stands in for a target's device in the machine ceilings (the target's is the daemon's then).
    const spare = createLoopDevice(work, 'spare.img', deviceBytes, { allocate: true });
    devices.push(spare);

    // Fill every device with fio's random buffers (the copy overwrites the target's): the first
    // write of a tmpfs page is several times slower than later ones on this kind of VM (the host
    // backs the page then), and no figure should include that. Then the raw limits.
    const fills: Record<string, number> = {};
    for (const [name, device] of [['source', source], ['target', target], ['plain', plainDevice], ['spare', spare]] as const) {
      fills[name] = (await rawFio(device.path, 'write', fioOut, true)).bw_bytes;
    }
    log(`devices filled with random data (first touch, MB/s): ${Object.entries(fills).map(([name, value]) => `${name} ${(value / 1e6).toFixed(0)}`).join(', ')}`);
    const rawRead = await rawFio(source.path, 'read', fioOut);
    const rawWrite = await rawFio(target.path, 'write', fioOut);
    const rawLimit = Math.min(rawRead.bw_bytes, rawWrite.bw_bytes) / 1e6;
    log(`raw source read ${(rawRead.bw_bytes / 1e6).toFixed(0)} MB/s, raw target write ${(rawWrite.bw_bytes / 1e6).toFixed(0)} MB/s`);
    // The full sync's ceiling: the source read and the target write at once, nothing in between.
    const ceilings: Ceiling[] = [];
    const logCeiling = (ceiling: Ceiling): void =>
      log(`machine ceiling, ${ceiling.what}: ${ceiling.value.toFixed(0)} ${ceiling.unit}, ${ceiling.ratio.toFixed(2)}x of ${ceiling.reference.toFixed(0)} ` +
        `(steps: ${ceiling.steps.map((step) => `target limit ${step.targetLimit.toFixed(0)} -> source ${step.source.toFixed(0)}, target ${step.target.toFixed(0)}`).join('; ')})`);
    const fullSyncCeiling = await machineCeiling({
      what: 'full sync', unit: 'MB/s', sourceJob: rawJobArgs(source.path, 'read'), sourceSide: 'read', targetJob: rawJobArgs(target.path, 'write'),
      reference: rawLimit, startRate: 0.8 * rawLimit, iterations: ceilingSteps, seconds: rawRuntimeSeconds, output: fioOut,
    });
    ceilings.push(fullSyncCeiling);
    logCeiling(fullSyncCeiling);

    // Two daemons: A (source) and B (target, listening on 127.0.0.1).
    const secretFile = join(work, 'secret');
    writeFileSync(secretFile, randomBytes(32).toString('hex'), { mode: 0o600 });
    chmodSync(secretFile, 0o600);
    const epochFlush = process.env.BENCH_EPOCH_FLUSH === '1';
    const config = { replication: { connectTimeoutMs: 2000, ackTimeoutMs: 10_000, backoffBaseMs: 50, backoffMaxMs: 500, epochFlush } };
    const start = async (name: string, extra: string[]): Promise<{ client: ControlClient; nbdSocket: string; pid: number }> => {
      const dir = join(work, name);
      mkdirSync(dir);
      writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
      const controlSocket = join(dir, 'c.sock');
      const nbdSocket = join(dir, 'n.sock');
      const child = await children.startDaemon(
        ['--control-socket', controlSocket, '--nbd-socket', nbdSocket, '--state-dir', join(dir, 'state'), '--node-name', name,
          '--config', join(dir, 'config.json'), '--log-level', 'warn', ...extra],
        controlSocket,
      );
      const client = await ControlClient.connect({ socketPath: controlSocket, timeoutMs: 30_000 });
      clients.add(client);
      return { client, nbdSocket, pid: child.pid ?? 0 };
    };
    const a = await start('hostA', []);
    // NBD on TCP too, for the ceilings over TCP.
    const b = await start('hostB', ['--listen', '127.0.0.1:0', '--nbd-listen', '127.0.0.1:0']);
    const listen = (await b.client.request('status', {})).replicationListen;
    if (listen === null) throw new Error('target daemon is not listening');
    await b.client.request('peer.add', { name: 'hostA', address: '127.0.0.1:1', secretFile });
    await b.client.request('volume.add', { name: mirrored, device: target.path, role: 'mirror' });
    await a.client.request('peer.add', { name: 'hostB', address: listen, secretFile });
    await a.client.request('volume.add', { name: mirrored, device: source.path });
    await a.client.request('volume.add', { name: plain, device: plainDevice.path });
    const uris = { mirrored: `nbd+unix:///${mirrored}?socket=${a.nbdSocket}`, plain: `nbd+unix:///${plain}?socket=${a.nbdSocket}` };
    const daemonPids = { source: a.pid, target: b.pid };
    /** Runs a phase and reports the cores each daemon and the whole machine used meanwhile. */
    const metered = async <T>(phase: () => Promise<T>): Promise<{ result: T; cores: Record<string, number> }> => {
      const before = cpuSnapshot(daemonPids, foreign);
      const result = await phase();
      return { result, cores: cpuCores(before, cpuSnapshot(daemonPids, foreign)) };
    };

    // 1. Full sync: from mirror.add until INSYNC (the time of the transition in the mirror's
    // history; the 20 ms polls only notice it). Repeated (mirror remove, add: a new generation
    // the target does not know, so a full copy again); the median counts.
    const fullSyncs: Array<{ seconds: number; observedSeconds: number; sent: MirrorInfo['sent']; cores: Record<string, number> }> = [];
    for (let round = 0; round < syncRounds; round++) {
      if (round > 0) {
        await a.client.request('mirror.remove', { volume: mirrored });
        const deadline = Date.now() + 10_000;
        while ((await b.client.request('status', {})).replicationSessions > 0) {
          if (Date.now() > deadline) throw new Error('the target still has a replication session 10 s after mirror remove');
          await sleep(pollIntervalMs);
        }
      }
      const addMs = Date.now();
      const { result: synced, cores } = await metered(async () => {
        await a.client.request('mirror.add', { volume: mirrored, peer: 'hostB', target: mirrored, mode: 'sync', onDisconnect: 'continue' });
        return waitForMirror(a.client, mirrored, 'INSYNC after the full copy', inSync, 120_000);
      });
      const observedSeconds = (Date.now() - addMs) / 1000;
      const seconds = ((inSyncAtMs(synced, addMs) ?? Date.now()) - addMs) / 1000;
      // The copy proper starts at REPLICATE; before it: connect, authenticate, MAKEPARTS.
      const setupSeconds = ((inSyncAtMs(synced, addMs, 'REPLICATE') ?? addMs) - addMs) / 1000;
      fullSyncs.push({ seconds, observedSeconds, sent: synced.sent, cores });
      log(`full sync: ${seconds.toFixed(2)} s (${setupSeconds.toFixed(2)} s before REPLICATE), ${(deviceBytes / 1e6 / seconds).toFixed(0)} MB/s (copy ${synced.sent.copyBytes} B, zero ${synced.sent.zeroBytes} B); cores: ${formatCores(cores)}`);
    }
    const fullSyncSeconds = median(fullSyncs.map((run) => run.seconds));
    const fullSyncMBps = deviceBytes / 1e6 / fullSyncSeconds;
    // Random data: every byte must have gone over the wire as data (none detected as zeroes).
    const everyByteCopied = fullSyncs.every((run) => run.sent.copyBytes >= deviceBytes);
    const fullSyncCores = {
      source: median(fullSyncs.map((run) => run.cores.source)),
      target: median(fullSyncs.map((run) => run.cores.target)),
      machine: median(fullSyncs.map((run) => run.cores.machine)),
      foreign: median(fullSyncs.map((run) => run.cores.foreign)),
    };
    const fullSyncIdentical = identical(source, target);
    const fullSyncCpuUsPerMB = median(fullSyncs.map((run) => ((run.cores.source + run.cores.target) * run.observedSeconds * 1e6) / (deviceBytes / 1e6)));

    // 2, 3. Sync-mode writes on the mirrored volume vs the unmirrored one, alternating which
    // goes first round by round so drift affects both alike. A mirrored run counts only if
    // every fio write was forwarded live and the mirror never left INSYNC.
    // `extraCheck` adds a mode's own condition for a mirrored run to count (async: still ordered).
    const compare = async (job: NbdJob, extraCheck: (before: MirrorInfo, after: MirrorInfo) => boolean = () => true): Promise<{ mirrored: NbdSample[]; plain: NbdSample[] }> => {
      const result: { mirrored: NbdSample[]; plain: NbdSample[] } = { mirrored: [], plain: [] };
      // Unmeasured warm-up on both volumes: the first run of a job after another one is slower
      // (seen: 1M seqwrite unmirrored 1420 MB/s right after 4k randwrite, ~1900 MB/s after that).
      for (const which of ['plain', 'mirrored'] as const) await nbdFio(uris[which], job, fioOut, warmupSeconds);
      for (let round = 0; round < rounds; round++) {
        const order = round % 2 === 0 ? (['plain', 'mirrored'] as const) : (['mirrored', 'plain'] as const);
        for (const which of order) {
          const before = which === 'mirrored' ? await mirrorStatus(a.client, mirrored) : undefined;
          const { result: side, cores } = await metered(() => nbdFio(uris[which], job, fioOut));
          const value = job.unit === 'IOPS' ? side.iops : side.bw_bytes / 1e6;
          const daemonCpuUs = ((cores.source + cores.target) * 1e6) / value;
          const sample: NbdSample = { value, p50Us: p50Us(side), cores, daemonCpuUs };
          if (before !== undefined) {
            const after = await mirrorStatus(a.client, mirrored);
            sample.liveWrites = after.sent.liveWrites - before.sent.liveWrites;
            sample.fioWrites = Math.round(side.io_bytes / job.blockBytes);
            const leftInSync = after.history.some((e) => Date.parse(e.at) > Date.parse(before.since));
            sample.stayedInSync = inSync(before) && !leftInSync && sample.liveWrites >= sample.fioWrites && extraCheck(before, after);
          }
          result[which].push(sample);
          log(`${job.name} ${which}: ${sample.value.toFixed(0)} ${job.unit}, p50 ${sample.p50Us.toFixed(0)} us; daemon CPU ${daemonCpuUs.toFixed(1)} us/${job.unit === 'IOPS' ? 'write' : 'MB'}; cores: ${formatCores(cores)}${sample.stayedInSync === false ? '; MIRROR LEFT INSYNC' : ''}`);
        }
      }
      return result;
    };
    const samples: Record<string, { mirrored: NbdSample[]; plain: NbdSample[] }> = {};
    for (const job of nbdJobs) samples[job.name] = await compare(job);
    // Each job's ceiling: the unmirrored volume's job while the spare device takes the same
    // writes; the divisor is the same job alone, run right before.
    const jobCeilings: Record<string, Ceiling> = {};
    for (const job of nbdJobs) {
      const alone = await nbdFio(uris.plain, job, fioOut, rawRuntimeSeconds);
      const solo = job.unit === 'IOPS' ? alone.iops : alone.bw_bytes / 1e6;
      const ceiling = await machineCeiling({
        what: job.name, unit: job.unit, sourceJob: nbdJobArgs(uris.plain, job), sourceSide: 'write', targetJob: deviceJobArgs(spare.path, job),
        reference: solo, startRate: job.bar * solo, iterations: ceilingSteps, seconds: rawRuntimeSeconds, output: fioOut,
      });
      jobCeilings[job.name] = ceiling;
      ceilings.push(ceiling);
      logCeiling(ceiling);
    }
    // (b) The same with the target's writes through the target daemon's NBD export of the spare
    // device over TCP: the network and the target daemon included, no forwarding by the source.
    const spareUri = (await b.client.request('volume.add', { name: 'spare0', device: spare.path })).nbdTcpUri;
    if (spareUri === undefined) throw new Error('the target daemon has no NBD TCP address');
    const tcpCeilings: Record<string, Ceiling> = {};
    const fullSyncTcpCeiling = await machineCeiling({
      what: 'full sync, over TCP', unit: 'MB/s', sourceJob: rawJobArgs(source.path, 'read'), sourceSide: 'read', targetJob: nbdJobArgs(spareUri, { ...(nbdJobs[1] as NbdJob), rw: 'write' }),
      reference: rawLimit, startRate: 0.8 * rawLimit, iterations: ceilingSteps, seconds: rawRuntimeSeconds, output: fioOut,
    });
    ceilings.push(fullSyncTcpCeiling);
    logCeiling(fullSyncTcpCeiling);
    for (const job of nbdJobs) {
      const reference = (jobCeilings[job.name] as Ceiling).reference;
      const ceiling = await machineCeiling({
        what: `${job.name}, over TCP`, unit: job.unit, sourceJob: nbdJobArgs(uris.plain, job), sourceSide: 'write', targetJob: nbdJobArgs(spareUri, job),
        reference, startRate: job.bar * reference, iterations: ceilingSteps, seconds: rawRuntimeSeconds, output: fioOut,
      });
      tcpCeilings[job.name] = ceiling;
      ceilings.push(ceiling);
      logCeiling(ceiling);
    }

    // 4. Resync. Idle past the mirror's periodic target flush (every 1 s) first, so no
    // acknowledged-but-unflushed write turns dirty when the link drops.
    await sleep(2100);
    await a.client.request('mirror.suspend', { volume: mirrored });
    const suspended = await waitForMirror(a.client, mirrored, 'suspended', (info) => info.suspended && !info.linkUp, 10_000);
    const dirtyAtSuspend = suspended.dirtyBytes;
    // Random 64 KiB-aligned 64 KiB writes, no offset twice (fio's random map).
    await runFio(
      ['--name=dirty', '--ioengine=nbd', `--uri=${uris.mirrored}`, '--rw=randwrite', `--bs=${resyncRegionBytes}`, `--blockalign=${resyncRegionBytes}`,
        '--iodepth=8', `--io_size=${resyncWrites * resyncRegionBytes}`, '--randrepeat=0'],
      'write',
      fioOut,
    );
    const dirtied = await mirrorStatus(a.client, mirrored);
    const dirtyBytes = dirtied.dirtyBytes;
    const resumeMs = Date.now();
    await a.client.request('mirror.resume', { volume: mirrored });
    const resynced = await waitForMirror(a.client, mirrored, 'INSYNC after the resync', (info) => inSync(info) && inSyncAtMs(info, resumeMs) !== undefined, 60_000);
    const resyncSeconds = ((inSyncAtMs(resynced, resumeMs) ?? Date.now()) - resumeMs) / 1000;
    const resentBytes = sentCopy(resynced) - sentCopy(dirtied);
    const liveDuringResync = resynced.sent.liveBytes - dirtied.sent.liveBytes;
    log(`resync: dirty ${dirtyBytes} B (${dirtyAtSuspend} B at suspend), resent ${resentBytes} B in ${resyncSeconds.toFixed(2)} s`);
    // 5. Async consistency mode (issue 4): the 4k job again with the mirror switched to async.
    // A run counts only if every write went out as an ordered write (no buffer overflow, no
    // fallback to the bitmap). The mirror must be caught up and in sync afterwards.
    await a.client.request('mirror.set', { volume: mirrored, mode: 'async' });
    await waitForMirror(a.client, mirrored, 'async and ordered', (info) => inSync(info) && info.async?.ordered === true, 60_000);
    const asyncJob = nbdJobs[0] as NbdJob;
    const asyncSamples = await compare(asyncJob, (before, after) => after.async !== null && before.async !== null && after.async.overflows === before.async.overflows);
    await waitForMirror(a.client, mirrored, 'async mirror caught up', (info) => inSync(info) && info.async?.bufferedWrites === 0, 60_000);
    const finalIdentical = identical(source, target);
    clearInterval(sampler);

    const coresNote = (cores: Record<string, number>): string =>
      `cores src ${cores.source.toFixed(2)} / tgt ${cores.target.toFixed(2)} / machine ${cores.machine.toFixed(2)}` +
      (cores.foreign >= 0.05 ? ` (OTHER PROCESSES ${cores.foreign.toFixed(2)})` : '');
    const medianCores = (list: NbdSample[]): Record<string, number> => ({
      source: median(list.map((s) => s.cores.source)),
      target: median(list.map((s) => s.cores.target)),
      machine: median(list.map((s) => s.cores.machine)),
      foreign: median(list.map((s) => s.cores.foreign)),
    });
    const rows: Row[] = [
      {
        figure: `full sync (${deviceBytes / MiB} MiB random, median of ${fullSyncs.length})`,
        value: fullSyncMBps,
        peerName: 'raw copy limit',
        peer: rawLimit,
        unit: 'MB/s',
        ratio: fullSyncMBps / rawLimit,
        bar: '>= 0.8',
        pass: fullSyncMBps / rawLimit >= 0.8 && fullSyncIdentical && everyByteCopied,
        ceiling: fullSyncCeiling.ratio,
        ceilingTcp: fullSyncTcpCeiling.ratio,
        note: `${fullSyncSeconds.toFixed(2)} s; raw read ${(rawRead.bw_bytes / 1e6).toFixed(0)}, write ${(rawWrite.bw_bytes / 1e6).toFixed(0)} MB/s; daemon CPU ${fullSyncCpuUsPerMB.toFixed(0)} us per MB; ${coresNote(fullSyncCores)}; target ${fullSyncIdentical ? 'identical' : 'DIFFERS'}${everyByteCopied ? '' : '; NOT EVERY BYTE WAS SENT AS DATA'}`,
      },
      ...nbdJobs.map((job): Row => {
        const { mirrored: ours, plain: theirs } = samples[job.name];
        const value = median(ours.map((s) => s.value));
        const peer = median(theirs.map((s) => s.value));
        const allLive = ours.every((s) => s.stayedInSync === true);
        return {
          figure: `sync ${job.name}`,
          value,
          peerName: 'unmirrored',
          peer,
          unit: job.unit,
          ratio: value / peer,
          bar: `>= ${job.bar}`,
          pass: value / peer >= job.bar && allLive,
          ceiling: jobCeilings[job.name]?.ratio,
          ceilingTcp: tcpCeilings[job.name]?.ratio,
          note:
            `p50 ${median(ours.map((s) => s.p50Us)).toFixed(0)} / ${median(theirs.map((s) => s.p50Us)).toFixed(0)} us; ` +
            `daemon CPU ${median(ours.map((s) => s.daemonCpuUs)).toFixed(1)} / ${median(theirs.map((s) => s.daemonCpuUs)).toFixed(1)} us per ${job.unit === 'IOPS' ? 'write' : 'MB'}; mirrored ${coresNote(medianCores(ours))}; ` +
            `unmirrored src ${medianCores(theirs).source.toFixed(2)}${allLive ? '' : '; MIRROR LEFT INSYNC in a run'}`,
        };
      }),
      (() => {
        const { mirrored: ours, plain: theirs } = asyncSamples;
        const value = median(ours.map((s) => s.value));
        const peer = median(theirs.map((s) => s.value));
        const allOrdered = ours.every((s) => s.stayedInSync === true);
        return {
          figure: `async ${asyncJob.name}`,
          value,
          peerName: 'unmirrored',
          peer,
          unit: asyncJob.unit,
          ratio: value / peer,
          bar: '>= 0.8',
          pass: value / peer >= 0.8 && allOrdered && finalIdentical,
          ceiling: jobCeilings[asyncJob.name]?.ratio,
          ceilingTcp: tcpCeilings[asyncJob.name]?.ratio,
          note:
            `p50 ${median(ours.map((s) => s.p50Us)).toFixed(0)} / ${median(theirs.map((s) => s.p50Us)).toFixed(0)} us; ` +
            `daemon CPU ${median(ours.map((s) => s.daemonCpuUs)).toFixed(1)} / ${median(theirs.map((s) => s.daemonCpuUs)).toFixed(1)} us per write; mirrored ${coresNote(medianCores(ours))}` +
            (allOrdered ? '' : '; A RUN FELL BACK TO THE BITMAP'),
        };
      })(),
      {
        figure: `resync resent (${resyncWrites} x 64 KiB)`,
        value: resentBytes,
        peerName: 'dirtyBytes',
        peer: dirtyBytes,
        unit: 'bytes',
        ratio: resentBytes / dirtyBytes,
        bar: '<= 1.1',
        pass: dirtyBytes > 0 && resentBytes / dirtyBytes <= 1.1 && finalIdentical,
        note: `${resyncSeconds.toFixed(2)} s; target ${finalIdentical ? 'identical' : 'DIFFERS'} after`,
      },
    ];

    console.log(
      `\nreplication: two daemons over 127.0.0.1, tmpfs-backed loop devices (${deviceBytes / MiB} MiB, direct-io=on); ` +
        `NBD jobs: medians of ${rounds} rounds x ${runtimeSeconds} s; cores = CPU used (1.00 = one core)\n`,
    );
    console.log('| figure | blockmirror | peer | ratio | bar | result | ceiling: device | ceiling: over TCP | notes |');
    console.log('|---|---|---|---|---|---|---|---|---|');
    const ratio = (value: number | undefined): string => (value === undefined ? '-' : `${value.toFixed(2)}x`);
    for (const row of rows) {
      console.log(
        `| ${row.figure} | ${fmt(row.value, row.unit)} | ${row.peerName} ${fmt(row.peer, row.unit)} | ${row.ratio.toFixed(2)}x | ${row.bar} | ${row.pass ? 'PASS' : 'FAIL'} | ` +
          `${ratio(row.ceiling)} | ${ratio(row.ceilingTcp)} | ${row.note} |`,
      );
    }
    console.log(
      '\nceilings (bench/ceiling.ts): the ratio the source side reached while a spare device took the same writes at the same rate, ' +
        'written by fio directly (device: no network, no target daemon) or through the target daemon\'s NBD export over TCP',
    );
    foreign.sample();
    const foreignSeconds = foreign.totalSeconds;
    const totalSecondsSoFar = (Date.now() - startedMs) / 1000;
    if (foreignSeconds / totalSecondsSoFar >= 0.02) {
      console.log(
        `\nWARNING: processes outside the benchmark used ${foreignSeconds.toFixed(1)} CPU-seconds in ${totalSecondsSoFar.toFixed(0)} s ` +
          `(${(foreignSeconds / totalSecondsSoFar).toFixed(2)} cores on average); figures with OTHER PROCESSES in their notes are skewed. Top:\n  ` +
          foreign
            .top(5)
            .map((entry) => `${entry.cpuSeconds.toFixed(1)} s  ${entry.command}`)
            .join('\n  '),
      );
    }
    const resultsDir = join(repoRoot, 'bench', 'results');
    mkdirSync(resultsDir, { recursive: true });
    const file = join(resultsDir, `replication-${timestampForFile()}.json`);
    const totalSeconds = (Date.now() - startedMs) / 1000;
    writeFileSync(
      file,
      JSON.stringify(
        {
          date: new Date().toISOString(),
          deviceBytes,
          runtimeSeconds,
          rounds,
          rawRuntimeSeconds,
          epochFlush,
          rows,
          raw: { fillBytesPerSec: fills, readBytesPerSec: rawRead.bw_bytes, writeBytesPerSec: rawWrite.bw_bytes },
          fullSync: { seconds: fullSyncSeconds, runs: fullSyncs, identical: fullSyncIdentical, daemonCpuUsPerMB: fullSyncCpuUsPerMB },
          nbd: samples,
          ceilings,
          async: asyncSamples,
          resync: {
            writes: resyncWrites,
            writeBytes: resyncWrites * resyncRegionBytes,
            dirtyBytesAtSuspend: dirtyAtSuspend,
            dirtyBytes,
            resentBytes,
            liveBytesDuringResync: liveDuringResync,
            seconds: resyncSeconds,
            identical: finalIdentical,
          },
          totalSeconds,
          loadAverage1mAtStart: loadAtStart,
          foreignCpu: { seconds: foreignSeconds, top: foreign.top(10) },
        },
        null,
        2,
      ),
    );
    console.log(`\nwrote ${file} (${totalSeconds.toFixed(0)} s)`);
    if (strict && rows.some((row) => !row.pass)) process.exitCode = 1;
  } finally {
    await resources.cleanup();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
