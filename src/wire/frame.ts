// Frame layout (all integers big-endian, see docs/PROTOCOL.md):
//   [magic u32 'BMW1'][header length u32][payload length u32][Envelope header][raw payload]
// Data rides as a raw payload behind a small protobuf header: no protobuf copy of the block
// (bench/wire-framing.ts measures the difference).

import assert from 'node:assert';

import { WireError } from './errors';
import { decodeFastHeader, encodeFastHeader, FAST_HEADER_BYTES_MAX } from './fast-header';
import type { WireMessage } from './messages';
import { decodeGenericHeader, encodeHeader, expectedPayloadBytes } from './schema';

export const FRAME_MAGIC = 0x424d5731; // 'BMW1'
export const PRELUDE_BYTES = 12;
export const HEADER_BYTES_MAX = 64 * 1024;
export const PAYLOAD_BYTES_MAX = 32 * 1024 * 1024;

// Relations between the limits, checked once at load.
assert(Buffer.from('BMW1', 'latin1').readUInt32BE(0) === FRAME_MAGIC);
assert(HEADER_BYTES_MAX <= 0xffffffff);
assert(PAYLOAD_BYTES_MAX <= 0xffffffff);
assert(PAYLOAD_BYTES_MAX % 4096 === 0, 'a maximal payload is whole 4 KiB blocks');
assert(PAYLOAD_BYTES_MAX <= 2 ** 31 - 1, 'a payload fits one Buffer');

export interface FrameLimits {
  /** Largest payload accepted or sent; at most PAYLOAD_BYTES_MAX (the default). */
  payloadBytesMax?: number;
}

export interface FrameDecoderOptions extends FrameLimits {
  /** Buffer for a payload that spans chunks (e.g. an aligned pooled buffer for O_DIRECT).
   *  Must return exactly `bytes` bytes. Default: Buffer.allocUnsafe. */
  allocatePayload?: (bytes: number) => Buffer;
  /** Never hand out views of a pushed chunk: every payload is assembled in its own buffer and
   *  headers are decoded from copies. For a caller that reads into one buffer over and over. */
  copyChunks?: boolean;
}

export interface Frame {
  message: WireMessage;
  /** Raw payload, or undefined when the frame has none. A view on the received chunk when the
   *  payload lay whole in it (it keeps that chunk alive; never with copyChunks), else an
   *  assembled buffer. */
  payload: Buffer | undefined;
}

function resolvePayloadBytesMax(limits: FrameLimits | undefined): number {
  const value = limits?.payloadBytesMax ?? PAYLOAD_BYTES_MAX;
  if (!Number.isSafeInteger(value) || value < 0 || value > PAYLOAD_BYTES_MAX) {
    throw new RangeError(`payloadBytesMax must be an integer in [0, ${PAYLOAD_BYTES_MAX}], got ${value}`);
  }
  return value;
}

function checkPayloadMatches(message: WireMessage, payloadBytes: number): void {
  const expectedBytes = expectedPayloadBytes(message);
  if (expectedBytes !== payloadBytes) {
    throw new WireError(
      'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
      `${message.kind} announces ${expectedBytes} payload bytes, frame carries ${payloadBytes}`,
    );
  }
}

/** Encodes one frame as buffers for writev: the prelude and header in one buffer, then the
 *  payload itself (never copied). */
export function encodeFrame(message: WireMessage, payload?: Uint8Array, limits?: FrameLimits): Buffer[] {
  const payloadBytesMax = resolvePayloadBytesMax(limits);
  const payloadBytes = payload?.byteLength ?? 0;
  if (payloadBytes > payloadBytesMax) {
    throw new WireError('BM_ERR_WIRE_PAYLOAD_TOO_LARGE', `payload ${payloadBytes} > ${payloadBytesMax} bytes`);
  }
  checkPayloadMatches(message, payloadBytes);
  let head: Buffer;
  // The data path's headers are written in place, without protobufjs (same bytes).
  const fastHead = Buffer.allocUnsafe(PRELUDE_BYTES + FAST_HEADER_BYTES_MAX);
  const fastBytes = encodeFastHeader(message, fastHead, PRELUDE_BYTES);
  if (fastBytes >= 0) {
    head = fastHead.subarray(0, PRELUDE_BYTES + fastBytes);
    head.writeUInt32BE(fastBytes, 4);
  } else {
    const header = encodeHeader(message);
    if (header.byteLength > HEADER_BYTES_MAX) {
      throw new WireError('BM_ERR_WIRE_HEADER_TOO_LARGE', `header ${header.byteLength} > ${HEADER_BYTES_MAX} bytes`);
    }
    head = Buffer.allocUnsafe(PRELUDE_BYTES + header.byteLength);
    head.writeUInt32BE(header.byteLength, 4);
    head.set(header, PRELUDE_BYTES);
  }
  head.writeUInt32BE(FRAME_MAGIC, 0);
  head.writeUInt32BE(payloadBytes, 8);
  if (payload === undefined || payloadBytes === 0) return [head];
  const payloadBuffer = Buffer.isBuffer(payload)
    ? payload
    : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  return [head, payloadBuffer];
}

