// Child process for busy-poll.test.ts (not a test itself): each mode runs in a fresh process so
// its counters and CPU time are its own. Prints one JSON line. Modes:
//   lone-writes <path> <maxMicros>  300 awaited 4 KiB writes, one at a time, each read back
//   ping-pong <maxMicros>           2000 round trips with a worker: events that arrive while the
//                                   loop has no I/O in flight
//   idle <maxMicros>                ping-pong first (budgets grown), then 250 timer wake-ups 2 ms
//                                   apart: how often it polled and the CPU it spent meanwhile
import { Worker } from 'node:worker_threads';

import { allocAligned, BlockFile, busyPollStats, setBusyPoll } from '../../src/native/index';

const echoBody = `
const { parentPort } = require('node:worker_threads');
parentPort.on('message', (message) => parentPort.postMessage(message));
`;

async function loneWrites(filePath: string): Promise<{ mismatches: number }> {
  const file = BlockFile.open(filePath, { readOnly: false, exclusive: false });
  const written = allocAligned(4096);
  const read = allocAligned(4096);
  let mismatches = 0;
  for (let i = 0; i < 300; i++) {
    written.fill(i & 0xff);
    written.writeUInt32LE(i, 0);
    await file.write(written, (i % 64) * 4096, false);
    await file.read(read, (i % 64) * 4096);
    if (!read.equals(written)) mismatches++;
  }
  await file.close();
  return { mismatches };
}

async function pingPong(rounds: number): Promise<void> {
  const worker = new Worker(echoBody, { eval: true, execArgv: [] });
  for (let i = 0; i < rounds; i++) {
    const answer = await new Promise((resolve) => {
      worker.once('message', resolve);
      worker.postMessage(i);
    });
    if (answer !== i) throw new Error(`echo ${String(answer)} for ${i}`);
  }
  await worker.terminate();
}

async function idleTimers(): Promise<{ polls: number; cpuMs: number }> {
  const before = busyPollStats();
  const cpuBefore = process.cpuUsage();
  for (let i = 0; i < 250; i++) await new Promise((resolve) => setTimeout(resolve, 2));
  const cpu = process.cpuUsage(cpuBefore);
  const after = busyPollStats();
  return { polls: after.eventPolls - before.eventPolls, cpuMs: (cpu.user + cpu.system) / 1000 };
}

async function main(): Promise<void> {
  const [mode, ...args] = process.argv.slice(2);
  const maxMicros = Number(args[args.length - 1]);
  const applied = maxMicros > 0 ? setBusyPoll(maxMicros) : null;
  let result: object = {};
  if (mode === 'lone-writes') {
    result = await loneWrites(args[0] ?? '');
  } else if (mode === 'ping-pong') {
    await pingPong(2000);
  } else if (mode === 'idle') {
    await pingPong(500);
    result = { idle: await idleTimers() };
  } else {
    throw new Error(`unknown mode ${String(mode)}`);
  }
  console.log(JSON.stringify({ applied, stats: busyPollStats(), ...result }));
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
