// The addon must keep each Buffer alive until its op completes, even when JS drops it at once.
import v8 from 'node:v8';
import vm from 'node:vm';

import t from 'tap';

import { allocAligned, availableIoEngines, BlockFile } from '../../src/native/index';
import { sparseFile } from './fixtures';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

const BLOCK_BYTES = 64 * 1024;
const BLOCKS = 256;

for (const engine of availableIoEngines) {
  t.test(`${engine}: writes from dropped buffers land intact under forced GC`, async (tt) => {
    const file = BlockFile.open(sparseFile(tt, BLOCKS * BLOCK_BYTES), { readOnly: false, exclusive: false, ioEngine: engine });
    tt.teardown(() => file.close().catch(() => undefined));
    const pending: Promise<void>[] = [];
    for (let i = 0; i < BLOCKS; i++) {
      // The only reference to the buffer is the one the addon holds for the op.
      pending.push(file.write(allocAligned(BLOCK_BYTES).fill(i & 0xff), i * BLOCK_BYTES, false));
      if (i % 32 === 0) gc();
    }
    gc();
    await Promise.all(pending);
    gc();
    const back = allocAligned(BLOCKS * BLOCK_BYTES);
    await file.read(back, 0);
    let bad = 0;
    for (let i = 0; i < BLOCKS; i++) {
      const block = back.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES);
      if (!block.every((byte) => byte === (i & 0xff))) bad++;
    }
    tt.equal(bad, 0, 'every block holds its pattern');
  });
}
