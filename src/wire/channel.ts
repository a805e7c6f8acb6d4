// Frames over any Duplex (net.Socket, tls.TLSSocket, an in-memory pair): send with one corked
// writev per frame, receive one decoded frame at a time. Decoded frames wait in a bounded queue;
// above it the stream is paused, so a fast peer cannot make us buffer without limit.
// With ownReadBuffers a net.Socket is adopted (src/net/adopt-socket.ts): reads land in one
// reused staging buffer, and the rest of a large payload straight in its own buffer (aligned
// pooled memory on the target) instead of a fresh 64 KiB chunk per read and an assembly copy.

import net from 'node:net';
import type { Duplex, Writable } from 'node:stream';

import { adoptSocket } from '../net/adopt-socket';
import { WireError } from './errors';
import { encodeFrame, FrameDecoder, type Frame, type FrameDecoderOptions } from './frame';
import type { WireMessage } from './messages';

export interface FrameChannelOptions extends FrameDecoderOptions {
  /** Decoded frames held before the stream is paused. Default 64. */
  queuedFramesMax?: number;
  /** Payload bytes of decoded frames held before the stream is paused. Default 64 MiB. One frame
   *  may exceed it alone (up to the payload limit); then nothing more is read until it is taken. */
  queuedBytesMax?: number;
  /** Adopt a net.Socket so reads land in the channel's own buffers; `stream` is then the
   *  adopted socket (the one passed in is closed) and detach() is not available. */
  ownReadBuffers?: boolean;
}

/** The staging buffer an adopted socket reads into: a burst of small frames fits one read. */
const STAGING_BYTES = 256 * 1024;
/** A payload with at least this much still to come is read straight into its buffer. */
const DIRECT_READ_MIN_BYTES = 32 * 1024;

/** Resolves once `stream` can take more (its write buffer below the mark) or is gone: a
 *  destroyed stream never drains. */
export function whenWritable(stream: Writable): Promise<void> {
  if (stream.destroyed || !stream.writableNeedDrain) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    stream.on('drain', done);
    stream.on('close', done);
  });
}

interface Waiter {
  resolve: (frame: Frame) => void;
  reject: (error: Error) => void;
}

export class FrameChannel {
  readonly stream: Duplex;
  #decoder: FrameDecoder;
  readonly #queuedFramesMax: number;
  readonly #queuedBytesMax: number;
  readonly #queue: Frame[] = [];
  #queuedBytes = 0;
  #waiter: Waiter | undefined;
  #failure: Error | undefined;
  /** Adopted sockets only: the reused staging buffer and the payload slice the next read fills. */
  #staging: Buffer | undefined;
  #directTarget: Buffer | undefined;
  #directReadBytes = 0;

