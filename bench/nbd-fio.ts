// NBD data-path benchmark: fio's nbd engine against blockmirrord and against
// `qemu-nbd --cache=none --aio=native`, both exporting the same tmpfs-backed loop device, in the
// same run, alternating job by job. Prints each figure and the ratio blockmirrord/qemu-nbd and
// writes the JSON to bench/results/. Needs root (losetup), fio, qemu-nbd.
//
//   npm run bench                      # defaults: 5 s per job, 3 rounds, 1 GiB device
//   BENCH_RUNTIME=10 BENCH_ROUNDS=3 npm run bench
//   BENCH_JOBS=QD1 npm run bench:nbd   # only the jobs whose name contains this text
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Children, createLoopDevice, detachLoopDevices, median, MiB, p50Us, repoRoot, requireRootAndCommands, runFio, timestampForFile, waitForPath } from './lib';

interface Job {
  name: string;
  rw: 'randwrite' | 'randread' | 'write' | 'read';
  blockSize: string;
  ioDepth: number;
  /** What the table shows: IOPS for small blocks, MB/s for large. */
  unit: 'IOPS' | 'MB/s';
}

interface Figure {
  value: number;
  p50LatencyUs: number;
}

const allJobs: Job[] = [
  { name: '4k randwrite QD1', rw: 'randwrite', blockSize: '4k', ioDepth: 1, unit: 'IOPS' },
  { name: '4k randwrite QD32', rw: 'randwrite', blockSize: '4k', ioDepth: 32, unit: 'IOPS' },
  { name: '4k randread QD1', rw: 'randread', blockSize: '4k', ioDepth: 1, unit: 'IOPS' },
  { name: '4k randread QD32', rw: 'randread', blockSize: '4k', ioDepth: 32, unit: 'IOPS' },
  { name: '1M seqwrite QD8', rw: 'write', blockSize: '1M', ioDepth: 8, unit: 'MB/s' },
  { name: '1M seqread QD8', rw: 'read', blockSize: '1M', ioDepth: 8, unit: 'MB/s' },
];

const jobs = allJobs.filter((job) => job.name.includes(process.env.BENCH_JOBS ?? ''));
const runtimeSeconds = Number(process.env.BENCH_RUNTIME ?? 5);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const deviceBytes = Number(process.env.BENCH_DEVICE_MIB ?? 1024) * MiB;

async function nbdFio(uri: string, job: Job, outputFile: string): Promise<Figure> {
  const side = await runFio(
    ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.blockSize}`, `--iodepth=${job.ioDepth}`, '--time_based', `--runtime=${runtimeSeconds}`, '--ramp_time=1'],
    job.rw.includes('write') ? 'write' : 'read',
    outputFile,
  );
  return { value: job.unit === 'IOPS' ? side.iops : side.bw_bytes / 1e6, p50LatencyUs: p50Us(side) };
}

async function main(): Promise<void> {
  requireRootAndCommands(['fio', 'qemu-nbd', 'losetup']);
  const work = mkdtempSync('/dev/shm/bm-bench-');
  // Fill once so reads hit allocated tmpfs pages for both servers alike.
  const loop = createLoopDevice(work, 'device.img', deviceBytes, { zeroFill: true });
  const children = new Children();
  try {
    const controlSocket = join(work, 'control.sock');
    const nbdSocket = join(work, 'nbd.sock');
    await children.startDaemon(['--control-socket', controlSocket, '--nbd-socket', nbdSocket, '--state-dir', join(work, 'state'), '--log-level', 'warn'], controlSocket);
    execFileSync(process.execPath, [join(repoRoot, 'bin/blockmirror.js'), '--socket', controlSocket, 'volume', 'add', 'bench', '--device', loop.path]);

    const qemuSocket = join(work, 'qemu.sock');
    children.spawn('qemu-nbd', ['-t', '-k', qemuSocket, '-f', 'raw', '-x', 'bench', '--cache=none', '--aio=native', '--discard=unmap', loop.path]);
    await waitForPath(qemuSocket, 10000);

    const servers = {
      blockmirrord: `nbd+unix:///bench?socket=${nbdSocket}`,
      'qemu-nbd': `nbd+unix:///bench?socket=${qemuSocket}`,
    };
    const samples: Record<string, Record<string, Figure[]>> = {};
    for (const job of jobs) {
      samples[job.name] = { blockmirrord: [], 'qemu-nbd': [] };
      for (let round = 0; round < rounds; round++) {
        // Alternate which server goes first so drift in the machine affects both alike.
        const order = round % 2 === 0 ? (['blockmirrord', 'qemu-nbd'] as const) : (['qemu-nbd', 'blockmirrord'] as const);
        for (const server of order) {
          const figure = await nbdFio(servers[server], job, join(work, 'fio.json'));
          samples[job.name][server].push(figure);
          process.stderr.write(`  ${job.name} ${server}: ${figure.value.toFixed(0)} ${job.unit}, p50 ${figure.p50LatencyUs.toFixed(1)} us\n`);
        }
      }
    }

    const rows = jobs.map((job) => {
      const ours = samples[job.name].blockmirrord;
      const theirs = samples[job.name]['qemu-nbd'];
      const oursValue = median(ours.map((f) => f.value));
      const theirsValue = median(theirs.map((f) => f.value));
      return {
        job: job.name,
        unit: job.unit,
        blockmirrord: oursValue,
        qemuNbd: theirsValue,
        ratio: oursValue / theirsValue,
        blockmirrordP50Us: median(ours.map((f) => f.p50LatencyUs)),
        qemuNbdP50Us: median(theirs.map((f) => f.p50LatencyUs)),
      };
    });
    console.log(`\nmedians of ${rounds} rounds x ${runtimeSeconds} s, tmpfs-backed loop (${deviceBytes / 1048576} MiB, direct-io=on)\n`);
    console.log('| job | blockmirrord | qemu-nbd | ratio | p50 us (bm / qemu) |');
    console.log('|---|---|---|---|---|');
    for (const row of rows) {
      console.log(
        `| ${row.job} | ${row.blockmirrord.toFixed(0)} ${row.unit} | ${row.qemuNbd.toFixed(0)} ${row.unit} | ${row.ratio.toFixed(2)}x | ${row.blockmirrordP50Us.toFixed(1)} / ${row.qemuNbdP50Us.toFixed(1)} |`,
      );
    }
    const resultsDir = join(repoRoot, 'bench', 'results');
    mkdirSync(resultsDir, { recursive: true });
    const file = join(resultsDir, `nbd-fio-${timestampForFile()}.json`);
    writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), runtimeSeconds, rounds, deviceBytes, rows, samples }, null, 2));
    console.log(`\nwrote ${file}`);
  } finally {
    // SIGTERM both servers and wait for them to exit, so the loop device is free to detach.
    await children.stopAll();
    detachLoopDevices([loop]);
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
