// One mirror: a source volume replicated to a target volume on a peer daemon. It drives the
// state machine (mirror-state.ts) with what really happens on the link, keeps the dirty bitmap
// of what the target lacks (FastResync), copies dirty regions while the volume stays live, and
// is the volume's VolumeReplica: every client write is forwarded (synchronous mode) or recorded
// dirty. See docs/MIRROR-STATES.md and docs/PROTOCOL.md.
//
// The one invariant everything rests on: a region is clean in `dirty` only if the target has
// acknowledged the bytes the source holds there, or a send of them is in flight that will either
// be acknowledged or put the region back. Writes on the dirty path set their bits before and
// after their local write; a forwarded write that is not acknowledged sets them once its local
// write has finished; a copy chunk clears its bits under the volume's range lock, in the same
// critical section in which it reads and sends the bytes.
import assert from 'node:assert';
import type { Logger } from 'pino';
import { asyncBufferBytesDefault, type MirrorInfo, type MirrorRecovery, type SplitBrainDiscard, type WriteIntentInfo } from '../control/protocol';
import { Capability } from '../wire/index';
import { BufferPool, DirtyBitmap, type DirtyRun } from '../native/index';
import type { ReplicaSource, VolumeReplica } from '../volume/replica';
import { ExponentialBackoff } from './backoff';
import { MIRROR_ERROR_REASON_CHARS_MAX, type MirrorRecord } from './mirror-store';
import { MirrorStateMachine, type MirrorErrorCode, type MirrorEvent, type MirrorTransition } from './mirror-state';
import { RateLimit } from './rate-limit';
import { LinkSetupError, SourceLink, type SendResult } from './source-link';
import { SyncDeadline, syncPolicyOf, type MirrorSettings } from './sync-timeout';
import { dirtyRunsBetween } from '../write-intent/bitmap-file';
import { newGeneration } from './generation';
import { bitmapPartsMax, PeerBitmapReceiver, restoreFromPeer } from './split-brain';

/** Dirty-bitmap granularity: 64 KiB regions cost 2 MiB of bitmap per TiB. */
export const REGION_BYTES = 64 * 1024;

/** A client write held by the mirror (strict mode, or a restore), until released or failed. */
interface Waiter {
  resolve: () => void;
  reject: (error: Error) => void;
}

/** Lets every waiter go on, or fails them all with `error`; the list is emptied first. */
function releaseWaiters(waiters: Waiter[], error?: Error): void {
  for (const waiter of waiters.splice(0)) {
    if (error === undefined) waiter.resolve();
    else waiter.reject(error);
  }
}
/** A target failing to record the resolve this many times in a row: ERROR, for the admin (client
 *  writes held by a restore then fail instead of waiting without bound). */
const RESOLVE_FAILURES_MAX = 3;
/** Largest copy chunk, and how many may be in flight: bounds the copier's memory to 8 MiB. */
const CHUNK_BYTES_MAX = 1024 * 1024;
const CHUNKS_IN_FLIGHT_MAX = 8;
/** With acknowledged but unflushed data on the target, flush it at least this often, so a
 *  crack resends little more than what was really missed. */
const TARGET_FLUSH_INTERVAL_MS = 1000;
const ZERO_CHUNK = Buffer.alloc(CHUNK_BYTES_MAX);
/** How long a stopping mirror waits for its last target flush. */
const STOP_FLUSH_MS_MAX = 2000;
/** How long, at shutdown, client writes may wait for the target's acknowledgements. */
const SHUTDOWN_ACK_WAIT_MS = 5000;

export interface PeerEndpoint {
  host: string;
  port: number;
  secret: Buffer;
}

export interface MirrorTiming {
  connectTimeoutMs: number;
  ackTimeoutMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
}

export const defaultMirrorTiming: MirrorTiming = {
  connectTimeoutMs: 10_000,
  ackTimeoutMs: 30_000,
  backoffBaseMs: 500,
  backoffMaxMs: 30_000,
};

export interface MirrorOptions {
  record: MirrorRecord;
  volume: ReplicaSource;
  nodeName: string;
  /** Address and secret of the peer, read when connecting (the admin may rotate the secret). */
  resolvePeer: () => PeerEndpoint;
  /** The source volume's FastResync setting, read at each READY decision. */
  fastResync: () => boolean;
  /** Persists a changed record; throws when the state dir cannot be written. */
  persist: (record: MirrorRecord) => void;
  /** What the target may lack as the daemon starts (all dirty for a new mirror; from the
   *  write-intent metadata after a restart), and where that came from. */
  initialDirty: DirtyBitmap;
  recovery: MirrorRecovery;
  /** The source volume's write-intent log statistics (null: switched off). */
  writeIntentInfo: () => WriteIntentInfo | null;
  /** Called when regions became durable on the target: their persistent bits may be cleared. */
  onTargetDurable: () => void;
  /** Writes the persistent bitmap now (before INSYNC is reported, so a crash right after a
   *  copy does not copy it again). */
  persistBitmap: () => Promise<void>;
  timing: MirrorTiming;
  logger: Logger;
}

class Wakeup {
  private waiters: Array<() => void> = [];
  wait(timeoutMs?: number): Promise<void> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (timer !== undefined) clearTimeout(timer);
        resolve();
      };
      this.waiters.push(done);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiters = this.waiters.filter((waiter) => waiter !== done);
          resolve();
        }, timeoutMs);
      }
    });
  }
  notify(): void {
    for (const waiter of this.waiters.splice(0)) waiter();
  }
}

export class MirrorError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
    this.name = 'MirrorError';
  }
}

export class Mirror implements VolumeReplica {
  private record: MirrorRecord;
  readonly volume: ReplicaSource;
  private readonly options: MirrorOptions;
  private readonly logger: Logger;
  readonly machine: MirrorStateMachine;
  /** Regions the target lacks. */
  private readonly dirty: DirtyBitmap;
  /** Regions the target acknowledged but has not flushed: lost with a crashed target host, so
   *  they count as dirty when the link drops without a flush. */
  private unflushed: DirtyBitmap;
  private readonly backoff: ExponentialBackoff;
  private rateLimit: RateLimit | undefined;
  /** Aborted when the mirror stops or its rate changes: a copy waiting for the old rate stops waiting. */
  private rateAbort = new AbortController();
  /** Forwarded client writes and flushes waiting for the target, against --sync-timeout. */
  private readonly deadline: SyncDeadline;
  private syncTimeouts = { count: 0, lastAtMs: null as number | null };
  /** Why the engine itself cut `link` (the sync timeout), for the crack's cause. */
  private crackCause: { link: SourceLink; code: string; reason: string } | null = null;
  private readonly pool = new BufferPool({ maxPooledBytes: CHUNK_BYTES_MAX * CHUNKS_IN_FLIGHT_MAX, alignBytes: 4096 });
  /** Wakes the driver: admin commands, link closed, stop. */
  private readonly wakeup = new Wakeup();
  /** Wakes INSYNC's watch when a write left a region dirty (a separate channel, so data events
   *  never cut a RESET backoff short). */
  private readonly dirtied = new Wakeup();
  private readonly abort = new AbortController();
  private link: SourceLink | null = null;
  private driver: Promise<void> | null = null;
  private stopping = false;
  /** Set by stop('remove'): writes are no longer held, and held ones go on. */
  private releaseOnStop = false;
  private shutdownTimer: NodeJS.Timeout | undefined;
  /** A severe failure seen on the data path, for the driver to act on. */
  private pendingSevere: { code: MirrorErrorCode; reason: string } | null = null;
  /** Writes held by a strict mirror until it is in sync again. */
  private readonly held: Waiter[] = [];
  private nextRetryAtMs: number | null = null;
  private lastTargetFlushMs = 0;
  private pass = { startMs: 0, copiedBytes: 0 };
  private readonly sent = { liveBytes: 0, copyBytes: 0, zeroBytes: 0, liveWrites: 0 };
  /** Regions between "clean in dirty" and "acknowledged": copy chunks sent and not yet answered,
   *  and what target flushes in progress cover. They may still differ (mayDiffer). */
  private readonly copiesInFlight = new Set<DirtyRun>();
  private readonly flushesInFlight = new Set<DirtyBitmap>();
  /** Async mode: writes sent in order and not yet acknowledged (the bounded buffer). */
  private readonly asyncInFlight = new Set<DirtyRun>();
  private asyncBytes = 0;
  private asyncOverflows = 0;
  private asyncEpochs = 0;
  /** Async mode's current epoch: the link it was sent on, and whether a client write was
   *  acknowledged since it began (the next ordered write then depends on it: a new epoch). */
  private asyncEpoch: { link: SourceLink | null; acknowledged: boolean } = { link: null, acknowledged: true };
  /** Split brain resolved with --discard this: from the first restored byte until the target
   *  acknowledged the Resolve (record.restoring, kept across link drops and restarts), client
   *  writes wait at admit(). A retry restores the target's regions again (and whatever is still
   *  dirty), so a client write let through between two tries would be overwritten with the
   *  target's older bytes. */
  private readonly restoreWaiters: Waiter[] = [];
  /** The restore's own writes, recognised by their memory (the volume hands replicas views of
   *  it, not the same Buffer object). */
  private readonly restoring = new Set<ArrayBufferLike>();
  /** Regions the running restore wrote and no client write touched since: their dirty bits are
   *  cleared only once the local device is flushed (a lost cache must not leave them clean). */
  private restoredUnflushed: DirtyBitmap | null = null;
  private restoredBytes = 0;
  /** Resolves the target failed to record in a row (RESOLVE_FAILURES_MAX: ERROR). */
  private resolveFailures = 0;

