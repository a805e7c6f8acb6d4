// The target side of replication: the --listen port. Each connection must authenticate as a
// known peer, then name (Hello) a mirror volume it may write; after that its writes go to their
// home locations on that volume, in order where they overlap, and are acknowledged once on the
// device (FUA and Flush: once durable). Anything malformed or out of range drops the connection
// with a logged reason before it touches the device.
import net from 'node:net';
import type { Logger } from 'pino';
import { BufferPool } from '../native/index';
import { DirtyBitmap } from '../native/index';
import type { ReplicaTarget } from '../volume/replica';
import type { VolumeDivergence } from '../daemon/volume-manager';
import {
  authenticate,
  FrameChannel,
  PROTOCOL_VERSION,
  whenWritable,
  wireMessage,
  WriteFlag,
  Capability,
  type ErrorCodeName,
  type Hello,
  type ResyncRequest,
  type StatusName,
  type Write,
  peerText,
} from '../wire/index';
import type { MirrorSourceBinding } from '../daemon/registry';
import { OverlapOrder } from './overlap-order';

/** Connections at once (authenticated or not). */
export const replicationConnectionsMax = 64;
/** Per session: operations and payload bytes applied at once; above them reading pauses, so a
 *  fast source is slowed by TCP instead of growing our memory. */
const SESSION_OPS_MAX = 256;
const SESSION_BYTES_MAX = 64 * 1024 * 1024;
/** Flushes and barriers waiting to be answered; each holds a drain (and a device flush). */
const SESSION_FLUSHES_MAX = 64;
/** Replies the source has not read yet: above this, reading pauses until the socket drains,
 *  so a source that stops reading cannot grow our write buffer. */
const SESSION_REPLY_BYTES_MAX = 1024 * 1024;
const HELLO_TIMEOUT_MS = 10_000;
/** What this target offers; the reply carries the intersection with what the source asks. */
const TARGET_CAPABILITIES = Capability.ORDERED_WRITES | Capability.BITMAP_EXCHANGE;
/** A ResyncRequest: at most this many ranges and bytes (answered one range at a time). */
const RESYNC_RANGES_MAX = 64;
const RESYNC_REQUEST_BYTES_MAX = 8 * 1024 * 1024;
/** Regions per BitmapExchange part: 1 MiB of bits (32 TiB of 64 KiB regions). */
const BITMAP_PART_REGIONS = 8 * 1024 * 1024;

export interface TargetLookup {
  record: { name: string; role: string; mirrorSource?: MirrorSourceBinding };
  volume: (ReplicaTarget & { failure(): { code: string; message: string } | undefined }) | null;
}

export interface ReplicationServerOptions {
  nodeName: string;
  /** The peer's shared secret, or undefined for an unknown peer. */
  secretForPeer: (peerName: string) => Buffer | undefined;
  lookupVolume: (name: string) => TargetLookup | undefined;
  bindSource: (volumeName: string, binding: MirrorSourceBinding) => Promise<void>;
  /** The mirror volume's divergence (written while promoted: split brain), if any. */
  divergence: (volumeName: string) => VolumeDivergence | undefined;
  /** The source resolved the split brain: forget the divergence and hold `binding` again. */
  resolveDivergence: (volumeName: string, binding: MirrorSourceBinding) => Promise<void>;
  logger: Logger;
  /** Fault layer for tests, 0 in production: each replicated write waits a random 0..N ms
   *  before it is issued, so writes that may run concurrently really finish out of order. */
  faultApplyDelayMaxMs?: number;
  /** Flush the mirror volume at every epoch boundary of async mode (default false; config
   *  replication.epochFlush): a target host losing power then keeps a prefix of the writes.
   *  Without, only the source's resend of what the target acknowledged and had not flushed
   *  repairs that, when it reconnects. */
  epochFlush?: boolean;
  /** Connections at once, authenticated or not (default replicationConnectionsMax); one
   *  accepted beyond it is closed at once. */
  maxConnections?: number;
  /** Capabilities offered (default: all this version has). Tests offer fewer to act as an
   *  older daemon. */
  capabilities?: number;
}

class Refusal extends Error {
  constructor(readonly code: ErrorCodeName, message: string) {
    super(message);
  }
}

