// What a volume hands its mirrors. src/replication/mirror.ts implements it; the volume calls it
// for every client write, zeroing and flush, so no write can bypass replication.
//
// Ordering contract: the volume calls replicateWrite/replicateZeroes while it holds the
// operation's sector span exclusively, after starting the local I/O and before any later
// overlapping write may start. Whatever the replica sends synchronously in that call is
// therefore ordered, against every overlapping write and every readForCopy, the same way as on
// the local device.
import type { BlockBackendInfo, ReadResult } from './backend';

export interface VolumeReplica {
  /** Undefined when a new client write may start now, else a promise that settles when it may
   *  (or rejects with the error the client gets). A strict (on-disconnect block) mirror holds
   *  writes here while it is unprotected, a restoring one while it restores. The volume asks
   *  every replica again after any wait, so returning a promise when not holding (even a
   *  settled one) would make it ask for ever. */
  admit(): Promise<void> | void;
  /** `local` settles when the local write finished. The result settles when the replica is
   *  done with the write: acknowledged by the target, or recorded as dirty for a later resync.
   *  It rejects only when the client must see an error (a strict mirror shutting down).
   *  `restore`: bytes a mirror restores from its target (split brain, --discard this), not a
   *  client's: never held (a strict mirror holding it would stall that restore). */
  replicateWrite(offsetBytes: number, data: Buffer, fua: boolean, local: Promise<void>, restore?: boolean): Promise<void>;
  replicateZeroes(offsetBytes: number, lengthBytes: number, fua: boolean, local: Promise<void>): Promise<void>;
  /** Everything the replica acknowledged before is durable on the target (or the target is
   *  unreachable and the affected regions are recorded dirty). */
  replicateFlush(): Promise<void>;
}

/** The volume's write-intent log (src/write-intent/): the extents a change touches are recorded
 *  on stable storage before its local write starts, and released once every replica is done
 *  with it, so after a crash the daemon knows where the source and its mirrors may differ. */
export interface WriteIntent {
  /** Resolves (or returns at once when the extents are already recorded) when the change may
   *  start; rejects with code BM_ERR_METADATA_IO when the record cannot be written. */
  acquire(offsetBytes: number, lengthBytes: number): Promise<void> | void;
  release(offsetBytes: number, lengthBytes: number): void;
}

/** What a mirror needs of its source volume (src/volume/volume.ts's Volume). */
export interface ReplicaSource {
  readonly spec: { readonly name: string; readonly uuid: string };
  info(): BlockBackendInfo;
  attachReplica(replica: VolumeReplica): void;
  detachReplica(replica: VolumeReplica): void;
  /** Every replicated change takes its extents from `intent` first (undefined: none). */
  setWriteIntent(intent: WriteIntent | undefined): void;
  readForCopy(offsetBytes: number, buffer: Buffer, onRead: () => void): Promise<void>;
  /** Writes bytes restored from a target (split brain resolved with --discard this). */
  restoreWrite(offsetBytes: number, data: Buffer): Promise<void>;
  /** Makes every completed write durable on the local device (not the mirrors). */
  flushLocal(): Promise<void>;
  /** Resolves once every client change that passed admit() has finished. */
  drainAdmitted(): Promise<void>;
}

/** What the mirror service needs of a target (mirror) volume. */
export interface ReplicaTarget {
  info(): BlockBackendInfo;
  /** Reads for a source restoring from this volume (ResyncRequest). */
  read(offsetBytes: number, lengthBytes: number): Promise<ReadResult>;
  mirrorWrite(offsetBytes: number, data: Buffer, fua: boolean): Promise<void>;
  mirrorWriteZeroes(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
}
