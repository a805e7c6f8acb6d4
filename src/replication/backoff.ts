// Exponential backoff with full jitter for RESET retries (AWS "Exponential Backoff And Jitter"):
// the n-th delay is uniform in [0, min(maxMs, baseMs * 2^n)]. Full jitter spreads reconnect storms
// after a target restart; the cap bounds how long an admin waits after fixing a transient cause.
// Time and randomness are injected so tests are deterministic; this module owns no timers.

import assert from 'node:assert';

/** Upper bound on maxMs: one hour. A longer retry interval looks like a hung mirror. */
export const BACKOFF_MAX_MS_LIMIT = 3_600_000;

export interface BackoffOptions {
  /** First ceiling (attempt 0), in ms. Integer >= 1. */
  baseMs: number;
  /** Ceiling never exceeded, in ms. Integer, baseMs <= maxMs <= BACKOFF_MAX_MS_LIMIT. */
  maxMs: number;
  /** Uniform source in [0, 1). Math.random in production, seededRandom(seed) in tests. */
  random: () => number;
}

export class BackoffOptionsError extends RangeError {
  readonly code = 'BM_ERR_BACKOFF_OPTIONS';
  constructor(message: string) {
    super(message);
    this.name = 'BackoffOptionsError';
  }
}

export class ExponentialBackoff {
  readonly baseMs: number;
  readonly maxMs: number;
  private readonly random: () => number;
  /** Failures since the last success; the exponent saturates once the ceiling reaches maxMs. */
  private attemptCount = 0;

  constructor(options: BackoffOptions) {
    const { baseMs, maxMs, random } = options;
    if (!Number.isSafeInteger(baseMs) || baseMs < 1) {
      throw new BackoffOptionsError(`baseMs must be an integer >= 1, got ${baseMs}`);
    }
    if (!Number.isSafeInteger(maxMs) || maxMs < baseMs || maxMs > BACKOFF_MAX_MS_LIMIT) {
      throw new BackoffOptionsError(
        `maxMs must be an integer in [baseMs=${baseMs}, ${BACKOFF_MAX_MS_LIMIT}], got ${maxMs}`,
      );
    }
    if (typeof random !== 'function') throw new BackoffOptionsError('random must be a function');
    this.baseMs = baseMs;
    this.maxMs = maxMs;
    this.random = random;
  }

  /** Number of delays handed out since construction or the last reset(). */
  get attempts(): number {
    return this.attemptCount;
  }

  /** The ceiling the next delay is drawn under, in ms. */
  ceilingMs(): number {
    // Doubling stops at maxMs, so the product never grows past 2 * maxMs: no overflow, no Infinity.
    let ceilingMs = this.baseMs;
    for (let i = 0; i < this.attemptCount && ceilingMs < this.maxMs; i++) ceilingMs *= 2;
    return Math.min(ceilingMs, this.maxMs);
  }

  /** Delay before the next retry, in whole ms, uniform in [0, ceilingMs()]. Counts one attempt. */
  nextDelayMs(): number {
    const ceilingMs = this.ceilingMs();
    const sample = this.random();
    assert(Number.isFinite(sample), 'random() must return a finite number');
    assert(sample >= 0 && sample < 1, `random() must return a value in [0, 1), got ${sample}`);
    const delayMs = Math.floor(sample * (ceilingMs + 1));
    assert(delayMs >= 0 && delayMs <= ceilingMs);
    // The count saturates with the ceiling: it only feeds the exponent and status.
    if (this.attemptCount < Number.MAX_SAFE_INTEGER) this.attemptCount++;
    return delayMs;
  }

  /** Called after a success (the mirror reached READY): the next failure starts at baseMs again. */
  reset(): void {
    this.attemptCount = 0;
  }
}

/**
 * Deterministic uniform source in [0, 1) from a 32-bit seed (mulberry32). For tests and fault
 * injection, so a failing run can print `reproduce with seed=...`; not for anything secret.
 */
export function seededRandom(seed: number): () => number {
  assert(Number.isInteger(seed), 'seed must be an integer');
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
