// The daemon side of the control socket: framing, validation and dispatch. What the methods do
// lives in the handlers the daemon passes in; this module knows nothing about volumes.
import assert from 'node:assert';
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { formatFirstIssue } from '../config/zod-issues';
import { ControlErrorCode, errorCode, errorMessage, isBmError } from './errors';
import {
  controlConnectionsMax,
  controlLineBytesMax,
  isMethodName,
  paramsSchemas,
  requestEnvelopeSchema,
  type MethodName,
  type MethodParams,
  type MethodResults,
  type RequestId,
  type Response,
} from './protocol';
import { claimSocketPath, removeSocketPath } from './socket-path';

export type ControlHandlers = {
  [M in MethodName]: (params: MethodParams<M>) => Promise<MethodResults[M]>;
};

export interface ControlServerOptions {
  handlers: ControlHandlers;
  logger: Logger;
  /** File mode of the socket: group members may manage volumes, others may not connect. */
  socketMode: number;
}

const newline = 0x0a;

export class ControlServer {
  private readonly handlers: ControlHandlers;
  private readonly logger: Logger;
  private readonly socketMode: number;
  private readonly server: net.Server;
  private readonly connections = new Set<ControlConnection>();
  private socketPath: string | null = null;
  private closing = false;
  private lastRefusalWarningMs = 0;

  constructor(options: ControlServerOptions) {
    this.handlers = options.handlers;
    this.logger = options.logger;
    this.socketMode = options.socketMode;
    this.server = net.createServer({ allowHalfOpen: false }, (socket) => this.accept(socket));
    // The limit itself is kept in accept(); this only bounds descriptors while over-limit
    // connections are being turned away.
    this.server.maxConnections = 2 * controlConnectionsMax;
  }