export class ReplicationServer {
  private readonly options: ReplicationServerOptions;
  private readonly logger: Logger;
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  /** Live session per target volume name. */
  private readonly sessions = new Map<string, TargetSession>();
  private readonly pool = new BufferPool({ maxPooledBytes: SESSION_BYTES_MAX, alignBytes: 4096 });
  private closing = false;
  private readonly maxConnections: number;
  /** Connections not yet authenticated, oldest first. At most half the slots: a new one
   *  evicts the oldest, so peers that never finish the handshake cannot keep a real source out
   *  (it needs only the few milliseconds its own handshake takes). */
  private readonly authenticating = new Set<net.Socket>();
  /** Per target volume, the admission in progress: one at a time, until its session is
   *  registered, so two connections can never both pass the "no other session" check. */
  private readonly admissions = new Map<string, Promise<void>>();

  constructor(options: ReplicationServerOptions) {
    this.options = options;
    this.logger = options.logger;
    this.server = net.createServer({ noDelay: true }, (socket) => {
      void this.accept(socket);
    });
    // Counted here, not with net.Server's maxConnections: an adopted connection (FrameChannel's
    // ownReadBuffers) lives on in a new socket the server does not count.
    this.maxConnections = options.maxConnections ?? replicationConnectionsMax;
  }

