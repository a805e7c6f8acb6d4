// In-process replication rig for engine tests: an in-memory source volume (FakeSource) with the
// Volume's replica contract, an in-memory target (FakeTarget) served by a real ReplicationServer
// on 127.0.0.1, and a real Mirror between them, with the daemon's log lines captured. Faults are
// injected by the test: a slow or failing local write, a target that refuses or loses writes, a
// TCP proxy cut (test/helpers/tcp-proxy.ts), a persist() that throws.
import crypto from 'node:crypto';
import pino, { type Logger } from 'pino';
import { DirtyBitmap } from '../../src/native/index';
import { Mirror, REGION_BYTES, type MirrorTiming } from '../../src/replication/mirror';
import type { MirrorRecord } from '../../src/replication/mirror-store';
import { ReplicationServer } from '../../src/replication/target-server';
import type { MirrorSourceBinding } from '../../src/daemon/registry';
import type { VolumeDivergence } from '../../src/daemon/volume-manager';
import type { BlockBackendInfo } from '../../src/volume/backend';
import type { ReplicaSource, ReplicaTarget, VolumeReplica } from '../../src/volume/replica';
export { settlesWithin, waitFor } from './async';

interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

export const secret = Buffer.alloc(32, 7);
export const SIZE_BYTES = 4 * 1024 * 1024;

/** Short timings: a test waits milliseconds, not the production seconds. */
export const fastTiming: MirrorTiming = { connectTimeoutMs: 300, ackTimeoutMs: 1000, backoffBaseMs: 20, backoffMaxMs: 200 };

function info(): BlockBackendInfo {
  return { sizeBytes: SIZE_BYTES, logicalSectorBytes: 512, physicalSectorBytes: 512, readOnly: false, canTrim: true };
}

/** One parsed pino line. */
export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export function captureLogger(): { logger: Logger; logs: LogLine[] } {
  const logs: LogLine[] = [];
  const logger = pino(
    { level: 'debug' },
    {
      write(line: string) {
        logs.push(JSON.parse(line) as LogLine);
        if (process.env.BM_TEST_VERBOSE) process.stderr.write(line);
      },
    },
  );
  return { logger, logs };
}

/** In-memory source volume with the Volume's contract: admit() before the write, replicas handed
 *  the write under the lock (one global lock here) with the local write's promise, the lock held
 *  until the local write settles, the client answered when the replicas are done; a local
 *  failure reaches the client after that. */
export class FakeSource implements ReplicaSource {
  readonly spec = { name: 'src', uuid: crypto.randomUUID() };
  readonly data = Buffer.alloc(SIZE_BYTES);
  private replicas: VolumeReplica[] = [];
  private chain: Promise<void> = Promise.resolve();
  /** Runs before a copy read, under the lock; throwing fails the read (a source device error). */
  beforeRead: (offsetBytes: number, lengthBytes: number) => void = () => undefined;

  info(): BlockBackendInfo {
    return info();
  }

  attachReplica(replica: VolumeReplica): void {
    this.replicas.push(replica);
  }

  /** No write-intent log here: these tests run no crash recovery. */
  setWriteIntent(): void {}

  detachReplica(replica: VolumeReplica): void {
    this.replicas = this.replicas.filter((other) => other !== replica);
  }

  async readForCopy(offsetBytes: number, buffer: Buffer, onRead: () => void): Promise<void> {
    const unlock = await this.lock();
    try {
      this.beforeRead(offsetBytes, buffer.length);
      this.data.copy(buffer, 0, offsetBytes, offsetBytes + buffer.length);
      onRead();
    } finally {
      unlock();
    }
  }

  /** A restore from the target: replicas are handed it like a client write, without admit(). */
  async restoreWrite(offsetBytes: number, data: Buffer): Promise<void> {
    const unlock = await this.lock();
    const local = Promise.resolve().then(() => {
      data.copy(this.data, offsetBytes);
    });
    const replicated = Promise.allSettled(this.replicas.map((replica) => replica.replicateWrite(offsetBytes, data, false, local, true)));
    try {
      await local;
    } finally {
      unlock();
    }
    await replicated;
  }

  /** A client's FLUSH: every replica is handed it, as Volume.flush does after the local flush. */
  async clientFlush(): Promise<void> {
    await Promise.all(this.replicas.map((replica) => replica.replicateFlush()));
  }

  /** Runs when the mirror flushes the local device (after a restore). */
  onFlushLocal: () => void = () => undefined;

