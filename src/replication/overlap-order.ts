// Applies operations in arrival order where they overlap, concurrently where they do not. The
// target of a mirror receives writes in the source's order (one TCP stream) but issues them to
// its device concurrently; two writes to the same bytes must still land in the order they were
// sent, or an older copy chunk could overwrite a newer client write.
//
// Both questions asked per operation are answered without looking at every operation in
// flight (a lagging async target keeps hundreds): overlap candidates come from 1 MiB buckets
// of the byte range, and drain() is a barrier on arrival numbers, settled by the completion
// that makes the oldest unfinished operation newer than the barrier.
import assert from 'node:assert';

interface Active {
  id: number;
  startBytes: number;
  endBytes: number;
  done: Promise<unknown>;
  /** The id of the last operation that counted this one as overlapping (no duplicates from
   *  the several buckets a range spans). */
  seenBy: number;
  /** First and last bucket, or -1 for a range spanning more than WIDE_BUCKETS (kept apart). */
  firstBucket: number;
  lastBucket: number;
}

interface Barrier {
  /** Settles once no operation with an id up to this one is unfinished. */
  lastId: number;
  resolve: () => void;
}

const BUCKET_SHIFT = 20;
const BUCKET_BYTES = 2 ** BUCKET_SHIFT;
/** A range over more buckets than this (a large zeroing) is kept in one list every operation
 *  checks, rather than in each of its buckets. */
const WIDE_BUCKETS = 64;

const ignore = (): void => undefined;

/** An operation that throws instead of rejecting still settles, and its entry is still removed. */
function started<T>(operation: () => Promise<T>): Promise<T> {
  try {
    return operation();
  } catch (error) {
    return Promise.reject(error);
  }
}

export class OverlapOrder {
  /** Every operation not yet settled, by id: insertion order is arrival order. */
  private readonly active = new Map<number, Active>();
  private readonly buckets = new Map<number, Set<Active>>();
  private readonly wide = new Set<Active>();
  private readonly barriers: Barrier[] = [];
  private readonly activeMax: number;
  private nextId = 1;

  /** activeMax bounds the operations in flight; the caller keeps fewer. */
  constructor(activeMax: number) {
    assert(Number.isSafeInteger(activeMax) && activeMax > 0);
    this.activeMax = activeMax;
  }

  get size(): number {
    return this.active.size;
  }

  /** Runs `operation` once every earlier overlapping operation has settled. */
  run<T>(offsetBytes: number, lengthBytes: number, operation: () => Promise<T>): Promise<T> {
    assert(this.active.size < this.activeMax, 'too many operations in flight');
    const id = this.nextId++;
    const startBytes = offsetBytes;
    const endBytes = offsetBytes + lengthBytes;
    const firstBucket = Math.floor(startBytes / BUCKET_BYTES);
    const lastBucket = Math.floor((Math.max(endBytes, startBytes + 1) - 1) / BUCKET_BYTES);
    const isWide = lastBucket - firstBucket >= WIDE_BUCKETS;
    let before: Array<Promise<unknown>> | undefined;
    const consider = (other: Active): void => {
      if (other.seenBy === id || other.startBytes >= endBytes || startBytes >= other.endBytes) return;
      other.seenBy = id;
      (before ??= []).push(other.done);
    };
    if (isWide) {
      for (const other of this.active.values()) consider(other);
    } else {
      for (const other of this.wide) consider(other);
      for (let bucket = firstBucket; bucket <= lastBucket; bucket++) {
        const members = this.buckets.get(bucket);
        if (members !== undefined) for (const other of members) consider(other);
      }
    }
    const result =
      before === undefined ? started(operation) : Promise.all(before.map((done) => done.then(ignore, ignore))).then(operation);
    const entry: Active = {
      id,
      startBytes,
      endBytes,
      done: result,
      seenBy: 0,
      firstBucket: isWide ? -1 : firstBucket,
      lastBucket: isWide ? -1 : lastBucket,
    };
    this.add(entry);
    const remove = (): void => this.remove(entry);
    result.then(remove, remove);
    return result;
  }

  /** Resolves when every operation started so far has settled. */
  drain(): Promise<void> {
    if (this.active.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.barriers.push({ lastId: this.nextId - 1, resolve }));
  }

  private add(entry: Active): void {
    this.active.set(entry.id, entry);
    if (entry.firstBucket < 0) {
      this.wide.add(entry);
      return;
    }
    for (let bucket = entry.firstBucket; bucket <= entry.lastBucket; bucket++) {
      let members = this.buckets.get(bucket);
      if (members === undefined) {
        members = new Set();
        this.buckets.set(bucket, members);
      }
      members.add(entry);
    }
  }

  private remove(entry: Active): void {
    this.active.delete(entry.id);
    if (entry.firstBucket < 0) {
      this.wide.delete(entry);
    } else {
      for (let bucket = entry.firstBucket; bucket <= entry.lastBucket; bucket++) {
        const members = this.buckets.get(bucket) as Set<Active>;
        members.delete(entry);
        if (members.size === 0) this.buckets.delete(bucket);
      }
    }
    if (this.barriers.length === 0) return;
    // Barriers were taken in id order; settle those older than the oldest unfinished operation.
    const oldest = this.active.size === 0 ? Number.POSITIVE_INFINITY : (this.active.keys().next().value as number);
    let settled = 0;
    while (settled < this.barriers.length && (this.barriers[settled] as Barrier).lastId < oldest) {
      (this.barriers[settled] as Barrier).resolve();
      settled++;
    }
    if (settled > 0) this.barriers.splice(0, settled);
  }
}
