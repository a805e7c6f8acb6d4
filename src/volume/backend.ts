// The block backend the NBD server talks to. The server validates every request against the
// NBD spec (bounds, flags, read-only) before calling in; a backend only asserts.
// src/volume/volume.ts implements it over a native BlockFile (alignment, read-modify-write,
// ordering of overlapping requests); tests may implement it in memory.

export interface BlockBackendInfo {
  sizeBytes: number;
  /** Smallest unit the backend handles without read-modify-write (advertised as preferred). */
  logicalSectorBytes: number;
  physicalSectorBytes: number;
  readOnly: boolean;
  /** Whether trim really deallocates (advertise SEND_TRIM either way; trim is advisory). */
  canTrim: boolean;
}

export interface WriteZeroesOptions {
  fua: boolean;
  /** NBD_CMD_FLAG_NO_HOLE: storage must stay allocated. */
  noHole: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP-ish BM_ERR_NOT_FAST rather than write slowly. */
  fastZero: boolean;
}

export interface AllocationRun {
  lengthBytes: number;
  /** NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2) bits for base:allocation. */
  flags: number;
}

/** A read result. `data` is valid until `release()` is called; the caller must call it exactly
 *  once, after the bytes have been written to the socket. This lets reads land in pooled,
 *  aligned buffers and go to the socket without a copy. */
export interface ReadResult {
  data: Buffer;
  release(): void;
}

export interface BlockBackend {
  info(): BlockBackendInfo;
  read(offsetBytes: number, lengthBytes: number): Promise<ReadResult>;
  /** `data` may be unaligned in memory and in offset. The backend may read it until the promise
   *  settles (an aligned pooled buffer goes to the device without a copy), so the caller must
   *  not reuse or release it before then. */
  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void>;
  /** Durable: every write acknowledged before flush() was called is on stable storage. */
  flush(): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void>;
  /** Advisory prefetch. */
  cache(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Allocation runs covering at least the first byte of [offset, offset+length). */
  blockStatus(offsetBytes: number, lengthBytes: number): Promise<AllocationRun[]>;
}

/** Errors a backend raises carry an errno name in `code` ('EIO', 'ENOSPC', ...); the NBD server
 *  maps them to NBD error values and anything unknown to EIO. */