  /** Resolves with the bound port. */
  listen(host: string, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        this.server.on('error', (error) => this.logger.error({ err: error }, 'replication listener error'));
        resolve((this.server.address() as net.AddressInfo).port);
      });
    });
  }

  get sessionCount(): number {
    return this.sessions.size;
  }

  /** The peer writing `volumeName` now, if any. */
  sessionPeer(volumeName: string): string | undefined {
    return this.sessions.get(volumeName)?.peerName;
  }

  /** Ends the session writing `volumeName` (volume promote --force); resolves once the writes
   *  it started have landed. */
  async endSession(volumeName: string, reason: string): Promise<void> {
    const session = this.sessions.get(volumeName);
    if (session === undefined) return;
    await session.close(reason);
    if (this.sessions.get(volumeName) === session) this.sessions.delete(volumeName);
  }

  /** Stops accepting and closes every connection; writes being applied finish first. */
  async close(): Promise<void> {
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all([...this.sessions.values()].map((session) => session.close('the daemon is stopping')));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  private async accept(accepted: net.Socket): Promise<void> {
    const remote = `${accepted.remoteAddress ?? '?'}:${accepted.remotePort ?? '?'}`;
    if (this.closing) {
      accepted.destroy();
      return;
    }
    if (this.sockets.size >= this.maxConnections) {
      this.logger.warn({ remote, maxConnections: this.maxConnections }, 'replication connection refused: too many connections');
      accepted.destroy();
      return;
    }
    const authenticatingMax = Math.max(1, Math.floor(this.maxConnections / 2));
    if (this.authenticating.size >= authenticatingMax) {
      const oldest = this.authenticating.values().next().value as net.Socket;
      this.authenticating.delete(oldest);
      this.logger.warn({ remote: `${oldest.remoteAddress ?? '?'}:${oldest.remotePort ?? '?'}`, authenticatingMax }, 'replication connection dropped: still not authenticated, and a newer connection needs its slot');
      oldest.destroy();
    }
    accepted.setKeepAlive(true, 10_000);
    const pooled = new WeakSet<Buffer>();
    // Payloads are read straight into aligned pooled buffers, which go to the device as they are.
    const channel = new FrameChannel(accepted, {
      queuedFramesMax: 64,
      queuedBytesMax: 32 * 1024 * 1024,
      allocatePayload: (bytes) => {
        const buffer = this.pool.acquire(bytes);
        pooled.add(buffer);
        return buffer;
      },
      ownReadBuffers: true,
    });
    // From here on the connection is the channel's stream (a new socket when adopted).
    const socket = channel.stream as net.Socket;
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    socket.on('error', (error) => this.logger.debug({ remote, err: error }, 'replication connection error'));
    let peerName: string;
    this.authenticating.add(socket);
    try {
      ({ peerName } = await authenticate(channel, { role: 'responder', nodeName: this.options.nodeName, secretForPeer: this.options.secretForPeer }));
    } catch (error) {
      this.logger.warn({ remote, peer: (error as { peerName?: string }).peerName, code: (error as { code?: string }).code, reason: (error as Error).message }, 'replication connection refused: authentication failed');
      // end(), not destroy(): the Error frame authenticate() queued must reach the peer, so it
      // knows the refusal is severe. A peer that does not close is cut off shortly after.
      socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    } finally {
      this.authenticating.delete(socket);
    }
    const log = this.logger.child({ remote, peer: peerName });
    let hello: Hello;
    let target: TargetLookup['volume'];
    let knownGenerations: number[];
    let bindOnFlush: (() => Promise<void>) | undefined;
    let split: SplitBrain | null;
    let admitted = (): void => undefined;
    try {
      const frame = await channel.receive(AbortSignal.timeout(HELLO_TIMEOUT_MS));
      if (frame.message.kind !== 'hello') throw new Refusal('ERROR_CODE_PROTOCOL', `expected hello, got ${frame.message.kind}`);
      hello = frame.message.body;
      admitted = await this.admissionTurn(hello.targetVolumeName);
      ({ volume: target, knownGenerations, bindOnFlush, split } = await this.admit(hello, peerName));
    } catch (error) {
      admitted();
      const code: ErrorCodeName = error instanceof Refusal ? error.code : 'ERROR_CODE_PROTOCOL';
      log.warn({ code, reason: (error as Error).message }, 'replication hello refused');
      if (!socket.destroyed) {
        channel.send(wireMessage('helloReply', { accepted: false, error: { code, message: (error as Error).message }, protocolVersion: PROTOCOL_VERSION, nodeName: this.options.nodeName, sizeBytes: 0, logicalSectorBytes: 0, generationIds: [], capabilities: 0, diverged: false, divergedBytes: 0, promoted: false }));
        socket.end();
        socket.destroySoon();
      }
      return;
    }
    if (target === null || this.closing) {
      admitted();
      socket.destroy();
      return;
    }
    const info = target.info();
    // The session works with what both sides have: an ordered write the source did not
    // negotiate is refused there.
    const capabilities = hello.capabilities & (this.options.capabilities ?? TARGET_CAPABILITIES);
    const session = new TargetSession(channel, target, { ...hello, capabilities }, peerName, log, (buffer) => {
      if (pooled.has(buffer)) {
        pooled.delete(buffer);
        this.pool.release(buffer);
      }
    }, { faultDelayMaxMs: this.options.faultApplyDelayMaxMs ?? 0, epochFlush: this.options.epochFlush ?? false }, bindOnFlush, split);
    this.sessions.set(hello.targetVolumeName, session);
    admitted();
    channel.send(
      wireMessage('helloReply', {
        accepted: true,
        protocolVersion: PROTOCOL_VERSION,
        nodeName: this.options.nodeName,
        sizeBytes: info.sizeBytes,
        logicalSectorBytes: info.logicalSectorBytes,
        generationIds: knownGenerations,
        capabilities,
        diverged: split !== null,
        divergedBytes: split?.divergence.bits.dirtyBytes() ?? 0,
        promoted: split?.divergence.promoted ?? false,
      }),
    );
    if (split !== null) {
      log.warn({ volume: hello.targetVolumeName, source: hello.volumeName, divergedBytes: split.divergence.bits.dirtyBytes(), promoted: split.divergence.promoted }, 'replication session started on a diverged volume (split brain): no writes until the source resolves it');
    }
    log.info({ volume: hello.targetVolumeName, source: hello.volumeName, sourceUuid: hello.volumeUuid, resumed: knownGenerations.length > 0 }, 'replication session started');
    const reason = await session.run();
    if (this.sessions.get(hello.targetVolumeName) === session) this.sessions.delete(hello.targetVolumeName);
    log.info({ volume: hello.targetVolumeName, reason, applied: session.appliedWrites }, 'replication session ended');
  }

  /** Waits for the admissions to `volumeName` before this one; the result ends this one's turn. */
  private async admissionTurn(volumeName: string): Promise<() => void> {
    const before = this.admissions.get(volumeName);
    let done!: () => void;
    const turn = new Promise<void>((resolve) => (done = resolve));
    this.admissions.set(volumeName, turn);
    await before;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      if (this.admissions.get(volumeName) === turn) this.admissions.delete(volumeName);
      done();
    };
  }

  /** MAKEPARTS on the target side: the checks of docs/PROTOCOL.md, then the binding. */
  private async admit(hello: Hello, peerName: string): Promise<{ volume: TargetLookup['volume']; knownGenerations: number[]; bindOnFlush: (() => Promise<void>) | undefined; split: SplitBrain | null }> {
    if (hello.protocolVersion !== PROTOCOL_VERSION) {
      throw new Refusal('ERROR_CODE_UNSUPPORTED_VERSION', `protocol version ${hello.protocolVersion} is not supported (this daemon speaks ${PROTOCOL_VERSION})`);
    }
    const found = this.options.lookupVolume(hello.targetVolumeName);
    if (found === undefined) throw new Refusal('ERROR_CODE_UNKNOWN_VOLUME', `no volume ${JSON.stringify(hello.targetVolumeName)} on ${this.options.nodeName}`);
    const { record, volume } = found;
    if (record.role !== 'mirror') throw new Refusal('ERROR_CODE_NOT_A_MIRROR', `volume ${record.name} was not added with --mirror`);
    if (volume === null || volume.failure() !== undefined) throw new Refusal('ERROR_CODE_IO', `volume ${record.name} is not online`);
    const info = volume.info();
    if (info.sizeBytes < hello.sizeBytes) {
      throw new Refusal('ERROR_CODE_TARGET_TOO_SMALL', `volume ${record.name} has ${info.sizeBytes} bytes; the source ${hello.volumeName} has ${hello.sizeBytes}`);
    }
    if (info.logicalSectorBytes !== hello.logicalSectorBytes) {
      throw new Refusal('ERROR_CODE_SECTOR_SIZE_MISMATCH', `volume ${record.name} has ${info.logicalSectorBytes}-byte sectors; the source ${hello.logicalSectorBytes}`);
    }
    const generation = hello.generationIds[0];
    if (generation === undefined || generation <= 0) throw new Refusal('ERROR_CODE_PROTOCOL', 'hello carries no generation');
    const bound = record.mirrorSource;
    if (bound !== undefined && (bound.peer !== peerName || bound.volumeUuid !== hello.volumeUuid)) {
      throw new Refusal('ERROR_CODE_TARGET_BUSY', `volume ${record.name} mirrors ${bound.volumeName} (${bound.volumeUuid}) from ${bound.peer}; remove and add it again to change its source`);
    }
    const existing = this.sessions.get(record.name);
    if (existing !== undefined && (existing.peerName !== peerName || existing.sourceUuid !== hello.volumeUuid)) {
      throw new Refusal('ERROR_CODE_TARGET_BUSY', `volume ${record.name} is being written by ${existing.peerName}'s volume ${existing.sourceUuid}`);
    }
    if (existing !== undefined) {
      // The same source reconnecting (its old connection may not have noticed the drop yet):
      // the old session's writes must all land before the new one applies anything.
      await existing.close('replaced by a new connection from the same source');
      if (this.sessions.get(record.name) === existing) this.sessions.delete(record.name);
    }
    if (this.sessions.has(record.name)) throw new Refusal('ERROR_CODE_TARGET_BUSY', `volume ${record.name} is being written by another connection`);
    const knows = bound !== undefined && bound.generation === generation;
    // A new generation is recorded only at the session's first durable flush, which the source
    // sends after it has made "everything dirty" durable on its side: a source that crashes
    // before that must not find its generation known, or it would trust an old, clean bitmap.
    const binding = { peer: peerName, volumeUuid: hello.volumeUuid, volumeName: hello.volumeName, generation, boundAt: new Date().toISOString() };
    const divergence = this.options.divergence(record.name);
    if (divergence !== undefined) {
      // Written while promoted: the source learns it from the reply (our own generation first)
      // and nothing is written until it resolves the split brain.
      const split: SplitBrain = { divergence, resolve: (resolved) => this.options.resolveDivergence(record.name, { ...binding, generation: resolved, boundAt: new Date().toISOString() }) };
      return { volume, knownGenerations: [divergence.generation, ...(bound === undefined ? [] : [bound.generation])], bindOnFlush: undefined, split };
    }
    const bindOnFlush = knows ? undefined : () => this.options.bindSource(record.name, binding);
    return { volume, knownGenerations: knows ? [generation] : [], bindOnFlush, split: null };
  }
}

