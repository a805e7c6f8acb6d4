// A TCP proxy on 127.0.0.1 that replication tests put between two daemons to inject network
// faults: cut every connection, refuse new ones, stall forwarding, or move to another target.
// Forwarding is pipe-like: a socket is paused while the other side's write buffer is full or
// while stalled, so the proxy itself never buffers more than a chunk or so per direction.
import { createServer, connect, type Server, type Socket } from 'node:net';

export interface TcpProxy {
  /** Listens on 127.0.0.1:<port> (port 0 chosen by the OS). */
  readonly port: number;
  /** Bytes forwarded client->target and target->client since start (or since resetCounters). */
  readonly bytesUp: number;
  readonly bytesDown: number;
  /** Currently open proxied connections. */
  readonly connectionCount: number;
  /** Total connections accepted so far (including refused ones; not reset by resetCounters). */
  readonly acceptedCount: number;
  /** Zeroes bytesUp and bytesDown. */
  resetCounters(): void;
  /** Destroy every open proxied connection (both sides, like a network cut). New connections are still accepted unless refuse(true). */
  cut(): void;
  /** While refusing, new connections are accepted and immediately destroyed (target "unreachable"). */
  refuse(on: boolean): void;
  /** Stop forwarding in both directions (data is held, bounded by pausing the sockets: no unbounded buffering), until resume(). Applies to current and new connections. */
  stall(): void;
  resume(): void;
  /** Change the target address (e.g. the target daemon restarted on another port). Applies to new connections. */
  setTarget(port: number, host?: string): void;
  /** Closes the listener and destroys all connections. Idempotent. */
  close(): Promise<void>;
}

interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

/** One proxied connection: the accepted client socket and the socket to the target. */
class ProxiedConnection {
  private upstreamConnected = false;
  // Per direction: the destination's write() returned false, wait for its 'drain'.
  private upWaitsDrain = false;
  private downWaitsDrain = false;
  private closedSockets = 0;

  constructor(
    private readonly client: Socket,
    private readonly upstream: Socket,
    private readonly proxy: {
      isStalled(): boolean;
      countUp(bytes: number): void;
      countDown(bytes: number): void;
      onClosed(connection: ProxiedConnection): void;
    },
  ) {
    // Paused before any 'data' listener is attached: nothing flows until update() says so.
    client.pause();
    upstream.pause();
    upstream.once('connect', () => {
      this.upstreamConnected = true;
      this.update();
    });
    this.forward(client, upstream, 'up');
    this.forward(upstream, client, 'down');
    for (const [socket, other] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      // Any error (ECONNREFUSED from the target, ECONNRESET from either peer) ends both sides.
      socket.on('error', () => {
        other.destroy();
      });
      socket.once('close', (hadError) => {
        // A clean close means we saw 'end' and already ended the other side: let it flush.
        if (hadError || !other.writableEnded) other.destroy();
        if (++this.closedSockets === 2) this.proxy.onClosed(this);
      });
    }
  }

  destroy(): void {
    this.client.destroy();
    this.upstream.destroy();
  }

  /** Each socket flows only when connected, not stalled, and its destination is not full. */
  update(): void {
    const stalled = this.proxy.isStalled() || !this.upstreamConnected;
    setFlowing(this.client, !stalled && !this.upWaitsDrain);
    setFlowing(this.upstream, !stalled && !this.downWaitsDrain);
  }

  private forward(source: Socket, destination: Socket, direction: 'up' | 'down'): void {
    source.on('data', (chunk: Buffer) => {
      if (destination.destroyed) {
        source.destroy();
        return;
      }
      if (this.proxy.isStalled()) {
        // Should not happen (the socket was paused), but never forward while stalled.
        source.pause();
        source.unshift(chunk);
        return;
      }
      if (direction === 'up') this.proxy.countUp(chunk.length);
      else this.proxy.countDown(chunk.length);
      if (!destination.write(chunk)) {
        if (direction === 'up') this.upWaitsDrain = true;
        else this.downWaitsDrain = true;
        source.pause();
        destination.once('drain', () => {
          if (direction === 'up') this.upWaitsDrain = false;
          else this.downWaitsDrain = false;
          this.update();
        });
      }
    });
    // Half-close is forwarded: the sockets are allowHalfOpen so a reply can still come back.
    source.once('end', () => {
      destination.end();
    });
  }
}

function setFlowing(socket: Socket, flowing: boolean): void {
  if (socket.destroyed) return;
  if (flowing) socket.resume();
  else socket.pause();
}

export async function startTcpProxy(t: Teardown, targetPort: number, targetHost = '127.0.0.1'): Promise<TcpProxy> {
  let target = { port: targetPort, host: targetHost };
  let refusing = false;
  let stalled = false;
  let bytesUp = 0;
  let bytesDown = 0;
  let acceptedCount = 0;
  const connections = new Set<ProxiedConnection>();
  let closing: Promise<void> | undefined;
  let allClosed: (() => void) | undefined;

  const hooks = {
    isStalled: () => stalled,
    countUp: (bytes: number) => {
      bytesUp += bytes;
    },
    countDown: (bytes: number) => {
      bytesDown += bytes;
    },
    onClosed: (connection: ProxiedConnection) => {
      connections.delete(connection);
      if (connections.size === 0) allClosed?.();
    },
  };

  const server: Server = createServer({ allowHalfOpen: true }, (client) => {
    acceptedCount++;
    client.on('error', () => {});
    if (refusing || closing !== undefined) {
      client.destroy();
      return;
    }
    const upstream = connect({ port: target.port, host: target.host, allowHalfOpen: true });
    upstream.setNoDelay(true);
    client.setNoDelay(true);
    connections.add(new ProxiedConnection(client, upstream, hooks));
  });
  const close = (): Promise<void> => {
    closing ??= (async () => {
      const drained = new Promise<void>((resolve) => {
        allClosed = resolve;
        if (connections.size === 0) resolve();
      });
      for (const connection of connections) connection.destroy();
      if (server.listening) await new Promise<void>((resolve) => server.close(() => resolve()));
      // Both sockets of every connection (the target side too) have emitted 'close'.
      await drained;
    })();
    return closing;
  };
  // Registered before listening, so a failed listen still leaves nothing behind.
  t.teardown(close);

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('tcp-proxy: no TCP address');
  const port = address.port;

  const proxy: TcpProxy = {
    port,
    get bytesUp() {
      return bytesUp;
    },
    get bytesDown() {
      return bytesDown;
    },
    get connectionCount() {
      return connections.size;
    },
    get acceptedCount() {
      return acceptedCount;
    },
    resetCounters() {
      bytesUp = 0;
      bytesDown = 0;
    },
    cut() {
      for (const connection of connections) connection.destroy();
    },
    refuse(on) {
      refusing = on;
    },
    stall() {
      stalled = true;
      for (const connection of connections) connection.update();
    },
    resume() {
      stalled = false;
      for (const connection of connections) connection.update();
    },
    setTarget(port, host = '127.0.0.1') {
      target = { port, host };
    },
    close,
  };
  return proxy;
}