  constructor(options: MirrorOptions) {
    this.options = options;
    this.record = options.record;
    this.volume = options.volume;
    this.logger = options.logger.child({ mirror: `${this.record.volume}->${this.record.peer}:${this.record.target}` });
    const sizeBytes = this.volume.info().sizeBytes;
    this.machine = new MirrorStateMachine({ now: Date.now });
    this.machine.onTransition((transition) => this.onTransition(transition));
    assert(options.initialDirty.sizeBytes === sizeBytes && options.initialDirty.regionBytes === REGION_BYTES, 'initial bitmap geometry');
    this.dirty = options.initialDirty;
    this.unflushed = new DirtyBitmap(sizeBytes, REGION_BYTES);
    this.backoff = new ExponentialBackoff({ baseMs: options.timing.backoffBaseMs, maxMs: options.timing.backoffMaxMs, random: Math.random });
    this.rateLimit = this.record.maxRateBytesPerSec === null ? undefined : new RateLimit(this.record.maxRateBytesPerSec, CHUNK_BYTES_MAX);
    this.deadline = new SyncDeadline(() => syncPolicyOf(this.record).syncTimeoutMs, (count, waitedMs) => this.syncTimedOut(count, waitedMs));
    const restoredError = this.record.error;
    if (restoredError !== null) {
      // Restored across a restart: ERROR waits for the admin, with the reason it had. A choice
      // left from before (see onTransition) is dropped in memory only: the manager has not
      // registered this mirror yet, so nothing may be persisted from here.
      if (this.record.resolve !== undefined) this.record = { ...this.record, resolve: undefined };
      this.machine.fire({ type: 'start', reason: 'restoring the state saved before the restart' });
      this.machine.fire({ type: 'validationFailed', code: restoredError.code, reason: `${restoredError.reason} (before the restart)` });
    }
  }

  get key(): { volume: string; peer: string } {
    return { volume: this.record.volume, peer: this.record.peer };
  }

  get currentRecord(): MirrorRecord {
    return this.record;
  }

  /** Starts driving the mirror (connecting unless suspended or in ERROR). */
  start(): void {
    assert(this.driver === null);
    this.volume.attachReplica(this);
    this.driver = this.drive().catch((error: unknown) => {
      this.logger.error({ err: error }, 'mirror driver failed');
    });
  }

  /** Stops the link and the driver. At shutdown held writes fail with ESHUTDOWN; when the
   *  mirror is removed they go on (the volume stays in service, now without this mirror).
   *  Returns the dirty bitmap (everything the target may lack) for saving. */
  async stop(reason: string, why: 'shutdown' | 'remove' = 'shutdown'): Promise<DirtyBitmap> {
    this.stopping = true;
    this.releaseOnStop = why === 'remove';
    this.releaseHeld(this.releaseOnStop ? undefined : this.shutdownError());
    if (this.releaseOnStop && this.record.restoring === true) {
      this.logger.warn('mirror removed in the middle of restoring the target\'s bytes (resolve --discard this): client writes go on over a partly restored volume');
    }
    this.releaseRestoreWaiters(this.releaseOnStop ? undefined : this.shutdownError());
    // A last flush lets the saved bitmap leave out what the target already holds durably;
    // bounded, because a stuck target must not hold up the shutdown.
    const link = this.liveLink();
    if (link !== null && this.unflushed.count() > 0) {
      await Promise.race([this.flushTarget(link), new Promise((resolve) => setTimeout(resolve, STOP_FLUSH_MS_MAX).unref())]);
    }
    if (this.shutdownTimer !== undefined) clearTimeout(this.shutdownTimer);
    this.abort.abort();
    this.rateAbort.abort();
    this.deadline.close();
    this.link?.close(reason);
    this.wakeup.notify();
    this.dirtied.notify();
    await this.driver;
    this.volume.detachReplica(this);
    if (this.machine.canFire('stop')) this.machine.fire({ type: 'stop', reason });
    this.dirty.merge(this.unflushed);
    this.unflushed = new DirtyBitmap(this.dirty.sizeBytes, REGION_BYTES);
    return this.dirty;
  }

  /** Fails held writes (ESHUTDOWN) so the NBD server can drain before the mirror stops, and
   *  bounds the wait for the target's acknowledgements: after SHUTDOWN_ACK_WAIT_MS the link is
   *  closed, so writes waiting for a stalled target settle (their regions dirty) well inside
   *  the daemon's shutdown limit and the bitmap still gets saved. */
  releaseHeldForShutdown(): void {
    this.stopping = true;
    this.releaseHeld(this.shutdownError());
    this.releaseRestoreWaiters(this.shutdownError());
    this.shutdownTimer ??= setTimeout(() => this.link?.close('the daemon is stopping and the target did not answer in time'), SHUTDOWN_ACK_WAIT_MS).unref();
  }

  private shutdownError(): MirrorError {
    return new MirrorError('ESHUTDOWN', `mirror of ${this.record.volume} is stopping`);
  }

  // --- admin commands ------------------------------------------------------------------------

  suspend(): void {
    this.refuseUnlessAllowed('suspend');
    this.update({ suspended: true });
    this.releaseHeld(); // suspended means unprotected by the admin's choice: nothing is held
    // ... except by an unfinished restore: letting writes through would have a later retry
    // overwrite them, so they fail until the admin resumes.
    if (this.restorePending()) this.releaseRestoreWaiters(this.restoreError());
    this.link?.close('suspended by the admin');
    this.wakeup.notify();
  }

  resume(): void {
    this.refuseUnlessAllowed('resume');
    this.update({ suspended: false });
    if (this.machine.state === 'ERROR' || this.machine.state === 'RESET') this.machine.fire({ type: 'adminResume' });
    this.backoff.reset();
    this.wakeup.notify();
  }

