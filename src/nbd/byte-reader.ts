// Pull-style reader over a socket for the handshake phase (not the hot path): `read(n)` resolves
// with exactly n bytes, `skip(n)` discards n bytes without buffering them. When the handshake is
// done, `detach()` hands back whatever arrived after the last consumed byte.

import type { Socket } from 'node:net';
import { NbdError } from './errors';

interface PendingRead {
  lengthBytes: number;
  discard: boolean;
  resolve(data: Buffer): void;
  reject(error: Error): void;
}

export class ByteReader {
  private readonly socket: Socket;
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private pending: PendingRead | null = null;
  private failure: Error | null = null;
  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.bufferedBytes += chunk.length;
    this.settle();
  };
  private readonly onEnd = (): void => {
    this.fail(new NbdError('BM_ERR_NBD_CONNECTION_CLOSED', 'peer closed the connection during the handshake'));
  };

  constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
  }

  read(lengthBytes: number): Promise<Buffer> {
    return this.enqueue(lengthBytes, false);
  }

  async skip(lengthBytes: number): Promise<void> {
    await this.enqueue(lengthBytes, true);
  }

  fail(error: Error): void {
    if (this.failure !== null) return;
    this.failure = error;
    const pending = this.pending;
    this.pending = null;
    if (pending !== null) pending.reject(error);
  }

  /** Stops listening and returns the bytes received but not consumed. */
  detach(): Buffer {
    // Paused so nothing is emitted before the next phase attaches its own 'data' listener.
    this.socket.pause();
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    const rest = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.bufferedBytes);
    this.chunks = [];
    this.bufferedBytes = 0;
    return rest;
  }

  private enqueue(lengthBytes: number, discard: boolean): Promise<Buffer> {
    if (this.pending !== null) throw new Error('ByteReader: one read at a time');
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise<Buffer>((resolve, reject) => {
      this.pending = { lengthBytes, discard, resolve, reject };
      this.settle();
    });
  }

  private settle(): void {
    const pending = this.pending;
    if (pending === null) return;
    if (pending.discard) {
      const dropBytes = Math.min(pending.lengthBytes, this.bufferedBytes);
      this.consume(dropBytes, false);
      pending.lengthBytes -= dropBytes;
      if (pending.lengthBytes > 0) return;
      this.pending = null;
      pending.resolve(Buffer.alloc(0));
      return;
    }
    if (this.bufferedBytes < pending.lengthBytes) return;
    this.pending = null;
    pending.resolve(this.consume(pending.lengthBytes, true));
  }

  private consume(lengthBytes: number, keep: boolean): Buffer {
    const out = keep ? Buffer.allocUnsafe(lengthBytes) : null;
    let copiedBytes = 0;
    while (copiedBytes < lengthBytes) {
      const head = this.chunks[0]!;
      const takeBytes = Math.min(head.length, lengthBytes - copiedBytes);
      if (out !== null) head.copy(out, copiedBytes, 0, takeBytes);
      copiedBytes += takeBytes;
      if (takeBytes === head.length) this.chunks.shift();
      else this.chunks[0] = head.subarray(takeBytes);
    }
    this.bufferedBytes -= lengthBytes;
    return out ?? Buffer.alloc(0);
  }
}
