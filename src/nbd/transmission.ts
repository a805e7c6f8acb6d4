// The transmission phase of one connection: parses requests straight out of received chunks,
// validates each one as doc/proto.md asks, runs it on the backend concurrently and answers as
// each completes (out of order). In-flight requests and bytes are bounded; when a bound is hit
// the socket is paused and the unparsed bytes wait until a request completes.
// Reads land in buffers this class picks (src/net/adopt-socket.ts): one staging buffer, reused
// read after read, for request headers and small payloads, which are copied out of it into
// aligned pooled buffers; the rest of a large WRITE payload is read straight into its aligned
// buffer, which the backend hands to O_DIRECT as it is. Where the socket cannot be adopted it is
// read as a stream of fresh chunks, and a payload lying whole in one is passed on as a view.
//
// States: open -> (disconnecting | shuttingDown) -> closing -> closed.
//   disconnecting: NBD_CMD_DISC seen; nothing more is parsed, in-flight requests finish.
//   shuttingDown:  server close/disconnectExport; new requests get ESHUTDOWN, in-flight finish.
//   closing:       replies handed over and FIN sent; incoming bytes are discarded until the
//                  peer closes or the linger time runs out.

import assert from 'node:assert';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { BufferPool } from '../native/index';
import { adoptSocket } from '../net/adopt-socket';
import type { AllocationRun, BlockBackend, ReadResult } from '../volume/backend';
import { nbdErrnoFromError, nbdErrnoName } from './errors';
import type { NegotiatedSession } from './handshake';
import * as P from './protocol';
import { ReplyWriter } from './reply-writer';

export interface TransmissionLimits {
  maxInFlightRequests: number;
  maxInFlightBytes: number;
  maxPayloadBytes: number;
  /** How long to wait for the peer to close after our FIN before destroying the socket. */
  closeLingerMs: number;
  /** How long shutdown() waits for in-flight requests (and a WRITE payload still arriving)
   *  before it drops the connection anyway. Backend calls still settle and are released. */
  shutdownTimeoutMs: number;
  /** Read into this connection's own buffers (the default); false keeps Node's stream reads. */
  ownReadBuffers?: boolean;
}

/** The staging buffer one connection reads headers and small payloads into. Large enough for a
 *  QD32 burst of 4 KiB writes in one read. */
const STAGING_BYTES = 160 * 1024;
/** A WRITE payload with at least this much still to come is read straight into its buffer. */
const DIRECT_READ_MIN_BYTES = 32 * 1024;

/** Block status descriptors per reply (the spec lets the server return fewer than asked). */
const BLOCK_STATUS_DESCRIPTORS_MAX = 1024;

type State = 'open' | 'disconnecting' | 'shuttingDown' | 'closing' | 'closed';

/** A request between parse and reply. Pooled per connection; callbacks are bound once. */
class Request {
  cookieHi = 0;
  cookieLo = 0;
  type = 0;
  flags = 0;
  offsetBytes = 0;
  lengthBytes = 0;
  /** Bytes charged against maxInFlightBytes until the payload is no longer in memory. */
  chargedBytes = 0;
  payload: Buffer | null = null;
  /** Whether `payload` came from the payload pool and must go back to it once the backend is
   *  done with it (its promise settled) or the request is dropped before dispatch. */
  payloadPooled = false;
  readonly onDone: () => void;
  readonly onError: (error: unknown) => void;
  readonly onRead: (result: ReadResult) => void;
  readonly onBlockStatus: (runs: AllocationRun[]) => void;

  constructor(owner: Transmission) {
    this.onDone = () => owner.completeOk(this);
    this.onError = (error: unknown) => owner.completeError(this, error);
    this.onRead = (result: ReadResult) => owner.completeRead(this, result);
    this.onBlockStatus = (runs: AllocationRun[]) => owner.completeBlockStatus(this, runs);
  }
}

const COMMAND_NAMES: Record<number, string> = {
  [P.NBD_CMD_READ]: 'READ',
  [P.NBD_CMD_WRITE]: 'WRITE',
  [P.NBD_CMD_DISC]: 'DISC',
  [P.NBD_CMD_FLUSH]: 'FLUSH',
  [P.NBD_CMD_TRIM]: 'TRIM',
  [P.NBD_CMD_CACHE]: 'CACHE',
  [P.NBD_CMD_WRITE_ZEROES]: 'WRITE_ZEROES',
  [P.NBD_CMD_BLOCK_STATUS]: 'BLOCK_STATUS',
};

