// The sync-mode timeout (issue 4 part 6, REC's Error state when forwarding is delayed): a
// forwarded client write or flush that the target has not acknowledged within the mirror's
// --sync-timeout either cracks the link (--on-timeout suspend: the write completes once local,
// its regions stay dirty) or keeps waiting for the target (--on-timeout block). This module
// keeps the bookkeeping out of mirror.ts: which forwarded operations are waiting and since when,
// with one timer armed for the oldest; the policy (what to do when one expires) is the mirror's.
// It also holds the rules for which mirror settings may be combined (mirror.add, mirror.set).
import type { MirrorRecord } from './mirror-store';
import { syncTimeoutMsDefault } from '../control/protocol';

export type OnTimeoutPolicy = 'suspend' | 'block';

/** The settings a mirror's data path depends on (MirrorRecord's, with the defaults applied). */
export interface MirrorSettings {
  mode: MirrorRecord['mode'];
  onDisconnect: MirrorRecord['onDisconnect'];
  syncTimeoutMs: number;
  onTimeout: OnTimeoutPolicy;
}

/** The default --on-timeout for an --on-disconnect policy: a strict mirror never lets a write
 *  the target lacks complete, so it blocks; others suspend. */
export function defaultOnTimeout(onDisconnect: MirrorRecord['onDisconnect']): OnTimeoutPolicy {
  return onDisconnect === 'block' ? 'block' : 'suspend';
}

/** A record's sync timeout and policy; records written before they existed get the defaults. */
export function syncPolicyOf(record: Pick<MirrorRecord, 'onDisconnect' | 'syncTimeoutMs' | 'onTimeout'>): { syncTimeoutMs: number; onTimeout: OnTimeoutPolicy } {
  return { syncTimeoutMs: record.syncTimeoutMs ?? syncTimeoutMsDefault, onTimeout: record.onTimeout ?? defaultOnTimeout(record.onDisconnect) };
}

/** Why a combination of settings makes no sense, or undefined when it is fine. */
export function settingsProblem(settings: MirrorSettings): string | undefined {
  if (settings.mode !== 'sync' && settings.onDisconnect === 'block') {
    return `onDisconnect: block holds writes the target lacks, but ${settings.mode} mode never waits for the target; use sync mode (or set onDisconnect to continue)`;
  }
  if (settings.onDisconnect === 'block' && settings.onTimeout === 'suspend') {
    return 'onTimeout: suspend lets a write the target did not acknowledge complete, but onDisconnect: block holds exactly those writes; use onTimeout block with onDisconnect block';
  }
  return undefined;
}

interface Waiting {
  sentMs: number;
  expired: boolean;
}

/**
 * Forwarded operations waiting for the target, oldest first (a Set keeps insertion order, and
 * operations are tracked as they are sent). One timer is armed at a time, for the oldest that has
 * not expired yet; when it fires, every operation older than the timeout is reported once.
 */
export class SyncDeadline {
  private readonly waiting = new Set<Waiting>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly timeoutMs: () => number,
    /** Called with how many operations just passed the timeout and how long the oldest waited. */
    private readonly onExpired: (count: number, waitedMs: number) => void,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Tracks `sent` until it settles; returns it. */
  track<T>(sent: Promise<T>): Promise<T> {
    const entry: Waiting = { sentMs: this.now(), expired: false };
    this.waiting.add(entry);
    this.arm();
    // The timer is left armed when the set empties: it fires at most once per timeout and finds
    // nothing, which costs less than a setTimeout/clearTimeout pair per write at queue depth 1.
    const done = (): void => {
      this.waiting.delete(entry);
    };
    sent.then(done, done);
    return sent;
  }

  /** The timeout changed: arm the timer again for the new value. */
  rearm(): void {
    this.disarm();
    this.arm();
  }

  /** Stops the timer (the mirror is stopping); tracked operations settle on their own. */
  close(): void {
    this.disarm();
    this.waiting.clear();
  }

  private arm(): void {
    if (this.timer !== undefined) return;
    let oldest: Waiting | undefined;
    for (const entry of this.waiting) {
      if (!entry.expired) {
        oldest = entry;
        break;
      }
    }
    if (oldest === undefined) return;
    const delayMs = Math.max(0, oldest.sentMs + this.timeoutMs() - this.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.check();
    }, Math.ceil(delayMs));
    this.timer.unref();
  }

  private disarm(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private check(): void {
    const nowMs = this.now();
    const timeoutMs = this.timeoutMs();
    let count = 0;
    let waitedMs = 0;
    for (const entry of this.waiting) {
      if (entry.expired) continue;
      if (nowMs - entry.sentMs < timeoutMs) break;
      entry.expired = true;
      count++;
      waitedMs = Math.max(waitedMs, nowMs - entry.sentMs);
    }
    if (count > 0) this.onExpired(count, waitedMs);
    this.arm();
  }
}
