// Write-intent benchmark (issue 4's bar): what persistent tracking of the hot extents costs a
// mirrored volume's writes, in one run, on one machine. Two blockmirrord daemons over 127.0.0.1,
// 1 GiB tmpfs-backed loop devices (direct I/O) on both sides, the SOURCE's state dir (write-intent
// log and bitmap files) on the real disk (ext4 under /var/tmp by default), so each slot write +
// fdatasync costs what it costs on a host. fio's nbd engine, 4k randwrite QD32 over the whole
// volume through the source volume's NBD export, with three source configurations:
//
//   on         {"writeIntent":{"activityLogExtents":512}}  the default: the whole volume fits (steady state)
//   off        {"writeIntent":{"activityLogExtents":0}}    recording off, the peer figure
//   scattered  {"writeIntent":{"activityLogExtents":64}}   256 MiB hot over 1 GiB: the log thrashes
//
// for the mirror in sync mode (INSYNC throughout) and in stack mode. The source daemon is restarted
// (SIGTERM, clean stop) for every configuration change; after each restart come two fio runs: the
// first one re-warms the log (first touch of every extent: its metadata writes are reported on
// their own), the second is the measured steady state. Configurations alternate per round
// (on off scattered, scattered off on, ...), so on/off go a b b a a b; medians are reported.
//
// Metadata writes per 1000 client writes = delta of writeIntent.transactions + pageWrites (from
// mirror.status, what `blockmirror --json mirror status` prints) over fio's write count.
//
// Prints a table and writes bench/results/write-intent-<timestamp>.json. Needs root (losetup)
// and fio with its nbd engine. Environment:
//   BENCH_DEVICE_MIB (1024)      volume size
//   BENCH_RUNTIME (10)           seconds per fio run (no ramp: every write is counted)
//   BENCH_ROUNDS (3)             rounds per mode (each: one restart per configuration)
//   BENCH_MODES (sync,stack)     mirror modes to measure
//   BENCH_STATE_PARENT (/var/tmp) where the source's state dir is created (must be a real disk)
//   BENCH_DAEMON_NODE_FLAGS      extra node flags for both daemons, e.g. "--cpu-prof --cpu-prof-dir=/tmp/p"
//   BENCH_STRICT=1               exit 1 when a bar fails
import { ChildProcess, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { ControlClient } from '../src/control/client';
import type { MirrorInfo, WriteIntentInfo } from '../src/control/protocol';
import {
  BenchResources,
  cpuCores,
  cpuSnapshot,
  createLoopDevice,
  ForeignCpu,
  formatCores,
  inSync,
  log,
  median,
  MiB,
  mirrorStatus,
  p50Us,
  repoRoot,
  requireRootAndCommands,
  runFio,
  sleep,
  stopChild,
  timestampForFile,
  waitForMirror,
} from './lib';

const pollIntervalMs = 20;
const deviceBytes = Number(process.env.BENCH_DEVICE_MIB ?? 1024) * MiB;
const runtimeSeconds = Number(process.env.BENCH_RUNTIME ?? 10);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const modes = (process.env.BENCH_MODES ?? 'sync,stack').split(',').filter((mode) => mode !== '') as Array<'sync' | 'stack'>;
const stateParent = process.env.BENCH_STATE_PARENT ?? '/var/tmp';
const strict = process.env.BENCH_STRICT === '1';
const blockBytes = 4096;
const volume = 'vol0';
/** The bar: IOPS with the log on >= 0.9 x with recording off. */
const costBar = 0.9;

const configs = [
  { key: 'on', extents: 512, label: 'log on (512 extents, whole volume hot)' },
  { key: 'off', extents: 0, label: 'recording off' },
  { key: 'scattered', extents: 64, label: 'log of 64 extents (256 MiB hot) over 1 GiB' },
] as const;
type ConfigKey = (typeof configs)[number]['key'];

/** One fio run: IOPS, and what the write-intent log did meanwhile. */
interface Sample {
  iops: number;
  p50Us: number;
  p99Us: number;
  fioWrites: number;
  /** Deltas of MirrorInfo.writeIntent over the run (null with recording off). */
  writeIntent: { transactions: number; pageWrites: number; evictions: number; acquires: number; acquiresWaited: number } | null;
  metadataWritesPer1000: number | null;
  cores: Record<string, number>;
  stateBefore: string;
  stateAfter: string;
  /** Sync mode: INSYNC before and after, never left, every fio write forwarded live. */
  stayedInSync: boolean | null;
}

interface ConfigRun {
  round: number;
  mode: string;
  config: ConfigKey;
  extents: number;
  restartSeconds: number;
  recovery: MirrorInfo['recovery'];
  /** The first run after the restart (warm-up: first touch of every extent). */
  first: Sample;
  /** The run after it (steady state): the measured figure. */
  steady: Sample;
}

function filesystemType(path: string): string {
  return execFileSync('findmnt', ['-no', 'FSTYPE', '-T', path], { encoding: 'utf8' }).trim().split('\n')[0] ?? 'unknown';
}

function delta(before: WriteIntentInfo | null, after: WriteIntentInfo | null): Sample['writeIntent'] {
  if (before === null || after === null) return null;
  return {
    transactions: after.transactions - before.transactions,
    pageWrites: after.pageWrites - before.pageWrites,
    evictions: after.evictions - before.evictions,
    acquires: after.acquires - before.acquires,
    acquiresWaited: after.acquiresWaited - before.acquiresWaited,
  };
}

async function main(): Promise<void> {
  requireRootAndCommands(['fio', 'losetup']);
  const startedMs = Date.now();
  const loadAtStart = loadavg()[0];
  const foreign = new ForeignCpu();
  const resources = new BenchResources();
  const sampler = resources.every(500, () => foreign.sample());
  const work = resources.tempDir('/dev/shm', 'bm-wi-');
  const stateRoot = resources.tempDir(stateParent, 'bm-wi-state-');
  const { devices, children, clients } = resources;
  try {
    const stateFs = filesystemType(stateRoot);
    if (stateFs === 'tmpfs' || stateFs === 'ramfs') throw new Error(`${stateRoot} is on ${stateFs}: the source's state dir must be on a real disk (BENCH_STATE_PARENT)`);
    const fioOut = join(work, 'fio.json');
    const source = createLoopDevice(work, 'source.img', deviceBytes, { allocate: true });
    devices.push(source);
    const target = createLoopDevice(work, 'target.img', deviceBytes, { allocate: true });
    devices.push(target);
    // First touch of the tmpfs pages before any figure (slow on this kind of VM), with random data.
    for (const device of [source, target]) {
      await runFio(['--name=fill', `--filename=${device.path}`, '--ioengine=io_uring', '--direct=1', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${deviceBytes}`], 'write', fioOut);
    }
    log(`devices filled; source state dir ${stateRoot} on ${stateFs}`);

    const secretFile = join(work, 'secret');
    writeFileSync(secretFile, randomBytes(32).toString('hex'), { mode: 0o600 });
    chmodSync(secretFile, 0o600);
    const replication = { connectTimeoutMs: 2000, ackTimeoutMs: 10_000, backoffBaseMs: 50, backoffMaxMs: 500 };
    interface Daemon {
      child: ChildProcess;
      client: ControlClient;
      nbdSocket: string;
      pid: number;
    }
    const start = async (name: string, dir: string, extents: number, extra: string[]): Promise<Daemon> => {
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, 'config.json'), JSON.stringify({ replication, writeIntent: { activityLogExtents: extents } }));
      const controlSocket = join(dir, 'c.sock');
      const nbdSocket = join(dir, 'n.sock');
      rmSync(controlSocket, { force: true });
      const child = await children.startDaemon(
        ['--control-socket', controlSocket, '--nbd-socket', nbdSocket, '--state-dir', join(dir, 'state'), '--node-name', name,
          '--config', join(dir, 'config.json'), '--log-level', 'warn', ...extra],
        controlSocket,
      );
      const client = await ControlClient.connect({ socketPath: controlSocket, timeoutMs: 30_000 });
      clients.add(client);
      return { child, client, nbdSocket, pid: child.pid ?? 0 };
    };
    const sourceDir = join(stateRoot, 'hostA');
    const b = await start('hostB', join(work, 'hostB'), 512, ['--listen', '127.0.0.1:0']);
    const listen = (await b.client.request('status', {})).replicationListen;
    if (listen === null) throw new Error('target daemon is not listening');
    await b.client.request('peer.add', { name: 'hostA', address: '127.0.0.1:1', secretFile });
    await b.client.request('volume.add', { name: volume, device: target.path, role: 'mirror' });
    let a = await start('hostA', sourceDir, 512, []);
    let aExtents = 512;
    await a.client.request('peer.add', { name: 'hostB', address: listen, secretFile });
    await a.client.request('volume.add', { name: volume, device: source.path });

    /** Clean stop and start of the source with another activity log size; returns once INSYNC. */
    const restartSource = async (extents: number): Promise<{ seconds: number; info: MirrorInfo }> => {
      const begin = Date.now();
      a.client.close();
      clients.delete(a.client);
      await stopChild(a.child);
      a = await start('hostA', sourceDir, extents, []);
      aExtents = extents;
      const info = await waitForMirror(a.client, volume, 'INSYNC after the restart', inSync, 120_000);
      return { seconds: (Date.now() - begin) / 1000, info };
    };

    const uri = `nbd+unix:///${volume}?socket=${a.nbdSocket}`;
    const runOnce = async (mode: string): Promise<Sample> => {
      const pids = { source: a.pid, target: b.pid };
      const before = await mirrorStatus(a.client, volume);
      const snapshot = cpuSnapshot(pids, foreign);
      const side = await runFio(
        ['--name=wi', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bs=${blockBytes}`, '--iodepth=32', `--size=${deviceBytes}`, '--time_based', `--runtime=${runtimeSeconds}`],
        'write',
        fioOut,
      );
      const cores = cpuCores(snapshot, cpuSnapshot(pids, foreign));
      const after = await mirrorStatus(a.client, volume);
      const fioWrites = Math.round(side.io_bytes / blockBytes);
      const wi = delta(before.writeIntent, after.writeIntent);
      let stayedInSync: boolean | null = null;
      if (mode === 'sync') {
        const leftInSync = after.history.some((e) => Date.parse(e.at) > Date.parse(before.since));
        stayedInSync = inSync(before) && inSync(after) && !leftInSync && after.sent.liveWrites - before.sent.liveWrites >= fioWrites;
      }
      return {
        iops: side.iops,
        p50Us: p50Us(side),
        p99Us: (side.clat_ns.percentile?.['99.000000'] ?? Number.NaN) / 1000,
        fioWrites,
        writeIntent: wi,
        metadataWritesPer1000: wi === null ? null : ((wi.transactions + wi.pageWrites) * 1000) / fioWrites,
        cores,
        stateBefore: before.state,
        stateAfter: after.state,
        stayedInSync,
      };
    };
    const describe = (sample: Sample): string =>
      `${sample.iops.toFixed(0)} IOPS, p50 ${sample.p50Us.toFixed(0)} us` +
      (sample.writeIntent === null
        ? ''
        : `, md/1000 ${(sample.metadataWritesPer1000 as number).toFixed(2)} (tx ${sample.writeIntent.transactions}, pages ${sample.writeIntent.pageWrites}, evict ${sample.writeIntent.evictions}, waited ${sample.writeIntent.acquiresWaited}/${sample.writeIntent.acquires})`) +
      `; cores: ${formatCores(sample.cores)}` +
      (sample.stayedInSync === false ? '; MIRROR LEFT INSYNC' : '') +
      (sample.stayedInSync === null ? `; ${sample.stateBefore}->${sample.stateAfter}` : '');

    const runs: ConfigRun[] = [];
    let mirrorAdded = false;
    for (const mode of modes) {
      // A new mirror (a full copy) in this mode.
      if (mirrorAdded) {
        await a.client.request('mirror.remove', { volume });
        const deadline = Date.now() + 10_000;
        while ((await b.client.request('status', {})).replicationSessions > 0) {
          if (Date.now() > deadline) throw new Error('the target still has a replication session 10 s after mirror remove');
          await sleep(pollIntervalMs);
        }
      }
      await a.client.request('mirror.add', { volume, peer: 'hostB', target: volume, mode, onDisconnect: 'continue' });
      mirrorAdded = true;
      await waitForMirror(a.client, volume, `INSYNC after the full copy (${mode})`, inSync, 120_000);
      log(`mirror in ${mode} mode, INSYNC (source log ${aExtents} extents)`);
      for (let round = 0; round < rounds; round++) {
        const order = round % 2 === 0 ? [...configs] : [...configs].reverse();
        for (const config of order) {
          const restart = await restartSource(config.extents);
          const first = await runOnce(mode);
          // Stack mode: let the copier catch up, so the steady run starts from INSYNC too.
          await waitForMirror(a.client, volume, 'INSYNC between runs', inSync, 120_000);
          const steady = await runOnce(mode);
          await waitForMirror(a.client, volume, 'INSYNC after the runs', inSync, 120_000);
          runs.push({ round, mode, config: config.key, extents: config.extents, restartSeconds: restart.seconds, recovery: restart.info.recovery, first, steady });
          log(`${mode} round ${round} ${config.key} (restart ${restart.seconds.toFixed(1)} s, recovery ${restart.info.recovery.kind}): first ${describe(first)}`);
          log(`${mode} round ${round} ${config.key}: steady ${describe(steady)}`);
        }
      }
    }
    clearInterval(sampler);

    // --- summary ---------------------------------------------------------------------------
    interface Row {
      mode: string;
      figure: string;
      value: string;
      peer: string;
      ratio: number | null;
      bar: string;
      pass: boolean | null;
      note: string;
    }
    const rows: Row[] = [];
    const summary: Record<string, unknown> = {};
    const pick = (mode: string, key: ConfigKey): ConfigRun[] => runs.filter((run) => run.mode === mode && run.config === key);
    const fmtRange = (values: number[], digits = 0): string => `${Math.min(...values).toFixed(digits)}..${Math.max(...values).toFixed(digits)}`;
    const medianOf = (list: ConfigRun[], get: (run: ConfigRun) => number): number => median(list.map(get));
    for (const mode of modes) {
      const on = pick(mode, 'on');
      const off = pick(mode, 'off');
      const scattered = pick(mode, 'scattered');
      const onIops = medianOf(on, (r) => r.steady.iops);
      const offIops = medianOf(off, (r) => r.steady.iops);
      const scatteredIops = medianOf(scattered, (r) => r.steady.iops);
      // Per round: on / off of the same round (adjacent restarts), to show the spread of the ratio.
      const pairRatios = on.map((run, index) => run.steady.iops / off[index].steady.iops);
      const firstOnIops = medianOf(on, (r) => r.first.iops);
      const firstOffIops = medianOf(off, (r) => r.first.iops);
      const md = (list: ConfigRun[], which: 'first' | 'steady'): number => medianOf(list, (r) => r[which].metadataWritesPer1000 ?? Number.NaN);
      const allInSync = mode !== 'sync' || runs.filter((r) => r.mode === mode).every((r) => r.first.stayedInSync === true && r.steady.stayedInSync === true);
      const foreignCores = median(runs.filter((r) => r.mode === mode).map((r) => r.steady.cores.foreign));
      const coresNote = (list: ConfigRun[]): string =>
        `cores src ${medianOf(list, (r) => r.steady.cores.source).toFixed(2)} / tgt ${medianOf(list, (r) => r.steady.cores.target).toFixed(2)} / machine ${medianOf(list, (r) => r.steady.cores.machine).toFixed(2)}`;
      const counts = (list: ConfigRun[], which: 'first' | 'steady'): string => {
        const get = (f: (wi: NonNullable<Sample['writeIntent']>) => number): number => medianOf(list, (r) => (r[which].writeIntent === null ? Number.NaN : f(r[which].writeIntent as NonNullable<Sample['writeIntent']>)));
        return `median per run: tx ${get((w) => w.transactions).toFixed(0)}, pages ${get((w) => w.pageWrites).toFixed(0)}, evictions ${get((w) => w.evictions).toFixed(0)}, waited ${get((w) => w.acquiresWaited).toFixed(0)} of ${medianOf(list, (r) => r[which].fioWrites).toFixed(0)} writes`;
      };
      const ratio = onIops / offIops;
      // The source daemon's CPU per client write: less sensitive to other processes than IOPS.
      const cpuUs = (list: ConfigRun[]): number => medianOf(list, (r) => (r.steady.cores.source * runtimeSeconds * 1e6) / r.steady.fioWrites);
      rows.push({
        mode,
        figure: '4k randwrite QD32, log on (512) vs recording off, steady',
        value: `${onIops.toFixed(0)} IOPS`,
        peer: `off ${offIops.toFixed(0)} IOPS`,
        ratio,
        bar: `>= ${costBar}`,
        pass: ratio >= costBar && allInSync,
        note: `on ${fmtRange(on.map((r) => r.steady.iops))}, off ${fmtRange(off.map((r) => r.steady.iops))}; per-round ratios ${pairRatios.map((x) => x.toFixed(3)).join(' ')}; ${coresNote(on)} (off: ${coresNote(off)})${allInSync ? '' : '; MIRROR LEFT INSYNC in a run'}${foreignCores >= 0.05 ? `; OTHER PROCESSES ${foreignCores.toFixed(2)} cores` : ''}`,
      });
      rows.push({
        mode,
        figure: '  source daemon CPU per write, log on vs off, steady',
        value: `${cpuUs(on).toFixed(1)} us`,
        peer: `off ${cpuUs(off).toFixed(1)} us`,
        ratio: cpuUs(on) / cpuUs(off),
        bar: '-',
        pass: null,
        note: `log of 64: ${cpuUs(scattered).toFixed(1)} us`,
      });
      rows.push({
        mode,
        figure: '  same, first run after a restart (warm-up)',
        value: `${firstOnIops.toFixed(0)} IOPS`,
        peer: `off ${firstOffIops.toFixed(0)} IOPS`,
        ratio: firstOnIops / firstOffIops,
        bar: '-',
        pass: null,
        note: `on ${fmtRange(on.map((r) => r.first.iops))}, off ${fmtRange(off.map((r) => r.first.iops))}`,
      });
      rows.push({
        mode,
        figure: 'metadata writes / 1000 writes, log on, steady',
        value: md(on, 'steady').toFixed(3),
        peer: '-',
        ratio: null,
        bar: '-',
        pass: null,
        note: `${fmtRange(on.map((r) => r.steady.metadataWritesPer1000 ?? Number.NaN), 3)}; ${counts(on, 'steady')}`,
      });
      rows.push({
        mode,
        figure: 'metadata writes / 1000 writes, log on, first run after restart',
        value: md(on, 'first').toFixed(3),
        peer: '-',
        ratio: null,
        bar: '-',
        pass: null,
        note: `${fmtRange(on.map((r) => r.first.metadataWritesPer1000 ?? Number.NaN), 3)}; ${counts(on, 'first')}`,
      });
      rows.push({
        mode,
        figure: '4k randwrite QD32, log of 64 (256 MiB hot) vs off, steady',
        value: `${scatteredIops.toFixed(0)} IOPS`,
        peer: `off ${offIops.toFixed(0)} IOPS`,
        ratio: scatteredIops / offIops,
        bar: '-',
        pass: null,
        note: `${fmtRange(scattered.map((r) => r.steady.iops))}; p50 ${medianOf(scattered, (r) => r.steady.p50Us).toFixed(0)} us (off ${medianOf(off, (r) => r.steady.p50Us).toFixed(0)}); ${coresNote(scattered)}`,
      });
      rows.push({
        mode,
        figure: 'metadata writes / 1000 writes, log of 64, steady',
        value: md(scattered, 'steady').toFixed(1),
        peer: '-',
        ratio: null,
        bar: '-',
        pass: null,
        note: `${fmtRange(scattered.map((r) => r.steady.metadataWritesPer1000 ?? Number.NaN), 1)}; ${counts(scattered, 'steady')}`,
      });
      summary[mode] = {
        onIops,
        offIops,
        ratio,
        pairRatios,
        firstOnIops,
        firstOffIops,
        metadataPer1000Steady: md(on, 'steady'),
        metadataPer1000First: md(on, 'first'),
        scatteredIops,
        scatteredRatio: scatteredIops / offIops,
        scatteredMetadataPer1000: md(scattered, 'steady'),
        sourceCpuUsPerWrite: { on: cpuUs(on), off: cpuUs(off), scattered: cpuUs(scattered) },
        allInSync,
      };
    }

    console.log(
      `\nwrite-intent: two daemons over 127.0.0.1, tmpfs-backed loop devices (${deviceBytes / MiB} MiB, direct-io=on), source state dir on ${stateFs}; ` +
        `fio nbd 4k randwrite QD32 over the whole volume, ${runtimeSeconds} s per run, medians of ${rounds} restarts per configuration; cores = CPU used (1.00 = one core)\n`,
    );
    console.log('| mode | figure | value | peer | ratio | bar | result | notes |');
    console.log('|---|---|---|---|---|---|---|---|');
    for (const row of rows) {
      console.log(
        `| ${row.mode} | ${row.figure} | ${row.value} | ${row.peer} | ${row.ratio === null ? '-' : `${row.ratio.toFixed(3)}x`} | ${row.bar} | ${row.pass === null ? '-' : row.pass ? 'PASS' : 'FAIL'} | ${row.note} |`,
      );
    }
    foreign.sample();
    const foreignSeconds = foreign.totalSeconds;
    const elapsed = (Date.now() - startedMs) / 1000;
    if (foreignSeconds / elapsed >= 0.02) {
      console.log(
        `\nWARNING: processes outside the benchmark used ${foreignSeconds.toFixed(1)} CPU-seconds in ${elapsed.toFixed(0)} s ` +
          `(${(foreignSeconds / elapsed).toFixed(2)} cores on average). Top:\n  ` +
          foreign
            .top(5)
            .map((entry) => `${entry.cpuSeconds.toFixed(1)} s  ${entry.command}`)
            .join('\n  '),
      );
    }
    const resultsDir = join(repoRoot, 'bench', 'results');
    mkdirSync(resultsDir, { recursive: true });
    const file = join(resultsDir, `write-intent-${timestampForFile()}.json`);
    writeFileSync(
      file,
      JSON.stringify(
        {
          date: new Date().toISOString(),
          deviceBytes,
          runtimeSeconds,
          rounds,
          modes,
          stateDirFilesystem: stateFs,
          configs,
          rows,
          summary,
          runs,
          totalSeconds: (Date.now() - startedMs) / 1000,
          loadAverage1mAtStart: loadAtStart,
          foreignCpu: { seconds: foreignSeconds, top: foreign.top(10) },
        },
        null,
        2,
      ),
    );
    console.log(`\nwrote ${file} (${elapsed.toFixed(0)} s)`);
    if (strict && rows.some((row) => row.pass === false)) process.exitCode = 1;
  } finally {
    await resources.cleanup();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
