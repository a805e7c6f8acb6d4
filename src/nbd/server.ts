// The NBD server: one listener per socket (Unix, optional TCP) serving every export by name.
// Each accepted connection runs the fixed newstyle handshake (bounded in time), then the
// transmission phase on the chosen export until the client disconnects or the server closes.

import { promises as fs } from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { BufferPool } from '../native/index';
import { ByteReader } from './byte-reader';
import { NbdError } from './errors';
import { negotiate } from './handshake';
import { Transmission, type TransmissionLimits } from './transmission';

import type { NbdExport } from './types';

export type { NbdExport } from './types';

export interface NbdServerOptions {
  /** '' is the default export name; returning undefined refuses it. */
  lookupExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  logger: Logger;
  /** Default 128. */
  maxInFlightRequestsPerConnection?: number;
  /** Default 64 MiB; the socket stops being read while this is exceeded. */
  maxInFlightBytesPerConnection?: number;
  /** Default 32 MiB; advertised as the maximum block size. */
  maxPayloadBytes?: number;
  /** Default 10 s: a client must reach the transmission phase within this. */
  handshakeTimeoutMs?: number;
  /** Default 30 s: close()/disconnectExport() drop a connection that has not drained by then. */
  shutdownTimeoutMs?: number;
  /** Default 256: connections in the handshake plus in transmission, over all listeners. A
   *  socket accepted beyond it is closed at once (with a logged warning). */
  maxConnections?: number;
  /** Default 64 MiB: idle bytes kept in the pool of aligned WRITE payload buffers. */
  maxPooledPayloadBytes?: number;
  /** Default true: connections read into their own staging and payload buffers (see
   *  transmission.ts); false keeps Node's stream reads, the fallback where that is impossible. */
  ownReadBuffers?: boolean;
}

const DEFAULT_MAX_IN_FLIGHT_REQUESTS = 128;
const DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_CONNECTIONS = 256;
const DEFAULT_MAX_POOLED_PAYLOAD_BYTES = 64 * 1024 * 1024;
/** O_DIRECT alignment of pooled payloads: covers 512 and 4K sector devices. */
const PAYLOAD_ALIGN_BYTES = 4096;
/** At most one "connection refused" warning per this interval; the rest are counted in it. */
const REFUSED_WARNING_INTERVAL_MS = 1_000;
const CLOSE_LINGER_MS = 1_000;
/** At close, how long a client still in the handshake may go on hearing NBD_REP_ERR_SHUTDOWN. */
const HANDSHAKE_SHUTDOWN_GRACE_MS = 2_000;
const UNIX_SOCKET_MODE = 0o660;

function positiveInteger(name: string, value: number | undefined, fallback: number, min: number, max: number): number {
  const chosen = value ?? fallback;
  if (!Number.isInteger(chosen) || chosen < min || chosen > max) {
    throw new NbdError('BM_ERR_NBD_INVALID_OPTION', `${name} must be an integer in [${min}, ${max}], got ${chosen}`);
  }
  return chosen;
}

export class NbdServer {
  private readonly options: NbdServerOptions;
  private readonly logger: Logger;
  private readonly limits: TransmissionLimits;
  private readonly handshakeTimeoutMs: number;
  private readonly maxConnections: number;
  /** Aligned buffers for WRITE payloads that span socket chunks, shared by every connection. */
  private readonly payloadPool: BufferPool;
  private refusedSinceWarning = 0;
  private lastRefusedWarningMs = -Infinity;
  private readonly listeners: net.Server[] = [];
  private readonly unixPaths: string[] = [];
  private readonly handshakeSockets = new Set<net.Socket>();
  /** Open transmission-phase connections. */
  private readonly transmissions = new Set<Transmission>();
  /** Connections whose backend calls may still be settling (closed or not). */
  private readonly unsettled = new Set<Transmission>();
  private closing: Promise<void> | null = null;
  private nextConnectionId = 1;

