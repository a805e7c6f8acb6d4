// The client side of the control socket: one connection, requests answered in order.
import net from 'node:net';
import { BmError, ControlErrorCode, errorCode, errorMessage } from './errors';
import { controlLineBytesMax, type MethodName, type MethodParams, type MethodResults } from './protocol';

export interface ControlClientOptions {
  socketPath: string;
  /** Bound on how long one request may take end to end. */
  timeoutMs: number;
}

interface Waiter {
  id: number;
  resolve(result: unknown): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

export class ControlClient {
  private readonly socket: net.Socket;
  private readonly timeoutMs: number;
  private readonly socketPath: string;
  private readonly waiters: Waiter[] = [];
  private pending = '';
  private nextId = 1;
  private failure: BmError | null = null;

  private constructor(socket: net.Socket, options: ControlClientOptions) {
    this.socket = socket;
    this.timeoutMs = options.timeoutMs;
    this.socketPath = options.socketPath;
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.receive(text));
    socket.on('error', (error) => this.fail(new BmError(ControlErrorCode.DaemonTimeout, `control socket ${this.socketPath}: ${errorMessage(error)}`)));
    socket.on('close', () => this.fail(new BmError(ControlErrorCode.DaemonTimeout, `control socket ${this.socketPath}: the daemon closed the connection`)));
  }

  /** Connect, or throw BM_ERR_DAEMON_UNREACHABLE naming the socket and the errno. */
  static connect(options: ControlClientOptions): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(options.socketPath);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new BmError(ControlErrorCode.DaemonUnreachable, `cannot connect to ${options.socketPath}: timed out after ${options.timeoutMs} ms`));
      }, options.timeoutMs);
      socket.once('error', (error) => {
        clearTimeout(timer);
        const code = errorCode(error) ?? 'Error';
        reject(new BmError(ControlErrorCode.DaemonUnreachable, `cannot connect to ${options.socketPath}: ${code} (is blockmirrord running?)`, { cause: error }));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new ControlClient(socket, options));
      });
    });
  }

  /** Send one request. Daemon errors reject with a BmError carrying the daemon's code. */
  request<M extends MethodName>(method: M, params: MethodParams<M>): Promise<MethodResults[M]>;
  request(method: string, params: Record<string, unknown>): Promise<unknown>;
  request(method: string, params: Record<string, unknown>): Promise<unknown> {
    if (this.failure !== null) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.fail(new BmError(ControlErrorCode.DaemonTimeout, `${method}: no answer from ${this.socketPath} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.waiters.push({ id, resolve, reject, timer });
      this.socket.write(JSON.stringify({ id, method, params }) + '\n');
    });
  }

  close(): void {
    this.socket.end();
    this.socket.destroySoon();
  }

  private receive(text: string): void {
    this.pending += text;
    for (;;) {
      const end = this.pending.indexOf('\n');
      if (end === -1) break;
      const line = this.pending.slice(0, end);
      this.pending = this.pending.slice(end + 1);
      this.settle(line);
    }
    if (this.pending.length > controlLineBytesMax) {
      this.fail(new BmError(ControlErrorCode.DaemonTimeout, `reply from ${this.socketPath} longer than ${controlLineBytesMax} bytes`));
    }
  }

  private settle(line: string): void {
    let reply: { id?: unknown; ok?: unknown; result?: unknown; error?: { code?: unknown; message?: unknown } };
    try {
      reply = JSON.parse(line);
    } catch {
      this.fail(new BmError(ControlErrorCode.Internal, `unparseable reply from ${this.socketPath}`));
      return;
    }
    // Replies come in request order; an id-less reply (framing error) answers the oldest request.
    const waiter = this.waiters.shift();
    if (waiter === undefined) {
      // Sent before any request: the daemon turned the connection away (its reason is kept for
      // the requests that follow).
      if (reply.id === null && reply.ok === false) this.fail(replyError(reply));
      return;
    }
    clearTimeout(waiter.timer);
    if (reply.id !== null && reply.id !== waiter.id) {
      waiter.reject(new BmError(ControlErrorCode.Internal, `reply id ${String(reply.id)} does not match request id ${waiter.id}`));
      return;
    }
    if (reply.ok === true) {
      waiter.resolve(reply.result);
      return;
    }
    waiter.reject(replyError(reply));
  }

  private fail(error: BmError): void {
    if (this.failure === null) this.failure = error;
    for (const waiter of this.waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(error);
    }
    this.socket.destroy();
  }
}

function replyError(reply: { error?: { code?: unknown; message?: unknown } }): BmError {
  const code = typeof reply.error?.code === 'string' ? reply.error.code : ControlErrorCode.Internal;
  const message = typeof reply.error?.message === 'string' ? reply.error.message : 'unknown error';
  return new BmError(code, message);
}
