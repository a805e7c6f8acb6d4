// A volume: one block device (or file) opened O_DIRECT, served to NBD clients as a BlockBackend.
//
// The device only takes sector-aligned I/O from aligned memory. NBD clients may send any byte
// range, so this layer copies payloads into pooled aligned buffers and turns unaligned edges into
// read-modify-write cycles, ordered against overlapping writes by a RangeLock. Later layers
// (replication, dirty bitmaps) hook in here, because every write of every client passes through.
import assert from 'node:assert';
import type { Logger } from 'pino';
import { statfsSync, statSync, readFileSync } from 'node:fs';
import { BlockFile, BufferPool, isAlignedBuffer } from '../native/index';
import type { BlockFileInfo } from '../native/types';
import type {
  AllocationRun,
  BlockBackend,
  BlockBackendInfo,
  ReadResult,
  WriteZeroesOptions,
} from './backend';
import { RangeLock, RangeLockHandle } from './range-lock';
import type { VolumeReplica, WriteIntent } from './replica';
import { OperationCount } from './operation-count';

export interface VolumeSpec {
  name: string;
  uuid: string;
  devicePath: string;
  /** Open the device O_RDONLY; every write is refused. */
  readOnly: boolean;
  /** 'mirror': the target of replication. The device is opened read-write (and exclusively) for
   *  the mirror service, which writes through mirrorWrite(); NBD clients see a read-only export.
   *  Default 'primary'. */
  role?: 'primary' | 'mirror';
}

export interface VolumeStats {
  readOps: number;
  writeOps: number;
  readBytes: number;
  writeBytes: number;
  flushOps: number;
  readModifyWriteOps: number;
  inFlightOps: number;
}

/** Idle aligned buffers kept per volume; above this, released buffers go back to the allocator. */
const pooledBytesMax = 64 * 1024 * 1024;
/** Zero-fill chunk used when the device cannot zero a range itself. */
const zeroChunkBytes = 1024 * 1024;
/** The largest single change handed to mirrors (longer zeroing goes in pieces): bounds how many
 *  write-intent extents one change holds. NBD writes are smaller (the payload limit). */
export const REPLICATED_CHANGE_BYTES_MAX = 64 * 1024 * 1024;

const NBD_STATE_HOLE = 1;
const NBD_STATE_ZERO = 2;

export class VolumeError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
    this.name = 'VolumeError';
  }
}

export class Volume implements BlockBackend {
  readonly spec: VolumeSpec;
  private readonly file: BlockFile;
  private readonly deviceInfo: BlockFileInfo;
  private readonly backendInfo: BlockBackendInfo;
  private readonly sectorBytes: number;
  private readonly pool: BufferPool;
  private readonly rangeLock = new RangeLock();
  private readonly logger: Logger;
  private readonly counters: Omit<VolumeStats, 'inFlightOps'> = {
    readOps: 0,
    writeOps: 0,
    readBytes: 0,
    writeBytes: 0,
    flushOps: 0,
    readModifyWriteOps: 0,
  };
  /** Operations on the device in progress (drain). */
  private readonly inFlight = new OperationCount();
  /** Client changes past admitReplicas and not yet done (drainAdmitted). */
  private readonly admittedChanges = new OperationCount();
  private closing: Promise<void> | undefined;
  /** Set when a write or flush failed on the device: what was acknowledged before may not be
   *  durable, and a later flush cannot make it so (the kernel forgets a failed writeback). The
   *  volume then refuses writes and flushes until an operator removes and re-adds it. */
  private failedError: VolumeError | undefined;
  /** Whether the device zeroes a range without writing the zeroes (NBD FAST_ZERO). */
  private readonly zeroIsFast: { mayDeallocate: boolean; noHole: boolean };
  /** NBD clients may not write: a read-only volume, or a mirror target not promoted. */
  private clientReadOnly: boolean;
  /** A mirror volume made writable by hand (setPromoted): the mirror service may not write it. */
  private promoted = false;
  /** A mirror volume written while promoted and not yet resolved by its source (setDiverged):
   *  the mirror service may not write it either, promoted or not. */
  private diverged = false;
  /** Mirrors of this volume: every client write, zeroing and flush is also handed to them. */
  private replicas: readonly VolumeReplica[] = [];
  /** The mirrors' write-intent log: replicated changes record their extents in it first. */
  private writeIntent: WriteIntent | undefined;