  /** Clears an ERROR; the next connection starts a full copy under a new generation. */
  reset(): void {
    this.refuseUnlessAllowed('reset');
    this.update({ generation: newGeneration(), fullCopyDone: false, suspended: false });
    this.dirty.setRange(0, this.dirty.sizeBytes);
    this.machine.fire({ type: 'adminReset' });
    this.backoff.reset();
    this.wakeup.notify();
  }

  /** Split brain: the admin picked the side to discard. The next connection merges both
   *  sides' changes and resyncs (discard peer) or restores (discard this) only their union. */
  resolve(discard: SplitBrainDiscard): void {
    const refusal = this.machine.commandAllowed('resolve');
    if (refusal !== undefined) throw new MirrorError(refusal.code, refusal.message);
    if (this.record.error?.code !== 'BM_ERR_SPLIT_BRAIN') {
      throw new MirrorError('BM_ERR_MIRROR_COMMAND_NOT_ALLOWED', `resolve is not allowed: the mirror is in ERROR ${this.record.error?.code ?? ''}, not in a split brain`);
    }
    this.update({ resolve: discard, suspended: false });
    this.resolveFailures = 0;
    this.machine.fire({ type: 'adminResume', reason: `split brain: resolve --discard ${discard} by the admin` });
    this.backoff.reset();
    this.wakeup.notify();
  }

  /** mirror.set: the mode and policies apply from the next client write, the rate from the next
   *  copy chunk. The manager checked the combination (settingsProblem). */
  set(change: Partial<MirrorSettings> & { maxRateBytesPerSec?: number | null }): void {
    if (change.mode !== undefined && change.mode !== this.record.mode) {
      const refusal = this.machine.commandAllowed('set-mode');
      if (refusal !== undefined) throw new MirrorError(refusal.code, refusal.message);
      // Checked at connect too; refused here so the mirror does not go on looking INSYNC while
      // every write only marks the bitmap until the next reconnect puts it in ERROR.
      const link = this.link;
      if (change.mode === 'async' && link !== null && link.isOpen && !this.takesOrderedWrites(link)) {
        throw new MirrorError('BM_ERR_TARGET_UNSUPPORTED', `the daemon on ${this.record.peer} does not support ordered writes, which async mode needs; upgrade it or use sync or stack mode`);
      }
    }
    this.update(Object.fromEntries(Object.entries(change).filter(([, value]) => value !== undefined)));
    if (change.maxRateBytesPerSec !== undefined) {
      this.rateLimit = change.maxRateBytesPerSec === null ? undefined : new RateLimit(change.maxRateBytesPerSec, CHUNK_BYTES_MAX);
      const previous = this.rateAbort;
      this.rateAbort = new AbortController();
      previous.abort();
    }
    if (change.syncTimeoutMs !== undefined) this.deadline.rearm();
    // Held writes look again: the mirror may no longer hold them (stack, continue, suspend).
    if (!this.isStrict()) this.releaseHeld();
  }

  checkRemovable(force: boolean): void {
    const refusal = this.machine.commandAllowed('remove', { force });
    if (refusal !== undefined) throw new MirrorError(refusal.code, refusal.message);
  }

  markRemoved(): void {
    if (this.machine.canFire('remove')) this.machine.fire({ type: 'remove' });
  }

  info(): MirrorInfo {
    const status = this.machine.toStatus();
    // A chunk sent but not yet acknowledged is still missing on the target.
    let dirtyBytes = this.dirty.dirtyBytes();
    for (const copy of this.copiesInFlight) dirtyBytes += copy.lengthBytes;
    const elapsedS = (Date.now() - this.pass.startMs) / 1000;
    const copying = status.state === 'REPLICATE' || (status.state === 'OUTOFSYNC' && status.linkUp);
    const rate = copying && elapsedS > 0 ? this.pass.copiedBytes / elapsedS : 0;
    const total = this.pass.copiedBytes + dirtyBytes;
    const progress = total === 0 ? 100 : (100 * this.pass.copiedBytes) / total;
    return {
      volume: this.record.volume,
      peer: this.record.peer,
      target: this.record.target,
      mode: this.record.mode,
      onDisconnect: this.record.onDisconnect,
      maxRateBytesPerSec: this.record.maxRateBytesPerSec,
      ...syncPolicyOf(this.record),
      syncTimeouts: this.syncTimeouts.count,
      lastSyncTimeoutAt: this.syncTimeouts.lastAtMs === null ? null : new Date(this.syncTimeouts.lastAtMs).toISOString(),
      state: status.state,
      since: status.since,
      cause: { ...status.cause },
      error: status.errorCode === null ? null : { code: status.errorCode, reason: status.errorReason ?? '' },
      suspended: this.record.suspended,
      linkUp: status.linkUp,
      fullCopyDone: this.record.fullCopyDone,
      fastResync: this.options.fastResync(),
      sizeBytes: this.dirty.sizeBytes,
      dirtyBytes,
      progressPercent: Math.floor(progress * 10) / 10,
      copiedBytes: this.pass.copiedBytes,
      rateBytesPerSec: Math.round(rate),
      etaSeconds: rate > 0 ? Math.ceil(dirtyBytes / rate) : null,
      sent: { ...this.sent },
      nextRetryAt: this.nextRetryAtMs === null ? null : new Date(this.nextRetryAtMs).toISOString(),
      history: status.history.slice(-10).map((entry) => ({
        from: entry.from,
        to: entry.to,
        event: entry.cause.event,
        reason: entry.cause.reason,
        code: entry.cause.code,
        at: new Date(entry.atMs).toISOString(),
      })),
      async:
        this.record.mode === 'async'
          ? { ordered: this.isOrdered() && this.copiesInFlight.size === 0, bufferBytes: this.asyncBufferBytes(), bufferedBytes: this.asyncBytes, bufferedWrites: this.asyncInFlight.size, overflows: this.asyncOverflows, writes: this.sent.liveWrites, epochs: this.asyncEpochs }
          : null,
      recovery: { ...this.options.recovery },
      writeIntent: this.options.writeIntentInfo(),
      splitBrain: this.record.splitBrain === undefined ? null : { ...this.record.splitBrain, resolving: this.record.resolve ?? null, restoring: this.record.restoring === true },
      received: { restoreBytes: this.restoredBytes },
    };
  }

  /** Regions of [startBytes, endBytes) whose bytes the target may not hold durably: dirty,
   *  acknowledged but not flushed, or in transit. The write-intent log persists these. */
  mayDiffer(startBytes: number, endBytes: number): DirtyRun[] {
    const runs: DirtyRun[] = [];
    for (const bitmap of [this.dirty, this.unflushed, ...this.flushesInFlight]) dirtyRunsBetween(bitmap, startBytes, endBytes, runs);
    for (const inTransit of [this.copiesInFlight, this.asyncInFlight]) {
      for (const run of inTransit) {
        if (run.offsetBytes < endBytes && run.offsetBytes + run.lengthBytes > startBytes) runs.push(run);
      }
    }
    return runs;
  }

  // --- VolumeReplica -------------------------------------------------------------------------

  admit(): Promise<void> | void {
    if (this.stopping && this.releaseOnStop) return; // removed: nothing is held any more
    if (this.restorePending()) return this.waitForRestore().then(() => this.admit());
    // Asked again once released: a restore may have begun while the write was held.
    if (this.mustHold()) return this.hold().then(() => this.admit());
  }

  replicateWrite(offsetBytes: number, data: Buffer, fua: boolean, local: Promise<void>, restore = false): Promise<void> {
    if (this.restoring.has(data.buffer)) {
      // Our own restore: once written and flushed, the source holds the target's bytes there.
      // Noted here, under the range lock, so a client write after it takes the region out again.
      this.restoredUnflushed?.setRange(offsetBytes, data.length);
      return local.catch(() => {
        this.forgetRestored(offsetBytes, data.length);
        this.markDirty(offsetBytes, data.length);
      });
    }
    this.forgetRestored(offsetBytes, data.length);
    if (this.record.mode === 'async') return this.forwardOrdered(offsetBytes, data.length, data, local);
    return this.forward(offsetBytes, data.length, local, (link, ordered) => link.write(offsetBytes, data, data.length, fua, ordered), !restore);
  }

