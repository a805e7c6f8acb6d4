// Child process for engine.test.ts (not a test itself). Modes:
//   info          print the process engine and do nothing else: Node must exit by itself
//   write <path>  start a write without awaiting it and let the script end: Node must stay alive
//                 until it completes (the poll handle is ref'd while I/O is in flight)
//   lock <path>   take the lock, print "locked", hold it until stdin closes or 10 s pass
//   terminate-workers <path>
//                 20 times: a worker keeps reads, writes, flushes and discards in flight on both
//                 engines and is terminated; prints "done" if the process survived them all
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import { allocAligned, BlockFile, ioEngine, lockFileExclusive } from '../../src/native/index';

// Plain JavaScript over the compiled door (dist/): a worker that loads the TypeScript loader
// takes over a second to start, twenty of them too long for a test.
const terminateWorkerBody = `
const { parentPort, workerData } = require('node:worker_threads');
const { allocAligned, availableIoEngines, BlockFile } = require(workerData.native);
const files = availableIoEngines.map((ioEngine) => BlockFile.open(workerData.target, { readOnly: false, exclusive: false, ioEngine }));
const ignore = () => undefined;
const churn = () => {
  for (let i = 0; i < 32; i++) {
    for (const file of files) {
      const buffer = allocAligned(65536);
      file.write(buffer, (i % 32) * 65536, i % 2 === 0).catch(ignore);
      file.read(buffer, (i % 32) * 65536).catch(ignore);
    }
  }
  for (const file of files) {
    file.flush().catch(ignore);
    file.discard(0, 65536).catch(ignore);
  }
  setImmediate(churn);
};
churn();
parentPort.postMessage('running');
`;

const [mode, target] = process.argv.slice(2);
if (mode === 'terminate-workers') {
  const native = path.join(__dirname, '..', '..', 'dist', 'src', 'native', 'index.js');
  void (async () => {
    for (let round = 0; round < 20; round++) {
      const worker = new Worker(terminateWorkerBody, { eval: true, execArgv: [], workerData: { target, native } });
      await new Promise((resolve) => worker.once('message', resolve));
      await new Promise((resolve) => setTimeout(resolve, round % 5));
      await worker.terminate();
    }
    console.log('done');
  })();
} else if (mode === 'info') {
  console.log(JSON.stringify({ ioEngine }));
} else if (mode === 'write') {
  const file = BlockFile.open(target, { readOnly: false, exclusive: false });
  const buffer = allocAligned(1024 * 1024).fill(0xab);
  let done = false;
  void file.write(buffer, 0, true).then(() => {
    done = true;
    return file.close();
  });
  process.on('exit', () => console.log(JSON.stringify({ engine: file.engine, done })));
} else if (mode === 'lock') {
  try {
    const lock = lockFileExclusive(target);
    console.log('locked');
    setTimeout(() => lock.release(), 10_000).unref();
    process.stdin.resume();
    process.stdin.on('end', () => lock.release());
  } catch (error) {
    console.log(JSON.stringify({ code: (error as { code?: string }).code }));
  }
}