  private constructor(spec: VolumeSpec, file: BlockFile, logger: Logger) {
    this.spec = spec;
    this.file = file;
    this.deviceInfo = file.info;
    this.sectorBytes = file.info.logicalSectorBytes;
    assert(!(spec.readOnly && spec.role === 'mirror'), 'a mirror volume must be opened read-write');
    this.clientReadOnly = spec.readOnly || spec.role === 'mirror';
    assert(this.sectorBytes >= 512 && (this.sectorBytes & (this.sectorBytes - 1)) === 0);
    this.backendInfo = {
      sizeBytes: file.info.sizeBytes,
      logicalSectorBytes: file.info.logicalSectorBytes,
      physicalSectorBytes: file.info.physicalSectorBytes,
      // NBD advertises NBD_FLAG_READ_ONLY from this, and refuses client writes with EPERM.
      readOnly: this.clientReadOnly,
      canTrim: true,
    };
    this.zeroIsFast = probeFastZero(file.info);
    this.pool = new BufferPool({ maxPooledBytes: pooledBytesMax, alignBytes: Math.max(4096, this.sectorBytes) });
    this.logger = logger.child({ volume: spec.name });
  }

  /** Opens the device O_DIRECT, exclusively (block devices), read-only when the spec says so. */
  static open(spec: VolumeSpec, logger: Logger): Volume {
    const file = BlockFile.open(spec.devicePath, { readOnly: spec.readOnly, exclusive: true });
    if (file.info.sizeBytes % file.info.logicalSectorBytes !== 0 || file.info.sizeBytes === 0) {
      void file.close();
      throw new VolumeError(
        'BM_ERR_DEVICE_SIZE',
        `${spec.devicePath}: size ${file.info.sizeBytes} is not a positive multiple of the ${file.info.logicalSectorBytes}-byte sector`,
      );
    }
    const volume = new Volume(spec, file, logger);
    volume.logger.info(
      { device: spec.devicePath, sizeBytes: file.info.sizeBytes, sectorBytes: file.info.logicalSectorBytes, engine: file.engine },
      'volume opened',
    );
    return volume;
  }

  info(): BlockBackendInfo {
    return this.backendInfo;
  }

  get device(): BlockFileInfo {
    return this.deviceInfo;
  }

  stats(): VolumeStats {
    return { ...this.counters, inFlightOps: this.inFlight.value };
  }