  constructor(stream: Duplex, options: FrameChannelOptions = {}) {
    // Options are checked before adoption: a throw after it would strand the new socket.
    const queuedFramesMax = options.queuedFramesMax ?? 64;
    if (!Number.isSafeInteger(queuedFramesMax) || queuedFramesMax < 1) {
      throw new RangeError(`queuedFramesMax must be a positive integer, got ${queuedFramesMax}`);
    }
    const queuedBytesMax = options.queuedBytesMax ?? 64 * 1024 * 1024;
    if (!Number.isSafeInteger(queuedBytesMax) || queuedBytesMax < 1) {
      throw new RangeError(`queuedBytesMax must be a positive integer, got ${queuedBytesMax}`);
    }
    // Staging buffer and decoder exist before adoption: the new socket asks for its first buffer at once.
    const wantsAdoption = options.ownReadBuffers === true && stream instanceof net.Socket;
    this.#staging = wantsAdoption ? Buffer.allocUnsafeSlow(STAGING_BYTES) : undefined;
    this.#decoder = new FrameDecoder({ ...options, copyChunks: wantsAdoption });
    const adopted = !wantsAdoption
      ? null
      : adoptSocket(stream as net.Socket, {
          nextReadBuffer: () => this.#nextReadBuffer(),
          onRead: (buffer, nread) => this.#ownRead(buffer, nread),
        });
    if (wantsAdoption && adopted === null) {
      this.#staging = undefined;
      this.#decoder = new FrameDecoder(options); // stream chunks are fresh: views of them are safe
    }
    this.stream = adopted?.socket ?? stream;
    this.#queuedFramesMax = queuedFramesMax;
    this.#queuedBytesMax = queuedBytesMax;
    if (adopted === null) this.stream.on('data', this.#onData);
    this.stream.on('end', this.#onEnd);
    this.stream.on('close', this.#onEnd);
    this.stream.on('error', this.#onError);
    if (adopted !== null && adopted.pending.length > 0) this.#onData(adopted.pending);
  }

  #nextReadBuffer(): Buffer {
    // Nothing decoded refers to the staging buffer (copyChunks), so every read may reuse it.
    this.#directTarget = this.#decoder.directReadTarget(DIRECT_READ_MIN_BYTES);
    return this.#directTarget ?? this.#staging!;
  }

  #ownRead(buffer: Buffer, nread: number): boolean {
    if (buffer === this.#directTarget) {
      this.#directTarget = undefined;
      this.#directReadBytes += nread;
      this.#deliver(this.#decoder.landed(nread));
    } else {
      this.#onData(buffer.subarray(0, nread));
    }
    return true; // #onData / #deliver pause the stream themselves when the queue is full
  }

  /** Writes one frame. Returns the stream's write() result (false: wait for 'drain'). */
  send(message: WireMessage, payload?: Uint8Array): boolean {
    const buffers = encodeFrame(message, payload, { payloadBytesMax: this.#decoder.payloadBytesMax });
    this.stream.cork();
    let flowing = true;
    for (const buffer of buffers) flowing = this.stream.write(buffer);
    process.nextTick(() => this.stream.uncork());
    return flowing;
  }

  /** Next frame. Rejects with the decoder's WireError, the stream's error, BM_ERR_WIRE_CLOSED,
   *  or the signal's reason when aborted. One receive at a time. */
  receive(signal?: AbortSignal): Promise<Frame> {
    if (this.#waiter !== undefined) throw new Error('FrameChannel.receive is already pending');
    const frame = this.#queue.shift();
    if (frame !== undefined) {
      this.#queuedBytes -= frame.payload?.length ?? 0;
      if (!this.#queueFull() && this.#failure === undefined) this.stream.resume();
      return Promise.resolve(frame);
    }
    if (this.#failure !== undefined) return Promise.reject(this.#failure);
    if (signal?.aborted === true) return Promise.reject(signal.reason as Error);
    return new Promise<Frame>((resolve, reject) => {
      const onAbort = (): void => {
        this.#waiter = undefined;
        reject(signal?.reason as Error);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiter = {
        resolve: (next) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(next);
        },
        reject: (error) => {
          signal?.removeEventListener('abort', onAbort);
          reject(error);
        },
      };
    });
  }

  /** Stops listening to the stream (it stays open, paused), e.g. to hand it to another layer.
   *  Frames still queued are returned. Only at a frame boundary: bytes of a half-received frame
   *  would otherwise be lost, so mid-frame it throws BM_ERR_WIRE_DECODE and changes nothing. */
  detach(): Frame[] {
    if (this.#staging !== undefined) throw new Error('FrameChannel.detach: an adopted socket cannot be handed on');
    if (!this.#decoder.atFrameBoundary) {
      throw new WireError('BM_ERR_WIRE_DECODE', 'cannot detach the channel in the middle of a frame');
    }
    // Paused first: a flowing stream with no 'data' listener drops what it reads.
    this.stream.pause();
    this.stream.off('data', this.#onData);
    this.stream.off('end', this.#onEnd);
    this.stream.off('close', this.#onEnd);
    this.stream.off('error', this.#onError);
    this.#fail(new WireError('BM_ERR_WIRE_CLOSED', 'channel detached'));
    this.#queuedBytes = 0;
    return this.#queue.splice(0);
  }

  readonly #onData = (chunk: Buffer): void => {
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (error) {
      this.stream.pause();
      this.#fail(error as Error);
      return;
    }
    this.#deliver(frames);
  };

  #deliver(frames: Frame[]): void {
    for (const frame of frames) {
      const waiter = this.#waiter;
      if (waiter !== undefined) {
        this.#waiter = undefined;
        waiter.resolve(frame);
      } else {
        this.#queue.push(frame);
        this.#queuedBytes += frame.payload?.length ?? 0;
      }
    }
    if (this.#queueFull()) this.stream.pause();
  }

  #queueFull(): boolean {
    return this.#queue.length >= this.#queuedFramesMax || this.#queuedBytes >= this.#queuedBytesMax;
  }

  /** Payload bytes read straight into their buffers (ownReadBuffers); for tests. */
  get directReadBytes(): number {
    return this.#directReadBytes;
  }

  /** Current payload limit of received frames (see FrameDecoder.limitPayloadBytes). */
  get payloadBytesMax(): number {
    return this.#decoder.payloadBytesMax;
  }

  limitPayloadBytes(payloadBytesMax: number): void {
    this.#decoder.limitPayloadBytes(payloadBytesMax);
  }

  readonly #onEnd = (): void => {
    const detail = this.#decoder.atFrameBoundary ? '' : ' in the middle of a frame';
    this.#fail(new WireError('BM_ERR_WIRE_CLOSED', `stream closed${detail}`));
  };

  readonly #onError = (error: Error): void => {
    this.#fail(error);
  };

  #fail(error: Error): void {
    if (this.#failure !== undefined) return;
    this.#failure = error;
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.reject(error);
  }
}
