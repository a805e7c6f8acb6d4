// A mirrored volume's write-intent log (MD's write-intent bitmap, DRBD's activity log): before a
// client write may change the local device, the 4 MiB extents it touches are recorded "hot" on
// stable storage, so a crash at any moment leaves metadata that covers every region where the
// source and its mirrors might differ:
//
//   for every region R that may differ: extent(R) is in the on-disk activity log, or R's bit is
//   set in that mirror's on-disk bitmap (bitmap-file.ts).
//
// Hot extents stay hot while in use, so a workload touching a working set that fits the log
// costs no metadata write per data write. An extent leaves the log (least recently used first,
// never while a write holds it) only after every mirror's bitmap pages covering it have been
// written from what the mirror knows may differ. Bits are cleared lazily: a page is rewritten
// from the mirror's in-memory state now and then, and only regions the target holds durably are
// clear there. Every metadata write of a volume goes through one queue, so a page computed
// earlier never lands after one computed later.
import type { Logger } from 'pino';
import type { WriteIntentInfo } from '../control/protocol';
import type { DirtyRun } from '../native/index';
import type { WriteIntent } from '../volume/replica';
import { ACTIVITY_LOG_EXTENTS_MAX, encodeSlot, SLOT_BYTES, type ActivityLogGeometry, type ActivityLogLoad } from './activity-log-format';
import type { BitmapFile, DirtyRunSource } from './bitmap-file';
import type { MetadataFile } from './metadata-file';

export const EXTENT_BYTES = 4 * 1024 * 1024;
export const ACTIVITY_LOG_EXTENTS_DEFAULT = 512;
/** Holds the largest replicated change (REPLICATED_CHANGE_BYTES_MAX spans at most 17 extents)
 *  twice over, so one request always fits. */
export const ACTIVITY_LOG_EXTENTS_MIN = 34;
export { ACTIVITY_LOG_EXTENTS_MAX };
/** How long cleared bits may wait before they are written (lazy clearing). */
const PERSIST_DELAY_MS = 2000;

export class MetadataIoError extends Error {
  readonly code = 'BM_ERR_METADATA_IO';
  constructor(message: string, options?: { cause: unknown }) {
    super(message, options);
    this.name = 'MetadataIoError';
  }
}

/** One mirror of the volume, as the log sees it. */
export interface IntentTracker {
  readonly id: string;
  readonly file: BitmapFile;
  /** Regions that may differ from the mirror right now. Exact outside hot extents; inside them
   *  anything is allowed (the log covers them). */
  readonly mayDiffer: DirtyRunSource;
}

export interface WriteIntentLogOptions {
  file: MetadataFile;
  sizeBytes: number;
  /** 0 switches recording off: the log then only tells a clean stop from a crash (after which
   *  every mirror copies everything). */
  capacityExtents: number;
  logger: Logger;
}

interface Waiter {
  first: number;
  last: number;
  resolve: () => void;
  reject: (error: Error) => void;
}

/** What status shows of the log (the extent size is added by the caller). */
export type WriteIntentStats = Omit<WriteIntentInfo, 'extentBytes'>;

export class WriteIntentLog implements WriteIntent {
  private readonly geometry: ActivityLogGeometry;
  private readonly capacity: number;
  /** Extents in the on-disk log that new writes may use, with the writes holding each.
   *  Insertion order is least recently used first. */
  private readonly hot = new Map<number, number>();
  private readonly waiters: Waiter[] = [];
  private readonly trackers = new Map<string, IntentTracker>();
  private sequence: number;
  private nextSlot: 0 | 1;
  private queue: Promise<void> = Promise.resolve();
  private committing = false;
  private rekick = false;
  private persistTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly counters = { transactions: 0, evictions: 0, pageWrites: 0, acquires: 0, acquiresWaited: 0 };
  private lastError: string | null = null;

  constructor(
    private readonly options: WriteIntentLogOptions,
    loaded: ActivityLogLoad,
  ) {
    const capacity = options.capacityExtents;
    if (!Number.isInteger(capacity) || (capacity !== 0 && (capacity < ACTIVITY_LOG_EXTENTS_MIN || capacity > ACTIVITY_LOG_EXTENTS_MAX))) {
      throw new RangeError(`activity log extents must be 0 (off) or ${ACTIVITY_LOG_EXTENTS_MIN}..${ACTIVITY_LOG_EXTENTS_MAX}`);
    }
    this.geometry = { sizeBytes: options.sizeBytes, extentBytes: EXTENT_BYTES };
    this.capacity = options.capacityExtents;
    this.sequence = loaded.state === 'ok' ? loaded.latest.sequence : 0;
    this.nextSlot = loaded.state === 'ok' ? ((1 - loaded.slot) as 0 | 1) : 0;
  }

  /** Byte ranges of the given extents, for marking them dirty after a crash. */
  static extentRuns(extents: readonly number[], sizeBytes: number): DirtyRun[] {
    return extents.map((extent) => {
      const offsetBytes = extent * EXTENT_BYTES;
      return { offsetBytes, lengthBytes: Math.min(EXTENT_BYTES, sizeBytes - offsetBytes) };
    });
  }