  /** The device error that put this volume in the failed state, if any. */
  failure(): { code: string; message: string } | undefined {
    return this.failedError === undefined ? undefined : { code: this.failedError.code, message: this.failedError.message };
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<ReadResult> {
    this.checkRange(offsetBytes, lengthBytes);
    const startBytes = this.alignDown(offsetBytes);
    const endBytes = this.alignUp(offsetBytes + lengthBytes);
    const buffer = this.pool.acquire(endBytes - startBytes);
    this.begin();
    try {
      await this.file.read(buffer, startBytes);
    } catch (error) {
      this.pool.release(buffer);
      throw error;
    } finally {
      this.end();
    }
    this.counters.readOps++;
    this.counters.readBytes += lengthBytes;
    const headBytes = offsetBytes - startBytes;
    const data = headBytes === 0 && lengthBytes === buffer.length ? buffer : buffer.subarray(headBytes, headBytes + lengthBytes);
    let released = false;
    return {
      data,
      release: () => {
        assert(!released, 'ReadResult released twice');
        released = true;
        this.pool.release(buffer);
      },
    };
  }

  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    try {
      this.checkWritable();
      this.checkRange(offsetBytes, data.length);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.writeChecked(offsetBytes, data, fua);
  }

  /** The mirror service's write path into a mirror volume, which NBD clients cannot write. Not
   *  part of BlockBackend, so the NBD server has no way to reach it. Same ordering, alignment
   *  and failure handling as a client write. */
  mirrorWrite(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    try {
      this.checkMirrorService();
      this.checkPeerRange(offsetBytes, data.length);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.writeChecked(offsetBytes, data, fua);
  }

  /** Starts handing client writes to `replica` (see VolumeReplica for the ordering contract). */
  attachReplica(replica: VolumeReplica): void {
    assert(!this.replicas.includes(replica), 'replica attached twice');
    this.replicas = [...this.replicas, replica];
  }

  detachReplica(replica: VolumeReplica): void {
    this.replicas = this.replicas.filter((attached) => attached !== replica);
  }

  setWriteIntent(intent: WriteIntent | undefined): void {
    this.writeIntent = intent;
  }

  /** A mirror restoring this volume from its target (a split brain resolved with --discard
   *  this): written like a client write (every mirror is handed it, the write-intent log records
   *  it first), except that it does not wait in admit(), where the restoring mirror holds the
   *  clients' writes until the restore is done. */
  restoreWrite(offsetBytes: number, data: Buffer): Promise<void> {
    try {
      if (this.spec.role === 'mirror') throw new VolumeError('EPERM', `volume ${this.spec.name} is a mirror volume, not a source`);
      this.checkDeviceWritable();
      this.checkPeerRange(offsetBytes, data.length);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.writeReplicated(offsetBytes, data, false, true);
  }

  /** Promotes a mirror volume (writable to NBD clients, closed to the mirror service) or demotes
   *  it back. Clients connected before keep the read-only flag they negotiated; the caller
   *  disconnects writable ones before a demote. Record the divergence (setWriteIntent) first. */
  setPromoted(promoted: boolean): void {
    assert(this.spec.role === 'mirror' && !this.spec.readOnly, 'only mirror volumes are promoted');
    this.promoted = promoted;
    this.clientReadOnly = !promoted;
    this.backendInfo.readOnly = !promoted;
  }

  /** Marks a mirror volume diverged from its source (written while promoted) or resolved again.
   *  Set before promoting, so no source session can write it from then on. */
  setDiverged(diverged: boolean): void {
    assert(this.spec.role === 'mirror', 'only mirror volumes diverge');
    this.diverged = diverged;
  }

  /** Whether client changes go through the replicated path: mirrors attached, or a write-intent
   *  record (a promoted volume's divergence) to take first. */
  private get tracked(): boolean {
    return this.replicas.length > 0 || this.writeIntent !== undefined;
  }

  /**
   * Reads [offset, offset + buffer.length) for a mirror's copy while no client write to that
   * range is in progress, and calls `onRead` before any new one may start: whatever `onRead`
   * sends is ordered before every later write's forwarded copy. Sector-aligned ranges only.
   */
  async readForCopy(offsetBytes: number, buffer: Buffer, onRead: () => void): Promise<void> {
    assert(this.isAligned(offsetBytes, buffer.length) && buffer.length > 0, 'copy reads are sector-aligned');
    this.checkRange(offsetBytes, buffer.length);
    this.begin();
    try {
      const lock = await this.rangeLock.acquire(offsetBytes, offsetBytes + buffer.length, true);
      try {
        await this.file.read(buffer, offsetBytes);
        onRead();
      } finally {
        this.rangeLock.release(lock);
      }
    } finally {
      this.end();
    }
  }

  private writeChecked(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.tracked) return this.writeReplicated(offsetBytes, data, fua);
    this.begin();
    this.counters.writeOps++;
    this.counters.writeBytes += data.length;
    if (this.isAligned(offsetBytes, data.length)) return this.writeAligned(offsetBytes, data, fua);
    return this.readModifyWrite(offsetBytes, data.length, fua, (span, headBytes) => data.copy(span, headBytes))
      .catch(this.failOnDeviceError)
      .finally(this.endOp);
  }

  /**
   * A client write while mirrors are attached. The sector span is held exclusively from before
   * the local write until it completed, and the replicas are handed the write inside that
   * window: overlapping writes reach the local device and every mirror in the same order, and
   * a mirror's copy read (readForCopy) falls wholly before or after each write.
   */
  private writeReplicated(offsetBytes: number, data: Buffer, fua: boolean, restore = false): Promise<void> {
    // The common case, one piece: no loop, and no promise hop when no replica holds writes.
    if (data.length <= REPLICATED_CHANGE_BYTES_MAX) {
      const piece = (): Promise<void> => this.writeReplicatedPiece(offsetBytes, data, fua, restore);
      return restore ? piece() : this.admitted(piece);
    }
    const pieces = async (): Promise<void> => {
      // A very long write (the NBD payload limit allows up to 1 GiB) goes in pieces, like zeroing.
      for (let done = 0; done < data.length; ) {
        const end = data.length - done <= REPLICATED_CHANGE_BYTES_MAX ? data.length : this.alignDown(offsetBytes + done + REPLICATED_CHANGE_BYTES_MAX) - offsetBytes;
        await this.writeReplicatedPiece(offsetBytes + done, data.subarray(done, end), fua, restore);
        done = end;
      }
    };
    // A restore does not wait in admit(): the restoring mirror holds the clients' writes there.
    return restore ? pieces() : this.admitted(pieces);
  }

  private writeReplicatedPiece(offsetBytes: number, data: Buffer, fua: boolean, restore: boolean): Promise<void> {
    const aligned = this.isAligned(offsetBytes, data.length);
    return this.changeReplicated(
      offsetBytes,
      data.length,
      () => {
        this.counters.writeOps++;
        this.counters.writeBytes += data.length;
        if (aligned) return this.deviceWrite(offsetBytes, data, fua);
        return this.readModifyWriteUnlocked(offsetBytes, data.length, fua, (span, headBytes) => data.copy(span, headBytes));
      },
      (replica, local) => replica.replicateWrite(offsetBytes, data, fua, local, restore),
    );
  }

  /** Zeroing (and trim, which becomes zeroing) while mirrors are attached; ordered like writes.
   *  A long range goes in pieces, so one change never spans more than the write-intent log
   *  holds (NBD makes no promise about how a zeroing overlaps concurrent writes). */
  private writeZeroesReplicated(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void> {
    const endBytes = offsetBytes + lengthBytes;
    return this.admitted(async () => {
      for (let pieceBytes = offsetBytes; pieceBytes < endBytes; ) {
        const pieceEnd = endBytes - pieceBytes <= REPLICATED_CHANGE_BYTES_MAX ? endBytes : this.alignDown(pieceBytes + REPLICATED_CHANGE_BYTES_MAX);
        const start = pieceBytes;
        await this.changeReplicated(
          start,
          pieceEnd - start,
          () => this.zeroUnlocked(start, pieceEnd - start, options),
          (replica, local) => replica.replicateZeroes(start, pieceEnd - start, options.fua, local),
        );
        pieceBytes = pieceEnd;
      }
    });
  }

  /** Runs one client operation (all its pieces) once every replica admitted it, counted until
   *  it is done (drainAdmitted). */
  private admitted(run: () => Promise<void>): Promise<void> {
    // Counted in the same step as the last admit() pass (admitReplicas).
    const waiting = this.admitReplicas();
    return waiting === undefined ? this.runAdmitted(run) : waiting.then(() => this.runAdmitted(run));
  }

  private runAdmitted(run: () => Promise<void>): Promise<void> {
    let running: Promise<void>;
    try {
      running = run();
    } catch (error) {
      this.admittedChanges.done();
      return Promise.reject(error);
    }
    return running.finally(this.admittedDone);
  }

  private readonly admittedDone = (): void => this.admittedChanges.done();

  /** Runs one change of [offset, offset + length) locally and hands it to every replica, under
   *  the exclusive lock of its sector span (the ordering contract of replica.ts). */
  private changeReplicated(
    offsetBytes: number,
    lengthBytes: number,
    change: () => Promise<void>,
    hand: (replica: VolumeReplica, local: Promise<void>) => Promise<void>,
  ): Promise<void> {
    try {
      this.checkDeviceWritable();
    } catch (error) {
      return Promise.reject(error);
    }
    const intent = this.writeIntent;
    if (intent === undefined) return this.changeReplicatedRecorded(offsetBytes, lengthBytes, change, hand);
    // Released only after an acquire that succeeded: the extents' counts are shared.
    const recordedChange = (): Promise<void> =>
      this.changeReplicatedRecorded(offsetBytes, lengthBytes, change, hand).finally(() => intent.release(offsetBytes, lengthBytes));
    const recorded = intent.acquire(offsetBytes, lengthBytes);
    return recorded === undefined ? recordedChange() : recorded.then(recordedChange);
  }

  /** Resolves once no client change that passed admission is still running. A mirror that
   *  starts holding new changes at admit() (a restore) waits here for those let in before. */
  drainAdmitted(): Promise<void> {
    return this.admittedChanges.idle();
  }

  private changeReplicatedRecorded(
    offsetBytes: number,
    lengthBytes: number,
    change: () => Promise<void>,
    hand: (replica: VolumeReplica, local: Promise<void>) => Promise<void>,
  ): Promise<void> {
    this.begin();
    // An uncontended lock is granted at once: then no promise hop before the change starts.
    let lock: RangeLockHandle | Promise<RangeLockHandle>;
    try {
      lock = this.rangeLock.acquire(this.alignDown(offsetBytes), this.alignUp(offsetBytes + lengthBytes), true);
    } catch (error) {
      this.end();
      return Promise.reject(error);
    }
    const locked =
      lock instanceof Promise
        ? lock.then((handle) => this.changeLocked(handle, change, hand))
        : this.changeLocked(lock, change, hand);
    return locked.finally(this.endOp);
  }

  private async changeLocked(
    lock: RangeLockHandle,
    change: () => Promise<void>,
    hand: (replica: VolumeReplica, local: Promise<void>) => Promise<void>,
  ): Promise<void> {
    let local: Promise<void>;
    let replicated: Promise<void>;
    try {
      local = change();
      replicated = this.replicate((replica) => hand(replica, local));
    } catch (error) {
      this.rangeLock.release(lock);
      throw error;
    }
    let localError: { error: unknown } | undefined;
    try {
      await local;
    } catch (error) {
      localError = { error };
    } finally {
      this.rangeLock.release(lock);
    }
    // The replicas may still be sending the caller's data, which it reuses once this settles:
    // wait for them even when the local change failed.
    let replicaError: { error: unknown } | undefined;
    try {
      await replicated;
    } catch (error) {
      replicaError = { error };
    }
    if (localError !== undefined) this.failOnDeviceError(localError.error);
    if (replicaError !== undefined) throw replicaError.error;
  }

  /** Hands one operation to every replica. The result settles only when every replica is done
   *  (one strict mirror's refusal must not return while another still sends the payload), and
   *  then rejects with the first refusal, if any. Handled from the start: the caller awaits it
   *  only after the local I/O. */
  private replicate(hand: (replica: VolumeReplica) => Promise<void>): Promise<void> {
    const replicas = this.replicas;
    // A replica that throws instead of rejecting fails like one that rejects: every other
    // replica is still handed the change and waited for, and the caller's lock stays held.
    const handOne = (replica: VolumeReplica): Promise<void> => {
      try {
        return hand(replica);
      } catch (error) {
        return Promise.reject(error);
      }
    };
    const result =
      replicas.length === 1
        ? handOne(replicas[0] as VolumeReplica)
        : Promise.allSettled(replicas.map(handOne)).then((outcomes) => {
            const refused = outcomes.find((outcome) => outcome.status === 'rejected');
            if (refused !== undefined) throw (refused as PromiseRejectedResult).reason;
          });
    result.catch(ignore);
    return result;
  }

  /** A replica in strict mode may hold new writes while its mirror is unprotected, and a
   *  restoring one holds them all. Once it returns undefined, or its promise resolves, the
   *  operation is counted as admitted. */
  private admitReplicas(): Promise<void> | undefined {
    for (const replica of this.replicas) {
      const admitted = replica.admit();
      if (admitted !== undefined) return admitted.then(() => this.admitReplicasAfterWait());
    }
    this.admittedChanges.add();
    return undefined;
  }

  private async admitReplicasAfterWait(): Promise<void> {
    // Again after any wait: while one replica held the change another may have begun holding
    // (a restore), and its admit() must be asked after that.
    for (;;) {
      let waited = false;
      for (const replica of this.replicas) {
        const admitted = replica.admit();
        if (admitted !== undefined) {
          waited = true;
          await admitted;
        }
      }
      if (!waited) {
        // Counted before anything else runs: a restore that begins holding from here on
        // (drainAdmitted) must see this change.
        this.admittedChanges.add();
        return;
      }
    }
  }

  async flush(): Promise<void> {
    this.checkNotFailed();
    this.begin();
    try {
      const replicated = this.replicas.length === 0 ? undefined : this.replicate((replica) => replica.replicateFlush());
      const local = this.file.flush();
      await settled(local);
      if (replicated !== undefined) await settled(replicated);
      await local.catch(this.failOnDeviceError);
      await replicated;
    } finally {
      this.end();
    }
    this.counters.flushOps++;
  }

  /** The local device only (a restore from a mirror's target is durable before the target
   *  forgets its divergence); the mirrors get the client's next flush as usual. */
  async flushLocal(): Promise<void> {
    this.checkNotFailed();
    this.begin();
    try {
      await this.file.flush().catch(this.failOnDeviceError);
    } finally {
      this.end();
    }
  }

  /** Advisory: only whole sectors inside the range are discarded; the edges keep their data. */
  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, lengthBytes);
    // A discarded range may read back as anything, so a mirror could not be kept equal by
    // forwarding the discard. Mirrored volumes zero the whole sectors instead (deallocating
    // where the device can): the same bytes on both sides, and still no data written.
    if (this.tracked) {
      const startBytes = this.alignUp(offsetBytes);
      const endBytes = this.alignDown(offsetBytes + lengthBytes);
      if (startBytes >= endBytes) return;
      return this.writeZeroesReplicated(startBytes, endBytes - startBytes, { fua, noHole: false, fastZero: false });
    }
    const startBytes = this.alignUp(offsetBytes);
    const endBytes = this.alignDown(offsetBytes + lengthBytes);
    if (startBytes >= endBytes) return;
    this.begin();
    try {
      const lock = await this.rangeLock.acquire(startBytes, endBytes, false);
      try {
        await this.file.discard(startBytes, endBytes - startBytes);
      } catch (error) {
        // TRIM is advisory: a device without discard support simply keeps the data.
        if (!isUnsupported(error)) throw error;
      } finally {
        this.rangeLock.release(lock);
      }
      if (fua) await this.file.flush().catch(this.failOnDeviceError);
    } finally {
      this.end();
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, lengthBytes);
    this.checkFastZero(options);
    if (this.tracked) return this.writeZeroesReplicated(offsetBytes, lengthBytes, options);
    // Whole sectors only: shared, like writes. Unaligned edges are read-modify-write: exclusive.
    return this.zeroLocked(offsetBytes, lengthBytes, options, !this.isAligned(offsetBytes, lengthBytes));
  }

  /** The mirror service's zeroing of a mirror volume (a write-zeroes frame from the source),
   *  exclusive like the source's replicated zeroing. */
  async mirrorWriteZeroes(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    this.checkMirrorService();
    this.checkPeerRange(offsetBytes, lengthBytes);
    return this.zeroLocked(offsetBytes, lengthBytes, { fua, noHole: false, fastZero: false }, true);
  }

  private async zeroLocked(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions, exclusive: boolean): Promise<void> {
    this.begin();
    try {
      const lock = await this.rangeLock.acquire(this.alignDown(offsetBytes), this.alignUp(offsetBytes + lengthBytes), exclusive);
      try {
        await this.zeroUnlocked(offsetBytes, lengthBytes, options);
      } finally {
        this.rangeLock.release(lock);
      }
    } catch (error) {
      this.failOnDeviceError(error);
    } finally {
      this.end();
    }
  }

  private checkFastZero(options: WriteZeroesOptions): void {
    if (options.fastZero && !(options.noHole ? this.zeroIsFast.noHole : this.zeroIsFast.mayDeallocate)) {
      // NBD: without a fast way to zero, FAST_ZERO must fail at once so the client writes instead.
      throw new VolumeError('ENOTSUP', `${this.spec.devicePath}: cannot zero ranges without writing them`);
    }
  }

  /** Zeroes a byte range; the caller holds its sector span (exclusively when edges are unaligned). */
  private async zeroUnlocked(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void> {
    const middleStartBytes = this.alignUp(offsetBytes);
    const middleEndBytes = this.alignDown(offsetBytes + lengthBytes);
    if (middleStartBytes < middleEndBytes) {
      await this.zeroAligned(middleStartBytes, middleEndBytes - middleStartBytes, options);
    }
    // Unaligned edges (or a range inside one sector) are read-modify-write of zero bytes.
    const headEndBytes = Math.min(offsetBytes + lengthBytes, middleStartBytes);
    if (offsetBytes < headEndBytes) {
      await this.readModifyWriteUnlocked(offsetBytes, headEndBytes - offsetBytes, false, (span, head, len) => span.fill(0, head, head + len));
    }
    const tailStartBytes = Math.max(middleEndBytes, headEndBytes);
    if (tailStartBytes < offsetBytes + lengthBytes) {
      await this.readModifyWriteUnlocked(tailStartBytes, offsetBytes + lengthBytes - tailStartBytes, false, (span, head, len) =>
        span.fill(0, head, head + len),
      );
    }
    if (options.fua) await this.file.flush();
  }

  /** There is no page cache under O_DIRECT to warm, and NBD_CMD_CACHE is advisory, so a valid
   *  request succeeds without I/O (the NBD server has already checked its bounds). */
  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.checkRange(offsetBytes, lengthBytes);
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<AllocationRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const extents = await this.file.allocationMap(offsetBytes, lengthBytes);
    const runs: AllocationRun[] = [];
    for (const extent of extents) {
      const flags = extent.hole ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
      const last = runs[runs.length - 1];
      if (last !== undefined && last.flags === flags) last.lengthBytes += extent.lengthBytes;
      else runs.push({ lengthBytes: extent.lengthBytes, flags });
    }
    if (runs.length === 0) runs.push({ lengthBytes, flags: 0 });
    return runs;
  }

  /** Resolves when no operation is in flight. */
  drain(): Promise<void> {
    return this.inFlight.idle();
  }

  /** Drains in-flight I/O, makes it durable and closes the device. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.drain();
      try {
        if (!this.spec.readOnly && this.failedError === undefined) await this.file.flush();
      } finally {
        // Even when the final flush fails, the exclusive descriptor must go, or the device stays
        // busy until the daemon exits.
        await this.file.close();
        this.logger.info(this.stats(), 'volume closed');
      }
    })();
    return this.closing;
  }

  /** The hot path: no async frames, one native write. When no read-modify-write holds or
   *  awaits an overlapping range, the range lock grants at once. */
  private writeAligned(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    const lock = this.rangeLock.acquire(offsetBytes, offsetBytes + data.length, false);
    const write = (held: RangeLockHandle): Promise<void> =>
      this.deviceWrite(offsetBytes, data, fua).then(
        () => {
          this.rangeLock.release(held);
          this.end();
        },
        (error: unknown) => {
          this.rangeLock.release(held);
          this.end();
          this.failOnDeviceError(error);
        },
      );
    return lock instanceof Promise ? lock.then(write) : write(lock);
  }

  /** One aligned device write. Aligned pooled memory (an NBD payload assembled across socket
   *  reads) goes to the device as it is; anything else is copied once into an aligned buffer. */
  private deviceWrite(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    if (isAlignedBuffer(data, this.pool.alignBytes)) return this.file.write(data, offsetBytes, fua);
    const buffer = this.pool.acquire(data.length);
    data.copy(buffer);
    const release = (): void => this.pool.release(buffer);
    const written = this.file.write(buffer, offsetBytes, fua);
    written.then(release, release);
    return written;
  }

  /** Reads the sector span around [offset, offset+length), lets `modify` change the bytes, and
   *  writes the span back, holding the span exclusively throughout. */
  private async readModifyWrite(
    offsetBytes: number,
    lengthBytes: number,
    fua: boolean,
    modify: (span: Buffer, headBytes: number, lengthBytes: number) => void,
  ): Promise<void> {
    const lock = await this.rangeLock.acquire(this.alignDown(offsetBytes), this.alignUp(offsetBytes + lengthBytes), true);
    try {
      await this.readModifyWriteUnlocked(offsetBytes, lengthBytes, fua, modify);
    } finally {
      this.rangeLock.release(lock);
    }
  }

  /** The read-modify-write cycle; the caller holds the sector span exclusively. */
  private async readModifyWriteUnlocked(
    offsetBytes: number,
    lengthBytes: number,
    fua: boolean,
    modify: (span: Buffer, headBytes: number, lengthBytes: number) => void,
  ): Promise<void> {
    const startBytes = this.alignDown(offsetBytes);
    const endBytes = this.alignUp(offsetBytes + lengthBytes);
    const span = this.pool.acquire(endBytes - startBytes);
    try {
      await this.file.read(span, startBytes);
      modify(span, offsetBytes - startBytes, lengthBytes);
      await this.file.write(span, startBytes, fua);
      this.counters.readModifyWriteOps++;
    } finally {
      this.pool.release(span);
    }
  }

  /** Zeroes whole sectors; the caller holds the range. */
  private async zeroAligned(offsetBytes: number, lengthBytes: number, options: WriteZeroesOptions): Promise<void> {
    try {
      await this.file.writeZeroes(offsetBytes, lengthBytes, !options.noHole);
      return;
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code !== 'EOPNOTSUPP' && code !== 'ENOTSUP' && code !== 'ENOTTY') throw error;
      if (options.fastZero) throw new VolumeError('ENOTSUP', `${this.spec.devicePath}: device cannot zero ranges fast`);
    }
    // The device has no zeroing primitive: write zero buffers.
    const zeroes = this.pool.acquire(Math.min(zeroChunkBytes, lengthBytes));
    zeroes.fill(0);
    try {
      for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += zeroes.length) {
        const chunkBytes = Math.min(zeroes.length, lengthBytes - doneBytes);
        await this.file.write(chunkBytes === zeroes.length ? zeroes : zeroes.subarray(0, chunkBytes), offsetBytes + doneBytes, false);
      }
    } finally {
      this.pool.release(zeroes);
    }
  }

  private checkNotFailed(): void {
    if (this.failedError !== undefined) throw this.failedError;
  }

  /** Marks the volume failed on a device error (not on validation errors) and rethrows. */
  private readonly failOnDeviceError = (error: unknown): never => {
    const code = (error as { code?: unknown }).code;
    const syscall = (error as { syscall?: unknown }).syscall;
    if (this.failedError === undefined && typeof syscall === 'string' && syscall !== '' && typeof code === 'string' && !code.startsWith('BM_ERR_')) {
      this.failedError = new VolumeError('EIO', `volume ${this.spec.name} failed: ${(error as Error).message}; writes and flushes are refused until it is removed and added again`);
      this.logger.error({ err: error }, 'device write or flush failed; volume marked failed');
    }
    throw error;
  };

  /** For client writes (NBD): refused on read-only and mirror volumes. */
  private checkWritable(): void {
    this.checkNotFailed();
    if (this.clientReadOnly) {
      const why = this.spec.readOnly ? 'read-only' : 'a mirror volume (read-only to clients until promoted)';
      throw new VolumeError('EPERM', `volume ${this.spec.name} is ${why}`);
    }
    if (this.closing !== undefined) throw new VolumeError('ESHUTDOWN', `volume ${this.spec.name} is closing`);
  }

  /** The mirror service writes only mirror volumes that are not promoted. */
  private checkMirrorService(): void {
    if (this.spec.role !== 'mirror') throw new VolumeError('EPERM', `volume ${this.spec.name} is not a mirror volume`);
    if (this.promoted) throw new VolumeError('EPERM', `volume ${this.spec.name} is promoted: the mirror service may not write it`);
    if (this.diverged) throw new VolumeError('EPERM', `volume ${this.spec.name} diverged from its source (split brain): the mirror service may not write it until the source resolves it`);
    this.checkDeviceWritable();
  }

  /** For the mirror service's writes: the device itself must be writable. */
  private checkDeviceWritable(): void {
    this.checkNotFailed();
    if (this.spec.readOnly) throw new VolumeError('EPERM', `volume ${this.spec.name} is read-only`);
    if (this.closing !== undefined) throw new VolumeError('ESHUTDOWN', `volume ${this.spec.name} is closing`);
  }

  /** A range from a peer, not from the validating NBD layer: checked as input, not as an invariant. */
  private checkPeerRange(offsetBytes: number, lengthBytes: number): void {
    const valid = Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && Number.isSafeInteger(lengthBytes) && lengthBytes > 0;
    if (!valid || offsetBytes + lengthBytes > this.backendInfo.sizeBytes) {
      throw new VolumeError('EINVAL', `volume ${this.spec.name}: ${lengthBytes} bytes at ${offsetBytes} is outside the volume (${this.backendInfo.sizeBytes} bytes)`);
    }
  }

  /** The NBD layer validates bounds per the spec; this is the invariant underneath it. */
  private checkRange(offsetBytes: number, lengthBytes: number): void {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'offsetBytes');
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0, 'lengthBytes');
    assert(offsetBytes + lengthBytes <= this.backendInfo.sizeBytes, 'range past the end of the volume');
  }

  private isAligned(offsetBytes: number, lengthBytes: number): boolean {
    return offsetBytes % this.sectorBytes === 0 && lengthBytes % this.sectorBytes === 0;
  }

  private alignDown(bytes: number): number {
    return bytes - (bytes % this.sectorBytes);
  }

  private alignUp(bytes: number): number {
    const remainder = bytes % this.sectorBytes;
    return remainder === 0 ? bytes : bytes + this.sectorBytes - remainder;
  }

  private readonly endOp = (): void => this.end();

  private begin(): void {
    this.inFlight.add();
  }

  private end(): void {
    this.inFlight.done();
  }
}