const STATUS_FOR_ERRNO: Record<string, StatusName> = {
  EINVAL: 'STATUS_INVALID',
  ENOSPC: 'STATUS_NO_SPACE',
  EPERM: 'STATUS_READ_ONLY',
  EROFS: 'STATUS_READ_ONLY',
};

/** A session on a diverged volume: no writes until the source sends Resolve. */
interface SplitBrain {
  divergence: VolumeDivergence;
  resolve: (generation: number) => Promise<void>;
}

/** One authenticated source writing one mirror volume. */
class TargetSession {
  appliedWrites = 0;
  private readonly order = new OverlapOrder(SESSION_OPS_MAX);
  private inFlightBytes = 0;
  private lastSequence = 0;
  private ended: string | null = null;
  private orderBroken = false;
  /** Set by the last ordered write: every write received from then on waits for what came
   *  before that write (async mode's epochs). `landed` spares later writes the wait. */
  private epoch: { landed: boolean; start: Promise<void> } | undefined;
  /** A write (not FUA) was issued to the device since the last epoch's flush. True at first:
   *  an earlier session may have left writes unflushed, and the first epoch covers them too. */
  private unflushedSinceEpoch = true;
  /** A write of an epoch failed: applying later ones would leave a device the source never
   *  passed through, so they are refused too. */
  private readonly breakOrder = (error: unknown): never => {
    this.orderBroken = true;
    throw error;
  };
  private readonly settledOne: Array<() => void> = [];
  private running: Promise<string> | null = null;
  private flushesInFlight = 0;
  private sendingBitmap = false;

