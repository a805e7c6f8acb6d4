// The source side of one replication connection: TCP connect, mutual authentication, Hello,
// then writes and flushes matched to their acknowledgements by sequence number. A link never
// reconnects: when it closes, every pending operation resolves 'lost' and the mirror decides
// what to do (mark the regions dirty, crack to OUTOFSYNC, retry later).
import net from 'node:net';
import type { Logger } from 'pino';
import { authenticate, FrameChannel, peerText, PROTOCOL_VERSION, wireMessage, type BitmapExchange, type ErrorCodeName, type Hello, type HelloReply, type WireMessage, whenWritable, WriteFlag } from '../wire/index';
import type { MirrorErrorCode } from './mirror-state';

export type SendResult = 'ok' | 'lost' | 'failed';

/** Why a link could not be set up: transient ones are retried with backoff, severe ones put the
 *  mirror in ERROR until the admin acts. */
export class LinkSetupError extends Error {
  constructor(
    readonly severity: 'transient' | 'severe',
    /** errno name or BM_ERR_* for transient failures; a MirrorErrorCode for severe ones. */
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'LinkSetupError';
  }
}

/** HelloReply refusals that need the admin, mapped to the mirror's error codes. */
const SEVERE_REFUSALS: Partial<Record<ErrorCodeName, MirrorErrorCode>> = {
  ERROR_CODE_UNKNOWN_VOLUME: 'BM_ERR_TARGET_NOT_FOUND',
  ERROR_CODE_NOT_A_MIRROR: 'BM_ERR_TARGET_NOT_MIRROR',
  ERROR_CODE_TARGET_TOO_SMALL: 'BM_ERR_TARGET_TOO_SMALL',
  ERROR_CODE_SECTOR_SIZE_MISMATCH: 'BM_ERR_SECTOR_MISMATCH',
  ERROR_CODE_TARGET_BUSY: 'BM_ERR_TARGET_BOUND',
  ERROR_CODE_VOLUME_MISMATCH: 'BM_ERR_IDENTITY_MISMATCH',
  ERROR_CODE_UNSUPPORTED_VERSION: 'BM_ERR_PROTOCOL_VERSION',
  ERROR_CODE_AUTH_FAILED: 'BM_ERR_AUTH_FAILED',
  ERROR_CODE_UNKNOWN_PEER: 'BM_ERR_AUTH_UNKNOWN_PEER',
};

export interface SourceLinkOptions {
  host: string;
  port: number;
  nodeName: string;
  peerName: string;
  secret: Buffer;
  hello: Omit<Hello, 'protocolVersion' | 'nodeName'>;
  connectTimeoutMs: number;
  /** A write or flush unanswered this long means the target or the path is stuck: the link is
   *  closed and its pending operations count as lost. */
  ackTimeoutMs: number;
  logger: Logger;
  /** Aborting gives up the set-up at once (the daemon is stopping). */
  signal?: AbortSignal;
}

interface Pending {
  sentMs: number;
  resolve: (result: SendResult) => void;
}

/** One part of the target's bitmap of regions written while promoted (split brain). */
export interface BitmapPart {
  header: BitmapExchange;
  bits: Buffer;
}

/** A request answered with data frames carrying its sequence (bitmap parts, resync data). */
interface DataRequest {
  sentMs: number;
  /** Takes one answer; returns true when it was the last. */
  take: (message: WireMessage, payload: Buffer | undefined) => boolean;
  lost: () => void;
}

export class SourceLink {
  readonly reply: HelloReply;
  private readonly channel: FrameChannel;
  private readonly socket: net.Socket;
  private readonly logger: Logger;
  private readonly ackTimeoutMs: number;
  private readonly pending = new Map<number, Pending>();
  private readonly requests = new Map<number, DataRequest>();
  private nextSequence = 1;
  private lastAckMs = 0;
  private closeReason: string | null = null;
  private readonly closeListeners: Array<(reason: string) => void> = [];
  private readonly ackTimer: NodeJS.Timeout;
  /** Status of the last refused write or flush, for the mirror's error reason. */
  lastTargetStatus: string | null = null;

  private constructor(channel: FrameChannel, reply: HelloReply, options: SourceLinkOptions) {
    const socket = channel.stream as net.Socket;
    this.socket = socket;
    this.channel = channel;
    this.reply = reply;
    this.logger = options.logger;
    this.ackTimeoutMs = options.ackTimeoutMs;
    socket.on('close', () => this.close('connection closed'));
    this.ackTimer = setInterval(() => this.checkAckTimeout(), Math.min(1000, Math.max(50, this.ackTimeoutMs / 4)));
    this.ackTimer.unref();
    void this.receiveLoop();
  }