function ignore(): void {}

/** Resolves when `promise` settles, either way. */
function settled(promise: Promise<unknown>): Promise<void> {
  return promise.then(ignore, ignore);
}

function isUnsupported(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOTTY';
}

// statfs(2) magic numbers of file systems whose fallocate modes zero without writing.
const EXT4_SUPER_MAGIC = 0xef53;
const XFS_SUPER_MAGIC = 0x58465342;
const TMPFS_MAGIC = 0x01021994;
const BTRFS_SUPER_MAGIC = 0x9123683e;

/** Whether zeroing is an offload rather than written zeroes. Block devices: the queue has a
 *  write-zeroes limit (BLKZEROOUT falls back to writing otherwise). Files: the file system
 *  implements fallocate PUNCH_HOLE (deallocating) and ZERO_RANGE (keeping blocks allocated). */
function probeFastZero(info: { path: string; isBlockDevice: boolean }): { mayDeallocate: boolean; noHole: boolean } {
  try {
    if (info.isBlockDevice) {
      const rdev = statSync(info.path).rdev;
      const major = Math.floor(rdev / 256) & 0xfff;
      const minor = (rdev & 0xff) | (Math.floor(rdev / 2 ** 12) & ~0xff);
      const limit = Number(readFileSync(`/sys/dev/block/${major}:${minor}/queue/write_zeroes_max_bytes`, 'utf8').trim());
      return { mayDeallocate: limit > 0, noHole: limit > 0 };
    }
    const type = statfsSync(info.path).type;
    const punchHole = [EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, TMPFS_MAGIC, BTRFS_SUPER_MAGIC].includes(type);
    const zeroRange = [EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC].includes(type);
    return { mayDeallocate: punchHole, noHole: zeroRange };
  } catch {
    return { mayDeallocate: false, noHole: false };
  }
}
