// Encodes transmission-phase replies and coalesces every reply produced in one event-loop turn
// into a single corked socket write (one writev). Headers and small read payloads are packed
// into an append-only arena; large read payloads go out as their own segment, zero-copy, and
// their ReadResult is released from the write callback once the socket is done with them.
//
// The arena is never rewritten: a region handed to the socket keeps its bytes until the write
// completes, and a full arena is simply replaced (the old one is freed by GC after its writes).

import assert from 'node:assert';
import type { Socket } from 'node:net';
import type { ReadResult } from '../volume/backend';
import * as P from './protocol';

const ARENA_BYTES = 256 * 1024;
/** Read payloads up to this size are copied into the arena: one memcpy is cheaper than an extra
 *  writev segment plus a write callback, and the pooled buffer goes back at once. */
export const SMALL_READ_COPY_BYTES = 16 * 1024;
/** Error messages sent in ERROR chunks are cut to this length. */
const ERROR_MESSAGE_BYTES_MAX = 512;

type WriteCallback = (error?: Error | null) => void;

export class ReplyWriter {
  private readonly socket: Socket;
  private arena: Buffer = Buffer.allocUnsafeSlow(ARENA_BYTES);
  private usedBytes = 0;
  private regionStartBytes = 0;
  private readonly segments: Buffer[] = [];
  private readonly callbacks: (WriteCallback | undefined)[] = [];
  /** Large read payloads handed to the socket and not yet released. */
  private readonly outstanding = new Set<WriteCallback>();
  private flushScheduled = false;
  private closed = false;
  private readonly flushOnImmediate = (): void => {
    this.flushScheduled = false;
    this.flush();
  };

  constructor(socket: Socket) {
    this.socket = socket;
  }

  /** Bytes of large read payloads still held by the socket. */
  get outstandingSegments(): number {
    return this.outstanding.size;
  }

  simpleReply(cookieHi: number, cookieLo: number, errorValue: number): void {
    const at = this.reserve(P.SIMPLE_REPLY_HEADER_BYTES);
    this.writeSimpleHeader(at, cookieHi, cookieLo, errorValue);
  }

  /** Simple reply with data (reads without structured replies). `dataWritten` runs once the
   *  payload no longer needs to stay in memory. */
  simpleReadReply(cookieHi: number, cookieLo: number, result: ReadResult, dataWritten: () => void): void {
    const at = this.reserve(P.SIMPLE_REPLY_HEADER_BYTES);
    this.writeSimpleHeader(at, cookieHi, cookieLo, 0);
    this.appendData(result, dataWritten);
  }

  /** One OFFSET_DATA chunk with the DONE flag: the whole read in a single chunk. */
  structuredReadReply(cookieHi: number, cookieLo: number, offsetBytes: number, result: ReadResult, dataWritten: () => void): void {
    const dataBytes = result.data.length;
    const at = this.reserve(P.STRUCTURED_REPLY_HEADER_BYTES + 8);
    this.writeStructuredHeader(at, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + dataBytes);
    writeUInt64At(this.arena, offsetBytes, at + P.STRUCTURED_REPLY_HEADER_BYTES);
    this.appendData(result, dataWritten);
  }

  /** An ERROR chunk with the DONE flag and a human-readable message. */
  structuredError(cookieHi: number, cookieLo: number, errorValue: number, message: string): void {
    assert(errorValue !== 0);
    let text = Buffer.from(message, 'utf8');
    if (text.length > ERROR_MESSAGE_BYTES_MAX) text = text.subarray(0, ERROR_MESSAGE_BYTES_MAX);
    const at = this.reserve(P.STRUCTURED_REPLY_HEADER_BYTES + 6 + text.length);
    this.writeStructuredHeader(at, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, cookieHi, cookieLo, 6 + text.length);
    const body = at + P.STRUCTURED_REPLY_HEADER_BYTES;
    this.arena.writeUInt32BE(errorValue, body);
    this.arena.writeUInt16BE(text.length, body + 4);
    text.copy(this.arena, body + 6);
  }