  constructor(options: NbdServerOptions) {
    this.options = options;
    this.logger = options.logger;
    const maxPayloadBytes = positiveInteger('maxPayloadBytes', options.maxPayloadBytes, DEFAULT_MAX_PAYLOAD_BYTES, 4096, 0x4000_0000);
    this.limits = {
      maxInFlightRequests: positiveInteger(
        'maxInFlightRequestsPerConnection',
        options.maxInFlightRequestsPerConnection,
        DEFAULT_MAX_IN_FLIGHT_REQUESTS,
        1,
        65536,
      ),
      maxInFlightBytes: positiveInteger('maxInFlightBytesPerConnection', options.maxInFlightBytesPerConnection, DEFAULT_MAX_IN_FLIGHT_BYTES, 1, 2 ** 40),
      maxPayloadBytes,
      closeLingerMs: CLOSE_LINGER_MS,
      shutdownTimeoutMs: positiveInteger('shutdownTimeoutMs', options.shutdownTimeoutMs, DEFAULT_SHUTDOWN_TIMEOUT_MS, 1, 3_600_000),
      ownReadBuffers: options.ownReadBuffers ?? true,
    };
    this.handshakeTimeoutMs = positiveInteger('handshakeTimeoutMs', options.handshakeTimeoutMs, DEFAULT_HANDSHAKE_TIMEOUT_MS, 1, 3_600_000);
    this.maxConnections = positiveInteger('maxConnections', options.maxConnections, DEFAULT_MAX_CONNECTIONS, 1, 65536);
    this.payloadPool = new BufferPool({
      maxPooledBytes: positiveInteger('maxPooledPayloadBytes', options.maxPooledPayloadBytes, DEFAULT_MAX_POOLED_PAYLOAD_BYTES, 0, 2 ** 40),
      alignBytes: PAYLOAD_ALIGN_BYTES,
    });
  }

