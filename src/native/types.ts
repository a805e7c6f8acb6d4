// The contract of the native addon, as TypeScript sees it. src/native/index.ts is the only
// module that loads build/Release/blockmirror.node; everything else imports from there.

/** Options for BlockFile.open. Every flag is explicit at the call site (no hidden defaults). */
export interface OpenOptions {
  /** Open O_RDONLY instead of O_RDWR. */
  readOnly: boolean;
  /** O_EXCL on block devices (the kernel refuses a second exclusive opener or a mounted fs).
   *  Ignored for regular files. The daemon always passes true for devices. */
  exclusive: boolean;
  /** Engine for this file; defaults to the process engine (`ioEngine`). Lets tests and the
   *  addon benchmark compare both engines in one process. 'io_uring' fails with
   *  BM_ERR_IO_URING_UNAVAILABLE where the kernel refuses it. */
  ioEngine?: IoEngine;
}

/** How reads, writes and flushes reach the kernel. */
export type IoEngine = 'io_uring' | 'threadpool';

/** Upper bound of setBusyPoll and the daemon's --busy-poll-us. */
export const BUSY_POLL_MICROS_MAX = 1000;

export interface BusyPollStats {
  /** The configured maximum (0: off). */
  maxMicros: number;
  /** Spins for the next event before the loop would sleep, and how many caught it. */
  eventPolls: number;
  eventPollHits: number;
  /** Spins for the completion of a lone op, and how many caught it. */
  completionPolls: number;
  completionPollHits: number;
}

/** What the addon learned about an open device or file. */
export interface BlockFileInfo {
  path: string;
  sizeBytes: number;
  /** BLKSSZGET for devices; 512 for files on ext4 (O_DIRECT alignment unit). */
  logicalSectorBytes: number;
  /** BLKPBSZGET for devices; st_blksize for files. */
  physicalSectorBytes: number;
  isBlockDevice: boolean;
  readOnly: boolean;
}

/** One run of the allocation map (NBD base:allocation). */
export interface AllocationExtent {
  offsetBytes: number;
  lengthBytes: number;
  /** true when the range reads as zeroes and has no storage (a hole). */
  hole: boolean;
}

/** A run of dirty regions, in bytes. */
export interface DirtyRun {
  offsetBytes: number;
  lengthBytes: number;
}

/** Error thrown or rejected by every native call. `code` is the errno name ('EIO', 'EINVAL',
 *  ...) or a BM_ERR_* code for validation failures detected before any syscall. */
export interface NativeErrorFields {
  code: string;
  errno: number;
  syscall: string;
  path?: string;
  offsetBytes?: number;
  lengthBytes?: number;
}


/** The error class of every native call: a real Error with a stable `code` that tests and
 *  callers match on (never the message). `errno` is 0 for BM_ERR_* validation failures. */
export class NativeError extends Error implements NativeErrorFields {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  readonly path?: string;
  readonly offsetBytes?: number;
  readonly lengthBytes?: number;

  constructor(message: string, fields: NativeErrorFields) {
    super(message);
    this.name = 'NativeError';
    this.code = fields.code;
    this.errno = fields.errno;
    this.syscall = fields.syscall;
    if (fields.path !== undefined) this.path = fields.path;
    if (fields.offsetBytes !== undefined) this.offsetBytes = fields.offsetBytes;
    if (fields.lengthBytes !== undefined) this.lengthBytes = fields.lengthBytes;
  }
}