  addTracker(tracker: IntentTracker): void {
    this.trackers.set(tracker.id, tracker);
    this.persistSoon();
  }

  /** Forgets a mirror and removes its bitmap file. */
  removeTracker(id: string): Promise<void> {
    const tracker = this.trackers.get(id);
    this.trackers.delete(id);
    if (tracker === undefined) return Promise.resolve();
    return this.exclusive(() => tracker.file.file.remove());
  }

  get trackerCount(): number {
    return this.trackers.size;
  }

  /** Whether writes are recorded (the volume should call acquire/release). */
  get tracking(): boolean {
    return this.capacity > 0;
  }

  /** Makes the recovered state durable in the bitmaps, then empties the log. Writes that
   *  arrive meanwhile wait in the queue behind it. */
  start(): Promise<void> {
    return this.exclusive(async () => {
      await this.persistTrackers(undefined);
      await this.writeSlot([], false);
    });
  }

  // --- WriteIntent: the volume's write path -------------------------------------------------

  acquire(offsetBytes: number, lengthBytes: number): Promise<void> | void {
    this.counters.acquires++;
    const [first, last] = this.extentsOf(offsetBytes, lengthBytes);
    let allHot = true;
    for (let extent = first; extent <= last; extent++) {
      if (!this.hot.has(extent)) {
        allHot = false;
        break;
      }
    }
    if (allHot) {
      for (let extent = first; extent <= last; extent++) this.take(extent);
      return;
    }
    if (this.closed || !this.tracking) return Promise.reject(new MetadataIoError('the write-intent log is closed or switched off'));
    if (last - first + 1 > this.capacity) {
      return Promise.reject(new MetadataIoError(`a change of ${lengthBytes} bytes spans more extents than the activity log holds (${this.capacity})`));
    }
    this.counters.acquiresWaited++;
    return new Promise((resolve, reject) => {
      this.waiters.push({ first, last, resolve, reject });
      // A commit loop that already looked at the waiters would miss this one: ask it to look again.
      if (this.committing) this.rekick = true;
      else this.kick();
    });
  }

  release(offsetBytes: number, lengthBytes: number): void {
    const [first, last] = this.extentsOf(offsetBytes, lengthBytes);
    for (let extent = first; extent <= last; extent++) {
      const refs = this.hot.get(extent);
      if (refs !== undefined && refs > 0) this.hot.set(extent, refs - 1);
    }
    if (this.waiters.length > 0) {
      if (this.committing) this.rekick = true;
      else this.kick();
    }
  }

  // --- lazy clearing and shutdown -------------------------------------------------------------

  /** Rewrites, soon, the bitmap pages whose bits changed (regions the mirrors now hold). */
  persistSoon(): void {
    if (this.persistTimer !== undefined || this.closed) return;
    this.persistTimer = setTimeout(() => {
      this.persistTimer = undefined;
      this.persistNow().catch((error: unknown) => {
        this.options.logger.error({ err: error }, 'writing the persistent dirty bitmaps failed; retrying later');
        this.persistSoon();
      });
    }, PERSIST_DELAY_MS);
    this.persistTimer.unref();
  }

  persistNow(): Promise<void> {
    return this.exclusive(() => this.persistTrackers(undefined));
  }

  /** Writes every mirror's final bitmap, then an empty log marked clean (when no write holds an
   *  extent): the next start trusts the bitmaps alone. Call once the volume takes no writes. */
  close(clean: boolean): Promise<void> {
    this.closed = true;
    if (this.persistTimer !== undefined) clearTimeout(this.persistTimer);
    this.persistTimer = undefined;
    return this.exclusive(async () => {
      await this.persistTrackers(undefined);
      const busy = [...this.hot].filter(([, refs]) => refs > 0).map(([extent]) => extent);
      await this.writeSlot(busy, clean && busy.length === 0);
      await this.options.file.close();
    });
  }

  /** Removes the log file (the volume has no mirrors left). */
  remove(): Promise<void> {
    this.closed = true;
    if (this.persistTimer !== undefined) clearTimeout(this.persistTimer);
    return this.exclusive(() => this.options.file.remove());
  }

  stats(): WriteIntentStats {
    return { capacityExtents: this.capacity, hotExtents: this.hot.size, ...this.counters, lastError: this.lastError };
  }

  // --- transactions -------------------------------------------------------------------------