  /** Connects, authenticates and says Hello. Rejects with LinkSetupError. */
  static async open(options: SourceLinkOptions): Promise<SourceLink> {
    const connected = await connect(options.host, options.port, options.connectTimeoutMs, options.signal);
    // Acknowledgements are small: reading them into one reused buffer saves a 64 KiB one per read.
    const channel = new FrameChannel(connected, { queuedFramesMax: 1024, queuedBytesMax: 1024 * 1024, ownReadBuffers: true });
    const abandon = (): void => {
      channel.stream.destroy(); // a new socket when adopted
    };
    options.signal?.addEventListener('abort', abandon, { once: true });
    try {
      return await SourceLink.setUp(channel, options);
    } finally {
      options.signal?.removeEventListener('abort', abandon);
    }
  }

  private static async setUp(channel: FrameChannel, options: SourceLinkOptions): Promise<SourceLink> {
    const socket = channel.stream;
    try {
      await authenticate(channel, {
        role: 'initiator',
        nodeName: options.nodeName,
        expectedPeerName: options.peerName,
        secretForPeer: (name) => (name === options.peerName ? options.secret : undefined),
        timeoutMs: options.connectTimeoutMs,
      });
    } catch (error) {
      socket.destroy();
      const code = errorCodeOf(error, 'BM_ERR_AUTH_PROTOCOL');
      if (code === 'BM_ERR_AUTH_FAILED' || code === 'BM_ERR_AUTH_UNKNOWN_PEER') {
        throw new LinkSetupError('severe', code, `authentication with peer ${options.peerName} failed: ${(error as Error).message}`);
      }
      throw new LinkSetupError('transient', code, `authentication with peer ${options.peerName} did not complete: ${(error as Error).message}`);
    }
    try {
      channel.send(wireMessage('hello', { protocolVersion: PROTOCOL_VERSION, nodeName: options.nodeName, ...options.hello }));
      const timeout = AbortSignal.timeout(options.connectTimeoutMs);
      const frame = await channel.receive(timeout);
      const message = frame.message;
      if (message.kind === 'error') throw refusal(message.body.code, peerText(message.body.message));
      if (message.kind !== 'helloReply') throw new LinkSetupError('transient', 'BM_ERR_PROTOCOL', `expected helloReply, got ${message.kind}`);
      const reply = message.body;
      if (!reply.accepted) throw refusal(reply.error?.code ?? 'ERROR_CODE_UNSPECIFIED', reply.error?.message ?? 'no reason given');
      checkReply(reply, options.hello);
      return new SourceLink(channel, reply, options);
    } catch (error) {
      socket.destroy();
      if (error instanceof LinkSetupError) throw error;
      throw new LinkSetupError('transient', errorCodeOf(error, 'BM_ERR_PROTOCOL'), `hello with peer ${options.peerName} failed: ${(error as Error).message}`);
    }
  }

  get isOpen(): boolean {
    return this.closeReason === null;
  }

  /** Sends a write (payload undefined: zeroes over lengthBytes). Resolves with its outcome.
   *  `ordered`: the target applies it only after every earlier write landed (async mode). */
  write(offsetBytes: number, payload: Buffer | undefined, lengthBytes: number, fua: boolean, ordered = false): Promise<SendResult> {
    if (this.closeReason !== null) return Promise.resolve('lost');
    const sequence = this.nextSequence++;
    const flags = (fua ? WriteFlag.FUA : 0) | (payload === undefined ? WriteFlag.ZEROES : 0) | (ordered ? WriteFlag.ORDERED : 0);
    return this.track(sequence, () =>
      this.channel.send(wireMessage('write', { sequence, offsetBytes, lengthBytes, flags }), payload),
    );
  }

  /** Everything acknowledged before is durable on the target once this resolves 'ok'. */
  flush(): Promise<SendResult> {
    if (this.closeReason !== null) return Promise.resolve('lost');
    const sequence = this.nextSequence++;
    return this.track(sequence, () => this.channel.send(wireMessage('flush', { sequence })));
  }

