// Write-path benchmark: the daemon's JavaScript cost per client write through a Volume, with no
// replica attached and with one replica that does nothing but wait for the local write (so
// the difference is the replicated path's own bookkeeping: admission, the exclusive range
// lock, the hand-over), in the same process, alternating. No sockets, no second daemon: the
// figures are CPU microseconds per write (user + system of this process) and writes per
// second at QD32 of 4 KiB random writes, medians of the rounds, and the promises created per
// write (counted with an async hook in a separate pass: a figure that does not drift with the
// machine's load, unlike the CPU time).
//   node dist/bench/write-path.js [--device PATH] [--seconds N] [--rounds N]
// Default device: a 256 MiB file in /dev/shm (O_DIRECT on tmpfs, Linux >= 6.6), removed after.
import { createHook } from 'node:async_hooks';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { BufferPool } from '../src/native/index';
import type { VolumeReplica } from '../src/volume/replica';
import { Volume } from '../src/volume/volume';

const BLOCK_BYTES = 4096;
const QUEUE_DEPTH = 32;
const logger = pino({ level: 'silent' });

/** Waits for the local write, as a mirror in sync mode with an instant target would. */
class WaitingReplica implements VolumeReplica {
  admit(): void {}
  replicateWrite(_offsetBytes: number, _data: Buffer, _fua: boolean, local: Promise<void>): Promise<void> {
    return local;
  }
  replicateZeroes(_offsetBytes: number, _lengthBytes: number, _fua: boolean, local: Promise<void>): Promise<void> {
    return local;
  }
  async replicateFlush(): Promise<void> {}
}

interface Sample {
  writesPerSecond: number;
  cpuUsPerWrite: number;
  userUsPerWrite: number;
}

async function run(volume: Volume, seconds: number): Promise<Sample> {
  const pool = new BufferPool({ maxPooledBytes: QUEUE_DEPTH * BLOCK_BYTES });
  const blocks = Math.floor(volume.info().sizeBytes / BLOCK_BYTES);
  let writes = 0;
  const deadline = performance.now() + seconds * 1000;
  const cpu = process.cpuUsage();
  const started = performance.now();
  const worker = async (): Promise<void> => {
    while (performance.now() < deadline) {
      // A pooled buffer per write, as the NBD server hands the volume one.
      const data = pool.acquire(BLOCK_BYTES);
      await volume.write(Math.floor(Math.random() * blocks) * BLOCK_BYTES, data, false);
      pool.release(data);
      writes++;
    }
  };
  await Promise.all(Array.from({ length: QUEUE_DEPTH }, worker));
  const elapsedSeconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  return {
    writesPerSecond: writes / elapsedSeconds,
    cpuUsPerWrite: (used.user + used.system) / writes,
    userUsPerWrite: used.user / writes,
  };
}

/** Promises created per write (the bench loop's own included, the same for both paths). */
async function promisesPerWrite(volume: Volume): Promise<number> {
  const pool = new BufferPool({ maxPooledBytes: QUEUE_DEPTH * BLOCK_BYTES });
  const blocks = Math.floor(volume.info().sizeBytes / BLOCK_BYTES);
  const writesPerWorker = 200;
  let promises = 0;
  const hook = createHook({
    init(_id, type) {
      if (type === 'PROMISE') promises++;
    },
  });
  const worker = async (): Promise<void> => {
    for (let i = 0; i < writesPerWorker; i++) {
      const data = pool.acquire(BLOCK_BYTES);
      await volume.write(Math.floor(Math.random() * blocks) * BLOCK_BYTES, data, false);
      pool.release(data);
    }
  };
  hook.enable();
  try {
    await Promise.all(Array.from({ length: QUEUE_DEPTH }, worker));
  } finally {
    hook.disable();
  }
  return promises / (writesPerWorker * QUEUE_DEPTH);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[middle] as number) : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  let device: string | undefined;
  let seconds = 3;
  let rounds = 5;
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--device') device = args[++i];
    else if (args[i] === '--seconds') seconds = Number(args[++i]);
    else if (args[i] === '--rounds') rounds = Number(args[++i]);
    else throw new Error(`unknown argument ${args[i]}`);
  }
  if (!(seconds > 0 && seconds <= 600) || !(Number.isInteger(rounds) && rounds > 0 && rounds <= 100)) throw new Error('--seconds in (0, 600], --rounds in 1..100');
  const scratch = device === undefined ? mkdtempSync('/dev/shm/bm-write-path-') : undefined;
  const path = device ?? join(scratch as string, 'device.img');
  if (scratch !== undefined) writeFileSync(path, Buffer.alloc(256 * 1024 * 1024, 0x5a));
  const volume = Volume.open({ name: 'bench', uuid: '00000000-0000-4000-8000-000000000000', devicePath: path, readOnly: false }, logger);
  const replica = new WaitingReplica();
  const samples: Record<'plain' | 'replicated', Sample[]> = { plain: [], replicated: [] };
  const promises: Record<'plain' | 'replicated', number> = { plain: 0, replicated: 0 };
  try {
    await run(volume, 1); // warm-up: JIT, pool, page cache of the file
    promises.plain = await promisesPerWrite(volume);
    volume.attachReplica(replica);
    promises.replicated = await promisesPerWrite(volume);
    volume.detachReplica(replica);
    for (let round = 0; round < rounds; round++) {
      for (const which of round % 2 === 0 ? (['plain', 'replicated'] as const) : (['replicated', 'plain'] as const)) {
        if (which === 'replicated') volume.attachReplica(replica);
        try {
          samples[which].push(await run(volume, seconds));
        } finally {
          if (which === 'replicated') volume.detachReplica(replica);
        }
      }
    }
  } finally {
    await volume.close();
    if (scratch !== undefined) rmSync(scratch, { recursive: true, force: true });
  }
  console.log(`4 KiB random writes, QD${QUEUE_DEPTH}, ${rounds} rounds x ${seconds} s, medians (${device ?? 'a file in /dev/shm'})`);
  console.log('| path | writes/s | CPU us per write | of which user | promises per write |');
  console.log('|---|---|---|---|---|');
  for (const which of ['plain', 'replicated'] as const) {
    const list = samples[which];
    console.log(`| ${which} | ${median(list.map((s) => s.writesPerSecond)).toFixed(0)} | ${median(list.map((s) => s.cpuUsPerWrite)).toFixed(2)} | ${median(list.map((s) => s.userUsPerWrite)).toFixed(2)} | ${promises[which].toFixed(1)} |`);
  }
  const extra = median(samples.replicated.map((s) => s.cpuUsPerWrite)) - median(samples.plain.map((s) => s.cpuUsPerWrite));
  console.log(`replicated path's own cost: ${extra.toFixed(2)} us of CPU per write`);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