export class Transmission {
  readonly exportName: string;
  private readonly socket: Socket;
  private readonly backend: BlockBackend;
  private readonly logger: Logger;
  private readonly limits: TransmissionLimits;
  private readonly payloadPool: BufferPool;
  private readonly writer: ReplyWriter;
  private readonly sizeBytes: number;
  private readonly readOnly: boolean;
  private readonly structuredReplies: boolean;
  private readonly allocationContextId: number;
  private state: State = 'open';

  // Parser state. `input` holds unparsed received bytes from `inputPosition` on.
  private input: Buffer | null = null;
  private inputPosition = 0;
  private readonly headerBuffer = Buffer.allocUnsafe(P.REQUEST_HEADER_BYTES);
  private headerFillBytes = 0;
  private payloadRequest: Request | null = null;
  private payloadFillBytes = 0;
  private discardBytes = 0;
  private paused = false;
  /** Own-buffer reads only: the staging buffer, and the payload slice the next read goes to. */
  private staging: Buffer | null;
  private directTarget: Buffer | null = null;

  private inFlightRequests = 0;
  private inFlightBytes = 0;
  private readonly pool: Request[] = [];
  private lingerTimer: NodeJS.Timeout | null = null;
  private shutdownTimer: NodeJS.Timeout | null = null;
  private readonly idleWaiters: (() => void)[] = [];
  private readonly closedWaiters: (() => void)[] = [];

  /** Payload bytes read straight into their pooled buffers (own read buffers); for tests. */
  directReadBytes = 0;
  /** Highest concurrency seen; exposed for tests of the bounds. */
  peakInFlightRequests = 0;
  peakInFlightBytes = 0;

  constructor(socket: Socket, session: NegotiatedSession, limits: TransmissionLimits, payloadPool: BufferPool, logger: Logger) {
    assert(limits.maxInFlightRequests >= 1);
    assert(limits.maxInFlightBytes >= 1);
    this.payloadPool = payloadPool;
    this.exportName = session.nbdExport.name;
    this.backend = session.nbdExport.backend;
    this.logger = logger;
    this.limits = limits;
    // The staging buffer must exist before adoption: the new socket asks for its first read buffer at once.
    this.staging = limits.ownReadBuffers === false ? null : Buffer.allocUnsafeSlow(STAGING_BYTES);
    const adopted =
      this.staging === null
        ? null
        : adoptSocket(socket, {
            nextReadBuffer: () => this.nextReadBuffer(),
            onRead: (buffer, nread) => this.ownRead(buffer, nread),
          });
    if (adopted === null) this.staging = null;
    this.socket = adopted?.socket ?? socket;
    this.writer = new ReplyWriter(this.socket);
    this.sizeBytes = session.sizeBytes;
    this.readOnly = (session.transmissionFlags & P.NBD_FLAG_READ_ONLY) !== 0;
    this.structuredReplies = session.structuredReplies;
    this.allocationContextId = session.allocationContextId;

    if (adopted === null) socket.on('data', (chunk: Buffer) => this.receive(chunk));
    else this.socket.on('error', (error: NodeJS.ErrnoException) => logger.debug({ code: error.code }, 'nbd socket error'));
    this.socket.on('drain', () => this.maybeResume());
    this.socket.on('end', () => this.peerEnded());
    this.socket.on('close', () => this.socketClosed());
    // Bytes read before this phase come first: the handshake's leftover, then the stream's.
    if (session.leftover.length > 0) this.receive(session.leftover);
    if (adopted !== null && adopted.pending.length > 0) this.receive(adopted.pending);
    if (!this.paused) this.socket.resume();
  }

  get isOpen(): boolean {
    return this.state !== 'closed';
  }

  /** Refuses new requests with ESHUTDOWN, lets in-flight ones finish and closes. Resolves
   *  when the socket is closed and every backend call has settled. */
  shutdown(): Promise<void> {
    if (this.state === 'open') {
      this.state = 'shuttingDown';
      this.logger.debug('nbd connection shutting down');
      this.shutdownTimer = setTimeout(() => {
        this.logger.warn('nbd connection did not drain in time, dropping it');
        this.socket.destroy();
      }, this.limits.shutdownTimeoutMs);
      this.shutdownTimer.unref();
      // Requests held back by backpressure are answered with ESHUTDOWN first (at once, or on
      // 'drain' if the socket's write buffer is what holds them back); only then may it close.
      this.maybeResume();
      this.maybeFinish();
    }
    return this.whenIdle();
  }

