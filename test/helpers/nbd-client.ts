// A small raw-protocol NBD client for tests: it speaks exactly what a test asks, including
// things a real client never would (bad magic, bad flags, oversize payloads), and decodes
// whatever the server answers (simple replies, structured chunks, option replies).

import net from 'node:net';
import * as P from '../../src/nbd/protocol';

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface StructuredChunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

export interface Reply {
  cookie: bigint;
  /** NBD error value, 0 on success. */
  error: number;
  structured: boolean;
  /** Read data (simple reply) or the data of all OFFSET_DATA chunks, in offset order. */
  data?: Buffer;
  errorMessage?: string;
  /** BLOCK_STATUS: context id and [length, flags] pairs. */
  blockStatus?: { contextId: number; descriptors: Array<[number, number]> };
  chunks: StructuredChunk[];
}

export interface RequestSpec {
  type: number;
  flags?: number;
  offsetBytes?: number;
  lengthBytes?: number;
  payload?: Buffer;
  cookie?: bigint;
}

export class NbdTestClient {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private waiter: (() => void) | null = null;
  private ended = false;
  readonly closed: Promise<void>;
  private nextCookie = 1n;
  private readonly pending = new Map<bigint, { type: number; lengthBytes: number; offsetBytes: number }>();
  private readonly partial = new Map<bigint, StructuredChunk[]>();

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.bufferedBytes += chunk.length;
      this.wake();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.ended = true;
        this.wake();
        resolve();
      }),
    );
  }

  static connect(path: string): Promise<NbdTestClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new NbdTestClient(socket));
      });
    });
  }

  /** Connects and completes a fixed newstyle handshake with NBD_OPT_GO. */
  static async open(path: string, exportName: string, opts: { structured?: boolean; allocation?: boolean } = {}): Promise<{ client: NbdTestClient; sizeBytes: number; transmissionFlags: number }> {
    const client = await NbdTestClient.connect(path);
    await client.startFixedNewstyle();
    if (opts.structured === true || opts.allocation === true) {
      const reply = await client.option(P.NBD_OPT_STRUCTURED_REPLY);
      if (reply.type !== P.NBD_REP_ACK) throw new Error('structured replies refused');
    }
    if (opts.allocation === true) {
      const replies = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, exportName, [P.BASE_ALLOCATION]);
      if (replies[0]?.type !== P.NBD_REP_META_CONTEXT) throw new Error('base:allocation refused');
    }
    const go = await client.go(exportName);
    if (go.sizeBytes === undefined) throw new Error(`NBD_OPT_GO failed with reply type 0x${go.replies.at(-1)?.type.toString(16)}`);
    return { client, sizeBytes: go.sizeBytes, transmissionFlags: go.transmissionFlags! };
  }

  get isClosed(): boolean {
    return this.ended;
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Exactly n bytes; rejects if the server closes first. */
  async read(lengthBytes: number): Promise<Buffer> {
    while (this.bufferedBytes < lengthBytes) {
      if (this.ended) throw Object.assign(new Error(`connection closed with ${this.bufferedBytes}/${lengthBytes} bytes`), { code: 'ECONNCLOSED' });
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
    const all = Buffer.concat(this.chunks, this.bufferedBytes);
    this.chunks = all.length > lengthBytes ? [all.subarray(lengthBytes)] : [];
    this.bufferedBytes -= lengthBytes;
    return all.subarray(0, lengthBytes);
  }

  /** Bytes received and not yet read (for asserting the server sent nothing more). */
  get unreadBytes(): number {
    return this.bufferedBytes;
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = null;
    if (waiter !== null) waiter();
  }

  // ---- handshake -----------------------------------------------------------------------------

  async readGreeting(): Promise<number> {
    const greeting = await this.read(18);
    if (greeting.readUInt32BE(0) !== P.NBDMAGIC_HI || greeting.readUInt32BE(4) !== P.NBDMAGIC_LO) throw new Error('bad NBDMAGIC');
    if (greeting.readUInt32BE(8) !== P.IHAVEOPT_HI || greeting.readUInt32BE(12) !== P.IHAVEOPT_LO) throw new Error('bad IHAVEOPT');
    return greeting.readUInt16BE(16);
  }

  sendClientFlags(flags: number): void {
    const data = Buffer.alloc(4);
    data.writeUInt32BE(flags >>> 0, 0);
    this.write(data);
  }

  async startFixedNewstyle(noZeroes = true): Promise<number> {
    const handshakeFlags = await this.readGreeting();
    this.sendClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
    return handshakeFlags;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredBytes = data.length): void {
    const header = Buffer.alloc(16);
    header.writeUInt32BE(P.IHAVEOPT_HI, 0);
    header.writeUInt32BE(P.IHAVEOPT_LO, 4);
    header.writeUInt32BE(option >>> 0, 8);
    header.writeUInt32BE(declaredBytes >>> 0, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.read(20);
    if (header.readUInt32BE(0) !== P.OPTION_REPLY_MAGIC_HI || header.readUInt32BE(4) !== P.OPTION_REPLY_MAGIC_LO) {
      throw new Error('bad option reply magic');
    }
    const lengthBytes = header.readUInt32BE(16);
    const data = lengthBytes > 0 ? Buffer.from(await this.read(lengthBytes)) : Buffer.alloc(0);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }

  /** Reads replies until the final one (ACK or an error); returns all of them. */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === P.NBD_REP_ACK || (reply.type & P.NBD_REP_FLAG_ERROR) !== 0) return replies;
    }
  }

  /** Sends an option and returns its final reply. */
  async option(option: number, data?: Buffer): Promise<OptionReply> {
    this.sendOption(option, data);
    const replies = await this.readOptionReplies();
    return replies[replies.length - 1]!;
  }

  static goData(name: string, infos: number[] = []): Buffer {
    const nameBytes = Buffer.from(name, 'utf8');
    const data = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    data.writeUInt16BE(infos.length, 4 + nameBytes.length);
    infos.forEach((info, i) => data.writeUInt16BE(info, 4 + nameBytes.length + 2 + 2 * i));
    return data;
  }

  static metaContextData(exportName: string, queries: string[]): Buffer {
    const parts: Buffer[] = [];
    const name = Buffer.from(exportName, 'utf8');
    const head = Buffer.alloc(4);
    head.writeUInt32BE(name.length, 0);
    parts.push(head, name);
    const count = Buffer.alloc(4);
    count.writeUInt32BE(queries.length, 0);
    parts.push(count);
    for (const query of queries) {
      const text = Buffer.from(query, 'utf8');
      const length = Buffer.alloc(4);
      length.writeUInt32BE(text.length, 0);
      parts.push(length, text);
    }
    return Buffer.concat(parts);
  }

  async metaContext(option: number, exportName: string, queries: string[]): Promise<OptionReply[]> {
    this.sendOption(option, NbdTestClient.metaContextData(exportName, queries));
    return this.readOptionReplies();
  }

  /** NBD_OPT_GO or NBD_OPT_INFO; decodes the NBD_REP_INFO replies. */
  async go(
    name: string,
    infos: number[] = [],
    option: number = P.NBD_OPT_GO,
  ): Promise<{
    replies: OptionReply[];
    sizeBytes?: number;
    transmissionFlags?: number;
    blockSize?: { minimumBytes: number; preferredBytes: number; maximumBytes: number };
    name?: string;
    description?: string;
  }> {
    this.sendOption(option, NbdTestClient.goData(name, infos));
    const replies = await this.readOptionReplies();
    const result: Awaited<ReturnType<NbdTestClient['go']>> = { replies };
    for (const reply of replies) {
      if (reply.type !== P.NBD_REP_INFO) continue;
      const infoType = reply.data.readUInt16BE(0);
      if (infoType === P.NBD_INFO_EXPORT) {
        result.sizeBytes = reply.data.readUInt32BE(2) * P.TWO_POW_32 + reply.data.readUInt32BE(6);
        result.transmissionFlags = reply.data.readUInt16BE(10);
      } else if (infoType === P.NBD_INFO_BLOCK_SIZE) {
        result.blockSize = {
          minimumBytes: reply.data.readUInt32BE(2),
          preferredBytes: reply.data.readUInt32BE(6),
          maximumBytes: reply.data.readUInt32BE(10),
        };
      } else if (infoType === P.NBD_INFO_NAME) {
        result.name = reply.data.toString('utf8', 2);
      } else if (infoType === P.NBD_INFO_DESCRIPTION) {
        result.description = reply.data.toString('utf8', 2);
      }
    }
    if (replies.at(-1)?.type !== P.NBD_REP_ACK) {
      delete result.sizeBytes;
    }
    return result;
  }

  // ---- transmission --------------------------------------------------------------------------

  static requestHeader(spec: RequestSpec, cookie: bigint, magic = P.NBD_REQUEST_MAGIC): Buffer {
    const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
    header.writeUInt32BE(magic >>> 0, 0);
    header.writeUInt16BE(spec.flags ?? 0, 4);
    header.writeUInt16BE(spec.type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(spec.offsetBytes ?? 0), 16);
    header.writeUInt32BE(spec.lengthBytes ?? spec.payload?.length ?? 0, 24);
    return header;
  }

  /** Sends a request (header plus payload, if any) and returns its cookie. */
  send(spec: RequestSpec): bigint {
    const cookie = spec.cookie ?? this.nextCookie++;
    const lengthBytes = spec.lengthBytes ?? spec.payload?.length ?? 0;
    this.pending.set(cookie, { type: spec.type, lengthBytes, offsetBytes: spec.offsetBytes ?? 0 });
    const header = NbdTestClient.requestHeader(spec, cookie);
    this.write(spec.payload === undefined ? header : Buffer.concat([header, spec.payload]));
    return cookie;
  }

  /** Reads the next complete reply (all chunks of a structured reply). */
  async readReply(): Promise<Reply> {
    for (;;) {
      const magic = (await this.read(4)).readUInt32BE(0);
      if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
        const rest = await this.read(12);
        const error = rest.readUInt32BE(0);
        const cookie = rest.readBigUInt64BE(4);
        const request = this.pending.get(cookie);
        this.pending.delete(cookie);
        const reply: Reply = { cookie, error, structured: false, chunks: [] };
        if (error === 0 && request?.type === P.NBD_CMD_READ) reply.data = Buffer.from(await this.read(request.lengthBytes));
        return reply;
      }
      if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      const rest = await this.read(16);
      const chunk: StructuredChunk = {
        flags: rest.readUInt16BE(0),
        type: rest.readUInt16BE(2),
        cookie: rest.readBigUInt64BE(4),
        payload: Buffer.alloc(0),
      };
      const payloadBytes = rest.readUInt32BE(12);
      if (payloadBytes > 0) chunk.payload = Buffer.from(await this.read(payloadBytes));
      const chunks = this.partial.get(chunk.cookie) ?? [];
      chunks.push(chunk);
      if ((chunk.flags & P.NBD_REPLY_FLAG_DONE) === 0) {
        this.partial.set(chunk.cookie, chunks);
        continue;
      }
      this.partial.delete(chunk.cookie);
      const request = this.pending.get(chunk.cookie);
      this.pending.delete(chunk.cookie);
      return decodeStructured(chunk.cookie, chunks, request);
    }
  }

  /** Sends one request and waits for its reply (no other requests may be outstanding). */
  async request(spec: RequestSpec): Promise<Reply> {
    const cookie = this.send(spec);
    const reply = await this.readReply();
    if (reply.cookie !== cookie) throw new Error(`reply for cookie ${reply.cookie}, expected ${cookie}`);
    return reply;
  }

  async disconnect(): Promise<void> {
    if (!this.ended) {
      this.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_DISC }, this.nextCookie++));
    }
    await this.closed;
  }
}