  /** BitmapRequest: the target's regions written while promoted. Each part goes to `take` as it
   *  arrives (its bytes are a view, valid only during the call); resolves true after the last
   *  part, null when the link closed first. At most `partsMax` parts are taken. A part `take`
   *  throws for, or one too many, closes the link and rejects with that error. */
  requestBitmap(partsMax: number, take: (header: BitmapExchange, bits: Buffer) => void): Promise<true | null> {
    if (this.closeReason !== null) return Promise.resolve(null);
    const sequence = this.nextSequence++;
    return new Promise((resolve, reject) => {
      let parts = 0;
      this.requests.set(sequence, {
        sentMs: performance.now(),
        take: (message, payload) => {
          try {
            if (message.kind !== 'bitmapExchange') throw new Error(`protocol error: ${message.kind} answers a bitmap request`);
            if (++parts > partsMax) throw new Error(`protocol error: the target sent more than ${partsMax} bitmap parts`);
            take(message.body, payload ?? Buffer.alloc(0));
          } catch (error) {
            reject(error);
            throw error; // closes the link
          }
          if (message.body.last) resolve(true);
          return message.body.last;
        },
        lost: () => resolve(null),
      });
      this.sendOrClose(() => this.channel.send(wireMessage('bitmapRequest', { sequence })));
    });
  }

  /** ResyncRequest for one range: the target's bytes there (null: the link closed first). */
  readRange(offsetBytes: number, lengthBytes: number): Promise<Buffer | null> {
    if (this.closeReason !== null) return Promise.resolve(null);
    const sequence = this.nextSequence++;
    return new Promise((resolve) => {
      this.requests.set(sequence, {
        sentMs: performance.now(),
        take: (message, payload) => {
          const body = message.kind === 'resyncData' ? message.body : undefined;
          if (body === undefined || body.offsetBytes !== offsetBytes || body.lengthBytes !== lengthBytes || payload?.length !== lengthBytes) {
            throw new Error(`protocol error: the answer to a resync request for ${lengthBytes} bytes at ${offsetBytes} does not match it`);
          }
          resolve(payload);
          return true;
        },
        lost: () => resolve(null),
      });
      this.sendOrClose(() => this.channel.send(wireMessage('resyncRequest', { sequence, ranges: [{ offsetBytes, lengthBytes }] })));
    });
  }

  /** Resolve: the target forgets its divergence and holds `generation` again ('ok' once that
   *  is durable there). */
  resolve(generation: number): Promise<SendResult> {
    if (this.closeReason !== null) return Promise.resolve('lost');
    const sequence = this.nextSequence++;
    return this.track(sequence, () => this.channel.send(wireMessage('resolve', { sequence, generation })));
  }

  private sendOrClose(send: () => void): void {
    try {
      send();
    } catch (error) {
      this.close(`send failed: ${(error as Error).message}`);
    }
  }

  /** Resolves when the socket's send buffer has room again (or the link closed). */
  whenWritable(): Promise<void> {
    return this.closeReason !== null ? Promise.resolve() : whenWritable(this.socket);
  }

  /** Called once with the reason when the link closes (at once if it already has). */
  onClose(listener: (reason: string) => void): void {
    if (this.closeReason !== null) listener(this.closeReason);
    else this.closeListeners.push(listener);
  }