  constructor(
    private readonly channel: FrameChannel,
    private readonly volume: ReplicaTarget,
    private readonly hello: Hello,
    readonly peerName: string,
    private readonly logger: Logger,
    private readonly releasePayload: (buffer: Buffer) => void,
    private readonly applyOptions: { faultDelayMaxMs: number; epochFlush: boolean },
    /** Set for a generation the target does not know yet: recorded at the first durable flush. */
    private bindOnFlush: (() => Promise<void>) | undefined,
    /** Set while the volume is diverged (split brain). */
    private split: SplitBrain | null = null,
  ) {}

  get sourceUuid(): string {
    return this.hello.volumeUuid;
  }

  run(): Promise<string> {
    this.running ??= this.loop();
    return this.running;
  }

  /** Ends the session: stops reading, lets applied writes finish. */
  async close(reason: string): Promise<void> {
    this.end(reason);
    await this.running;
  }

  private end(reason: string): void {
    if (this.ended !== null) return;
    this.ended = reason;
    this.channel.stream.destroy();
  }

  private async loop(): Promise<string> {
    try {
      while (this.ended === null) {
        for (;;) {
          const stream = this.channel.stream;
          if (stream.writableNeedDrain && stream.writableLength >= SESSION_REPLY_BYTES_MAX && !stream.destroyed) {
            await whenWritable(stream);
          } else if (this.order.size >= SESSION_OPS_MAX - 1 || this.inFlightBytes >= SESSION_BYTES_MAX || this.flushesInFlight >= SESSION_FLUSHES_MAX) {
            await new Promise<void>((resolve) => this.settledOne.push(resolve));
          } else {
            break;
          }
        }
        const { message, payload } = await this.channel.receive();
        if (message.kind !== 'error' && 'sequence' in message.body) this.checkSequence(message.body.sequence);
        if (this.split !== null && (message.kind === 'write' || message.kind === 'flush' || message.kind === 'barrier')) {
          if (payload !== undefined) this.releasePayload(payload);
          this.protocolEnd(`volume diverged from its source (split brain): ${message.kind} refused until the source resolves it`, true, 'ERROR_CODE_SPLIT_BRAIN');
        } else if (message.kind === 'write') {
          this.applyWrite(message.body, payload);
        } else if (message.kind === 'flush' || message.kind === 'barrier') {
          this.applyFlush(message.body.sequence, message.kind === 'flush');
        } else if (message.kind === 'bitmapRequest') {
          // Only a diverged volume has a bitmap to send, and one transfer at a time: each
          // request costs up to a whole-volume bitmap in parts, so it must not be repeatable.
          if (this.split === null) throw new SessionProtocolError('bitmap request, but the volume has not diverged');
          if (this.sendingBitmap) throw new SessionProtocolError('bitmap request while the previous one is still being answered');
          this.sendingBitmap = true;
          this.background(
            this.sendBitmap(message.body.sequence, this.split.divergence.bits).finally(() => {
              this.sendingBitmap = false;
            }),
          );
        } else if (message.kind === 'resyncRequest') {
          this.serveResync(message.body);
        } else if (message.kind === 'resolve') {
          this.background(this.resolve(message.body.sequence, message.body.generation));
        } else if (message.kind === 'error') {
          this.protocolEnd(`source reported ${message.body.code}: ${peerText(message.body.message)}`, false);
        } else {
          this.protocolEnd(`unexpected ${message.kind} in a replication session`, true);
        }
      }
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (this.ended === null) {
        const closed = code === 'BM_ERR_WIRE_CLOSED';
        const what = code === 'BM_ERR_REPLICATION_PROTOCOL' ? 'protocol violation' : 'malformed frame';
        // A body this version does not know: the peer sent a message it should have asked for.
        const wireCode: ErrorCodeName = code === 'BM_ERR_WIRE_UNKNOWN_MESSAGE' ? 'ERROR_CODE_UNSUPPORTED_MESSAGE' : 'ERROR_CODE_PROTOCOL';
        this.protocolEnd(closed ? 'connection closed by the source' : `${what} (${code ?? 'error'}): ${(error as Error).message}`, !closed, wireCode);
      }
    }
    await this.order.drain();
    return this.ended ?? 'ended';
  }