function decodeStructured(cookie: bigint, chunks: StructuredChunk[], request: { offsetBytes: number; lengthBytes: number } | undefined): Reply {
  const reply: Reply = { cookie, error: 0, structured: true, chunks };
  const pieces: Array<{ offsetBytes: number; data: Buffer }> = [];
  for (const chunk of chunks) {
    if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      const offsetBytes = Number(chunk.payload.readBigUInt64BE(0));
      pieces.push({ offsetBytes, data: chunk.payload.subarray(8) });
    } else if (chunk.type === P.NBD_REPLY_TYPE_ERROR || chunk.type === P.NBD_REPLY_TYPE_ERROR_OFFSET) {
      reply.error = chunk.payload.readUInt32BE(0);
      const messageBytes = chunk.payload.readUInt16BE(4);
      reply.errorMessage = chunk.payload.toString('utf8', 6, 6 + messageBytes);
    } else if (chunk.type === P.NBD_REPLY_TYPE_BLOCK_STATUS) {
      const descriptors: Array<[number, number]> = [];
      for (let at = 4; at < chunk.payload.length; at += 8) {
        descriptors.push([chunk.payload.readUInt32BE(at), chunk.payload.readUInt32BE(at + 4)]);
      }
      reply.blockStatus = { contextId: chunk.payload.readUInt32BE(0), descriptors };
    } else if (chunk.type !== P.NBD_REPLY_TYPE_NONE) {
      throw new Error(`unexpected structured chunk type ${chunk.type}`);
    }
  }
  if (pieces.length > 0 && request !== undefined) {
    const data = Buffer.alloc(request.lengthBytes);
    for (const piece of pieces) piece.data.copy(data, piece.offsetBytes - request.offsetBytes);
    reply.data = data;
  }
  return reply;
}