  async flushLocal(): Promise<void> {
    this.onFlushLocal();
  }

  /** A client write whose local write takes `localMs` and, with `localFails`, fails with EIO
   *  (the local bytes then stay as they were). */
  async write(offsetBytes: number, payload: Buffer, options: { localMs?: number; localFails?: boolean } = {}): Promise<void> {
    const { localMs = 0, localFails = false } = options;
    for (const replica of this.replicas) await replica.admit();
    this.admitted++;
    try {
      await this.writeAdmitted(offsetBytes, payload, localMs, localFails);
    } finally {
      if (--this.admitted === 0) for (const resolve of this.admittedWaiters.splice(0)) resolve();
    }
  }

  drainAdmitted(): Promise<void> {
    if (this.admitted === 0) return Promise.resolve();
    return new Promise((resolve) => this.admittedWaiters.push(resolve));
  }

  private admitted = 0;
  private admittedWaiters: Array<() => void> = [];

  private async writeAdmitted(offsetBytes: number, payload: Buffer, localMs: number, localFails: boolean): Promise<void> {
    const unlock = await this.lock();
    const local = new Promise<void>((resolve, reject) =>
      setTimeout(() => {
        if (localFails) {
          reject(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', syscall: 'write' }));
        } else {
          payload.copy(this.data, offsetBytes);
          resolve();
        }
      }, localMs),
    );
    const replicated = Promise.allSettled(this.replicas.map((replica) => replica.replicateWrite(offsetBytes, payload, false, local)));
    try {
      await local.then(
        () => undefined,
        () => undefined,
      );
    } finally {
      unlock();
    }
    const outcomes = await replicated;
    await local;
    for (const outcome of outcomes) if (outcome.status === 'rejected') throw outcome.reason;
  }

  private async lock(): Promise<() => void> {
    const previous = this.chain;
    let unlock!: () => void;
    this.chain = new Promise((resolve) => (unlock = resolve));
    await previous;
    return unlock;
  }
}

/** In-memory target volume. With `volatile`, applied writes are lost by crash() until the next
 *  flush (a target host crash losing its page cache). */
export class FakeTarget implements ReplicaTarget {
  readonly data = Buffer.alloc(SIZE_BYTES);
  writes = 0;
  /** Runs before a write is applied; throwing refuses it. */
  beforeWrite: (offsetBytes: number, data: Buffer) => Promise<void> | void = () => undefined;
  /** Runs after a write was applied, before it is acknowledged. */
  afterWrite: (offsetBytes: number, data: Buffer) => void = () => undefined;
  /** Runs before a flush; throwing fails it (nothing is flushed then). */
  beforeFlush: () => void = () => undefined;
  flushes = 0;
  /** Offset -> bytes before the first unflushed write there. */
  private readonly unflushed = new Map<number, Buffer>();

  constructor(private readonly options: { volatile?: boolean } = {}) {}

  info(): BlockBackendInfo {
    return info();
  }

