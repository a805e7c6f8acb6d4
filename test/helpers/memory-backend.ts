// An in-memory BlockBackend for tests. It keeps real bytes and a per-block allocation map (so
// base:allocation has holes to report), counts concurrency and unreleased reads, and lets a
// test delay or fail chosen operations through `hook`.

import assert from 'node:assert';
import type {
  AllocationRun,
  BlockBackend,
  BlockBackendInfo,
  ReadResult,
  WriteZeroesOptions,
} from '../../src/volume/backend';

export type MemoryOp = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'cache' | 'blockStatus';

export interface MemoryCall {
  op: MemoryOp;
  offsetBytes: number;
  lengthBytes: number;
  fua?: boolean;
  options?: WriteZeroesOptions;
  /** write: the caller's buffer itself. Its bytes belong to the caller again once the call has
   *  settled; tests only look at its identity and alignment (pooled, aligned payloads). */
  data?: Buffer;
}

export interface MemoryBackendOptions {
  sizeBytes: number;
  readOnly?: boolean;
  /** Allocation granularity for trim/zero/block status. Default 4096. */
  blockBytes?: number;
  physicalSectorBytes?: number;
  /** Whether WRITE_ZEROES with FAST_ZERO is accepted. Default true. */
  fastZero?: boolean;
}

/** A Node-style error with an errno name, as real backends raise. */
export function errnoError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(`${code}: ${message}`), { code });
}

export class MemoryBackend implements BlockBackend {
  readonly data: Buffer;
  private readonly blockBytes: number;
  private readonly allocated: Uint8Array;
  private readonly options: MemoryBackendOptions;
  /** Runs before every operation; a returned promise delays it, a throw/rejection fails it. */
  hook: ((call: MemoryCall) => Promise<void> | void) | null = null;
  readonly calls: MemoryCall[] = [];
  activeOps = 0;
  peakActiveOps = 0;
  activeBytes = 0;
  peakActiveBytes = 0;
  /** Reads handed out and not yet released. */
  unreleasedReads = 0;
  flushCount = 0;

  constructor(options: MemoryBackendOptions) {
    this.options = options;
    this.blockBytes = options.blockBytes ?? 4096;
    assert(options.sizeBytes % this.blockBytes === 0);
    this.data = Buffer.alloc(options.sizeBytes);
    this.allocated = new Uint8Array(options.sizeBytes / this.blockBytes);
  }

  info(): BlockBackendInfo {
    return {
      sizeBytes: this.options.sizeBytes,
      logicalSectorBytes: 512,
      physicalSectorBytes: this.options.physicalSectorBytes ?? 4096,
      readOnly: this.options.readOnly ?? false,
      canTrim: true,
    };
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<ReadResult> {
    return this.run({ op: 'read', offsetBytes, lengthBytes }, lengthBytes, () => {
      const data = Buffer.from(this.data.subarray(offsetBytes, offsetBytes + lengthBytes));
      this.unreleasedReads += 1;
      let released = false;
      return {
        data,
        release: () => {
          assert(!released, 'ReadResult released twice');
          released = true;
          this.unreleasedReads -= 1;
        },
      };
    });
  }

  async write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    // Copy before any await, as the contract says the caller may reuse `data` after settling.
    const copy = Buffer.from(data);
    return this.run({ op: 'write', offsetBytes, lengthBytes: data.length, fua, data }, data.length, () => {
      copy.copy(this.data, offsetBytes);
      this.markAllocated(offsetBytes, copy.length, true);
    });
  }

  async flush(): Promise<void> {
    return this.run({ op: 'flush', offsetBytes: 0, lengthBytes: 0 }, 0, () => {
      this.flushCount += 1;
    });
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    return this.run({ op: 'trim', offsetBytes, lengthBytes, fua }, 0, () => {
      this.deallocateWholeBlocks(offsetBytes, lengthBytes);
    });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void> {
    return this.run({ op: 'writeZeroes', offsetBytes, lengthBytes, options }, 0, () => {
      if (options.fastZero && this.options.fastZero === false) {
        throw errnoError('BM_ERR_NOT_FAST', 'zeroing is not fast on this backend');
      }
      this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
      if (options.noHole) this.markAllocated(offsetBytes, lengthBytes, true);
      else this.deallocateWholeBlocks(offsetBytes, lengthBytes);
    });
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.run({ op: 'cache', offsetBytes, lengthBytes }, 0, () => undefined);
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<AllocationRun[]> {
    return this.run({ op: 'blockStatus', offsetBytes, lengthBytes }, 0, () => {
      const endBytes = Math.min(offsetBytes + lengthBytes, this.options.sizeBytes);
      const runs: AllocationRun[] = [];
      let position = offsetBytes;
      while (position < endBytes) {
        const block = Math.floor(position / this.blockBytes);
        const isAllocated = this.allocated[block] === 1;
        let runEnd = (block + 1) * this.blockBytes;
        while (runEnd < endBytes && (this.allocated[runEnd / this.blockBytes] === 1) === isAllocated) runEnd += this.blockBytes;
        runEnd = Math.min(runEnd, endBytes);
        runs.push({ lengthBytes: runEnd - position, flags: isAllocated ? 0 : 3 });
        position = runEnd;
      }
      return runs;
    });
  }

  private async run<T>(call: MemoryCall, chargedBytes: number, body: () => T): Promise<T> {
    this.calls.push(call);
    this.activeOps += 1;
    this.activeBytes += chargedBytes;
    this.peakActiveOps = Math.max(this.peakActiveOps, this.activeOps);
    this.peakActiveBytes = Math.max(this.peakActiveBytes, this.activeBytes);
    try {
      if (this.hook !== null) await this.hook(call);
      else await Promise.resolve();
      this.assertInBounds(call);
      return body();
    } finally {
      this.activeOps -= 1;
      this.activeBytes -= chargedBytes;
    }
  }

  // The server validates bounds; reaching here out of bounds is a server bug.
  private assertInBounds(call: MemoryCall): void {
    assert(call.offsetBytes >= 0);
    assert(call.offsetBytes + call.lengthBytes <= this.options.sizeBytes, `${call.op} out of bounds`);
  }

  private markAllocated(offsetBytes: number, lengthBytes: number, value: boolean): void {
    const first = Math.floor(offsetBytes / this.blockBytes);
    const last = Math.ceil((offsetBytes + lengthBytes) / this.blockBytes);
    this.allocated.fill(value ? 1 : 0, first, last);
  }

  private deallocateWholeBlocks(offsetBytes: number, lengthBytes: number): void {
    const first = Math.ceil(offsetBytes / this.blockBytes);
    const last = Math.floor((offsetBytes + lengthBytes) / this.blockBytes);
    if (last > first) {
      this.data.fill(0, first * this.blockBytes, last * this.blockBytes);
      this.allocated.fill(0, first, last);
    }
  }
}