  /** Resolves once the socket is closed and no backend call is outstanding. */
  whenIdle(): Promise<void> {
    if (this.state === 'closed' && this.inFlightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Resolves once the socket is closed (backend calls may still be settling). */
  whenClosed(): Promise<void> {
    if (this.state === 'closed') return Promise.resolve();
    return new Promise((resolve) => this.closedWaiters.push(resolve));
  }

  // ---- parsing -------------------------------------------------------------------------------

  /** Own-buffer reads: where the next read lands. The staging buffer is only ever handed out
   *  once parse() is done with its bytes: a read follows a parse that consumed all input, or a
   *  pause, and reading resumes only after the held input has been consumed (maybeResume). */
  private nextReadBuffer(): Buffer {
    const request = this.payloadRequest;
    if (request !== null && request.payload!.length - this.payloadFillBytes >= DIRECT_READ_MIN_BYTES) {
      this.directTarget = request.payload!.subarray(this.payloadFillBytes);
      return this.directTarget;
    }
    this.directTarget = null;
    return this.staging!;
  }

  private ownRead(buffer: Buffer, nread: number): boolean {
    if (buffer === this.directTarget) {
      this.directTarget = null;
      this.payloadLanded(nread);
    } else {
      this.receive(buffer.subarray(0, nread));
    }
    return !this.paused;
  }

  /** nread bytes of the pending WRITE payload were read straight into it. */
  private payloadLanded(nread: number): void {
    const request = this.payloadRequest;
    if (request === null) return; // the connection closed in between; the buffer is back in the pool
    this.payloadFillBytes += nread;
    this.directReadBytes += nread;
    if (this.payloadFillBytes === request.payload!.length) {
      this.payloadRequest = null;
      this.dispatch(request);
    }
  }

  private receive(chunk: Buffer): void {
    if (this.state === 'closed') return;
    if (this.state === 'closing' || this.state === 'disconnecting') return; // nothing more is read
    if (this.input === null) {
      this.input = chunk;
      this.inputPosition = 0;
    } else {
      // Only when paused by backpressure; the socket is paused so this is rare.
      this.input = Buffer.concat([this.input.subarray(this.inputPosition), chunk]);
      this.inputPosition = 0;
    }
    this.parse();
  }

  private parse(): void {
    for (;;) {
      if (this.state !== 'open' && this.state !== 'shuttingDown') {
        this.input = null;
        return;
      }
      // A header assembled in headerBuffer may be complete with no byte after it (held back by
      // backpressure on the read that completed it): handle it before looking for more input.
      if (this.headerFillBytes === P.REQUEST_HEADER_BYTES) {
        if (!this.admits(this.headerBuffer, 0)) {
          this.pause();
          return;
        }
        this.headerFillBytes = 0;
        this.handleHeader(this.headerBuffer, 0);
        continue;
      }
      const input = this.input;
      if (input === null) return;
      const availableBytes = input.length - this.inputPosition;
      if (availableBytes === 0) {
        this.input = null;
        return;
      }

      if (this.discardBytes > 0) {
        const dropBytes = Math.min(this.discardBytes, availableBytes);
        this.discardBytes -= dropBytes;
        this.inputPosition += dropBytes;
        continue;
      }

      const payloadRequest = this.payloadRequest;
      if (payloadRequest !== null) {
        const payload = payloadRequest.payload!;
        const copyBytes = Math.min(payload.length - this.payloadFillBytes, availableBytes);
        input.copy(payload, this.payloadFillBytes, this.inputPosition, this.inputPosition + copyBytes);
        this.payloadFillBytes += copyBytes;
        this.inputPosition += copyBytes;
        if (this.payloadFillBytes === payload.length) {
          this.payloadRequest = null;
          this.dispatch(payloadRequest);
        }
        continue;
      }

      // A request header: straight from the chunk when it is all there, else assembled in
      // headerBuffer (a complete one is handled at the top of the loop).
      if (this.headerFillBytes > 0 || availableBytes < P.REQUEST_HEADER_BYTES) {
        const copyBytes = Math.min(P.REQUEST_HEADER_BYTES - this.headerFillBytes, availableBytes);
        input.copy(this.headerBuffer, this.headerFillBytes, this.inputPosition, this.inputPosition + copyBytes);
        this.headerFillBytes += copyBytes;
        this.inputPosition += copyBytes;
        continue;
      }
      if (!this.admits(input, this.inputPosition)) {
        // Keep the header in the chunk and wait for completions.
        this.pause();
        return;
      }
      const headerAt = this.inputPosition;
      this.inputPosition += P.REQUEST_HEADER_BYTES;
      this.handleHeader(input, headerAt);
    }
  }

  /** Whether one more request fits the in-flight bounds. The first request always fits, so a
   *  request larger than maxInFlightBytes alone cannot stall the connection. */
  private admits(header: Buffer, headerAt: number): boolean {
    // Never below the socket's high-water mark: past it a 'drain' is certain to come and resume us.
    if (this.socket.writableLength > Math.max(this.limits.maxInFlightBytes, this.socket.writableHighWaterMark)) return false;
    // While shutting down every request is answered at once with ESHUTDOWN: nothing to bound.
    if (this.state === 'shuttingDown') return true;
    if (this.inFlightRequests >= this.limits.maxInFlightRequests) return false;
    if (this.inFlightBytes === 0) return true;
    const type = header.readUInt16BE(headerAt + 6);
    const lengthBytes = header.readUInt32BE(headerAt + 24);
    const costBytes = (type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) && lengthBytes <= this.limits.maxPayloadBytes ? lengthBytes : 0;
    return this.inFlightBytes + costBytes <= this.limits.maxInFlightBytes;
  }

  private handleHeader(header: Buffer, at: number): void {
    if (header.readUInt32BE(at) !== P.NBD_REQUEST_MAGIC) {
      this.protocolViolation(`bad request magic 0x${header.readUInt32BE(at).toString(16)}`);
      return;
    }
    const request = this.pool.pop() ?? new Request(this);
    request.flags = header.readUInt16BE(at + 4);
    request.type = header.readUInt16BE(at + 6);
    request.cookieHi = header.readUInt32BE(at + 8);
    request.cookieLo = header.readUInt32BE(at + 12);
    // Offsets past 2^53 lose precision but are past the end of any export all the same.
    request.offsetBytes = header.readUInt32BE(at + 16) * P.TWO_POW_32 + header.readUInt32BE(at + 20);
    request.lengthBytes = header.readUInt32BE(at + 24);
    request.payload = null;
    request.payloadPooled = false;
    request.chargedBytes = 0;

    if (request.type === P.NBD_CMD_DISC) {
      this.recycle(request);
      this.disconnectRequested();
      return;
    }

    const errorValue = this.validate(request);
    if (request.type === P.NBD_CMD_WRITE) {
      const lengthBytes = request.lengthBytes;
      if (errorValue !== 0) {
        // The payload follows whatever the verdict; skip it unless it is absurd.
        if (lengthBytes > 2 * this.limits.maxPayloadBytes) {
          this.recycle(request);
          this.protocolViolation(`WRITE payload of ${lengthBytes} bytes exceeds twice the maximum`);
          return;
        }
        this.discardBytes = lengthBytes;
        this.replyError(request, errorValue, this.validationMessage(request, errorValue));
        this.recycle(request);
        return;
      }
      this.charge(request, lengthBytes);
      const input = this.input;
      const availableBytes = input === null ? 0 : input.length - this.inputPosition;
      if (input !== null && availableBytes >= lengthBytes && this.staging === null) {
        // Zero-copy: a view of the chunk, which the backend must not outlive (it copies or
        // finishes with the data before its promise settles). Never of the staging buffer,
        // which the next read overwrites.
        request.payload = input.subarray(this.inputPosition, this.inputPosition + lengthBytes);
        this.inputPosition += lengthBytes;
        this.dispatch(request);
      } else {
        // Spans chunks (or sits in the staging buffer): assembled once, in aligned memory the
        // backend can write as it is.
        try {
          request.payload = this.payloadPool.acquire(lengthBytes);
        } catch (error) {
          // Out of memory for one payload must not take the whole daemon down with it.
          this.recycle(request);
          this.logger.error({ err: error, lengthBytes }, 'nbd cannot allocate a WRITE payload buffer, dropping connection');
          this.input = null;
          this.socket.destroy();
          return;
        }
        request.payloadPooled = true;
        this.payloadRequest = request;
        this.payloadFillBytes = 0;
      }
      return;
    }

    if (errorValue !== 0) {
      this.replyError(request, errorValue, this.validationMessage(request, errorValue));
      this.recycle(request);
      return;
    }
    if (request.type === P.NBD_CMD_READ) this.charge(request, request.lengthBytes);
    this.dispatch(request);
  }

  /** 0 when the request may run, else the NBD error value the spec asks for. */
  private validate(request: Request): number {
    if (this.state === 'shuttingDown') return P.NBD_ESHUTDOWN;
    const type = request.type;
    let allowedFlags: number;
    let writes = false;
    switch (type) {
      case P.NBD_CMD_READ:
        allowedFlags = P.NBD_CMD_FLAG_FUA | (this.structuredReplies ? P.NBD_CMD_FLAG_DF : 0);
        break;
      case P.NBD_CMD_WRITE:
      case P.NBD_CMD_TRIM:
        allowedFlags = P.NBD_CMD_FLAG_FUA;
        writes = true;
        break;
      case P.NBD_CMD_FLUSH:
      case P.NBD_CMD_CACHE:
        allowedFlags = P.NBD_CMD_FLAG_FUA;
        break;
      case P.NBD_CMD_WRITE_ZEROES:
        allowedFlags = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO;
        writes = true;
        break;
      case P.NBD_CMD_BLOCK_STATUS:
        allowedFlags = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE;
        break;
      default:
        return P.NBD_EINVAL; // unknown command
    }
    if ((request.flags & ~allowedFlags) !== 0) return P.NBD_EINVAL;
    if (writes && this.readOnly) return P.NBD_EPERM;
    if (type === P.NBD_CMD_FLUSH) {
      return request.offsetBytes === 0 && request.lengthBytes === 0 ? 0 : P.NBD_EINVAL;
    }
    if (type === P.NBD_CMD_BLOCK_STATUS && this.allocationContextId === 0) return P.NBD_EINVAL;
    if (request.lengthBytes === 0) return P.NBD_EINVAL;
    // Over the advertised maximum block size: EINVAL (EOVERFLOW is only for a DF read whose
    // reply would need fragmenting, and a read reply here is never fragmented).
    if (this.exceedsMaxPayload(request)) return P.NBD_EINVAL;
    if (request.offsetBytes + request.lengthBytes > this.sizeBytes) {
      // ENOSPC past the end is for writes that store data; a TRIM past the end is EINVAL.
      return type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
    }
    return 0;
  }

  private exceedsMaxPayload(request: Request): boolean {
    const type = request.type;
    return (type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) && request.lengthBytes > this.limits.maxPayloadBytes;
  }

  private validationMessage(request: Request, errorValue: number): string {
    const command = COMMAND_NAMES[request.type] ?? `command ${request.type}`;
    switch (errorValue) {
      case P.NBD_ESHUTDOWN:
        return 'server is shutting down';
      case P.NBD_EPERM:
        return `${command} on a read-only export`;
      case P.NBD_ENOSPC:
        return `${command} past the end of the export (${this.sizeBytes} bytes)`;
      default:
        if (this.exceedsMaxPayload(request)) {
          return `${command} of ${request.lengthBytes} bytes exceeds the maximum block size of ${this.limits.maxPayloadBytes}`;
        }
        if (request.lengthBytes > 0 && request.offsetBytes + request.lengthBytes > this.sizeBytes) {
          return `${command} past the end of the export (${this.sizeBytes} bytes)`;
        }
        return `invalid ${command}: flags 0x${request.flags.toString(16)}, offset ${request.offsetBytes}, length ${request.lengthBytes}`;
    }
  }

  // ---- execution -----------------------------------------------------------------------------

  private charge(request: Request, lengthBytes: number): void {
    request.chargedBytes = lengthBytes;
    this.inFlightBytes += lengthBytes;
    if (this.inFlightBytes > this.peakInFlightBytes) this.peakInFlightBytes = this.inFlightBytes;
  }

  private dispatch(request: Request): void {
    this.inFlightRequests += 1;
    if (this.inFlightRequests > this.peakInFlightRequests) this.peakInFlightRequests = this.inFlightRequests;
    const backend = this.backend;
    const fua = (request.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    const offsetBytes = request.offsetBytes;
    const lengthBytes = request.lengthBytes;
    try {
      switch (request.type) {
        case P.NBD_CMD_READ:
          backend.read(offsetBytes, lengthBytes).then(request.onRead, request.onError);
          return;
        case P.NBD_CMD_WRITE:
          backend.write(offsetBytes, request.payload!, fua).then(request.onDone, request.onError);
          return;
        case P.NBD_CMD_FLUSH:
          backend.flush().then(request.onDone, request.onError);
          return;
        case P.NBD_CMD_TRIM:
          backend.trim(offsetBytes, lengthBytes, fua).then(request.onDone, request.onError);
          return;
        case P.NBD_CMD_WRITE_ZEROES:
          backend
            .writeZeroes(offsetBytes, lengthBytes, {
              fua,
              noHole: (request.flags & P.NBD_CMD_FLAG_NO_HOLE) !== 0,
              fastZero: (request.flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0,
            })
            .then(request.onDone, request.onError);
          return;
        case P.NBD_CMD_CACHE:
          backend.cache(offsetBytes, lengthBytes).then(request.onDone, request.onError);
          return;
        case P.NBD_CMD_BLOCK_STATUS:
          backend.blockStatus(offsetBytes, lengthBytes).then(request.onBlockStatus, request.onError);
          return;
        default:
          assert.fail(`dispatch of unvalidated command ${request.type}`);
      }
    } catch (error) {
      // A backend that throws instead of rejecting still gets a reply, asynchronously like the rest.
      queueMicrotask(() => request.onError(error));
    }
  }

  completeOk(request: Request): void {
    if (this.canReply()) this.writer.simpleReply(request.cookieHi, request.cookieLo, 0);
    this.finish(request, true);
  }

  completeError(request: Request, error: unknown): void {
    const fastZero = request.type === P.NBD_CMD_WRITE_ZEROES && (request.flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0;
    const errorValue = nbdErrnoFromError(error, fastZero);
    const command = COMMAND_NAMES[request.type] ?? String(request.type);
    const message = error instanceof Error ? error.message : String(error);
    // A FAST_ZERO that cannot be fast is an expected answer, not a failure worth a warning.
    const level = errorValue === P.NBD_ENOTSUP ? 'debug' : 'warn';
    this.logger[level](
      { command, offsetBytes: request.offsetBytes, lengthBytes: request.lengthBytes, code: (error as { code?: unknown } | null)?.code, err: error },
      'nbd backend request failed',
    );
    if (this.canReply()) this.replyError(request, errorValue, `${command}: ${nbdErrnoName(errorValue)}: ${message}`);
    this.finish(request, true);
  }

  completeRead(request: Request, result: ReadResult): void {
    if (result.data.length !== request.lengthBytes) {
      result.release();
      this.completeError(request, new Error(`backend returned ${result.data.length} bytes for a read of ${request.lengthBytes}`));
      return;
    }
    if (!this.canReply()) {
      result.release();
      this.finish(request, true);
      return;
    }
    // The charged bytes stay charged until the socket has taken the data.
    const chargedBytes = request.chargedBytes;
    const dataWritten = (): void => {
      this.inFlightBytes -= chargedBytes;
      this.maybeResume();
    };
    if (this.structuredReplies) {
      this.writer.structuredReadReply(request.cookieHi, request.cookieLo, request.offsetBytes, result, dataWritten);
    } else {
      this.writer.simpleReadReply(request.cookieHi, request.cookieLo, result, dataWritten);
    }
    this.finish(request, false);
  }

  completeBlockStatus(request: Request, runs: AllocationRun[]): void {
    if (this.canReply()) {
      const reqOne = (request.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
      const descriptors: number[] = [];
      let remainingBytes = request.lengthBytes;
      for (const run of runs) {
        if (!(run.lengthBytes > 0) || remainingBytes === 0) break;
        const lengthBytes = Math.min(run.lengthBytes, remainingBytes);
        descriptors.push(lengthBytes, run.flags);
        remainingBytes -= lengthBytes;
        if (reqOne || descriptors.length >= 2 * BLOCK_STATUS_DESCRIPTORS_MAX) break;
      }
      // Status 0 ("allocated, contents unknown") is always a truthful answer.
      if (descriptors.length === 0) descriptors.push(request.lengthBytes, 0);
      this.writer.blockStatusReply(request.cookieHi, request.cookieLo, this.allocationContextId, descriptors);
    }
    this.finish(request, true);
  }

  private replyError(request: Request, errorValue: number, message: string): void {
    if (this.structuredReplies) this.writer.structuredError(request.cookieHi, request.cookieLo, errorValue, message);
    else this.writer.simpleReply(request.cookieHi, request.cookieLo, errorValue);
  }

  private canReply(): boolean {
    return this.state !== 'closed' && this.state !== 'closing' && !this.writer.isClosed;
  }

  private finish(request: Request, releaseBytes: boolean): void {
    assert(this.inFlightRequests > 0);
    this.inFlightRequests -= 1;
    if (releaseBytes) this.inFlightBytes -= request.chargedBytes;
    this.recycle(request);
    if (this.state === 'closed') {
      if (this.inFlightRequests === 0) this.notifyIdle();
      return;
    }
    this.maybeResume();
    this.maybeFinish();
  }

  /** Called once the backend is done with the request (or it never reached the backend). */
  private recycle(request: Request): void {
    if (request.payloadPooled) {
      this.payloadPool.release(request.payload!);
      request.payloadPooled = false;
    }
    request.payload = null;
    if (this.pool.length < this.limits.maxInFlightRequests) this.pool.push(request);
  }

  // ---- flow control and closing --------------------------------------------------------------

  private pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (!this.paused || this.state === 'closed') return;
    this.paused = false;
    this.parse();
    if (!this.paused) this.socket.resume();
    // When shutting down, held requests answered just now may have been all that kept it open.
    this.maybeFinish();
  }

  private disconnectRequested(): void {
    if (this.state === 'open' || this.state === 'shuttingDown') this.state = 'disconnecting';
    this.input = null;
    this.logger.debug('nbd client sent NBD_CMD_DISC');
    this.maybeFinish();
  }

  /** The client closed its side: no request can follow, but those received are answered. */
  private peerEnded(): void {
    if (this.state === 'closing' || this.state === 'closed') return;
    this.logger.debug('nbd client closed its side of the connection');
    this.dropIncompletePayload();
    this.headerFillBytes = 0;
    if (this.state === 'open' || this.state === 'shuttingDown') this.state = 'disconnecting';
    this.input = null;
    this.maybeFinish();
  }

  /** A WRITE whose payload was still arriving never reaches the backend: its buffer goes back. */
  private dropIncompletePayload(): void {
    const payloadRequest = this.payloadRequest;
    this.payloadRequest = null;
    if (payloadRequest !== null) {
      this.inFlightBytes -= payloadRequest.chargedBytes;
      this.recycle(payloadRequest);
    }
  }

  /** Once no request is in flight in a draining state: hand over the replies and send FIN. */
  private maybeFinish(): void {
    if (this.state !== 'disconnecting' && this.state !== 'shuttingDown') return;
    if (this.inFlightRequests > 0) return;
    if (this.payloadRequest !== null) return; // a WRITE payload is still arriving; it will be answered
    // Paused means a request read before the shutdown is held back; it gets its ESHUTDOWN when
    // the socket drains (or the shutdown timer drops the connection).
    if (this.state === 'shuttingDown' && this.paused) return;
    this.state = 'closing';
    this.input = null;
    this.writer.seal();
    if (this.paused) {
      this.paused = false;
      this.socket.resume(); // read and drop until the peer closes
    }
    this.socket.end();
    // The linger starts once every reply is with the kernel, so a slow reader still gets them
    // all; a client that stops reading is cut off by the shutdown timeout instead.
    this.socket.once('finish', () => {
      if (this.state === 'closed') return;
      this.lingerTimer = setTimeout(() => this.socket.destroy(), this.limits.closeLingerMs);
      this.lingerTimer.unref();
    });
    if (this.shutdownTimer === null) {
      this.shutdownTimer = setTimeout(() => {
        this.logger.warn('nbd client did not read its last replies in time, dropping the connection');
        this.socket.destroy();
      }, this.limits.shutdownTimeoutMs);
      this.shutdownTimer.unref();
    }
  }

  private protocolViolation(reason: string): void {
    this.logger.warn({ reason }, 'nbd protocol violation, dropping connection');
    this.input = null;
    this.socket.destroy();
  }

  private socketClosed(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.input = null;
    this.dropIncompletePayload();
    if (this.lingerTimer !== null) clearTimeout(this.lingerTimer);
    if (this.shutdownTimer !== null) clearTimeout(this.shutdownTimer);
    this.writer.close();
    for (const resolve of this.closedWaiters.splice(0)) resolve();
    if (this.inFlightRequests === 0) this.notifyIdle();
  }

  private notifyIdle(): void {
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}