  private checkSequence(sequence: number): void {
    if (sequence <= this.lastSequence) throw new SessionProtocolError(`sequence ${sequence} does not follow ${this.lastSequence}`);
    this.lastSequence = sequence;
  }

  private applyWrite(write: Write, payload: Buffer | undefined): void {
    const { sequence, offsetBytes, lengthBytes, flags } = write;
    const zeroes = (flags & WriteFlag.ZEROES) !== 0;
    const fua = (flags & WriteFlag.FUA) !== 0;
    const ordered = (flags & WriteFlag.ORDERED) !== 0;
    const invalid =
      (flags & ~(WriteFlag.ZEROES | WriteFlag.FUA | WriteFlag.ORDERED)) !== 0
        ? `unknown write flags ${flags}`
        : ordered && (this.hello.capabilities & Capability.ORDERED_WRITES) === 0
          ? 'ordered write, but the source did not ask for CAPABILITY_ORDERED_WRITES in its Hello'
          : lengthBytes <= 0
          ? 'empty write'
          : offsetBytes + lengthBytes > this.hello.sizeBytes
            ? `write of ${lengthBytes} bytes at ${offsetBytes} is past the end of the ${this.hello.sizeBytes}-byte volume`
            : null;
    if (invalid !== null) {
      if (payload !== undefined) this.releasePayload(payload);
      throw new SessionProtocolError(invalid);
    }
    const bytes = payload?.length ?? 0;
    this.inFlightBytes += bytes;
    // An ordered write starts an epoch: it and every write after it start once every write
    // before it landed, so a write never lands before one the source had acknowledged when it
    // was issued (crash consistent). With epochFlush the earlier ones are also flushed first,
    // which holds when the target host loses power and its device's volatile cache with it.
    // Within an epoch writes only wait for overlaps.
    if (ordered) {
      const start = this.order.drain().then(() => this.flushEarlierEpochs());
      const epoch = { landed: false, start };
      start.then(
        () => {
          epoch.landed = true;
        },
        (error: unknown) => {
          // Its writes fail with this error (run below) and, the order broken, so do later ones.
          this.orderBroken = true;
          this.logger.error({ err: error }, 'flushing the mirror volume between two epochs failed');
        },
      );
      this.epoch = epoch;
    }
    const epoch = this.epoch;
    const issue = (): Promise<void> => {
      if (!fua) this.unflushedSinceEpoch = true;
      return zeroes || payload === undefined ? this.volume.mirrorWriteZeroes(offsetBytes, lengthBytes, fua) : this.volume.mirrorWrite(offsetBytes, payload, fua);
    };
    const faultDelayMaxMs = this.applyOptions.faultDelayMaxMs;
    const apply =
      faultDelayMaxMs > 0 ? (): Promise<void> => new Promise((resolve) => setTimeout(resolve, Math.random() * faultDelayMaxMs)).then(issue) : issue;
    let run = apply;
    if (epoch !== undefined) {
      const applyInEpoch = (): Promise<void> =>
        this.orderBroken ? Promise.reject(Object.assign(new Error('an earlier ordered write failed'), { code: 'EIO' })) : apply().catch(this.breakOrder);
      // No promise hop once the epoch's start has landed (the common case under a steady load).
      run = () => (epoch.landed ? applyInEpoch() : epoch.start.then(applyInEpoch));
    }
    const landed = (): void => {
      this.inFlightBytes -= bytes;
      if (payload !== undefined) this.releasePayload(payload);
      if (this.settledOne.length > 0) for (const wake of this.settledOne.splice(0)) wake();
    };
    this.order.run(offsetBytes, lengthBytes, run).then(
      () => {
        landed();
        this.appliedWrites++;
        this.answer('writeAck', sequence, 'STATUS_OK');
      },
      (error: unknown) => {
        landed();
        this.logger.error({ err: error, offsetBytes, lengthBytes }, 'applying a replicated write failed');
        this.answer('writeAck', sequence, statusFor(error));
      },
    );
  }

