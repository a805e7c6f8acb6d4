// Token bucket for a mirror's copy traffic (--max-rate). Live writes are never throttled: in
// synchronous mode that would throttle the application. The burst is one second of rate, at
// least one chunk, so a chunk larger than a second's budget still goes (after waiting).
import assert from 'node:assert';
import { setTimeout as sleep } from 'node:timers/promises';

export class RateLimit {
  private tokens: number;
  private lastMs: number;
  private readonly burstBytes: number;

  constructor(
    readonly bytesPerSecond: number,
    chunkBytesMax: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    assert(Number.isSafeInteger(bytesPerSecond) && bytesPerSecond > 0);
    this.burstBytes = Math.max(bytesPerSecond, chunkBytesMax);
    this.tokens = this.burstBytes;
    this.lastMs = now();
  }

  /** Waits until `bytes` may be sent, then spends them. */
  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      const nowMs = this.now();
      this.tokens = Math.min(this.burstBytes, this.tokens + ((nowMs - this.lastMs) * this.bytesPerSecond) / 1000);
      this.lastMs = nowMs;
      if (this.tokens >= bytes) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.ceil(((bytes - this.tokens) * 1000) / this.bytesPerSecond);
      await sleep(Math.max(1, waitMs), undefined, { signal });
    }
  }
}
