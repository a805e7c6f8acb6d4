import t from 'tap';

import { allocAligned, BlockFile, BufferPool } from '../../src/native/index';
import { sparseFile } from './fixtures';

t.test('acquire returns exact-size aligned views, reused after release', async (tt) => {
  const pool = new BufferPool({ maxPooledBytes: 1024 * 1024 });
  const first = pool.acquire(5000);
  tt.equal(first.length, 5000);
  tt.equal(first.buffer.byteLength, 8192, '8 KiB size class');
  pool.release(first);
  tt.equal(pool.idleBytes, 8192);
  const second = pool.acquire(8192);
  tt.equal(second.buffer, first.buffer, 'same block reused');
  tt.equal(pool.idleBytes, 0);
  const small = pool.acquire(1);
  tt.equal(small.buffer.byteLength, 4096, 'smallest class is 4 KiB');
  pool.release(second);
  pool.release(small);
});

t.test('pooled buffers work for O_DIRECT', async (tt) => {
  const file = BlockFile.open(sparseFile(tt, 1024 * 1024), { readOnly: false, exclusive: false });
  tt.teardown(() => file.close().catch(() => undefined));
  const pool = new BufferPool({ maxPooledBytes: 1024 * 1024 });
  const buffer = pool.acquire(3 * 4096);
  buffer.fill(0x5a);
  await file.write(buffer, 8192, false);
  const back = pool.acquire(3 * 4096);
  await file.read(back, 8192);
  tt.ok(back.equals(buffer));
  pool.release(buffer);
  pool.release(back);
});

t.test('idle bytes are bounded by maxPooledBytes', async (tt) => {
  const pool = new BufferPool({ maxPooledBytes: 64 * 1024 });
  const lent = Array.from({ length: 40 }, () => pool.acquire(4096));
  for (const buffer of lent) pool.release(buffer);
  tt.equal(pool.idleBytes, 64 * 1024, 'only 16 of 40 blocks kept');
  const big = pool.acquire(1024 * 1024);
  pool.release(big);
  tt.equal(pool.idleBytes, 64 * 1024, 'a block larger than the bound is dropped');
  const zero = new BufferPool({ maxPooledBytes: 0 });
  zero.release(zero.acquire(4096));
  tt.equal(zero.idleBytes, 0);
});

t.test('sizes above 32 MiB get a dedicated block', async (tt) => {
  const pool = new BufferPool({ maxPooledBytes: 128 * 1024 * 1024 });
  const huge = pool.acquire(33 * 1024 * 1024);
  tt.equal(huge.length, 33 * 1024 * 1024);
  pool.release(huge);
  tt.equal(pool.idleBytes, 0);
  const max = pool.acquire(32 * 1024 * 1024);
  pool.release(max);
  tt.equal(pool.idleBytes, 32 * 1024 * 1024, 'the 32 MiB class is pooled');
});

t.test('foreign buffers and double release are refused', async (tt) => {
  const pool = new BufferPool({ maxPooledBytes: 1024 * 1024 });
  const other = new BufferPool({ maxPooledBytes: 1024 * 1024 });
  tt.throws(() => pool.release(Buffer.alloc(4096)), { code: 'BM_ERR_POOL_FOREIGN' });
  tt.throws(() => pool.release(allocAligned(4096)), { code: 'BM_ERR_POOL_FOREIGN' });
  const buffer = pool.acquire(4096);
  tt.throws(() => other.release(buffer), { code: 'BM_ERR_POOL_FOREIGN' });
  tt.throws(() => pool.release(buffer.subarray(512)), { code: 'BM_ERR_POOL_FOREIGN' }, 'a view at another offset');
  pool.release(buffer);
  tt.throws(() => pool.release(buffer), { code: 'BM_ERR_POOL_FOREIGN' }, 'double release');
  // The block is lent again; a stale release of the first lend must not hand it back while the
  // second borrower still uses it.
  const again = pool.acquire(4096);
  tt.equal(again.buffer, buffer.buffer, 'same block reused');
  tt.throws(() => pool.release(buffer), { code: 'BM_ERR_POOL_FOREIGN' }, 'stale release after the block was lent again');
  pool.release(again);
});

t.test('options are validated', async (tt) => {
  tt.throws(() => new BufferPool({ maxPooledBytes: -1 }), RangeError);
  tt.throws(() => new BufferPool({ maxPooledBytes: 1, alignBytes: 1000 }), RangeError);
  const pool = new BufferPool({ maxPooledBytes: 1 });
  tt.throws(() => pool.acquire(0), RangeError);
  tt.throws(() => pool.acquire(1.5), RangeError);
});

t.test('allocAligned', async (tt) => {
  const buffer = allocAligned(8192, 4096);
  tt.equal(buffer.length, 8192);
  tt.ok(buffer.every((byte) => byte === 0), 'zeroed');
  tt.equal(allocAligned(0).length, 0);
  tt.throws(() => allocAligned(4096, 3000), RangeError);
  tt.throws(() => allocAligned(-1), RangeError);
});