  replicateZeroes(offsetBytes: number, lengthBytes: number, fua: boolean, local: Promise<void>): Promise<void> {
    this.forgetRestored(offsetBytes, lengthBytes);
    if (this.record.mode === 'async') return this.forwardOrdered(offsetBytes, lengthBytes, undefined, local);
    return this.forward(offsetBytes, lengthBytes, local, (link, ordered) => link.write(offsetBytes, undefined, lengthBytes, fua, ordered));
  }

  async replicateFlush(): Promise<void> {
    // Stack and async modes promise nothing about when the target has it: a flush is the local
    // device's alone.
    if (this.record.mode !== 'sync') return;
    const link = this.liveLink();
    if (link === null) {
      // Nothing to make durable there; what the target lacks is dirty. A strict mirror holds
      // the flush like a write: it must not report durability it does not have.
      await this.holdWhileUnprotected();
      return;
    }
    const result = await this.deadline.track(this.flushTarget(link));
    // Even a flush the target confirmed: while a strict mirror resyncs, writes acknowledged
    // before it may still be dirty, so it is held until INSYNC (reached through a target flush).
    await this.holdWhileUnprotected(undefined, undefined, result !== 'ok');
  }

  // --- data path -----------------------------------------------------------------------------

  /** The link when live writes are forwarded on it: connected and past the READY decision. */
  private liveLink(): SourceLink | null {
    const link = this.link;
    if (link === null || !link.isOpen) return null;
    const state = this.machine.state;
    return state === 'REPLICATE' || state === 'OUTOFSYNC' || state === 'INSYNC' ? link : null;
  }

  /** `mayHold` false: a strict mirror does not hold this write (another mirror's restore). */
  private forward(offsetBytes: number, lengthBytes: number, local: Promise<void>, send: (link: SourceLink, ordered: boolean) => Promise<SendResult>, mayHold = true): Promise<void> {
    const link = this.liveLink();
    // In INSYNC every write is forwarded, even into a region a rare race left dirty: what the
    // client is told is on the target must be there. While copying, a region not yet copied is
    // only marked: the copier will send what the local device holds once this write is done.
    const behind = this.machine.state !== 'INSYNC' && this.dirty.testRange(offsetBytes, lengthBytes);
    // Stack mode never forwards: the write only marks its regions, which the copier ships.
    if (link === null || behind || this.record.mode === 'stack') {
      this.markDirty(offsetBytes, lengthBytes);
      return this.settle(local, offsetBytes, lengthBytes, Promise.resolve<SendResult>('lost'), false, mayHold);
    }
    this.sent.liveWrites++;
    this.sent.liveBytes += lengthBytes;
    // Recorded the moment the target answers or the link drops, not after the local write: a
    // reconnect in between must find the region dirty (or unflushed) in the bitmaps.
    // Just after a switch from async mode, ordered writes may still be on their way: this one
    // lands after them (it starts an epoch on the target), or a sync write the client saw
    // acknowledged could be on the target without an async one acknowledged before it.
    const sent = this.deadline.track(send(link, this.asyncInFlight.size > 0)).then((result) => {
      if (result === 'ok') {
        this.unflushed.setRange(offsetBytes, lengthBytes);
      } else {
        this.markDirty(offsetBytes, lengthBytes);
        if (result === 'failed') this.targetFailed(link);
      }
      return result;
    });
    return this.settle(local, offsetBytes, lengthBytes, sent, true, mayHold);
  }

  /**
   * Async consistency mode (REC async consistency, DRBD protocol A): the client's write is done
   * once local; it travels to the target as an ordered write (applied after every earlier one,
   * so the target always holds a prefix of the source's writes). What is sent and not yet
   * acknowledged is bounded; when that buffer is full, or the write's region is dirty (catching
   * up after a fallback or a crack), it only marks the bitmap; the target is crash consistent
   * again once the copier has made the bitmap clean.
   */
  private async forwardOrdered(offsetBytes: number, lengthBytes: number, data: Buffer | undefined, local: Promise<void>): Promise<void> {
    const link = this.liveLink();
    const overflow = this.asyncBytes + lengthBytes > this.asyncBufferBytes();
    // While catching up, a write into a region the copier still owes only marks it (the copier
    // sends what the device holds then); a write into a clean region still goes out ordered,
    // so the bitmap only shrinks and catching up ends even under a steady write load.
    const behind = this.dirty.testRange(offsetBytes, lengthBytes);
    if (link === null || !this.takesOrderedWrites(link) || overflow || behind) {
      if (link !== null && overflow && this.isOrdered()) {
        this.asyncOverflows++;
        this.logger.warn({ bufferedBytes: this.asyncBytes, bufferBytes: this.asyncBufferBytes() }, 'async buffer full: tracking writes in the dirty bitmap until the target catches up');
      }
      this.markDirty(offsetBytes, lengthBytes);
      return this.settle(local, offsetBytes, lengthBytes, Promise.resolve<SendResult>('lost'), false);
    }
    // The client may reuse its buffer as soon as we return: the buffer holds a copy.
    const payload = data === undefined ? undefined : Buffer.from(data);
    const entry: DirtyRun = { offsetBytes, lengthBytes };
    this.asyncInFlight.add(entry);
    this.asyncBytes += lengthBytes;
    this.sent.liveWrites++;
    this.sent.liveBytes += lengthBytes;
    // Write-order fidelity: a write the client issued after another was acknowledged may depend
    // on it, so it starts a new epoch (WRITE_FLAG_ORDERED: the target applies it, and every
    // write after it, once every earlier write landed). Writes issued with none acknowledged in
    // between were concurrent on the source too and land in any order within their epoch. A
    // catch-up copy still in flight also starts one.
    const startsEpoch = this.asyncEpoch.link !== link || this.asyncEpoch.acknowledged || this.copiesInFlight.size > 0;
    if (startsEpoch) this.asyncEpoch = { link, acknowledged: false };
    this.asyncEpochs += startsEpoch ? 1 : 0;
    void link.write(offsetBytes, payload, lengthBytes, false, startsEpoch).then((result) => {
      if (result === 'ok') this.unflushed.setRange(offsetBytes, lengthBytes);
      else this.markDirty(offsetBytes, lengthBytes);
      this.asyncInFlight.delete(entry);
      this.asyncBytes -= lengthBytes;
      if (result === 'failed') this.targetFailed(link);
    });
    // A failed local write leaves bytes on the target the source does not hold.
    await local.catch(() => this.markDirty(offsetBytes, lengthBytes));
    // The client is answered from here on: later writes may depend on this one.
    this.asyncEpoch.acknowledged = true;
  }

  private takesOrderedWrites(link: SourceLink): boolean {
    return (link.reply.capabilities & Capability.ORDERED_WRITES) !== 0;
  }

  /** Async mode is ordered (the target crash consistent): in sync, nothing owed, and the
   *  target takes ordered writes. */
  private isOrdered(): boolean {
    const link = this.liveLink();
    return link !== null && this.machine.state === 'INSYNC' && this.dirty.count() === 0 && this.takesOrderedWrites(link);
  }

  private asyncBufferBytes(): number {
    return this.record.asyncBufferBytes ?? asyncBufferBytesDefault;
  }