  /** Before an epoch's writes start (every earlier write has landed): makes the earlier ones
   *  durable. Nothing is issued meanwhile, as every later write waits for this epoch. */
  private flushEarlierEpochs(): Promise<void> | undefined {
    if (!this.unflushedSinceEpoch || !this.applyOptions.epochFlush) return undefined;
    this.unflushedSinceEpoch = false;
    return this.volume.flush();
  }

  /** Flush: durable once every write received before it has landed. Barrier: landed only. */
  private applyFlush(sequence: number, durable: boolean): void {
    this.flushesInFlight++;
    void this.order
      .drain()
      .then(() => (durable ? this.volume.flush() : undefined))
      .then(async () => {
        const bind = durable ? this.bindOnFlush : undefined;
        this.bindOnFlush = undefined;
        await bind?.();
      })
      .then(
        () => this.answer('flushAck', sequence, 'STATUS_OK'),
        (error: unknown) => {
          this.logger.error({ err: error }, 'flushing the mirror volume failed');
          this.answer('flushAck', sequence, statusFor(error));
        },
      )
      .finally(() => {
        this.flushesInFlight--;
        for (const wake of this.settledOne.splice(0)) wake();
      });
  }

  /** A request answered asynchronously; a failure ends the session with the reason. */
  private background(work: Promise<void>): void {
    work.catch((error: unknown) => {
      if (this.ended === null) this.protocolEnd((error as Error).message, true, (error as { wireCode?: ErrorCodeName }).wireCode ?? 'ERROR_CODE_INTERNAL');
    });
  }

  /** BitmapRequest: the regions written while promoted, in parts, each sent once the socket
   *  has taken the one before. */
  private async sendBitmap(sequence: number, bits: DirtyBitmap): Promise<void> {
    for (let first = 0; ; first += BITMAP_PART_REGIONS) {
      await whenWritable(this.channel.stream);
      const count = Math.min(BITMAP_PART_REGIONS, bits.regionCount - first);
      const payload = Buffer.alloc(Math.ceil(count / 8));
      const startBytes = first * bits.regionBytes;
      const endBytes = Math.min(bits.sizeBytes, (first + count) * bits.regionBytes);
      let cursor = startBytes;
      while (cursor < endBytes) {
        const batch = bits.runs(cursor, 256);
        for (const run of batch) {
          const from = Math.max(run.offsetBytes, startBytes);
          const to = Math.min(run.offsetBytes + run.lengthBytes, endBytes);
          for (let region = Math.floor(from / bits.regionBytes); region * bits.regionBytes < to; region++) {
            const bit = region - first;
            payload[bit >> 3] = (payload[bit >> 3] as number) | (1 << (bit & 7));
          }
        }
        const last = batch[batch.length - 1];
        cursor = batch.length < 256 || last === undefined ? endBytes : last.offsetBytes + last.lengthBytes;
      }
      const lastPart = first + count >= bits.regionCount;
      if (this.channel.stream.destroyed) return;
      this.channel.send(wireMessage('bitmapExchange', { sequence, regionBytes: bits.regionBytes, firstRegion: first, regionCount: count, last: lastPart }), payload);
      if (lastPart) return;
    }
  }