  private extentsOf(offsetBytes: number, lengthBytes: number): [number, number] {
    const first = Math.floor(offsetBytes / EXTENT_BYTES);
    const last = Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / EXTENT_BYTES);
    return [first, last];
  }

  /** Takes a reference on a hot extent and makes it the most recently used. */
  private take(extent: number): void {
    const refs = this.hot.get(extent) as number;
    this.hot.delete(extent);
    this.hot.set(extent, refs + 1);
  }

  private kick(): void {
    if (this.committing) return;
    this.committing = true;
    void this.exclusive(() => this.commitLoop()).finally(() => {
      this.committing = false;
      if (this.rekick && this.waiters.length > 0) {
        this.rekick = false;
        this.kick();
      }
    });
  }

  /** Grants what is hot; brings in what waiters need, evicting idle extents, in group commits
   *  (one slot write for every waiter that fits), until nobody can go on. */
  private async commitLoop(): Promise<void> {
    for (;;) {
      if (this.closed) {
        // Removed or closed: nothing may write the log any more (it would come back as a file).
        for (const waiter of this.waiters.splice(0)) waiter.reject(new MetadataIoError('the write-intent log is closed'));
        return;
      }
      this.grantHotWaiters();
      if (this.waiters.length === 0) return;
      const evictable = [...this.hot].filter(([, refs]) => refs === 0).map(([extent]) => extent);
      const wanted = new Set<number>();
      /** Every extent an admitted waiter needs, hot or not: none of them may be evicted. */
      const needed = new Set<number>();
      const admitted: Waiter[] = [];
      for (const waiter of this.waiters) {
        const added: number[] = [];
        const range: number[] = [];
        for (let extent = waiter.first; extent <= waiter.last; extent++) {
          range.push(extent);
          if (!this.hot.has(extent) && !wanted.has(extent)) added.push(extent);
        }
        const evictableLeft = evictable.filter((extent) => !needed.has(extent) && !range.includes(extent)).length;
        if (this.hot.size + wanted.size + added.length - evictableLeft > this.capacity) break; // first come, first served
        for (const extent of added) wanted.add(extent);
        for (const extent of range) needed.add(extent);
        admitted.push(waiter);
      }
      if (admitted.length === 0) return; // every slot is held by a write in progress: wait for a release
      const overflow = this.hot.size + wanted.size - this.capacity;
      const victims = overflow > 0 ? evictable.filter((extent) => !needed.has(extent)).slice(0, overflow) : [];
      // From here a write to a victim waits for a later transaction that brings it back.
      for (const victim of victims) this.hot.delete(victim);
      let step: 'pages' | 'slot' = 'pages';
      try {
        if (victims.length > 0) await this.persistTrackers(victims);
        step = 'slot';
        await this.writeSlot([...this.hot.keys(), ...wanted], false);
      } catch (error) {
        // Pages failed: the victims' bits may not be durable, but the last durable slot still
        // lists them, so they go back in (or a later slot would drop them unprotected).
        // Slot failed: their bits are durable and whether the slot reached the disk is unknown,
        // so they stay out and a write to one waits for a transaction that brings it back.
        if (step === 'pages') for (const victim of victims) this.hot.set(victim, 0);
        const failure = new MetadataIoError(`recording write intent in ${this.options.file.path} failed: ${(error as Error).message}`, { cause: error });
        this.lastError = failure.message;
        this.options.logger.error({ err: error }, 'write-intent metadata write failed; the writes waiting for it fail with EIO');
        for (const waiter of this.waiters.splice(0)) waiter.reject(failure);
        return;
      }
      this.counters.evictions += victims.length;
      for (const extent of wanted) this.hot.set(extent, 0);
      this.lastError = null;
    }
  }

  private grantHotWaiters(): void {
    for (let index = 0; index < this.waiters.length; ) {
      const waiter = this.waiters[index] as Waiter;
      let allHot = true;
      for (let extent = waiter.first; extent <= waiter.last && allHot; extent++) allHot = this.hot.has(extent);
      if (!allHot) {
        index++;
        continue;
      }
      for (let extent = waiter.first; extent <= waiter.last; extent++) this.take(extent);
      this.waiters.splice(index, 1);
      waiter.resolve();
    }
  }

  /** Writes each mirror's bitmap pages (those covering `extents`, or all) from what it knows. */
  private async persistTrackers(extents: readonly number[] | undefined): Promise<void> {
    for (const tracker of this.trackers.values()) {
      let pages: number[] | undefined;
      if (extents !== undefined) {
        const set = new Set<number>();
        for (const run of WriteIntentLog.extentRuns(extents, this.options.sizeBytes)) {
          for (const page of tracker.file.pagesFor(run.offsetBytes, run.lengthBytes)) set.add(page);
        }
        pages = [...set].sort((a, b) => a - b);
      }
      this.counters.pageWrites += await tracker.file.persist(tracker.mayDiffer, pages);
    }
  }

  private async writeSlot(extents: number[], clean: boolean): Promise<void> {
    const sequence = this.sequence + 1;
    const bytes = encodeSlot(this.geometry, { sequence, clean, tracked: this.tracking, extents });
    await this.options.file.write(this.nextSlot * SLOT_BYTES, bytes);
    await this.options.file.sync();
    // Only a durable slot moves the next write to the other one: after a failed or torn write
    // the same slot is written again, and the other keeps the last committed state.
    this.sequence = sequence;
    this.nextSlot = (1 - this.nextSlot) as 0 | 1;
    this.counters.transactions++;
  }

  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.queue.then(work);
    this.queue = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
