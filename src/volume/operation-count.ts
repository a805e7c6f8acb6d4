// A count of operations in progress, with waiters for the moment it reaches zero: the volume's
// in-flight I/O (drain before close) and its admitted client changes (drainAdmitted).
import assert from 'node:assert';

export class OperationCount {
  private count = 0;
  private idleWaiters: Array<() => void> = [];

  get value(): number {
    return this.count;
  }

  add(): void {
    this.count++;
  }

  done(): void {
    assert(this.count > 0, 'operation count below zero');
    this.count--;
    if (this.count === 0 && this.idleWaiters.length > 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  /** Resolves once no operation is in progress (at once when none is). */
  idle(): Promise<void> {
    if (this.count === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }
}
