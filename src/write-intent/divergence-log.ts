// What a promoted mirror volume has written since it was promoted (split brain, issue 4 part 2):
// one bit per 64 KiB region in a checksummed BitmapFile, <state>/diverged/<uuid>.dirty. A region
// is on stable storage before the first write to it starts, so after any crash the file covers
// every region the device may hold changed. Bits are only ever set while promoted (never
// cleared), so only a region's first write costs a metadata write, and concurrent first writes
// share one group commit. The file is dropped when the source resolves the split brain.
import path from 'node:path';
import type { Logger } from 'pino';
import { DirtyBitmap } from '../native/index';
import type { WriteIntent } from '../volume/replica';
import { BitmapFile, dirtyRunsBetween } from './bitmap-file';
import type { MetadataStore } from './metadata-file';
import { MetadataIoError } from './write-intent-log';

export function divergenceBitmapPath(stateDir: string, volumeUuid: string): string {
  return path.join(stateDir, 'diverged', `${volumeUuid}.dirty`);
}

export interface DivergenceLogOptions {
  store: MetadataStore;
  stateDir: string;
  volumeUuid: string;
  sizeBytes: number;
  regionBytes: number;
  logger: Logger;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (error: Error) => void;
}

export class DivergenceLog implements WriteIntent {
  private readonly file: BitmapFile;
  private readonly logger: Logger;
  /** Regions written (or being written) since the promotion. */
  readonly bits: DirtyBitmap;
  /** Pages whose new bits wait for the next commit, and the promise that commit settles. */
  private readonly pending = new Set<number>();
  private waiting: Deferred | null = null;
  /** Pages being written now, and the promise of that commit. */
  private inFlight = new Set<number>();
  private current: Promise<void> | null = null;
  private running = false;
  /** After a failed metadata write nothing is admitted: a write could land unrecorded. */
  private failed: MetadataIoError | null = null;
  pageWrites = 0;

  private constructor(file: BitmapFile, bits: DirtyBitmap, logger: Logger) {
    this.file = file;
    this.bits = bits;
    this.logger = logger;
  }

  /** A new, empty record, durable (every page written and synced) before it is returned: the
   *  volume may be made writable only after this. */
  static async create(options: DivergenceLogOptions): Promise<DivergenceLog> {
    const file = new BitmapFile(options.store.open(divergenceBitmapPath(options.stateDir, options.volumeUuid)), options.sizeBytes, options.regionBytes);
    const bits = new DirtyBitmap(options.sizeBytes, options.regionBytes);
    await file.persist(() => []);
    return new DivergenceLog(file, bits, options.logger);
  }

  /** The record after a restart. A missing or unreadable file counts every region as written
   *  (never less than may differ); a torn page, the regions of that page. */
  static async open(options: DivergenceLogOptions): Promise<{ log: DivergenceLog; state: string }> {
    const file = new BitmapFile(options.store.open(divergenceBitmapPath(options.stateDir, options.volumeUuid)), options.sizeBytes, options.regionBytes);
    const loaded = await file.load();
    if (loaded.state !== 'ok') {
      options.logger.warn({ state: loaded.state, damagedPages: loaded.damagedPages }, 'the record of regions written while promoted was not intact; the affected regions count as written');
    }
    return { log: new DivergenceLog(file, loaded.bitmap, options.logger), state: loaded.state };
  }

  /** Removes the file (the split brain was resolved). */
  static async remove(options: Pick<DivergenceLogOptions, 'store' | 'stateDir' | 'volumeUuid'>): Promise<void> {
    await options.store.open(divergenceBitmapPath(options.stateDir, options.volumeUuid)).remove();
  }

  get divergedBytes(): number {
    return this.bits.dirtyBytes();
  }

  acquire(offsetBytes: number, lengthBytes: number): Promise<void> | void {
    if (this.failed !== null) return Promise.reject(this.failed);
    const newly = this.bits.setRange(offsetBytes, lengthBytes);
    const pages = this.file.pagesFor(offsetBytes, lengthBytes);
    if (newly > 0) {
      for (const page of pages) this.pending.add(page);
      return this.commit();
    }
    // Already set, but maybe not yet on disk (another write's commit is still coming).
    if (pages.some((page) => this.pending.has(page))) return this.commit();
    if (this.current !== null && pages.some((page) => this.inFlight.has(page))) return this.current;
  }

  release(): void {
    // Bits stay set for as long as the divergence is unresolved.
  }

  /** Waits for every commit in progress (demote, close). */
  async settle(): Promise<void> {
    while (this.running) await (this.waiting?.promise ?? this.current)?.catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.settle();
    await this.file.file.close();
  }

  private commit(): Promise<void> {
    if (this.waiting === null) {
      let resolve!: () => void;
      let reject!: (error: Error) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      promise.catch(() => undefined); // a commit nobody awaits any more must not be unhandled
      this.waiting = { promise, resolve, reject };
    }
    const { promise } = this.waiting;
    if (!this.running) void this.run();
    return promise;
  }

  /** Group commit: each round writes every page that gained bits since the last round. */
  private async run(): Promise<void> {
    this.running = true;
    try {
      while (this.waiting !== null) {
        const batch = this.waiting;
        this.waiting = null;
        this.inFlight = new Set(this.pending);
        this.pending.clear();
        this.current = batch.promise;
        try {
          if (this.failed !== null) throw this.failed;
          this.pageWrites += await this.file.persist((startBytes, endBytes) => dirtyRunsBetween(this.bits, startBytes, endBytes), this.inFlight);
          batch.resolve();
        } catch (error) {
          this.failed ??= new MetadataIoError(`recording the regions written while promoted failed: ${(error as Error).message}`, { cause: error });
          this.logger.error({ err: error }, 'writing the divergence record failed; writes to the promoted volume are refused');
          batch.reject(this.failed);
        }
        this.inFlight = new Set();
        this.current = null;
      }
    } finally {
      this.running = false;
    }
  }
}