  /** Listens on a Unix socket; a stale socket file at `path` is removed first. */
  async listenUnix(path: string): Promise<void> {
    this.assertNotClosed();
    try {
      const stat = await fs.lstat(path);
      if (!stat.isSocket()) {
        throw new NbdError('BM_ERR_NBD_SOCKET_PATH_IN_USE', `${path} exists and is not a socket`);
      }
      await fs.unlink(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    }
    const listener = this.createListener('unix');
    await listenOn(listener, { path });
    this.unixPaths.push(path);
    await fs.chmod(path, UNIX_SOCKET_MODE);
    this.logger.info({ path }, 'nbd listening on unix socket');
  }

  /** Listens on TCP; returns the bound port (pass 0 for any free port). */
  async listenTcp(host: string, port: number): Promise<number> {
    this.assertNotClosed();
    const listener = this.createListener('tcp');
    await listenOn(listener, { host, port });
    const address = listener.address();
    if (address === null || typeof address === 'string') throw new Error('TCP listener has no port');
    this.logger.info({ host, port: address.port }, 'nbd listening on tcp');
    return address.port;
  }

  /** Transmission-phase connections, all or those on one export. */
  connectionCount(exportName?: string): number {
    if (exportName === undefined) return this.transmissions.size;
    let count = 0;
    for (const transmission of this.transmissions) if (transmission.exportName === exportName) count += 1;
    return count;
  }

  /** New requests on the export's connections get ESHUTDOWN; in-flight ones finish; then the
   *  connections close. Resolves when they are closed and their backend calls settled. */
  async disconnectExport(exportName: string): Promise<void> {
    const draining: Promise<void>[] = [];
    for (const transmission of this.unsettled) {
      if (transmission.exportName === exportName) draining.push(transmission.shutdown());
    }
    await Promise.all(draining);
  }

  /** Stops listening, drains and closes every connection. Idempotent. */
  close(): Promise<void> {
    if (this.closing === null) this.closing = this.closeAll();
    return this.closing;
  }

  private async closeAll(): Promise<void> {
    const listenersClosed = this.listeners.map((listener) => new Promise<void>((resolve) => listener.close(() => resolve())));
    // A client still haggling is answered NBD_REP_ERR_SHUTDOWN to its options (the spec's
    // SHOULD) and may send NBD_OPT_ABORT; after a short grace it is cut off.
    const handshakesEnded = [...this.handshakeSockets]
      .filter((socket) => !socket.destroyed)
      .map((socket) => {
        const cutOff = setTimeout(() => socket.destroy(), Math.min(HANDSHAKE_SHUTDOWN_GRACE_MS, this.handshakeTimeoutMs));
        return new Promise<void>((resolve) => {
          socket.once('close', () => {
            clearTimeout(cutOff);
            resolve();
          });
        });
      });
    await Promise.all([...this.unsettled].map((transmission) => transmission.shutdown()));
    await Promise.all(handshakesEnded);
    await Promise.all(listenersClosed);
    for (const path of this.unixPaths) {
      await fs.unlink(path).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
      });
    }
    this.logger.info('nbd server closed');
  }

  private assertNotClosed(): void {
    if (this.closing !== null) throw new NbdError('BM_ERR_NBD_SERVER_CLOSED', 'NBD server is closed');
  }

  private createListener(transport: 'unix' | 'tcp'): net.Server {
    // allowHalfOpen: a client's FIN (libnbd sends one right after NBD_CMD_DISC) ends its
    // requests, not our replies: every request already received is answered before we close.
    const listener = net.createServer({ pauseOnConnect: false, allowHalfOpen: true }, (socket) => this.accept(socket, transport));
    listener.on('error', (error) => this.logger.error({ err: error }, 'nbd listener error'));
    this.listeners.push(listener);
    return listener;
  }

  private accept(socket: net.Socket, transport: 'unix' | 'tcp'): void {
    if (this.closing !== null) {
      socket.destroy();
      return;
    }
    if (this.handshakeSockets.size + this.transmissions.size >= this.maxConnections) {
      this.refuse(socket, transport);
      return;
    }
    const connectionId = this.nextConnectionId++;
    const peer = transport === 'tcp' ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    const logger = this.logger.child({ connectionId, peer });
    if (transport === 'tcp') socket.setNoDelay(true);
    socket.on('error', (error: NodeJS.ErrnoException) => logger.debug({ code: error.code }, 'nbd socket error'));

    this.handshakeSockets.add(socket);
    const reader = new ByteReader(socket);
    const timer = setTimeout(() => {
      reader.fail(new NbdError('BM_ERR_NBD_HANDSHAKE_TIMEOUT', `handshake not finished within ${this.handshakeTimeoutMs} ms`));
    }, this.handshakeTimeoutMs);
    timer.unref();

    const context = {
      lookupExport: this.options.lookupExport,
      listExports: this.options.listExports,
      isShuttingDown: () => this.closing !== null,
      maxPayloadBytes: this.limits.maxPayloadBytes,
      logger,
    };
    negotiate(socket, reader, context).then(
      (result) => {
        clearTimeout(timer);
        this.handshakeSockets.delete(socket);
        if (result.kind === 'aborted') {
          logger.debug('nbd client aborted the handshake');
          socket.end();
          setTimeout(() => socket.destroy(), CLOSE_LINGER_MS).unref();
          return;
        }
        if (socket.destroyed) return;
        const { session } = result;
        const exportName = session.nbdExport.name;
        const connectionLogger = logger.child({ exportName });
        const transmission = new Transmission(socket, session, this.limits, this.payloadPool, connectionLogger);
        this.transmissions.add(transmission);
        this.unsettled.add(transmission);
        connectionLogger.info({ structuredReplies: session.structuredReplies, sizeBytes: session.sizeBytes }, 'nbd connection open');
        void transmission.whenClosed().then(() => {
          this.transmissions.delete(transmission);
          connectionLogger.info('nbd connection closed');
        });
        void transmission.whenIdle().then(() => this.unsettled.delete(transmission));
        // The server began closing while this client was finishing its handshake.
        if (this.closing !== null) void transmission.shutdown();
      },
      (error: unknown) => {
        clearTimeout(timer);
        this.handshakeSockets.delete(socket);
        const code = (error as { code?: string }).code;
        if (code === 'BM_ERR_NBD_PROTOCOL' || code === 'BM_ERR_NBD_HANDSHAKE_TIMEOUT') {
          logger.warn({ code, reason: (error as Error).message }, 'nbd protocol violation in handshake, dropping connection');
        } else {
          logger.debug({ code, reason: (error as Error).message }, 'nbd handshake ended');
        }
        socket.destroy();
      },
    );
  }

  /** Over maxConnections: closed before the greeting. Warnings are rate-limited so a flood of
   *  connections cannot flood the log; each one says how many were refused since the last. */
  private refuse(socket: net.Socket, transport: 'unix' | 'tcp'): void {
    socket.on('error', () => undefined);
    socket.destroy();
    this.refusedSinceWarning += 1;
    const nowMs = performance.now();
    if (nowMs - this.lastRefusedWarningMs < REFUSED_WARNING_INTERVAL_MS) return;
    this.logger.warn(
      { transport, maxConnections: this.maxConnections, refusedCount: this.refusedSinceWarning },
      'nbd connection limit reached, refusing new connections',
    );
    this.lastRefusedWarningMs = nowMs;
    this.refusedSinceWarning = 0;
  }
}

function listenOn(listener: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error): void => reject(error);
    listener.once('error', onError);
    listener.listen(options, () => {
      listener.off('error', onError);
      resolve();
    });
  });
}