  private async settle(local: Promise<void>, offsetBytes: number, lengthBytes: number, sent: Promise<SendResult>, forwarded: boolean, mayHold = true): Promise<void> {
    let localFailed = false;
    await local.catch(() => {
      localFailed = true;
    });
    const result = await sent;
    if (result === 'ok' && !localFailed) return;
    // Again after the local write: a copy that read the region before it finished must not be
    // the last word; and when the local write failed, the target may hold bytes we do not.
    this.markDirty(offsetBytes, lengthBytes);
    if (!localFailed && mayHold) await this.holdWhileUnprotected(offsetBytes, lengthBytes, forwarded);
  }

  /** Forwarded writes or flushes waited longer than --sync-timeout. suspend: cut the link, so
   *  they settle 'lost' (their regions dirty) and complete for the client; the driver cracks to
   *  OUTOFSYNC with this cause and reconnects. block: they keep waiting (the ack timeout bounds
   *  that), and settle() holds what the target did not get. */
  private syncTimedOut(count: number, waitedMs: number): void {
    this.syncTimeouts.count += count;
    this.syncTimeouts.lastAtMs = Date.now();
    const { syncTimeoutMs, onTimeout } = syncPolicyOf(this.record);
    const link = this.link;
    if (onTimeout === 'block' || link === null || !link.isOpen) {
      this.logger.warn({ count, waitedMs: Math.round(waitedMs), syncTimeoutMs }, 'the target is slower than the sync timeout; writes keep waiting for it (--on-timeout block)');
      return;
    }
    const reason = `sync timeout: the target did not acknowledge a forwarded write or flush within ${syncTimeoutMs} ms (--on-timeout suspend); writes go on, tracked in the dirty bitmap`;
    this.logger.warn({ count, waitedMs: Math.round(waitedMs), syncTimeoutMs }, 'the target is slower than the sync timeout; cracking the link (--on-timeout suspend)');
    this.crackCause ??= { link, code: 'BM_ERR_SYNC_TIMEOUT', reason };
    link.close(reason);
  }

  /** A write after the restore's in a region: the region stays dirty after the restore. */
  private forgetRestored(offsetBytes: number, lengthBytes: number): void {
    const restored = this.restoredUnflushed;
    if (restored === null) return;
    // Every region the range touches (clearRange only clears regions fully inside).
    const start = Math.floor(offsetBytes / REGION_BYTES) * REGION_BYTES;
    const end = Math.min(restored.sizeBytes, Math.ceil((offsetBytes + lengthBytes) / REGION_BYTES) * REGION_BYTES);
    restored.clearRange(start, end - start);
  }

  private markDirty(offsetBytes: number, lengthBytes: number): void {
    this.dirty.setRange(offsetBytes, lengthBytes);
    this.dirtied.notify();
  }

  private async flushTarget(link: SourceLink): Promise<SendResult> {
    const covered = this.unflushed.snapshotAndClear();
    this.flushesInFlight.add(covered);
    this.lastTargetFlushMs = performance.now();
    const result = await link.flush();
    if (result !== 'ok') this.dirty.merge(covered);
    this.flushesInFlight.delete(covered);
    if (result === 'ok') this.options.onTargetDurable();
    if (result === 'failed') this.targetFailed(link);
    return result;
  }

  /** The target refused data on `link`. Only the current link's refusal moves the mirror to
   *  ERROR; an older link is gone already and its ranges are dirty. */
  private targetFailed(link: SourceLink): void {
    if (link !== this.link || this.pendingSevere !== null) return;
    this.pendingSevere = { code: 'BM_ERR_TARGET_IO', reason: `the target answered ${link.lastTargetStatus ?? 'an error'} writing replicated data` };
    link.close('the target failed a write');
    this.wakeup.notify();
  }

  /** A strict mirror that has been in sync holds writes while the target is not protected. */
  private mustHold(): boolean {
    if (!this.isStrict()) return false;
    // The link may be gone before the driver noticed and left INSYNC.
    return this.machine.state !== 'INSYNC' || this.liveLink() === null;
  }

  private strictError(): MirrorError {
    return new MirrorError('EIO', `mirror of ${this.record.volume} to ${this.record.peer} is in ERROR and set to --on-disconnect block or --on-timeout block: writes are refused until the admin resumes, resets or suspends it`);
  }

  private hold(): Promise<void> {
    if (this.stopping) return this.releaseOnStop ? Promise.resolve() : Promise.reject(this.shutdownError());
    if (this.machine.state === 'ERROR') return Promise.reject(this.strictError());
    return new Promise((resolve, reject) => this.held.push({ resolve, reject }));
  }

  /** A strict mirror's write or flush that did not reach the target: returns once the mirror is
   *  in sync with that range copied (or is suspended, removed, ...), fails at shutdown or in
   *  ERROR. Returns at once for other mirrors. */
  private async holdWhileUnprotected(offsetBytes?: number, lengthBytes?: number, forwarded = false): Promise<void> {
    for (;;) {
      // --on-timeout block makes a forwarded write that did not reach the target strict too.
      const strict = this.isStrict() || (forwarded && this.blocksOnTimeout());
      const unprotected = strict && (this.machine.state !== 'INSYNC' || this.liveLink() === null);
      if (!unprotected && (offsetBytes === undefined || lengthBytes === undefined || !strict || !this.dirty.testRange(offsetBytes, lengthBytes))) return;
      if (this.stopping && this.releaseOnStop) return;
      await this.hold();
    }
  }

  private isStrict(): boolean {
    return this.record.onDisconnect === 'block' && this.record.fullCopyDone && !this.record.suspended;
  }

  /** A sync mirror with --on-timeout block that has been in sync: a forwarded write the target
   *  did not acknowledge is held like a strict mirror's. */
  private blocksOnTimeout(): boolean {
    return syncPolicyOf(this.record).onTimeout === 'block' && this.record.mode === 'sync' && this.record.fullCopyDone && !this.record.suspended;
  }

  /** A restore (resolve --discard this) started and the target has not acknowledged the
   *  Resolve yet; a removed mirror no longer holds anything. */
  private restorePending(): boolean {
    return this.record.restoring === true && !this.releaseOnStop;
  }

  /** Client writes wait for the restore to complete; they fail at shutdown and while the
   *  mirror is in ERROR or suspended (the admin must act: they would otherwise hang without
   *  bound). */
  private waitForRestore(): Promise<void> {
    if (this.stopping) return this.releaseOnStop ? Promise.resolve() : Promise.reject(this.shutdownError());
    if (this.machine.state === 'ERROR' || this.record.suspended) return Promise.reject(this.restoreError());
    return new Promise((resolve, reject) => this.restoreWaiters.push({ resolve, reject }));
  }

  private restoreError(): MirrorError {
    return new MirrorError('EIO', `volume ${this.record.volume} is being restored from ${this.record.target} on ${this.record.peer} (mirror resolve --discard this) and the mirror is ${this.record.suspended ? 'suspended' : 'in ERROR'}: writes are refused until a resolve completes (mirror resolve, or resume) or the mirror is removed`);
  }

  private releaseRestoreWaiters(error?: Error): void {
    releaseWaiters(this.restoreWaiters, error);
  }

  /** The split brain is resolved (or found resolved): forget the choice and let writes go on. */
  private splitBrainResolved(): void {
    this.tryUpdate({ resolve: undefined, splitBrain: undefined, restoring: undefined });
    this.releaseRestoreWaiters();
  }

  private releaseHeld(error?: Error): void {
    releaseWaiters(this.held, error);
  }

  // --- driver --------------------------------------------------------------------------------

  private fire(event: MirrorEvent): void {
    this.machine.fire(event);
  }

