// Byte-range lock that orders read-modify-write cycles against overlapping writes.
//
// Aligned writes take the range shared: NBD lets overlapping concurrent writes land in either
// order, so they need not wait for each other. A read-modify-write takes its sector span
// exclusive: between its read and its write no other write may touch those sectors, or the
// write-back would resurrect old bytes. The common case (no exclusive holder, nobody waiting)
// is O(1) and never allocates a Promise.
import assert from 'node:assert';

export interface RangeLockHandle {
  readonly startBytes: number;
  readonly endBytes: number;
  readonly exclusive: boolean;
}

interface Waiter extends RangeLockHandle {
  grant(): void;
}

function overlaps(a: RangeLockHandle, b: RangeLockHandle): boolean {
  return a.startBytes < b.endBytes && b.startBytes < a.endBytes;
}

export class RangeLock {
  private readonly holders = new Set<RangeLockHandle>();
  private exclusiveHolders = 0;
  private readonly waiters: Waiter[] = [];

  /** Acquire [startBytes, endBytes). Resolves with a handle to pass to release(). */
  acquire(startBytes: number, endBytes: number, exclusive: boolean): RangeLockHandle | Promise<RangeLockHandle> {
    assert(startBytes < endBytes, 'empty range');
    const handle: RangeLockHandle = { startBytes, endBytes, exclusive };
    if (this.canGrant(handle, this.waiters.length)) {
      this.grant(handle);
      return handle;
    }
    return new Promise<RangeLockHandle>((resolve) => {
      this.waiters.push({ ...handle, grant: () => { this.grant(handle); resolve(handle); } });
    });
  }

  release(handle: RangeLockHandle): void {
    const removed = this.holders.delete(handle);
    assert(removed, 'release of a range that is not held');
    if (handle.exclusive) this.exclusiveHolders--;
    if (this.waiters.length > 0) this.wakeWaiters();
  }

  get heldCount(): number {
    return this.holders.size;
  }

  get waitingCount(): number {
    return this.waiters.length;
  }

  private grant(handle: RangeLockHandle): void {
    this.holders.add(handle);
    if (handle.exclusive) this.exclusiveHolders++;
  }

  /** A request may go ahead when it conflicts with no holder and with no earlier waiter
   *  (FIFO among conflicting requests, so an exclusive request is never starved). */
  private canGrant(request: RangeLockHandle, waitersAhead: number): boolean {
    const mustScanHolders = request.exclusive || this.exclusiveHolders > 0;
    if (mustScanHolders) {
      for (const holder of this.holders) {
        if ((request.exclusive || holder.exclusive) && overlaps(request, holder)) return false;
      }
    }
    for (let i = 0; i < waitersAhead; i++) {
      const waiter = this.waiters[i];
      if ((request.exclusive || waiter.exclusive) && overlaps(request, waiter)) return false;
    }
    return true;
  }

  private wakeWaiters(): void {
    let i = 0;
    while (i < this.waiters.length) {
      const waiter = this.waiters[i];
      if (this.canGrant(waiter, i)) {
        this.waiters.splice(i, 1);
        waiter.grant();
      } else {
        i++;
      }
    }
  }
}
