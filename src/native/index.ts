// The only door to the native addon (build/Release/blockmirror.node). Arguments are validated
// here first, with the same error codes the C++ side re-checks cheaply, so callers get precise
// errors and the addon never trusts its caller.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  type AllocationExtent,
  type BlockFileInfo,
  type DirtyRun,
  BUSY_POLL_MICROS_MAX,
  type BusyPollStats,
  type IoEngine,
  NativeError,
  type OpenOptions,
} from './types';

export * from './types';
export { BufferPool } from './buffer-pool';

// ---------------------------------------------------------------------------------------------
// Loading

interface NativeFileHandle {
  info(): BlockFileInfo & { engine: IoEngine };
  read(buffer: Buffer, offsetBytes: number): Promise<void>;
  write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  discard(offsetBytes: number, lengthBytes: number): Promise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, mayDeallocate: boolean): Promise<void>;
  allocationMap(offsetBytes: number, lengthBytes: number): Promise<AllocationExtent[]>;
  close(): Promise<void>;
}

interface NativeDirtyBitmap {
  setRange(offsetBytes: number, lengthBytes: number): number;
  clearRange(offsetBytes: number, lengthBytes: number): void;
  testRange(offsetBytes: number, lengthBytes: number): boolean;
  count(): number;
  dirtyBytes(): number;
  runs(startOffsetBytes: number, maxRuns: number): DirtyRun[];
  merge(other: NativeDirtyBitmap): void;
  snapshotAndClear(): NativeDirtyBitmap;
  serialize(): Buffer;
  memoryBytes(): number;
}

interface NativeAddon {
  ioEngine: IoEngine;
  ioUringErrno: number;
  setErrorClass(errorClass: typeof NativeError): void;
  setBusyPoll(maxNs: number): boolean;
  busyPollStats(): { maxNs: number; eventPolls: number; eventPollHits: number; completionPolls: number; completionPollHits: number };
  allocAligned(sizeBytes: number, alignBytes: number): Buffer;
  open(filePath: string, readOnly: boolean, exclusive: boolean, ioEngine: string): NativeFileHandle;
  DirtyBitmap: {
    new (sizeBytes: number, regionBytes: number): NativeDirtyBitmap;
    deserialize(buffer: Buffer): NativeDirtyBitmap;
  };
  lockFile(filePath: string): number;
  unlockFile(fd: number): void;
  sdNotify(state: string): boolean;
  crc32c(data: Uint8Array): number;
  dupFd(fd: number): number;
}

function loadAddon(): NativeAddon {
  // src/native/index.ts (tests, via tap's loader) or dist/src/native/index.js (compiled).
  const candidates = [
    path.join(__dirname, '..', '..', 'build', 'Release', 'blockmirror.node'),
    path.join(__dirname, '..', '..', '..', 'build', 'Release', 'blockmirror.node'),
  ];
  const found = candidates.find((candidate) => fs.existsSync(candidate));
  if (found === undefined) {
    throw new NativeError(`native addon not built (looked for ${candidates.join(', ')}); run npm ci or npx node-gyp rebuild`, {
      code: 'BM_ERR_ADDON_MISSING',
      errno: 0,
      syscall: '',
    });
  }
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const addon = require(found) as NativeAddon;
  addon.setErrorClass(NativeError);
  return addon;
}

const addon = loadAddon();

/** The engine BlockFile.open uses by default in this process. */
export const ioEngine: IoEngine = addon.ioEngine;
/** Engines that work in this process (io_uring is missing when the kernel refuses it). */
export const availableIoEngines: readonly IoEngine[] =
  addon.ioUringErrno === 0 ? ['io_uring', 'threadpool'] : ['threadpool'];

// ---------------------------------------------------------------------------------------------
// Busy polling (native/busy_poll.h): at queue depth 1 the JS thread spins briefly instead of
// sleeping, for the completion of a lone op and for the next event; budgets adapt, so an idle
// process or a slow disk costs no CPU. Off until set; only the io_uring engine polls.

/** Sets this thread's busy-poll maximum in microseconds (0 turns it off). Returns false when no
 *  io_uring engine runs in this thread yet (BLOCKMIRROR_IO_ENGINE=threadpool, or io_uring
 *  refused): then nothing polls, unless a file opened later with ioEngine 'io_uring' creates
 *  the engine, which takes the setting. */