  async listen(socketPath: string): Promise<void> {
    assert(this.socketPath === null, 'listen() called twice');
    await claimSocketPath(socketPath);
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(socketPath, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    this.socketPath = socketPath;
    fs.chmodSync(socketPath, this.socketMode);
    this.server.on('error', (error) => this.logger.error({ err: error }, 'control server error'));
  }

  /** Stop accepting, let requests already running finish, answer queued ones with
   *  BM_ERR_SHUTTING_DOWN, close every connection and remove the socket file. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const serverClosed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all([...this.connections].map((connection) => connection.shutdown()));
    await serverClosed;
    if (this.socketPath !== null) removeSocketPath(this.socketPath);
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    // At the limit, the connection idle longest makes room: leaked or forgotten clients must not
    // lock the admin out. Only when no connection can go is the new one refused.
    if (this.connections.size >= controlConnectionsMax) {
      const now = Date.now();
      let idlest: ControlConnection | undefined;
      for (const candidate of this.connections) {
        if (candidate.evictable(now) && (idlest === undefined || candidate.lastActivityMs < idlest.lastActivityMs)) idlest = candidate;
      }
      if (idlest === undefined) {
        this.refuse(socket);
        return;
      }
      this.logger.info({ idleMs: now - idlest.lastActivityMs }, 'control connection limit reached: closing the connection idle longest');
      idlest.evict();
    }
    const connection = new ControlConnection(socket, this.logger, (method, params) => this.dispatch(method, params), () => this.closing);
    this.connections.add(connection);
    socket.once('close', () => this.connections.delete(connection));
  }

  /** Every connection is busy: say so and close. The client's request (sent after it connected)
   *  is read and dropped, so its write does not fail before it reads the answer. */
  private refuse(socket: net.Socket): void {
    const now = Date.now();
    if (now - this.lastRefusalWarningMs >= refusalWarningIntervalMs) {
      this.lastRefusalWarningMs = now;
      this.logger.warn({ connections: this.connections.size }, 'control connection refused: every connection is busy');
    }
    const reply: Response = { id: null, ok: false, error: { code: ControlErrorCode.TooManyConnections, message: `${controlConnectionsMax} control connections are busy; try again` } };
    socket.on('error', () => undefined);
    socket.resume();
    socket.end(JSON.stringify(reply) + '\n');
    // Closes when the client hangs up, or after a second.
    setTimeout(() => socket.destroy(), refusedLingerMs).unref();
  }

  private dispatch(method: MethodName, params: unknown): Promise<unknown> {
    const handler = this.handlers[method] as (params: unknown) => Promise<unknown>;
    return handler(params);
  }
}

/** At shutdown, how long a connection may take to flush its last replies to its client. */
const shutdownGraceMs = 2_000;
/** A refused connection is closed after this, if its client has not hung up. */
const refusedLingerMs = 1_000;
const refusalWarningIntervalMs = 1_000;
/** A new connection that has not sent a request yet is not closed for another for this long. */
const newConnectionGraceMs = 1_000;
/** A client that does not take its reply for this long may be closed for another connection. */
const unreadReplyEvictMs = 10_000;
/** After BM_ERR_LINE_TOO_LONG, how long the client has to hang up. */
const rejectedLingerMs = 2_000;

type Dispatch = (method: MethodName, params: unknown) => Promise<unknown>;

/** One client. Requests are handled strictly one at a time: the socket is paused while a
 *  request runs and while replies wait to be flushed, so buffered input is bounded by one line
 *  limit plus one read chunk, and a client that does not read replies stops being read. */
class ControlConnection {
  private pending: Buffer = Buffer.alloc(0);
  private running: Promise<void> | null = null;
  /** No more requests are read (closing, or framing lost). */
  private ended = false;
  /** When the client last sent bytes or was last answered. */
  lastActivityMs = Date.now();
  private readonly connectedMs = Date.now();
  private answered = 0;
  /** A reply is written and the client has not taken it (the socket's buffer is full). */
  private waitingForClient = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly logger: Logger,
    private readonly dispatch: Dispatch,
    private readonly serverClosing: () => boolean,
  ) {
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (error) => {
      // A client that vanishes is normal; nothing to answer.
      this.logger.debug({ err: error }, 'control connection error');
    });
    socket.once('close', () => {
      this.ended = true;
    });
  }

  /** Finish the request that is running, then end the connection. A client that does not
   *  read its replies is cut off after a grace period, so it cannot hold up the daemon's stop. */
  async shutdown(): Promise<void> {
    this.ended = true;
    const cutOff = setTimeout(() => {
      this.logger.warn('control client did not read its replies while the daemon stopped; closing its connection');
      this.socket.destroy();
    }, shutdownGraceMs);
    cutOff.unref();
    this.socket.once('close', () => clearTimeout(cutOff));
    while (this.running !== null) await this.running;
    this.socket.end();
    this.socket.destroySoon();
  }

  /** Whether closing it for a new connection loses nothing that matters: no request running
   *  (and not a new client about to send its first one), a connection already refused for a
   *  too-long line, or a client that has not taken its reply for a long time. */
  evictable(now: number): boolean {
    if (this.socket.destroyed) return false;
    if (this.ended) return !this.serverClosing();
    if (this.running === null) return this.answered > 0 || now - this.connectedMs >= newConnectionGraceMs;
    return this.waitingForClient && now - this.lastActivityMs >= unreadReplyEvictMs;
  }

  /** Closes an idle connection to make room for a new one (its client reconnects if it needs to). */
  evict(): void {
    this.ended = true;
    this.socket.destroy();
  }

  private receive(chunk: Buffer): void {
    if (this.ended) return;
    this.lastActivityMs = Date.now();
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    this.socket.pause();
    if (this.running === null) {
      this.running = this.serve().finally(() => {
        this.running = null;
      });
    }
  }

  /** Answer every complete line in `pending`, then read more. */
  private async serve(): Promise<void> {
    for (;;) {
      // At shutdown the lines already received are still answered (BM_ERR_SHUTTING_DOWN): a
      // pipelining client learns what happened to each request instead of losing them.
      if (this.ended && !this.serverClosing()) return;
      if (this.serverClosing()) this.takeBuffered();
      const end = this.pending.indexOf(newline);
      if (end > controlLineBytesMax || (end === -1 && this.pending.length > controlLineBytesMax)) {
        this.rejectLongLine();
        return;
      }
      if (end === -1) break;
      const line = this.pending.subarray(0, end).toString('utf8');
      this.pending = this.pending.subarray(end + 1);
      const reply = await this.answer(line);
      if (this.socket.destroyed) return;
      this.answered++;
      this.lastActivityMs = Date.now();
      if (!this.socket.write(JSON.stringify(reply) + '\n')) {
        this.waitingForClient = true;
        await new Promise<void>((resolve) => {
          const done = (): void => {
            this.socket.off('drain', done);
            this.socket.off('close', done);
            resolve();
          };
          this.socket.on('drain', done);
          this.socket.on('close', done);
        });
        this.waitingForClient = false;
      }
    }
    this.lastActivityMs = Date.now();
    // Keep a copy of the partial line, not a view that pins the whole chunk it came from.
    this.pending = Buffer.from(this.pending);
    if (!this.ended && !this.socket.destroyed) this.socket.resume();
  }

  /** At shutdown: what Node has read from the paused socket but not delivered joins `pending`,
   *  so requests sent after the running one are answered too (what is still in the kernel is not). */
  private takeBuffered(): void {
    for (let chunk = this.socket.read() as Buffer | null; chunk !== null && this.pending.length <= controlLineBytesMax; chunk = this.socket.read() as Buffer | null) {
      this.pending = Buffer.concat([this.pending, chunk]);
    }
  }

  /** The framing is lost: say why and hang up (earlier complete lines were already answered). */
  private rejectLongLine(): void {
    this.pending = Buffer.alloc(0);
    this.ended = true;
    const reply: Response = {
      id: null,
      ok: false,
      error: { code: ControlErrorCode.LineTooLong, message: `request line longer than ${controlLineBytesMax} bytes` },
    };
    if (this.socket.destroyed) return;
    // Discard what follows and close once the client hangs up (or after a grace): a paused
    // socket would never see its FIN and would hold a connection slot.
    this.socket.resume();
    this.socket.end(JSON.stringify(reply) + '\n');
    setTimeout(() => this.socket.destroy(), rejectedLingerMs).unref();
  }

  private async answer(line: string): Promise<Response> {
    let raw: unknown;
    try {
      raw = JSON.parse(line);
    } catch (error) {
      return failure(null, ControlErrorCode.BadRequest, `request is not valid JSON: ${errorMessage(error)}`);
    }
    const envelope = requestEnvelopeSchema.safeParse(raw);
    if (!envelope.success) {
      const id = idOf(raw);
      return failure(id, ControlErrorCode.BadRequest, `bad request: ${formatFirstIssue(envelope.error)}`);
    }
    const { id, method } = envelope.data;
    if (!isMethodName(method)) {
      return failure(id, ControlErrorCode.UnknownMethod, `unknown method ${JSON.stringify(method)}`);
    }
    if (this.serverClosing()) {
      return failure(id, ControlErrorCode.ShuttingDown, 'the daemon is shutting down');
    }
    const params = paramsSchemas[method].safeParse(envelope.data.params ?? {});
    if (!params.success) {
      return failure(id, ControlErrorCode.InvalidArgument, formatFirstIssue(params.error));
    }
    try {
      const result = await this.dispatch(method, params.data);
      return { id, ok: true, result };
    } catch (error) {
      if (isBmError(error)) return failure(id, error.code, error.message);
      this.logger.error({ err: error, method }, 'control method failed unexpectedly');
      return failure(id, ControlErrorCode.Internal, `${errorCode(error) ?? 'Error'}: ${errorMessage(error)}`);
    }
  }
}

function failure(id: RequestId | null, code: string, message: string): Response {
  return { id, ok: false, error: { code, message } };
}

/** The id of a request that failed validation, when it has a usable one, so the client can match it. */
function idOf(raw: unknown): RequestId | null {
  if (typeof raw !== 'object' || raw === null || !('id' in raw)) return null;
  const id = (raw as { id: unknown }).id;
  if (typeof id === 'string' && id.length <= 128) return id;
  if (typeof id === 'number' && Number.isSafeInteger(id)) return id;
  return null;
}