const enum State {
  Prelude,
  Header,
  Payload,
}

/** Incremental decoder for a byte stream of frames. Buffers at most one frame: the prelude is
 *  checked before anything else is kept, the header is decoded (and its payload length checked)
 *  before the payload is collected. After any error it refuses further input by throwing that
 *  error again: a stream that lost framing cannot be trusted. */
export class FrameDecoder {
  #payloadBytesMax: number;
  readonly #allocatePayload: (bytes: number) => Buffer;
  readonly #copyChunks: boolean;
  #state = State.Prelude;
  readonly #prelude = Buffer.alloc(PRELUDE_BYTES);
  #preludeFilled = 0;
  #headerBytes = 0;
  #payloadBytes = 0;
  #assembly: Buffer | undefined; // header or payload spanning chunks
  #assemblyFilled = 0;
  #message: WireMessage | undefined;
  #failure: WireError | undefined;

  get payloadBytesMax(): number {
    return this.#payloadBytesMax;
  }

  /** Changes the payload limit for frames whose prelude has not arrived yet, e.g. 0 until the
   *  peer has authenticated, so an unauthenticated peer cannot make us allocate payload memory. */
  limitPayloadBytes(payloadBytesMax: number): void {
    this.#payloadBytesMax = resolvePayloadBytesMax({ payloadBytesMax });
  }

  constructor(options: FrameDecoderOptions = {}) {
    this.#payloadBytesMax = resolvePayloadBytesMax(options);
    this.#allocatePayload = options.allocatePayload ?? ((bytes) => Buffer.allocUnsafe(bytes));
    this.#copyChunks = options.copyChunks ?? false;
  }