  /** A BLOCK_STATUS chunk with the DONE flag; `descriptors` is [length, flags, length, flags...]. */
  blockStatusReply(cookieHi: number, cookieLo: number, contextId: number, descriptors: number[]): void {
    assert(descriptors.length >= 2);
    assert(descriptors.length % 2 === 0);
    const payloadBytes = 4 + 4 * descriptors.length;
    const at = this.reserve(P.STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
    this.writeStructuredHeader(at, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, payloadBytes);
    let position = at + P.STRUCTURED_REPLY_HEADER_BYTES;
    this.arena.writeUInt32BE(contextId, position);
    position += 4;
    for (const value of descriptors) {
      this.arena.writeUInt32BE(value >>> 0, position);
      position += 4;
    }
  }

  /** Hands everything queued so far to the socket now (used before end()). */
  flush(): void {
    if (this.closed) return;
    this.closeRegion();
    const count = this.segments.length;
    if (count === 0) return;
    if (count === 1) {
      this.socket.write(this.segments[0]!, this.callbacks[0]);
    } else {
      this.socket.cork();
      for (let i = 0; i < count; i++) this.socket.write(this.segments[i]!, this.callbacks[i]);
      this.socket.uncork();
    }
    this.segments.length = 0;
    this.callbacks.length = 0;
  }

  /** No more replies: hand over what is queued; payloads in flight are released by their
   *  write callbacks (or by close()). */
  seal(): void {
    this.flush();
    this.closed = true;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** The socket is gone: drop queued replies and release every payload still held. */
  close(): void {
    this.closed = true;
    this.segments.length = 0;
    const pending = [...this.outstanding];
    this.outstanding.clear();
    this.callbacks.length = 0;
    for (const callback of pending) callback();
  }

  private appendData(result: ReadResult, dataWritten: () => void): void {
    const data = result.data;
    if (data.length <= SMALL_READ_COPY_BYTES) {
      const at = this.reserve(data.length);
      data.copy(this.arena, at);
      result.release();
      dataWritten();
      return;
    }
    this.closeRegion();
    let done = false;
    const callback: WriteCallback = () => {
      if (done) return;
      done = true;
      this.outstanding.delete(callback);
      result.release();
      dataWritten();
    };
    this.outstanding.add(callback);
    this.segments.push(data);
    this.callbacks.push(callback);
    this.scheduleFlush();
  }

  private reserve(lengthBytes: number): number {
    assert(!this.closed);
    if (this.usedBytes + lengthBytes > this.arena.length) {
      this.closeRegion();
      this.arena = Buffer.allocUnsafeSlow(Math.max(ARENA_BYTES, lengthBytes));
      this.usedBytes = 0;
      this.regionStartBytes = 0;
    }
    const at = this.usedBytes;
    this.usedBytes += lengthBytes;
    this.scheduleFlush();
    return at;
  }

  private closeRegion(): void {
    if (this.usedBytes === this.regionStartBytes) return;
    this.segments.push(this.arena.subarray(this.regionStartBytes, this.usedBytes));
    this.callbacks.push(undefined);
    this.regionStartBytes = this.usedBytes;
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    // setImmediate (not nextTick): completions arriving in the same poll phase share one write.
    setImmediate(this.flushOnImmediate);
  }

  private writeSimpleHeader(at: number, cookieHi: number, cookieLo: number, errorValue: number): void {
    const arena = this.arena;
    arena.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, at);
    arena.writeUInt32BE(errorValue, at + 4);
    arena.writeUInt32BE(cookieHi, at + 8);
    arena.writeUInt32BE(cookieLo, at + 12);
  }

  private writeStructuredHeader(at: number, flags: number, type: number, cookieHi: number, cookieLo: number, payloadBytes: number): void {
    const arena = this.arena;
    arena.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, at);
    arena.writeUInt16BE(flags, at + 4);
    arena.writeUInt16BE(type, at + 6);
    arena.writeUInt32BE(cookieHi, at + 8);
    arena.writeUInt32BE(cookieLo, at + 12);
    arena.writeUInt32BE(payloadBytes, at + 16);
  }
}

function writeUInt64At(target: Buffer, value: number, at: number): void {
  target.writeUInt32BE(Math.floor(value / P.TWO_POW_32), at);
  target.writeUInt32BE(value >>> 0, at + 4);
}
