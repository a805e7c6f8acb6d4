// A pool of aligned O_DIRECT buffers in power-of-two size classes (4 KiB .. 32 MiB), so the hot
// path does not call posix_memalign. Idle memory is bounded by maxPooledBytes; what does not fit
// is left to the garbage collector (its finalizer frees the native block).
import assert from 'node:assert';

// index.ts re-exports this module, so this import is circular; it is only used inside methods,
// after both modules have finished loading.
import { allocAligned } from './index';
import { NativeError } from './types';

const MIN_CLASS_SHIFT = 12; // 4 KiB
const MAX_CLASS_SHIFT = 25; // 32 MiB
const CLASS_COUNT = MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1;

assert(1 << MIN_CLASS_SHIFT === 4096);
assert(1 << MAX_CLASS_SHIFT === 32 * 1024 * 1024);

export interface BufferPoolOptions {
  /** Upper bound on the bytes kept idle in the pool (lent buffers are not counted). */
  maxPooledBytes: number;
  /** Alignment of every block; default 4096 (covers 512 and 4K sector devices). */
  alignBytes?: number;
}

function classIndexFor(sizeBytes: number): number {
  if (sizeBytes <= 1 << MIN_CLASS_SHIFT) return 0;
  const shift = Math.ceil(Math.log2(sizeBytes));
  // log2 of large integers can land just below an exact power: correct it.
  const exact = 2 ** shift >= sizeBytes ? shift : shift + 1;
  return exact - MIN_CLASS_SHIFT;
}

export class BufferPool {
  readonly maxPooledBytes: number;
  readonly alignBytes: number;
  #idle: Buffer[][] = Array.from({ length: CLASS_COUNT }, () => []);
  #idleBytes = 0;
  // Blocks lent out, keyed by the view acquire() returned for this lend; weak so a buffer that
  // is never released does not leak through the pool.
  #lent = new WeakMap<Buffer, Buffer>();

  constructor(options: BufferPoolOptions) {
    const maxPooledBytes = options?.maxPooledBytes;
    const alignBytes = options?.alignBytes ?? 4096;
    if (typeof maxPooledBytes !== 'number' || !Number.isSafeInteger(maxPooledBytes) || maxPooledBytes < 0) {
      throw new RangeError(`maxPooledBytes must be a non-negative integer, got ${String(maxPooledBytes)}`);
    }
    if (!Number.isSafeInteger(alignBytes) || alignBytes < 512 || alignBytes > 1 << MIN_CLASS_SHIFT ||
      (alignBytes & (alignBytes - 1)) !== 0) {
      throw new RangeError(`alignBytes must be a power of two between 512 and 4096, got ${String(alignBytes)}`);
    }
    this.maxPooledBytes = maxPooledBytes;
    this.alignBytes = alignBytes;
  }

  /** Bytes currently idle in the pool. */
  get idleBytes(): number {
    return this.#idleBytes;
  }

  /** An aligned Buffer of exactly sizeBytes: a view on a pooled block of its size class.
   *  Reused blocks are not zeroed (O_DIRECT reads overwrite them); fresh ones are.
   *  Sizes above 32 MiB get a dedicated block that release() hands to the GC. */
  acquire(sizeBytes: number): Buffer {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
      throw new RangeError(`sizeBytes must be a positive integer, got ${String(sizeBytes)}`);
    }
    let block: Buffer | undefined;
    if (sizeBytes > 1 << MAX_CLASS_SHIFT) {
      block = allocAligned(sizeBytes, this.alignBytes);
    } else {
      const index = classIndexFor(sizeBytes);
      block = this.#idle[index].pop();
      if (block !== undefined) {
        this.#idleBytes -= block.length;
      } else {
        block = allocAligned(1 << (index + MIN_CLASS_SHIFT), this.alignBytes);
      }
    }
    // A fresh view per lend: a stale release() of an earlier lend of the same block then fails
    // instead of returning memory its current user is still writing.
    const view = block.subarray(0, sizeBytes);
    this.#lent.set(view, block);
    return view;
  }

  /** Returns a buffer from acquire(). A buffer this pool did not lend (or one released twice)
   *  throws BM_ERR_POOL_FOREIGN: that is a programming error that could hand the same memory
   *  to two users. */
  release(buffer: Buffer): void {
    const block = Buffer.isBuffer(buffer) ? this.#lent.get(buffer) : undefined;
    if (block === undefined) {
      throw new NativeError('buffer was not acquired from this pool, or was released twice', {
        code: 'BM_ERR_POOL_FOREIGN',
        errno: 0,
        syscall: '',
      });
    }
    this.#lent.delete(buffer);
    if (block.length > 1 << MAX_CLASS_SHIFT) return;
    if (this.#idleBytes + block.length > this.maxPooledBytes) return;
    const index = classIndexFor(block.length);
    assert(1 << (index + MIN_CLASS_SHIFT) === block.length);
    this.#idle[index].push(block);
    this.#idleBytes += block.length;
  }
}