  private onTransition(transition: MirrorTransition): void {
    const { from, to, cause } = transition;
    this.logger.info({ from, to, event: cause.event, reason: cause.reason, code: cause.code }, `mirror ${from} -> ${to}`);
    if (to === 'ERROR' && from !== 'ERROR' && cause.code !== null && this.record.error?.code !== cause.code) {
      // Cut to what mirrors.json takes: one over-long reason would fail every later save.
      this.tryUpdate({ error: { code: cause.code as MirrorErrorCode, reason: cause.reason.slice(0, MIRROR_ERROR_REASON_CHARS_MAX) } });
    } else if (from === 'ERROR' && to !== 'ERROR') {
      this.tryUpdate({ error: null });
    }
    if (to === 'ERROR') {
      // The admin's choice applied to the split brain it was made for; whatever sent the mirror
      // to ERROR now (the target promoted again, refusing the resolve, ...) needs a new one.
      if (this.record.resolve !== undefined) this.tryUpdate({ resolve: undefined });
      if (this.restorePending()) this.releaseRestoreWaiters(this.restoreError());
    }
    // No longer strict (suspended, or a full copy started again): what was held goes on.
    if (to === 'INSYNC' || !this.isStrict()) this.releaseHeld();
    // A strict mirror in ERROR waits for the admin: its writes fail rather than hang or run
    // unprotected.
    else if (to === 'ERROR') this.releaseHeld(this.strictError());
  }

  private async drive(): Promise<void> {
    while (!this.stopping) {
      try {
        await this.step();
      } catch (error) {
        await this.recover(error);
      }
    }
  }

  /** A bug or an unexpected failure (state dir unwritable, ...) must not leave the mirror without
   *  a driver: drop the link, fail over to a retry state, back off. */
  private async recover(error: unknown): Promise<void> {
    this.logger.error({ err: error, state: this.machine.state }, 'mirror driver error; dropping the link and retrying');
    const link = this.link;
    this.link = null;
    if (link !== null) {
      link.close('internal error');
      this.dirty.merge(this.unflushed.snapshotAndClear());
    }
    try {
      if (this.machine.canFire('transientFailure')) {
        this.fire({ type: 'transientFailure', code: 'BM_ERR_INTERNAL', reason: `internal error: ${(error as Error).message}` });
      } else if (this.machine.canFire('connectionLost')) {
        this.fire({ type: 'connectionLost', reason: `internal error: ${(error as Error).message}` });
      }
    } catch (fireError) {
      this.logger.error({ err: fireError }, 'mirror state could not be updated after a driver error');
    }
    await this.wakeup.wait(this.backoff.nextDelayMs());
  }

  /** One turn of the driver: act on the current state. */
  private async step(): Promise<void> {
    const state = this.machine.state;
    if (state === 'ERROR' || (state === 'INIT' && this.record.suspended)) {
      await this.wakeup.wait();
    } else if (state === 'INIT') {
      this.fire({ type: 'start' });
    } else if (state === 'MAKEPARTS' && this.record.suspended) {
      this.fire({ type: 'stop', reason: 'suspended by the admin' });
    } else if (state === 'MAKEPARTS') {
      await this.connect();
    } else if (state === 'RESET') {
      const delayMs = this.backoff.nextDelayMs();
      this.nextRetryAtMs = Date.now() + delayMs;
      await this.wakeup.wait(delayMs);
      this.nextRetryAtMs = null;
      if (this.stopping || this.machine.state !== 'RESET') return;
      this.fire({ type: 'retryDue' });
    } else if (state === 'READY') {
      await this.decide();
    } else if (this.link === null || !this.link.isOpen || this.record.suspended) {
      await this.cracked();
    } else if (state === 'REPLICATE' || state === 'OUTOFSYNC') {
      await this.resync(this.link);
    } else {
      await this.watchInSync(this.link);
    }
  }

  private async connect(): Promise<void> {
    const { record } = this;
    let link: SourceLink;
    try {
      const peer = this.options.resolvePeer();
      const info = this.volume.info();
      link = await SourceLink.open({
        host: peer.host,
        port: peer.port,
        nodeName: this.options.nodeName,
        peerName: record.peer,
        secret: peer.secret,
        hello: {
          volumeUuid: this.volume.spec.uuid,
          volumeName: record.volume,
          targetVolumeName: record.target,
          sizeBytes: info.sizeBytes,
          logicalSectorBytes: info.logicalSectorBytes,
          generationIds: [record.generation],
          capabilities: Capability.ORDERED_WRITES | Capability.BITMAP_EXCHANGE,
        },
        connectTimeoutMs: this.options.timing.connectTimeoutMs,
        ackTimeoutMs: this.options.timing.ackTimeoutMs,
        logger: this.logger,
        signal: this.abort.signal,
      });
    } catch (error) {
      if (this.stopping || this.machine.state !== 'MAKEPARTS') return;
      if (error instanceof LinkSetupError && error.severity === 'severe') {
        this.fire({ type: 'validationFailed', code: error.code as MirrorErrorCode, reason: error.message });
      } else {
        const code = (error as { code?: unknown }).code;
        this.fire({ type: 'transientFailure', code: typeof code === 'string' && code !== '' ? code : 'BM_ERR_INTERNAL', reason: (error as Error).message });
      }
      return;
    }
    if (this.stopping || this.machine.state !== 'MAKEPARTS' || this.record.suspended) {
      link.close('mirror stopped while connecting');
      if (this.record.suspended && this.machine.canFire('stop')) this.fire({ type: 'stop', reason: 'suspended by the admin' });
      return;
    }
    if (record.mode === 'async' && (link.reply.capabilities & Capability.ORDERED_WRITES) === 0) {
      link.close('the target does not apply ordered writes');
      this.fire({ type: 'validationFailed', code: 'BM_ERR_TARGET_UNSUPPORTED', reason: `the daemon on ${record.peer} does not support ordered writes, which async mode needs; upgrade it or use sync or stack mode` });
      return;
    }
    this.link = link;
    this.pendingSevere = null;
    link.onClose(() => {
      this.wakeup.notify();
      this.dirtied.notify();
    });
    this.fire({ type: 'connected', reason: `connected to ${record.peer}, authenticated; target accepted the hello` });
    this.fire({ type: 'validated', reason: `target ${record.target} on ${record.peer} validated (${link.reply.sizeBytes} bytes)` });
  }

  /** READY: full copy, bitmap resync, or nothing, from the target's answer and our records. */
  private async decide(): Promise<void> {
    const link = this.link;
    assert(link !== null);
    let knowsUs = link.reply.generationIds.includes(this.record.generation);
    if (link.reply.diverged) {
      if (!(await this.splitBrain(link))) return;
      // The target now holds our generation (Resolve) and the union of changes is dirty.
      knowsUs = true;
    } else if (this.record.resolve !== undefined || this.record.splitBrain !== undefined) {
      // Resolved on the target before we could record it (a crash in between): done.
      this.splitBrainResolved();
    }
    if (!knowsUs) {
      // The target has no history with this generation (new, re-added, or reset): everything.
      if (this.record.fullCopyDone) this.tryUpdate({ fullCopyDone: false });
      this.dirty.setRange(0, this.dirty.sizeBytes);
      // Durable before the target records this generation (at our first flush): a crash in
      // between must find every region dirty, not an old clean bitmap the target would now
      // seem to match. A failure throws: the driver drops the link and retries.
      await this.options.persistBitmap();
      if (this.stopping || this.machine.state !== 'READY') return;
    }
    this.startPass();
    if (this.record.fullCopyDone && !this.options.fastResync()) {
      // FastResync off for this volume (the VxVM model): every reconnect copies everything.
      this.dirty.setRange(0, this.dirty.sizeBytes);
      this.fire({ type: 'fullCopyNeeded', reason: 'FastResync is off for this volume: full copy' });
    } else if (!this.record.fullCopyDone) {
      this.fire({ type: 'fullCopyNeeded', reason: knowsUs ? 'resuming the interrupted full copy' : 'target has no copy of this volume yet: full copy' });
    } else if (this.dirty.count() > 0) {
      this.fire({ type: 'bitmapResyncNeeded', reason: `target behind by ${this.dirty.dirtyBytes()} bytes: resync from the dirty bitmap` });
    } else {
      this.fire({ type: 'alreadyInSync' });
      this.backoff.reset();
    }
  }