  close(reason: string): void {
    if (this.closeReason !== null) return;
    this.closeReason = reason;
    clearInterval(this.ackTimer);
    this.socket.destroy();
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const entry of pending) entry.resolve('lost');
    const requests = [...this.requests.values()];
    this.requests.clear();
    for (const request of requests) request.lost();
    for (const listener of this.closeListeners.splice(0)) listener(reason);
  }

  private track(sequence: number, send: () => void): Promise<SendResult> {
    return new Promise<SendResult>((resolve) => {
      this.pending.set(sequence, { sentMs: performance.now(), resolve });
      try {
        send();
      } catch (error) {
        this.close(`send failed: ${(error as Error).message}`);
      }
    });
  }

  private settle(sequence: number, status: string): void {
    const entry = this.pending.get(sequence);
    if (entry === undefined) {
      this.close(`protocol error: acknowledgement for unknown sequence ${sequence}`);
      return;
    }
    this.pending.delete(sequence);
    this.lastAckMs = performance.now();
    if (status === 'STATUS_OK') {
      entry.resolve('ok');
    } else {
      this.lastTargetStatus = status;
      entry.resolve('failed');
    }
  }

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const { message, payload } = await this.channel.receive();
        if (message.kind === 'writeAck' || message.kind === 'flushAck') {
          this.settle(message.body.sequence, message.body.status);
        } else if (message.kind === 'bitmapExchange' || message.kind === 'resyncData') {
          const request = this.requests.get(message.body.sequence);
          if (request === undefined) {
            this.close(`protocol error: ${message.kind} for unknown sequence ${message.body.sequence}`);
          } else {
            this.lastAckMs = performance.now();
            if (request.take(message, payload)) this.requests.delete(message.body.sequence);
          }
        } else if (message.kind === 'error') {
          this.close(`target reported ${message.body.code}: ${peerText(message.body.message)}`);
        } else {
          this.close(`protocol error: unexpected ${message.kind} from the target`);
        }
        if (this.closeReason !== null) return;
      }
    } catch (error) {
      this.close((error as Error).message);
    }
  }

  private checkAckTimeout(): void {
    const oldestAck = this.pending.values().next();
    const oldestRequest = this.requests.values().next();
    const sentMs = Math.min(oldestAck.done === true ? Infinity : oldestAck.value.sentMs, oldestRequest.done === true ? Infinity : oldestRequest.value.sentMs);
    if (sentMs === Infinity) return;
    // Measured from the later of the oldest send and the last acknowledgement: a backlog that
    // is being worked through is slow, not stuck. But one write the target never finishes
    // must not hide behind others' acknowledgements: its own age is capped at twice the limit.
    const nowMs = performance.now();
    const waitedMs = nowMs - Math.max(sentMs, this.lastAckMs);
    if (waitedMs > this.ackTimeoutMs || nowMs - sentMs > 2 * this.ackTimeoutMs) {
      this.logger.warn({ waitedMs: Math.round(waitedMs), pending: this.pending.size }, 'target did not acknowledge in time; closing the link');
      this.close(`no acknowledgement from the target in ${this.ackTimeoutMs} ms`);
    }
  }
}

/** A string code for the mirror's cause: AbortSignal.timeout() rejects with a DOMException
 *  whose `code` is a number. */
function errorCodeOf(error: unknown, fallback: string): string {
  if ((error as { name?: unknown }).name === 'TimeoutError') return 'ETIMEDOUT';
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && code !== '' ? code : fallback;
}

function refusal(code: ErrorCodeName, message: string): LinkSetupError {
  const severe = SEVERE_REFUSALS[code];
  if (severe !== undefined) return new LinkSetupError('severe', severe, `target refused: ${message}`);
  return new LinkSetupError('transient', code, `target refused: ${message}`);
}

/** The target checked these; a source does not trust that it did. */
function checkReply(reply: HelloReply, hello: SourceLinkOptions['hello']): void {
  if (reply.protocolVersion !== PROTOCOL_VERSION) {
    throw new LinkSetupError('severe', 'BM_ERR_PROTOCOL_VERSION', `target speaks protocol ${reply.protocolVersion}, this daemon ${PROTOCOL_VERSION}`);
  }
  if (reply.sizeBytes < hello.sizeBytes) {
    throw new LinkSetupError('severe', 'BM_ERR_TARGET_TOO_SMALL', `target volume has ${reply.sizeBytes} bytes, the source ${hello.sizeBytes}`);
  }
  if (reply.logicalSectorBytes !== hello.logicalSectorBytes) {
    throw new LinkSetupError('severe', 'BM_ERR_SECTOR_MISMATCH', `target sector is ${reply.logicalSectorBytes} bytes, the source's ${hello.logicalSectorBytes}`);
  }
}

function connect(host: string, port: number, timeoutMs: number, signal: AbortSignal | undefined): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted === true) {
      reject(new LinkSetupError('transient', 'BM_ERR_SHUTTING_DOWN', 'the mirror is stopping'));
      return;
    }
    const socket = net.connect({ host, port, noDelay: true, signal });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new LinkSetupError('transient', 'ETIMEDOUT', `connecting to ${host}:${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', onError);
      socket.setKeepAlive(true, 10_000);
      // Errors after this are reported through 'close'.
      socket.on('error', () => undefined);
      resolve(socket);
    });
    const onError = (error: NodeJS.ErrnoException): void => {
      clearTimeout(timer);
      reject(new LinkSetupError('transient', error.code ?? 'ECONNREFUSED', `cannot connect to ${host}:${port}: ${error.message}`));
    };
    socket.once('error', onError);
  });
}
