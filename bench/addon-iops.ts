// Addon I/O benchmark: 4 KiB random write and read at QD1 and QD32 through BlockFile with each
// engine, then fio (io_uring, O_DIRECT) on the same device in the same run, for a ratio.
//   node dist/bench/addon-iops.js /dev/loopN [--seconds 3] [--json out.json]
// DESTROYS the data on the device. Use a tmpfs-backed loop device:
//   truncate -s 1G /dev/shm/bm.img && losetup --direct-io=on -f --show /dev/shm/bm.img
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

import { allocAligned, availableIoEngines, BlockFile, type IoEngine } from '../src/native/index';

interface JobResult {
  runner: string;
  job: string;
  iops: number;
  p50LatencyUs: number;
}

const BLOCK_BYTES = 4096;
const LATENCY_SAMPLES_MAX = 1 << 21;

function parseArgs(argv: string[]): { device: string; seconds: number; jsonPath?: string } {
  const [device, ...rest] = argv;
  if (device === undefined || device.startsWith('--')) {
    throw new Error('usage: addon-iops <device> [--seconds N] [--json out.json]');
  }
  let seconds = 3;
  let jsonPath: string | undefined;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--seconds') seconds = Number(rest[++i]);
    else if (rest[i] === '--json') jsonPath = rest[++i];
    else throw new Error(`unknown argument ${rest[i]}`);
  }
  if (!(seconds > 0 && seconds <= 600)) throw new Error('--seconds must be in (0, 600]');
  return { device, seconds, jsonPath };
}

async function runAddonJob(
  device: string,
  engine: IoEngine,
  write: boolean,
  queueDepth: number,
  seconds: number,
): Promise<JobResult> {
  const file = BlockFile.open(device, { readOnly: false, exclusive: true, ioEngine: engine });
  try {
    const spanBytes = Math.min(file.info.sizeBytes, 1024 * 1024 * 1024);
    const blockCount = Math.floor(spanBytes / BLOCK_BYTES);
    const latenciesNs = new Float64Array(LATENCY_SAMPLES_MAX);
    let samples = 0;
    let ops = 0;
    const startNs = process.hrtime.bigint();
    const endNs = startNs + BigInt(Math.round(seconds * 1e9));
    const worker = async (index: number): Promise<void> => {
      const buffer = allocAligned(BLOCK_BYTES);
      buffer.fill(index + 1);
      for (;;) {
        const t0 = process.hrtime.bigint();
        if (t0 >= endNs) return;
        const offsetBytes = Math.floor(Math.random() * blockCount) * BLOCK_BYTES;
        if (write) await file.write(buffer, offsetBytes, false);
        else await file.read(buffer, offsetBytes);
        ops++;
        if (samples < LATENCY_SAMPLES_MAX) latenciesNs[samples++] = Number(process.hrtime.bigint() - t0);
      }
    };
    await Promise.all(Array.from({ length: queueDepth }, (_, i) => worker(i)));
    const elapsedNs = Number(process.hrtime.bigint() - startNs);
    const sorted = latenciesNs.subarray(0, samples).sort();
    return {
      runner: `addon ${engine}`,
      job: `4k rand${write ? 'write' : 'read'} QD${queueDepth}`,
      iops: ops / (elapsedNs / 1e9),
      p50LatencyUs: sorted[Math.floor(samples / 2)] / 1000,
    };
  } finally {
    await file.close();
  }
}

function runFioJob(device: string, write: boolean, queueDepth: number, seconds: number): JobResult {
  const output = execFileSync(
    'fio',
    [
      '--name=bench',
      `--filename=${device}`,
      '--ioengine=io_uring',
      '--direct=1',
      `--rw=rand${write ? 'write' : 'read'}`,
      `--bs=${BLOCK_BYTES}`,
      `--iodepth=${queueDepth}`,
      '--size=1G',
      `--runtime=${seconds}`,
      '--time_based',
      '--randrepeat=0',
      '--lat_percentiles=1',
      '--output-format=json',
    ],
    { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 },
  );
  const job = JSON.parse(output).jobs[0];
  const side = write ? job.write : job.read;
  return {
    runner: 'fio io_uring',
    job: `4k rand${write ? 'write' : 'read'} QD${queueDepth}`,
    iops: side.iops,
    // lat (submit to completion, as the addon measures), not clat.
    p50LatencyUs: side.lat_ns.percentile['50.000000'] / 1000,
  };
}

// Writes every block once so no runner pays the backing store's first-touch allocation (tmpfs
// pages) that the runners after it would not.
async function prefill(device: string): Promise<void> {
  const file = BlockFile.open(device, { readOnly: false, exclusive: true });
  try {
    const spanBytes = Math.min(file.info.sizeBytes, 1024 * 1024 * 1024);
    const chunkBytes = 1024 * 1024;
    const chunk = allocAligned(chunkBytes).fill(0x5a);
    const pending: Promise<void>[] = [];
    for (let offsetBytes = 0; offsetBytes + chunkBytes <= spanBytes; offsetBytes += chunkBytes) {
      pending.push(file.write(chunk, offsetBytes, false));
      if (pending.length === 8) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
    await file.flush();
  } finally {
    await file.close();
  }
}

async function main(): Promise<void> {
  const { device, seconds, jsonPath } = parseArgs(process.argv.slice(2));
  await prefill(device);
  const results: JobResult[] = [];
  for (const write of [true, false]) {
    for (const queueDepth of [1, 32]) {
      for (const engine of availableIoEngines) {
        results.push(await runAddonJob(device, engine, write, queueDepth, seconds));
      }
      results.push(runFioJob(device, write, queueDepth, seconds));
    }
  }
  const rows = results.map((r) => {
    const fio = results.find((f) => f.runner === 'fio io_uring' && f.job === r.job);
    const ratio = fio === undefined ? '' : (r.iops / fio.iops).toFixed(2);
    return `| ${r.job} | ${r.runner} | ${Math.round(r.iops)} | ${r.p50LatencyUs.toFixed(1)} | ${ratio} |`;
  });
  console.log(`device ${device}, ${seconds} s per job, node ${process.version}`);
  console.log('| job | runner | IOPS | p50 us | vs fio |');
  console.log('|---|---|---|---|---|');
  for (const row of rows) console.log(row);
  if (jsonPath !== undefined) fs.writeFileSync(jsonPath, JSON.stringify({ device, seconds, results }, null, 2));
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