  /**
   * READY with a diverged target (split brain). Without the admin's choice, or while the target
   * is still promoted: ERROR, nothing sent. With it: merge the target's bitmap into ours (made
   * durable before anything else), send (discard peer, by the normal resync after this) or
   * restore (discard this) the union, then let the target forget its divergence. Returns true
   * when resolved and the decision may go on.
   */
  private async splitBrain(link: SourceLink): Promise<boolean> {
    const { reply } = link;
    const splitBrain = {
      detectedAt: this.record.splitBrain?.detectedAt ?? new Date().toISOString(),
      peerDivergedBytes: reply.divergedBytes,
      peerPromoted: reply.promoted,
      localDirtyBytes: this.dirty.dirtyBytes(),
    };
    this.tryUpdate({ splitBrain });
    const discard = this.record.resolve;
    const severe = (reason: string): false => {
      link.close('split brain');
      this.link = null;
      if (this.machine.state === 'READY') this.fire({ type: 'validationFailed', code: 'BM_ERR_SPLIT_BRAIN', reason });
      return false;
    };
    const sides = `${this.record.target} on ${this.record.peer} was written while apart (${reply.divergedBytes} bytes in regions written while promoted${reply.promoted ? ', and it is still promoted' : ''}); this side changed ${splitBrain.localDirtyBytes} bytes the target lacks`;
    if (discard === undefined) {
      return severe(`split brain: ${sides}. Nothing is copied until the admin picks a side: blockmirror mirror resolve ${this.record.volume} --peer ${this.record.peer} --discard this|peer`);
    }
    if (reply.promoted) {
      return severe(`split brain: ${sides}. Demote it first (blockmirror volume demote ${this.record.target} on ${this.record.peer}), then run mirror resolve again`);
    }
    if ((reply.capabilities & Capability.BITMAP_EXCHANGE) === 0) {
      return severe(`split brain: ${sides}, and the daemon on ${this.record.peer} cannot send its bitmap; resolve by hand (mirror reset copies everything)`);
    }
    this.logger.warn({ discard, peerDivergedBytes: reply.divergedBytes, localDirtyBytes: splitBrain.localDirtyBytes }, `split brain: resolving by discarding ${discard === 'peer' ? 'the target\'s changes' : 'this side\'s changes'}`);
    // A malformed bitmap rejects (a protocol error): the driver logs it and retries with backoff.
    const receiver = new PeerBitmapReceiver(reply.sizeBytes, this.dirty);
    const received = await link.requestBitmap(bitmapPartsMax(reply.sizeBytes), (header, bits) => receiver.take(header, bits));
    if (received === null) return this.resolveInterrupted(link);
    receiver.finish();
    this.dirty.merge(receiver.union);
    // The union is durable before the target may forget its half of it.
    await this.options.persistBitmap();
    if (discard === 'this') {
      const restored = await this.restore(link);
      if (restored !== 'ok') return this.resolveInterrupted(link);
    }
    const result = await link.resolve(this.record.generation);
    if (result === 'lost') return this.resolveInterrupted(link);
    if (result === 'failed' && link.lastTargetStatus === 'STATUS_READ_ONLY') {
      return severe(`split brain: ${sides}; the target refused to resolve: it was promoted again`);
    }
    if (result === 'failed' && ++this.resolveFailures >= RESOLVE_FAILURES_MAX) {
      return severe(`split brain: ${sides}; the target failed to record the resolve ${this.resolveFailures} times in a row (${link.lastTargetStatus ?? 'an error'}): see its log, then run mirror resolve again`);
    }
    if (result === 'failed') {
      // The target could not record the resolve (its state dir, say): nothing was lost on
      // either side and every step is idempotent, so retry with backoff like a lost link.
      link.close('the target failed to resolve');
      this.link = null;
      if (this.machine.state === 'READY') this.fire({ type: 'transientFailure', code: 'BM_ERR_TARGET_IO', reason: `the target failed to record the resolve (${link.lastTargetStatus ?? 'an error'}); retrying` });
      return false;
    }
    this.resolveFailures = 0;
    this.splitBrainResolved();
    this.logger.warn({ discard, dirtyBytes: this.dirty.dirtyBytes(), restoredBytes: this.restoredBytes }, 'split brain resolved');
    return true;
  }

  /** Restores every dirty region from the target (discard this), with client writes held
   *  from here until the target acknowledges the Resolve. */
  private async restore(link: SourceLink): Promise<'ok' | 'lost'> {
    // Durable before the first restored byte: a restart must go on holding client writes.
    if (this.record.restoring !== true) this.update({ restoring: true });
    // Client changes let in before that may still be on their way to the device: the restore
    // starts after them, so none lands in a region already restored (a retry would overwrite
    // it). Bounded by the link: a change held by something else must not stall us for ever.
    const drained = await Promise.race([this.volume.drainAdmitted().then(() => true), new Promise<boolean>((resolve) => link.onClose(() => resolve(false)))]);
    if (!drained || !link.isOpen || this.stopping) return 'lost';
    const restored = new DirtyBitmap(this.dirty.sizeBytes, REGION_BYTES);
    this.restoredUnflushed = restored;
    try {
      const outcome = await this.restoreRuns(link);
      if (outcome !== 'ok') return outcome;
      // Durable here before the bits go (and before the target forgets the divergence that
      // says where to restore).
      await this.volume.flushLocal();
      for (const run of dirtyRunsBetween(restored, 0, restored.sizeBytes)) this.dirty.clearRange(run.offsetBytes, run.lengthBytes);
      return 'ok';
    } finally {
      this.restoredUnflushed = null;
    }
  }

  private restoreRuns(link: SourceLink): Promise<'ok' | 'lost'> {
    return restoreFromPeer({
      link,
      dirty: this.dirty,
      write: async (offsetBytes, data) => {
        // Aligned memory of its own (no copy on the way to the device, and no other write
        // can share it).
        const buffer = this.pool.acquire(data.length);
        data.copy(buffer);
        this.restoring.add(buffer.buffer);
        try {
          await this.volume.restoreWrite(offsetBytes, buffer);
        } finally {
          this.restoring.delete(buffer.buffer);
          this.pool.release(buffer);
        }
      },
      chunkBytesMax: CHUNK_BYTES_MAX,
      chunksInFlightMax: CHUNKS_IN_FLIGHT_MAX / 2,
      onRestored: (bytes) => {
        this.restoredBytes += bytes;
      },
      cancelled: () => this.stopping,
    });
  }

  /** The link went while resolving: READY -> RESET, and the next connection starts over. */
  private resolveInterrupted(link: SourceLink): false {
    link.close('interrupted while resolving the split brain');
    this.link = null;
    if (this.machine.state === 'READY') this.fire({ type: 'connectionLost', reason: 'connection lost while resolving the split brain; it starts over' });
    return false;
  }

  private startPass(): void {
    this.pass = { startMs: Date.now(), copiedBytes: 0 };
  }