export function setBusyPoll(maxMicros: number): boolean {
  if (!Number.isInteger(maxMicros) || maxMicros < 0 || maxMicros > BUSY_POLL_MICROS_MAX) {
    const error = new RangeError(`maxMicros must be an integer 0..${BUSY_POLL_MICROS_MAX}, got ${String(maxMicros)}`) as RangeError & { code: string };
    error.code = 'ERR_OUT_OF_RANGE';
    throw error;
  }
  return addon.setBusyPoll(maxMicros * 1000);
}

export function busyPollStats(): BusyPollStats {
  const { maxNs, ...counts } = addon.busyPollStats();
  return { maxMicros: maxNs / 1000, ...counts };
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

const EBADF = os.constants.errno.EBADF;
const DEFAULT_ALIGN_BYTES = 4096;

function invalidArgument(message: string): TypeError {
  const error = new TypeError(message) as TypeError & { code: string };
  error.code = 'ERR_INVALID_ARG_TYPE';
  return error;
}

function isSafeUnsigned(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}

function requireSafeUnsigned(value: unknown, name: string): number {
  if (!isSafeUnsigned(value)) {
    const error = new RangeError(`${name} must be a non-negative safe integer, got ${String(value)}`) as RangeError & {
      code: string;
    };
    error.code = 'ERR_OUT_OF_RANGE';
    throw error;
  }
  return value;
}

function requireBoolean(value: unknown, name: string): boolean {
  if (typeof value !== 'boolean') throw invalidArgument(`${name} must be a boolean (explicit at every call site)`);
  return value;
}

function validationError(code: string, message: string, fields: Partial<NativeError> = {}): NativeError {
  return new NativeError(message, { code, errno: 0, syscall: '', ...fields });
}

// ---------------------------------------------------------------------------------------------
// allocAligned

/** Zeroed memory from posix_memalign, as a Buffer over an external ArrayBuffer freed by its
 *  finalizer. Required for O_DIRECT: Node's own Buffers are not sector-aligned. */
export function allocAligned(sizeBytes: number, alignBytes: number = DEFAULT_ALIGN_BYTES): Buffer {
  requireSafeUnsigned(sizeBytes, 'sizeBytes');
  requireSafeUnsigned(alignBytes, 'alignBytes');
  if (alignBytes < 8 || (alignBytes & (alignBytes - 1)) !== 0) {
    throw new RangeError(`alignBytes must be a power of two >= 8, got ${alignBytes}`);
  }
  const buffer: Buffer = addon.allocAligned(sizeBytes, alignBytes);
  alignedBlocks.set(buffer.buffer, alignBytes);
  return buffer;
}

// The alignment of every block allocAligned made, by its ArrayBuffer (weak: blocks still die).
const alignedBlocks = new WeakMap<ArrayBufferLike, number>();

/** Whether O_DIRECT can take `buffer` as it is: memory from allocAligned (or a BufferPool),
 *  starting at a multiple of alignBytes. Lets callers skip a copy into an aligned buffer. */
export function isAlignedBuffer(buffer: Buffer, alignBytes: number): boolean {
  const blockAlignBytes = alignedBlocks.get(buffer.buffer);
  return blockAlignBytes !== undefined && blockAlignBytes >= alignBytes && buffer.byteOffset % alignBytes === 0;
}

// ---------------------------------------------------------------------------------------------
// BlockFile

const kHandle = Symbol('blockmirror.native.fileHandle');

/** A block device or regular file opened with O_DIRECT, with asynchronous I/O returning Promises. */
export class BlockFile {
  readonly info: BlockFileInfo;
  readonly engine: IoEngine;
  private readonly [kHandle]: NativeFileHandle;
  #closed = false;

  private constructor(handle: NativeFileHandle) {
    const raw = handle.info();
    this[kHandle] = handle;
    this.engine = raw.engine;
    this.info = Object.freeze({
      path: raw.path,
      sizeBytes: raw.sizeBytes,
      logicalSectorBytes: raw.logicalSectorBytes,
      physicalSectorBytes: raw.physicalSectorBytes,
      isBlockDevice: raw.isBlockDevice,
      readOnly: raw.readOnly,
    });
  }

  /** Synchronous open: O_DIRECT|O_CLOEXEC always (an O_DIRECT refusal fails with its errno),
   *  O_RDONLY or O_RDWR, O_EXCL on block devices when options.exclusive. */
  static open(filePath: string, options: OpenOptions): BlockFile {
    if (typeof filePath !== 'string' || filePath.length === 0) throw invalidArgument('path must be a non-empty string');
    if (options === null || typeof options !== 'object') throw invalidArgument('options are required');
    const readOnly = requireBoolean(options.readOnly, 'options.readOnly');
    const exclusive = requireBoolean(options.exclusive, 'options.exclusive');
    const engine = options.ioEngine ?? '';
    if (engine !== '' && engine !== 'io_uring' && engine !== 'threadpool') {
      throw new RangeError(`options.ioEngine must be 'io_uring' or 'threadpool', got ${String(engine)}`);
    }
    return new BlockFile(addon.open(filePath, readOnly, exclusive, engine));
  }

  /** Fills buffer (buffer.length bytes) from offsetBytes. A short read rejects (BM_ERR_SHORT_IO). */
  read(buffer: Buffer, offsetBytes: number): Promise<void> {
    try {
      this.#checkData(buffer, offsetBytes, 'pread', false);
      return this[kHandle].read(buffer, offsetBytes);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Writes the whole buffer at offsetBytes; fua makes this one write durable (RWF_DSYNC). */
  write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void> {
    try {
      this.#checkData(buffer, offsetBytes, 'pwrite', true);
      if (typeof fua !== 'boolean') throw invalidArgument('fua must be a boolean');
      return this[kHandle].write(buffer, offsetBytes, fua);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** fdatasync: every write completed before this call is durable once it resolves. */
  flush(): Promise<void> {
    try {
      this.#checkOpen('fdatasync');
      return this[kHandle].flush();
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** BLKDISCARD on devices, fallocate(PUNCH_HOLE|KEEP_SIZE) on files. Sector-aligned range. */
  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    try {
      this.#checkRange(offsetBytes, lengthBytes, 'discard', true, true);
      return this[kHandle].discard(offsetBytes, lengthBytes);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** BLKZEROOUT on devices; on files fallocate(ZERO_RANGE), or PUNCH_HOLE when mayDeallocate
   *  (real zeroes are written where the file system has neither). Sector-aligned range. */
  writeZeroes(offsetBytes: number, lengthBytes: number, mayDeallocate: boolean): Promise<void> {
    try {
      this.#checkRange(offsetBytes, lengthBytes, 'writeZeroes', true, true);
      if (typeof mayDeallocate !== 'boolean') throw invalidArgument('mayDeallocate must be a boolean');
      return this[kHandle].writeZeroes(offsetBytes, lengthBytes, mayDeallocate);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Data and hole extents covering exactly [offsetBytes, offsetBytes+lengthBytes): SEEK_DATA/
   *  SEEK_HOLE on files; one data extent on block devices. */
  allocationMap(offsetBytes: number, lengthBytes: number): Promise<AllocationExtent[]> {
    try {
      this.#checkRange(offsetBytes, lengthBytes, 'lseek', false, false);
      return this[kHandle].allocationMap(offsetBytes, lengthBytes);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Waits for every op in flight on this file, then close(2). Later calls reject with EBADF. */
  close(): Promise<void> {
    try {
      this.#checkOpen('close');
      this.#closed = true;
      return this[kHandle].close();
    } catch (error) {
      return Promise.reject(error);
    }
  }

  #checkOpen(syscall: string): void {
    if (this.#closed) {
      throw new NativeError(`${syscall} ${this.info.path}: Bad file descriptor (closed)`, {
        code: 'EBADF',
        errno: EBADF,
        syscall,
        path: this.info.path,
      });
    }
  }

  #checkData(buffer: Buffer, offsetBytes: number, syscall: string, write: boolean): void {
    if (!Buffer.isBuffer(buffer)) throw invalidArgument('buffer must be a Buffer (from allocAligned or BufferPool)');
    this.#checkRange(offsetBytes, buffer.length, syscall, write, true);
  }

  #checkRange(offsetBytes: number, lengthBytes: number, syscall: string, write: boolean, aligned: boolean): void {
    this.#checkOpen(syscall);
    const info = this.info;
    if (write && info.readOnly) {
      throw validationError('BM_ERR_READ_ONLY', `${info.path} is open read-only`, { path: info.path });
    }
    requireSafeUnsigned(offsetBytes, 'offsetBytes');
    requireSafeUnsigned(lengthBytes, 'lengthBytes');
    const sector = info.logicalSectorBytes;
    if (aligned && (offsetBytes % sector !== 0 || lengthBytes % sector !== 0)) {
      throw validationError(
        'BM_ERR_UNALIGNED',
        `offset ${offsetBytes} and length ${lengthBytes} must be multiples of ${sector} bytes`,
        { path: info.path, offsetBytes, lengthBytes },
      );
    }
    if (offsetBytes + lengthBytes > info.sizeBytes) {
      throw validationError(
        'BM_ERR_OUT_OF_RANGE',
        `range @${offsetBytes}+${lengthBytes} is outside ${info.path} (${info.sizeBytes} bytes)`,
        { path: info.path, offsetBytes, lengthBytes },
      );
    }
  }
}

// ---------------------------------------------------------------------------------------------
// DirtyBitmap

const kBitmap = Symbol('blockmirror.native.dirtyBitmap');
const DEFAULT_REGION_BYTES = 65536;

/** FastResync bitmap: one bit per power-of-two region (default 64 KiB: 2 MiB per TiB). */
export class DirtyBitmap {
  readonly sizeBytes: number;
  readonly regionBytes: number;
  readonly regionCount: number;
  private readonly [kBitmap]: NativeDirtyBitmap;

  constructor(sizeBytes: number, regionBytes: number = DEFAULT_REGION_BYTES) {
    const geometryOk = isSafeUnsigned(sizeBytes) && sizeBytes > 0 && isSafeUnsigned(regionBytes) &&
      regionBytes >= 512 && (regionBytes & (regionBytes - 1)) === 0;
    if (!geometryOk) {
      throw validationError(
        'BM_ERR_BITMAP_GEOMETRY',
        `sizeBytes must be a positive integer and regionBytes a power of two >= 512 (got ${sizeBytes}, ${regionBytes})`,
      );
    }
    this[kBitmap] = new addon.DirtyBitmap(sizeBytes, regionBytes);
    this.sizeBytes = sizeBytes;
    this.regionBytes = regionBytes;
    this.regionCount = Math.ceil(sizeBytes / regionBytes);
  }

  /** Marks every region the range touches; returns how many were newly set. */
  setRange(offsetBytes: number, lengthBytes: number): number {
    checkBitmapRange(this, offsetBytes, lengthBytes);
    return this[kBitmap].setRange(offsetBytes, lengthBytes);
  }

  /** Clears only regions fully inside the range (the short last region counts when the range reaches sizeBytes). */
  clearRange(offsetBytes: number, lengthBytes: number): void {
    checkBitmapRange(this, offsetBytes, lengthBytes);
    this[kBitmap].clearRange(offsetBytes, lengthBytes);
  }

  /** True when any region the range touches is dirty. */
  testRange(offsetBytes: number, lengthBytes: number): boolean {
    checkBitmapRange(this, offsetBytes, lengthBytes);
    return this[kBitmap].testRange(offsetBytes, lengthBytes);
  }

  count(): number {
    return this[kBitmap].count();
  }

  dirtyBytes(): number {
    return this[kBitmap].dirtyBytes();
  }

  /** Native memory held by the bits (for the 2 MiB/TiB budget). */
  memoryBytes(): number {
    return this[kBitmap].memoryBytes();
  }

  /** Coalesced dirty runs in bytes, from the region holding startOffsetBytes, at most maxRuns. */
  runs(startOffsetBytes = 0, maxRuns: number = Number.MAX_SAFE_INTEGER): DirtyRun[] {
    requireSafeUnsigned(startOffsetBytes, 'startOffsetBytes');
    requireSafeUnsigned(maxRuns, 'maxRuns');
    if (startOffsetBytes > this.sizeBytes) {
      throw validationError('BM_ERR_OUT_OF_RANGE', `startOffsetBytes ${startOffsetBytes} is past ${this.sizeBytes}`);
    }
    return this[kBitmap].runs(startOffsetBytes, maxRuns);
  }

  /** OR of other into this one; same sizeBytes and regionBytes required (BM_ERR_BITMAP_GEOMETRY). */
  merge(other: DirtyBitmap): void {
    if (!(other instanceof DirtyBitmap)) throw invalidArgument('other must be a DirtyBitmap');
    if (other.sizeBytes !== this.sizeBytes || other.regionBytes !== this.regionBytes) {
      throw validationError(
        'BM_ERR_BITMAP_GEOMETRY',
        `cannot merge bitmaps of different geometry (${this.sizeBytes}/${this.regionBytes} vs ${other.sizeBytes}/${other.regionBytes})`,
      );
    }
    this[kBitmap].merge(other[kBitmap]);
  }

  /** Returns a copy of the current bits and clears this bitmap in the same step. */
  snapshotAndClear(): DirtyBitmap {
    return DirtyBitmap.#wrap(this[kBitmap].snapshotAndClear(), this.sizeBytes, this.regionBytes);
  }

  /** Header (magic, version, sizeBytes, regionBytes, word count) + little-endian words + crc32c. */
  serialize(): Buffer {
    return this[kBitmap].serialize();
  }

  /** Inverse of serialize; BM_ERR_BITMAP_CORRUPT on bad magic, length, geometry or checksum. */
  static deserialize(buffer: Buffer): DirtyBitmap {
    if (!Buffer.isBuffer(buffer)) throw invalidArgument('buffer must be a Buffer');
    const native = addon.DirtyBitmap.deserialize(buffer);
    return DirtyBitmap.#wrap(native, Number(buffer.readBigUInt64LE(8)), Number(buffer.readBigUInt64LE(16)));
  }

  static #wrap(native: NativeDirtyBitmap, sizeBytes: number, regionBytes: number): DirtyBitmap {
    const bitmap = Object.create(DirtyBitmap.prototype) as DirtyBitmap;
    Object.defineProperties(bitmap, {
      sizeBytes: { value: sizeBytes, enumerable: true },
      regionBytes: { value: regionBytes, enumerable: true },
      regionCount: { value: Math.ceil(sizeBytes / regionBytes), enumerable: true },
      [kBitmap]: { value: native },
    });
    return bitmap;
  }
}

// A plain function, not a #private method: deserialize/snapshot build instances without the
// constructor, and those would lack the private brand.
function checkBitmapRange(bitmap: DirtyBitmap, offsetBytes: number, lengthBytes: number): void {
  requireSafeUnsigned(offsetBytes, 'offsetBytes');
  requireSafeUnsigned(lengthBytes, 'lengthBytes');
  if (offsetBytes + lengthBytes > bitmap.sizeBytes) {
    throw validationError(
      'BM_ERR_OUT_OF_RANGE',
      `range @${offsetBytes}+${lengthBytes} is outside the bitmap (${bitmap.sizeBytes} bytes)`,
      { offsetBytes, lengthBytes },
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Process helpers

/** open(O_CREAT)+flock(LOCK_EX|LOCK_NB). A held lock fails with code 'BM_ERR_LOCKED'. The lock
 *  is released by release() or when the process dies. */
export function lockFileExclusive(filePath: string): { release(): void } {
  if (typeof filePath !== 'string' || filePath.length === 0) throw invalidArgument('path must be a non-empty string');
  let fd: number | undefined = addon.lockFile(filePath);
  return {
    release(): void {
      if (fd === undefined) return;
      const held = fd;
      fd = undefined;
      addon.unlockFile(held);
    },
  };
}

/** Sends state to $NOTIFY_SOCKET (AF_UNIX datagram; a leading '@' is the abstract namespace).
 *  Returns false when NOTIFY_SOCKET is unset; a failed send throws NativeError. */
export function sdNotify(state: string): boolean {
  if (typeof state !== 'string') throw invalidArgument('state must be a string');
  return addon.sdNotify(state);
}

/** A new close-on-exec descriptor for the same open file (fcntl F_DUPFD_CLOEXEC); the caller
 *  owns it. Throws NativeError (EBADF, EMFILE, ...). */
export function dupFd(fd: number): number {
  if (!Number.isSafeInteger(fd) || fd < 0) throw invalidArgument('fd must be a non-negative integer');
  return addon.dupFd(fd);
}

/** CRC-32C (Castagnoli) of `data`, as the bitmap serializer and the write-intent metadata use. */
export function crc32c(data: Uint8Array): number {
  if (!(data instanceof Uint8Array)) throw invalidArgument('data must be a Uint8Array');
  return addon.crc32c(data);
}