  /** The unfilled rest of the payload being assembled, when at least `minBytes` of it are still
   *  to come: a reader may read straight into it, then report the bytes with landed(). */
  directReadTarget(minBytes: number): Buffer | undefined {
    if (this.#failure !== undefined || this.#state !== State.Payload || this.#assembly === undefined) return undefined;
    if (this.#payloadBytes - this.#assemblyFilled < minBytes) return undefined;
    return this.#assembly.subarray(this.#assemblyFilled);
  }

  /** `bytes` bytes were read into the start of the last directReadTarget(); returns the frame
   *  they complete, if they do. */
  landed(bytes: number): Frame[] {
    if (this.#failure !== undefined) throw this.#failure;
    const assembly = this.#assembly;
    assert(this.#state === State.Payload && assembly !== undefined && this.#message !== undefined);
    assert(bytes >= 0 && this.#assemblyFilled + bytes <= this.#payloadBytes, 'landed more than the payload');
    this.#assemblyFilled += bytes;
    if (this.#assemblyFilled < this.#payloadBytes) return [];
    const frame = { message: this.#message, payload: assembly };
    this.#assembly = undefined;
    this.#assemblyFilled = 0;
    this.#message = undefined;
    this.#state = State.Prelude;
    return [frame];
  }

  /** The error that stopped this decoder, if any. */
  get failure(): WireError | undefined {
    return this.#failure;
  }

  /** Bytes held for the frame in progress (never more than one frame). */
  get bufferedBytes(): number {
    return this.#preludeFilled + this.#assemblyFilled;
  }

  /** True between frames: the stream may end here without losing anything. */
  get atFrameBoundary(): boolean {
    return this.#state === State.Prelude && this.#preludeFilled === 0;
  }

  /** Feeds the next chunk; returns the frames it completed. Frames completed earlier in a chunk
   *  that then fails are dropped with it (the connection is dropped, nothing was acknowledged). */
  push(chunk: Buffer): Frame[] {
    if (this.#failure !== undefined) throw this.#failure;
    try {
      return this.#consume(chunk);
    } catch (error) {
      if (error instanceof WireError) this.#failure = error;
      else this.#failure = new WireError('BM_ERR_WIRE_DECODE', `decoder failed: ${(error as Error).message}`);
      this.#assembly = undefined;
      throw this.#failure;
    }
  }

  #consume(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let offset = 0;
    for (;;) {
      const availableBytes = chunk.length - offset;
      if (this.#state === State.Prelude) {
        if (this.#preludeFilled === 0 && availableBytes >= PRELUDE_BYTES) {
          this.#onPrelude(chunk, offset);
          offset += PRELUDE_BYTES;
        } else {
          const copyBytes = Math.min(PRELUDE_BYTES - this.#preludeFilled, availableBytes);
          chunk.copy(this.#prelude, this.#preludeFilled, offset, offset + copyBytes);
          this.#preludeFilled += copyBytes;
          offset += copyBytes;
          if (this.#preludeFilled < PRELUDE_BYTES) return frames;
          this.#preludeFilled = 0;
          this.#onPrelude(this.#prelude, 0);
        }
        continue;
      }
      const wantedBytes = this.#state === State.Header ? this.#headerBytes : this.#payloadBytes;
      let piece: Buffer;
      if (this.#assembly === undefined && availableBytes >= wantedBytes && (this.#state === State.Header || !this.#copyChunks)) {
        piece = chunk.subarray(offset, offset + wantedBytes); // zero-copy
        offset += wantedBytes;
      } else {
        if (this.#assembly === undefined) {
          this.#assembly =
            this.#state === State.Header ? Buffer.allocUnsafe(wantedBytes) : this.#allocatePayload(wantedBytes);
          assert(this.#assembly.length === wantedBytes, 'allocatePayload returned the asked size');
          this.#assemblyFilled = 0;
        }
        const copyBytes = Math.min(wantedBytes - this.#assemblyFilled, availableBytes);
        chunk.copy(this.#assembly, this.#assemblyFilled, offset, offset + copyBytes);
        this.#assemblyFilled += copyBytes;
        offset += copyBytes;
        if (this.#assemblyFilled < wantedBytes) return frames;
        piece = this.#assembly;
        this.#assembly = undefined;
        this.#assemblyFilled = 0;
      }
      if (this.#state === State.Header) {
        // The data path's headers decode to plain numbers; protobufjs keeps views of bytes fields.
        const message = decodeFastHeader(piece) ?? decodeGenericHeader(this.#copyChunks ? Buffer.from(piece) : piece);
        checkPayloadMatches(message, this.#payloadBytes);
        if (this.#payloadBytes === 0) {
          frames.push({ message, payload: undefined });
          this.#state = State.Prelude;
        } else {
          this.#message = message;
          this.#state = State.Payload;
        }
      } else {
        assert(this.#message !== undefined);
        frames.push({ message: this.#message, payload: piece });
        this.#message = undefined;
        this.#state = State.Prelude;
      }
    }
  }

  /** Checks a prelude before a single further byte is kept. */
  #onPrelude(source: Buffer, offset: number): void {
    const magic = source.readUInt32BE(offset);
    if (magic !== FRAME_MAGIC) {
      throw new WireError('BM_ERR_WIRE_BAD_MAGIC', `bad frame magic 0x${magic.toString(16).padStart(8, '0')}`);
    }
    const headerBytes = source.readUInt32BE(offset + 4);
    if (headerBytes > HEADER_BYTES_MAX) {
      throw new WireError('BM_ERR_WIRE_HEADER_TOO_LARGE', `header ${headerBytes} > ${HEADER_BYTES_MAX} bytes`);
    }
    const payloadBytes = source.readUInt32BE(offset + 8);
    if (payloadBytes > this.#payloadBytesMax) {
      throw new WireError('BM_ERR_WIRE_PAYLOAD_TOO_LARGE', `payload ${payloadBytes} > ${this.#payloadBytesMax} bytes`);
    }
    this.#headerBytes = headerBytes;
    this.#payloadBytes = payloadBytes;
    this.#state = State.Header;
  }
}