  /** The link is down in OUTOFSYNC/INSYNC/REPLICATE: crack, then reconnect after a pause. */
  private async cracked(): Promise<void> {
    const link = this.link;
    this.link = null;
    const crack = this.crackCause !== null && this.crackCause.link === link ? this.crackCause : null;
    this.crackCause = null;
    const state = this.machine.state;
    if (link !== null) {
      this.dirty.merge(this.unflushed.snapshotAndClear());
      // Progress, rate and ETA describe the next pass from here, not the one that was cut.
      this.startPass();
    }
    if (this.pendingSevere !== null) {
      const severe = this.pendingSevere;
      this.pendingSevere = null;
      if (this.machine.canFire('severeFailure')) this.fire({ type: 'severeFailure', code: severe.code, reason: severe.reason });
      return;
    }
    if (this.machine.isLinkUp && this.machine.canFire('connectionLost')) {
      this.fire(
        crack !== null && !this.record.suspended
          ? { type: 'connectionLost', code: crack.code, reason: crack.reason }
          : { type: 'connectionLost', reason: this.record.suspended ? 'suspended by the admin' : 'connection to the target lost' },
      );
      return;
    }
    if (this.record.suspended) {
      if (this.machine.canFire('stop')) this.fire({ type: 'stop', reason: 'suspended by the admin' });
      return;
    }
    assert(state === 'OUTOFSYNC', `cracked in ${state}`);
    const delayMs = this.backoff.nextDelayMs();
    this.nextRetryAtMs = Date.now() + delayMs;
    await this.wakeup.wait(delayMs);
    this.nextRetryAtMs = null;
    if (!this.stopping && this.machine.state === 'OUTOFSYNC' && !this.record.suspended) this.fire({ type: 'reconnect' });
  }

  /** Copies dirty regions until the bitmap is clean and the target flushed them. */
  private async resync(link: SourceLink): Promise<void> {
    const sizeBytes = this.dirty.sizeBytes;
    let inFlight = 0;
    let cursor = 0;
    const progress = new Wakeup();
    while (link.isOpen && !this.stopping && this.pendingSevere === null) {
      let run = this.dirty.runs(Math.min(cursor, sizeBytes), 1)[0];
      if (run === undefined && cursor > 0) run = this.dirty.runs(0, 1)[0];
      if (run === undefined) {
        if (inFlight > 0) {
          await progress.wait();
          continue;
        }
        const flushed = await this.flushTarget(link);
        if (flushed !== 'ok' || this.dirty.count() > 0) continue;
        if (this.machine.state === 'REPLICATE' || this.machine.state === 'OUTOFSYNC') {
          await this.options.persistBitmap().catch((error: unknown) => {
            this.logger.error({ err: error }, 'writing the persistent dirty bitmap failed; a crash now would resync more than needed');
          });
          if (!link.isOpen || this.stopping || (this.machine.state !== 'REPLICATE' && this.machine.state !== 'OUTOFSYNC')) continue;
          if (!this.record.fullCopyDone) this.tryUpdate({ fullCopyDone: true });
          this.backoff.reset();
          this.fire({ type: 'copyComplete', reason: `target holds every region (${this.pass.copiedBytes} bytes copied)` });
        }
        return;
      }
      const offsetBytes = run.offsetBytes;
      const lengthBytes = Math.min(run.lengthBytes, CHUNK_BYTES_MAX, sizeBytes - offsetBytes);
      while (inFlight >= CHUNKS_IN_FLIGHT_MAX && link.isOpen) await progress.wait();
      if (this.rateLimit !== undefined) {
        try {
          await this.rateLimit.take(lengthBytes, this.rateAbort.signal);
        } catch {
          if (this.stopping) return;
          continue; // the rate changed (mirror set --max-rate): wait again at the new rate
        }
      }
      await link.whenWritable();
      if (!link.isOpen) break;
      const buffer = this.pool.acquire(lengthBytes);
      const copy: DirtyRun = { offsetBytes, lengthBytes };
      let sent: Promise<SendResult> | undefined;
      let zero = false;
      try {
        await this.volume.readForCopy(offsetBytes, buffer, () => {
          this.copiesInFlight.add(copy);
          this.dirty.clearRange(offsetBytes, lengthBytes);
          zero = buffer.equals(ZERO_CHUNK.subarray(0, lengthBytes));
          // The copy carries whatever the device holds now, so possibly writes issued after an
          // async write still unacknowledged was acknowledged to its client: sent ordered, it
          // lands after that write (a copy landing first would leave a target that is no prefix).
          sent = link.write(offsetBytes, zero ? undefined : buffer, lengthBytes, false, this.asyncInFlight.size > 0 && this.takesOrderedWrites(link));
        });
      } catch (error) {
        this.pool.release(buffer);
        this.dirty.setRange(offsetBytes, lengthBytes);
        this.copiesInFlight.delete(copy);
        this.logger.error({ err: error, offsetBytes, lengthBytes }, 'reading the source for the copy failed');
        // Retrying would fail the same way, forever: ERROR, with the reason, for the admin.
        this.pendingSevere ??= { code: 'BM_ERR_SOURCE_IO', reason: `reading ${lengthBytes} bytes at ${offsetBytes} of the source for the copy failed: ${(error as Error).message}` };
        link.close('reading the source volume failed');
        break;
      }
      assert(sent !== undefined);
      inFlight++;
      if (zero) this.sent.zeroBytes += lengthBytes;
      else this.sent.copyBytes += lengthBytes;
      void sent.then((result) => {
        inFlight--;
        this.pool.release(buffer);
        if (result === 'ok') {
          this.unflushed.setRange(offsetBytes, lengthBytes);
          this.pass.copiedBytes += lengthBytes;
        } else {
          this.dirty.setRange(offsetBytes, lengthBytes);
          if (result === 'failed') this.targetFailed(link);
        }
        this.copiesInFlight.delete(copy);
        progress.notify();
      });
      cursor = offsetBytes + lengthBytes;
      // Flush now and then during a long copy too: what is flushed is not resent after a crack
      // or a restart. Not awaited: the flush covers what was acknowledged before it was sent.
      if (performance.now() - this.lastTargetFlushMs >= TARGET_FLUSH_INTERVAL_MS && this.unflushed.count() > 0) {
        void this.flushTarget(link);
      }
    }
    // Wait for chunks still in flight: they settle 'lost' at once when the link closed.
    while (inFlight > 0) await progress.wait(100);
  }

  /** INSYNC: nothing to copy; flush the target now and then, and return when the link drops or
   *  a write left a region dirty (it is copied by the next resync pass). */
  private async watchInSync(link: SourceLink): Promise<void> {
    while (link.isOpen && !this.stopping && this.machine.state === 'INSYNC') {
      if (this.dirty.count() > 0) {
        await this.resync(link);
        // Writes a strict mirror held for this range may go: it is copied and flushed.
        if (this.dirty.count() === 0) this.releaseHeld();
        continue;
      }
      if (this.unflushed.count() > 0 && performance.now() - this.lastTargetFlushMs >= TARGET_FLUSH_INTERVAL_MS) {
        await this.flushTarget(link);
        continue;
      }
      await this.dirtied.wait(TARGET_FLUSH_INTERVAL_MS);
    }
  }

  // --- records -------------------------------------------------------------------------------

  private refuseUnlessAllowed(command: 'suspend' | 'resume' | 'reset'): void {
    if (command === 'resume' && this.record.suspended && this.machine.state !== 'ERROR') return;
    const refusal = this.machine.commandAllowed(command);
    if (refusal !== undefined) throw new MirrorError(refusal.code, refusal.message);
  }

  private update(change: Partial<MirrorRecord>): void {
    const next = { ...this.record, ...change };
    this.options.persist(next);
    this.record = next;
  }

  /** For changes the engine makes on its own: a failed write is logged and the change kept in
   *  memory (every such change is safe to lose at a restart: it only costs a copy). */
  private tryUpdate(change: Partial<MirrorRecord>): void {
    try {
      this.update(change);
    } catch (error) {
      this.record = { ...this.record, ...change };
      this.logger.error({ err: error }, 'persisting the mirror record failed; the change holds until the next restart');
    }
  }
}
