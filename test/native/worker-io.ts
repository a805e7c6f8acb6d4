// Worker body for engine.test.ts (not a test itself): keeps 32 writes in flight until terminated.
import { parentPort, workerData } from 'node:worker_threads';

import { allocAligned, BlockFile } from '../../src/native/index';

const file = BlockFile.open(workerData as string, { readOnly: false, exclusive: false });
const loop = (buffer: Buffer, index: number): Promise<void> =>
  file.write(buffer, ((index * 7919) % 32) * 1024 * 1024, false).then(() => loop(buffer, index + 1));
for (let i = 0; i < 32; i++) void loop(allocAligned(1024 * 1024).fill(i), i);
parentPort?.postMessage(file.engine);