  /** ResyncRequest: each range read once every write received before the request has landed,
   *  and sent as ResyncData carrying the request's sequence, in the order asked (one read at a
   *  time: a restore, not the data path). */
  private serveResync(request: ResyncRequest): void {
    const sizeBytes = this.volume.info().sizeBytes;
    const total = request.ranges.reduce((sum, range) => sum + range.lengthBytes, 0);
    const invalid =
      request.ranges.length === 0 || request.ranges.length > RESYNC_RANGES_MAX
        ? `a resync request must name 1 to ${RESYNC_RANGES_MAX} ranges`
        : total > RESYNC_REQUEST_BYTES_MAX
          ? `a resync request may ask for at most ${RESYNC_REQUEST_BYTES_MAX} bytes`
          : request.ranges.find((range) => range.lengthBytes <= 0 || range.offsetBytes + range.lengthBytes > sizeBytes) === undefined
            ? null
            : `a resync range is empty or past the end of the ${sizeBytes}-byte volume`;
    if (invalid !== null) throw new SessionProtocolError(invalid);
    this.inFlightBytes += total;
    const earlier = this.order.drain();
    this.background(
      (async () => {
        try {
          await earlier;
          for (const range of request.ranges) {
            if (this.channel.stream.destroyed) return;
            const read = await this.volume.read(range.offsetBytes, range.lengthBytes).catch((error: unknown) => {
              throw Object.assign(new Error(`reading ${range.lengthBytes} bytes at ${range.offsetBytes} for the source failed: ${(error as Error).message}`), { wireCode: 'ERROR_CODE_IO' });
            });
            // A copy: the pooled read buffer goes back at once, the socket keeps its own.
            const payload = Buffer.from(read.data);
            read.release();
            if (this.channel.stream.destroyed) return;
            this.channel.send(wireMessage('resyncData', { sequence: request.sequence, offsetBytes: range.offsetBytes, lengthBytes: range.lengthBytes }), payload);
            // Counted until the socket took it: a source that does not read must stop the
            // session reading requests (SESSION_BYTES_MAX), not grow the write buffer.
            await whenWritable(this.channel.stream);
          }
        } finally {
          this.inFlightBytes -= total;
          for (const wake of this.settledOne.splice(0)) wake();
        }
      })(),
    );
  }

  /** Resolve: the source made the union of both sides' changes durable on its side; forget the
   *  divergence and hold its generation. Answered with FlushAck. */
  private async resolve(sequence: number, generation: number): Promise<void> {
    await this.order.drain();
    const split = this.split;
    if (split === null) {
      this.logger.warn({ generation }, 'resolve received, but the volume has not diverged');
      this.answer('flushAck', sequence, 'STATUS_INVALID');
      return;
    }
    try {
      await split.resolve(generation);
    } catch (error) {
      this.logger.warn({ err: error }, 'resolving the split brain refused or failed');
      this.answer('flushAck', sequence, (error as { code?: string }).code === 'BM_ERR_VOLUME_ROLE' ? 'STATUS_READ_ONLY' : 'STATUS_IO_ERROR');
      return;
    }
    this.split = null;
    this.answer('flushAck', sequence, 'STATUS_OK');
  }

  private answer(kind: 'writeAck' | 'flushAck', sequence: number, status: StatusName): void {
    if (this.channel.stream.destroyed) return;
    this.channel.send(wireMessage(kind, { sequence, status }));
  }

  private protocolEnd(reason: string, tellSource: boolean, code: ErrorCodeName = 'ERROR_CODE_PROTOCOL'): void {
    if (tellSource && !this.channel.stream.destroyed) {
      this.channel.send(wireMessage('error', { code, message: reason }));
    }
    if (tellSource) this.logger.warn({ reason }, 'replication connection dropped');
    this.ended = reason;
    // end() flushes the error frame first; nothing more is read either way.
    this.channel.stream.end();
    setTimeout(() => this.channel.stream.destroy(), 1000).unref();
  }
}

class SessionProtocolError extends Error {
  readonly code = 'BM_ERR_REPLICATION_PROTOCOL';
}

function statusFor(error: unknown): StatusName {
  const code = (error as { code?: string }).code ?? '';
  return STATUS_FOR_ERRNO[code] ?? 'STATUS_IO_ERROR';
}