  failure(): undefined {
    return undefined;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<{ data: Buffer; release: () => void }> {
    return { data: Buffer.from(this.data.subarray(offsetBytes, offsetBytes + lengthBytes)), release: () => undefined };
  }

  async mirrorWrite(offsetBytes: number, data: Buffer, fua = false): Promise<void> {
    await this.beforeWrite(offsetBytes, data);
    if (!fua) this.remember(offsetBytes, data.length); // FUA: durable once written
    data.copy(this.data, offsetBytes);
    this.writes++;
    this.afterWrite(offsetBytes, data);
  }

  async mirrorWriteZeroes(offsetBytes: number, lengthBytes: number, fua = false): Promise<void> {
    if (!fua) this.remember(offsetBytes, lengthBytes);
    this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
    this.writes++;
  }

  async flush(): Promise<void> {
    this.beforeFlush();
    this.flushes++;
    // Durable only a loop turn later, as a device flush takes its time: a caller that did
    // not wait for it would find its earlier writes still unflushed.
    const covered = [...this.unflushed.keys()];
    await new Promise((resolve) => setImmediate(resolve));
    for (const offsetBytes of covered) this.unflushed.delete(offsetBytes);
  }

  /** Offsets of the writes applied and not flushed since (volatile targets only). */
  unflushedOffsets(): number[] {
    return [...this.unflushed.keys()];
  }

  /** Whether some write is applied but not flushed. */
  get hasUnflushed(): boolean {
    return this.unflushed.size > 0;
  }

  /** Loses every unflushed write (newest first, so the oldest saved bytes win). */
  loseUnflushed(): void {
    for (const [offsetBytes, previous] of [...this.unflushed].reverse()) previous.copy(this.data, offsetBytes);
    this.unflushed.clear();
  }

  private remember(offsetBytes: number, lengthBytes: number): void {
    if (this.options.volatile !== true || this.unflushed.has(offsetBytes)) return;
    this.unflushed.set(offsetBytes, Buffer.from(this.data.subarray(offsetBytes, offsetBytes + lengthBytes)));
  }
}

/** A ReplicationServer on 127.0.0.1 serving `target` as volume 'tgt' to peer 'hostA'; closed in
 *  teardown. `bindSource` runs when a new generation binds (the first Hello of a mirror).
 *  `forget()` drops the binding, as if the target volume had been removed and added again: the
 *  next Hello finds no known generation. */
export async function startTarget(
  t: Teardown,
  target: FakeTarget,
  options: {
    logger: Logger;
    bindSource?: () => Promise<void>;
    /** The target volume's divergence (split brain), and what resolving it does. */
    divergence?: () => VolumeDivergence | undefined;
    resolveDivergence?: () => Promise<void>;
    maxConnections?: number;
    /** Capabilities the target offers (default all: fewer act as an older daemon). */
    capabilities?: number;
    /** Flush at async epoch boundaries (default false, as the daemon). */
    epochFlush?: boolean;
  },
): Promise<{ server: ReplicationServer; port: number; forget: () => void }> {
  let binding: MirrorSourceBinding | undefined;
  const server = new ReplicationServer({
    nodeName: 'hostB',
    secretForPeer: (name) => (name === 'hostA' ? secret : undefined),
    lookupVolume: (name) => (name === 'tgt' ? { record: { name: 'tgt', role: 'mirror', mirrorSource: binding }, volume: target } : undefined),
    bindSource: async (_name, next) => {
      await options.bindSource?.();
      binding = next;
    },
    divergence: () => options.divergence?.(),
    resolveDivergence: async () => options.resolveDivergence?.(),
    logger: options.logger.child({ side: 'target' }),
    maxConnections: options.maxConnections,
    capabilities: options.capabilities,
    epochFlush: options.epochFlush,
  });
  const port = await server.listen('127.0.0.1', 0);
  t.teardown(() => server.close());
  return {
    server,
    port,
    forget: () => {
      binding = undefined;
    },
  };
}

/** A started Mirror from `source` to volume 'tgt' on 'hostB' at 127.0.0.1:port(); stopped in
 *  teardown. Its persisted record is in `saved` (the last successful persist). */
export function startMirror(
  t: Teardown,
  source: FakeSource,
  port: () => number,
  options: { logger: Logger; timing?: Partial<MirrorTiming>; record?: Partial<MirrorRecord>; persist?: (record: MirrorRecord) => void },
): { mirror: Mirror; saved: () => MirrorRecord } {
  let saved: MirrorRecord = {
    id: crypto.randomUUID(),
    volume: 'src',
    peer: 'hostB',
    target: 'tgt',
    mode: 'sync',
    onDisconnect: 'continue',
    maxRateBytesPerSec: null,
    generation: 1 + Math.floor(Math.random() * 1e9),
    fullCopyDone: false,
    suspended: false,
    error: null,
    createdAt: new Date().toISOString(),
    ...options.record,
  };
  const mirror = new Mirror({
    record: saved,
    volume: source,
    nodeName: 'hostA',
    resolvePeer: () => ({ host: '127.0.0.1', port: port(), secret }),
    fastResync: () => true,
    persist: (record) => {
      options.persist?.(record);
      saved = record;
    },
    initialDirty: allDirty(),
    recovery: { kind: 'new', detail: 'test', dirtyBytesAtStart: SIZE_BYTES },
    writeIntentInfo: () => null,
    onTargetDurable: () => undefined,
    persistBitmap: async () => undefined,
    timing: { ...fastTiming, ...options.timing },
    logger: options.logger.child({ side: 'source' }),
  });
  mirror.start();
  t.teardown(async () => {
    await mirror.stop('test done');
  });
  return { mirror, saved: () => saved };
}

function allDirty(): DirtyBitmap {
  const bitmap = new DirtyBitmap(SIZE_BYTES, REGION_BYTES);
  bitmap.setRange(0, SIZE_BYTES);
  return bitmap;
}
