// Applies operations in arrival order where they overlap, concurrently where they do not. The
// target of a mirror receives writes in the source's order (one TCP stream) but issues them to
// its device concurrently; two writes to the same bytes must still land in the order they were
// sent, or an older copy chunk could overwrite a newer client write.
import assert from 'node:assert';

interface Active {
  startBytes: number;
  endBytes: number;
  done: Promise<unknown>;
}

export class OverlapOrder {
  private readonly active = new Set<Active>();
  private readonly activeMax: number;

  /** activeMax bounds the scan per operation; the caller keeps fewer in flight. */
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
    const startBytes = offsetBytes;
    const endBytes = offsetBytes + lengthBytes;
    const before: Array<Promise<unknown>> = [];
    for (const other of this.active) {
      if (other.startBytes < endBytes && startBytes < other.endBytes) before.push(other.done);
    }
    const settled = (): void => undefined;
    const result = before.length === 0 ? operation() : Promise.all(before.map((done) => done.then(settled, settled))).then(operation);
    const entry: Active = { startBytes, endBytes, done: result };
    this.active.add(entry);
    const remove = (): void => {
      this.active.delete(entry);
    };
    result.then(remove, remove);
    return result;
  }

  /** Resolves when every operation started so far has settled. */
  async drain(): Promise<void> {
    const settled = (): void => undefined;
    await Promise.all([...this.active].map((entry) => entry.done.then(settled, settled)));
  }
}
