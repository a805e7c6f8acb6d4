// Registry changes (volumes, peers, mirrors) run one at a time, in arrival order, so two control
// clients never interleave a read-modify-write of a state file. Once closed (shutdown), new
// changes are refused with BM_ERR_SHUTTING_DOWN; the one running is allowed to finish.
import { BmError, ControlErrorCode } from '../control/errors';

export class ChangeQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private closed = false;

  run<T>(change: () => Promise<T>): Promise<T> {
    const result = this.tail.then(() => {
      if (this.closed) throw new BmError(ControlErrorCode.ShuttingDown, 'the daemon is shutting down');
      return change();
    });
    this.tail = result.catch(() => undefined);
    return result;
  }

  /** Waits for the changes already queued, then refuses new ones. */
  async close(): Promise<void> {
    await this.run(async () => {
      this.closed = true;
    }).catch(() => undefined);
  }
}
