// Fixed newstyle negotiation (doc/proto.md "Handshake"): greeting, client flags, then option
// haggling until NBD_OPT_GO / NBD_OPT_EXPORT_NAME enters transmission or the client aborts.
// Every option length is bounded; unknown options get NBD_REP_ERR_UNSUP and haggling goes on.

import assert from 'node:assert';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { ByteReader } from './byte-reader';
import { NbdError } from './errors';
import * as P from './protocol';
import type { NbdExport } from './types';

/** Option data above this is answered with NBD_REP_ERR_TOO_BIG and skipped. */
export const OPTION_DATA_BYTES_MAX = 64 * 1024;
/** Option data above this is not even skipped: the connection is dropped. */
export const OPTION_DATA_SKIP_BYTES_MAX = 1024 * 1024;
/** The options handleOption serves; every other one is answered NBD_REP_ERR_UNSUP. */
const SERVED_OPTIONS: ReadonlySet<number> = new Set([
  P.NBD_OPT_EXPORT_NAME,
  P.NBD_OPT_ABORT,
  P.NBD_OPT_LIST,
  P.NBD_OPT_INFO,
  P.NBD_OPT_GO,
  P.NBD_OPT_STRUCTURED_REPLY,
  P.NBD_OPT_LIST_META_CONTEXT,
  P.NBD_OPT_SET_META_CONTEXT,
]);
/** Options per connection; a well-behaved client needs a handful per export. */
export const OPTIONS_PER_HANDSHAKE_MAX = 4096;
/** Queries in one LIST/SET_META_CONTEXT. */
const META_CONTEXT_QUERIES_MAX = 128;
/** Context id we hand out for base:allocation (0 is reserved for LIST replies). */
export const BASE_ALLOCATION_CONTEXT_ID = 1;

export interface HandshakeContext {
  lookupExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  isShuttingDown(): boolean;
  maxPayloadBytes: number;
  logger: Logger;
}

export interface NegotiatedSession {
  nbdExport: NbdExport;
  structuredReplies: boolean;
  /** 0 when the client selected no metadata context. */
  allocationContextId: number;
  transmissionFlags: number;
  sizeBytes: number;
  /** Bytes the client sent after the final option (already transmission requests). */
  leftover: Buffer;
}

export type HandshakeResult = { kind: 'transmission'; session: NegotiatedSession } | { kind: 'aborted' };

function protocolError(reason: string): NbdError {
  return new NbdError('BM_ERR_NBD_PROTOCOL', reason);
}

export function transmissionFlagsFor(nbdExport: NbdExport, structuredReplies: boolean): number {
  let flags =
    P.NBD_FLAG_HAS_FLAGS |
    P.NBD_FLAG_SEND_FLUSH |
    P.NBD_FLAG_SEND_FUA |
    P.NBD_FLAG_SEND_TRIM |
    P.NBD_FLAG_SEND_WRITE_ZEROES |
    P.NBD_FLAG_SEND_FAST_ZERO |
    P.NBD_FLAG_SEND_CACHE |
    P.NBD_FLAG_CAN_MULTI_CONN;
  if (nbdExport.backend.info().readOnly) flags |= P.NBD_FLAG_READ_ONLY;
  // Reads are always answered with a single OFFSET_DATA chunk, so "don't fragment" is free; the
  // spec requires the flag to be clear without structured replies.
  if (structuredReplies) flags |= P.NBD_FLAG_SEND_DF;
  return flags;
}

/** Preferred block size: a power of two, at least 4 KiB and at least the physical sector. */
export function preferredBlockBytes(nbdExport: NbdExport, maxPayloadBytes: number): number {
  let preferredBytes = 4096;
  const physicalBytes = nbdExport.backend.info().physicalSectorBytes;
  while (preferredBytes < physicalBytes) preferredBytes *= 2;
  return Math.min(preferredBytes, maxPayloadBytes);
}

class Negotiation {
  private readonly socket: Socket;
  private readonly reader: ByteReader;
  private readonly ctx: HandshakeContext;
  private noZeroes = false;
  private structuredReplies = false;
  private metaContextExportName: string | null = null;
  private allocationSelected = false;

  constructor(socket: Socket, reader: ByteReader, ctx: HandshakeContext) {
    this.socket = socket;
    this.reader = reader;
    this.ctx = ctx;
  }

  async run(): Promise<HandshakeResult> {
    const greeting = Buffer.allocUnsafe(18);
    greeting.writeUInt32BE(P.NBDMAGIC_HI, 0);
    greeting.writeUInt32BE(P.NBDMAGIC_LO, 4);
    greeting.writeUInt32BE(P.IHAVEOPT_HI, 8);
    greeting.writeUInt32BE(P.IHAVEOPT_LO, 12);
    greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    this.socket.write(greeting);

    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if ((clientFlags & ~P.CLIENT_FLAGS_KNOWN) !== 0) {
      throw protocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    if ((clientFlags & P.NBD_FLAG_C_FIXED_NEWSTYLE) === 0) {
      throw protocolError('client did not set NBD_FLAG_C_FIXED_NEWSTYLE (only fixed newstyle is served)');
    }
    this.noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

    for (let optionCount = 0; optionCount < OPTIONS_PER_HANDSHAKE_MAX; optionCount++) {
      const header = await this.reader.read(P.OPTION_HEADER_BYTES);
      if (header.readUInt32BE(0) !== P.IHAVEOPT_HI || header.readUInt32BE(4) !== P.IHAVEOPT_LO) {
        throw protocolError('option without IHAVEOPT magic');
      }
      const option = header.readUInt32BE(8);
      const dataBytes = header.readUInt32BE(12);
      if (dataBytes > OPTION_DATA_BYTES_MAX) {
        if (option === P.NBD_OPT_EXPORT_NAME) throw protocolError(`NBD_OPT_EXPORT_NAME of ${dataBytes} bytes`);
        if (dataBytes > OPTION_DATA_SKIP_BYTES_MAX) throw protocolError(`option ${option} with ${dataBytes} bytes of data`);
        await this.reader.skip(dataBytes);
        // An option we do not know is unsupported whatever its size (proto.md: "MUST reply with
        // NBD_REP_ERR_UNSUP"); only a known one is too big.
        if (SERVED_OPTIONS.has(option)) {
          this.replyError(option, P.NBD_REP_ERR_TOO_BIG, `option data of ${dataBytes} bytes exceeds ${OPTION_DATA_BYTES_MAX}`);
        } else {
          this.replyError(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
        }
        continue;
      }
      const data = dataBytes === 0 ? Buffer.alloc(0) : await this.reader.read(dataBytes);
      const result = this.handleOption(option, data);
      if (result !== null) return result;
    }
    throw protocolError(`more than ${OPTIONS_PER_HANDSHAKE_MAX} options`);
  }

  /** Returns a result when haggling ends, null to read the next option. */
  private handleOption(option: number, data: Buffer): HandshakeResult | null {
    if (this.ctx.isShuttingDown()) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new NbdError('BM_ERR_NBD_SERVER_CLOSED', 'server is shutting down');
      if (option === P.NBD_OPT_ABORT) return this.abort(option);
      this.replyError(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      return null;
    }
    switch (option) {
      case P.NBD_OPT_EXPORT_NAME:
        return this.exportName(data);
      case P.NBD_OPT_ABORT:
        return this.abort(option);
      case P.NBD_OPT_LIST:
        this.list(option, data);
        return null;
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return this.infoOrGo(option, data);
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) {
          this.replyError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        } else {
          this.structuredReplies = true;
          this.reply(option, P.NBD_REP_ACK);
        }
        return null;
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        this.metaContext(option, data);
        return null;
      default:
        this.replyError(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
        return null;
    }
  }

  private abort(option: number): HandshakeResult {
    // The client may already have closed; the reply is best effort (proto.md "NBD_OPT_ABORT").
    if (!this.socket.destroyed) this.reply(option, P.NBD_REP_ACK);
    return { kind: 'aborted' };
  }

  private exportName(data: Buffer): HandshakeResult {
    const name = data.toString('utf8');
    const nbdExport = this.ctx.lookupExport(name);
    // NBD_OPT_EXPORT_NAME cannot carry an error: the spec says to terminate the session.
    if (nbdExport === undefined) throw protocolError(`NBD_OPT_EXPORT_NAME for unknown export '${name}'`);
    const session = this.session(nbdExport, name);
    const reply = Buffer.alloc(10 + (this.noZeroes ? 0 : P.EXPORT_NAME_ZEROES_BYTES));
    writeUInt64(reply, session.sizeBytes, 0);
    reply.writeUInt16BE(session.transmissionFlags, 8);
    this.socket.write(reply);
    return { kind: 'transmission', session };
  }

  private list(option: number, data: Buffer): void {
    if (data.length !== 0) {
      this.replyError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
      return;
    }
    for (const nbdExport of this.ctx.listExports()) {
      const name = Buffer.from(nbdExport.name, 'utf8');
      const description = Buffer.from(nbdExport.description, 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length + description.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      description.copy(payload, 4 + name.length);
      this.reply(option, P.NBD_REP_SERVER, payload);
    }
    this.reply(option, P.NBD_REP_ACK);
  }

  private infoOrGo(option: number, data: Buffer): HandshakeResult | null {
    const optionName = option === P.NBD_OPT_GO ? 'NBD_OPT_GO' : 'NBD_OPT_INFO';
    if (data.length < 6) {
      this.replyError(option, P.NBD_REP_ERR_INVALID, `${optionName} data too short`);
      return null;
    }
    const nameBytes = data.readUInt32BE(0);
    if (nameBytes > P.STRING_BYTES_MAX || 4 + nameBytes + 2 > data.length) {
      this.replyError(option, P.NBD_REP_ERR_INVALID, `${optionName} export name length ${nameBytes} is invalid`);
      return null;
    }
    const name = data.toString('utf8', 4, 4 + nameBytes);
    const infoCount = data.readUInt16BE(4 + nameBytes);
    if (data.length !== 4 + nameBytes + 2 + 2 * infoCount) {
      this.replyError(option, P.NBD_REP_ERR_INVALID, `${optionName} information request count does not match its length`);
      return null;
    }
    let wantName = false;
    let wantDescription = false;
    for (let i = 0; i < infoCount; i++) {
      const infoType = data.readUInt16BE(4 + nameBytes + 2 + 2 * i);
      if (infoType === P.NBD_INFO_NAME) wantName = true;
      else if (infoType === P.NBD_INFO_DESCRIPTION) wantDescription = true;
      // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; unknown types are ignored.
    }
    const nbdExport = this.ctx.lookupExport(name);
    if (nbdExport === undefined) {
      this.replyError(option, P.NBD_REP_ERR_UNKNOWN, `unknown export '${name}'`);
      return null;
    }
    const session = this.session(nbdExport, name);

    const exportInfo = Buffer.allocUnsafe(12);
    exportInfo.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    writeUInt64(exportInfo, session.sizeBytes, 2);
    exportInfo.writeUInt16BE(session.transmissionFlags, 10);
    this.reply(option, P.NBD_REP_INFO, exportInfo);

    if (wantName) this.reply(option, P.NBD_REP_INFO, infoString(P.NBD_INFO_NAME, nbdExport.name));
    if (wantDescription && nbdExport.description.length > 0) {
      this.reply(option, P.NBD_REP_INFO, infoString(P.NBD_INFO_DESCRIPTION, nbdExport.description));
    }

    const blockSize = Buffer.allocUnsafe(14);
    blockSize.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(1, 2); // minimum: any byte range works (the backend does read-modify-write)
    blockSize.writeUInt32BE(preferredBlockBytes(nbdExport, this.ctx.maxPayloadBytes), 6);
    blockSize.writeUInt32BE(this.ctx.maxPayloadBytes, 10);
    this.reply(option, P.NBD_REP_INFO, blockSize);

    this.reply(option, P.NBD_REP_ACK);
    if (option === P.NBD_OPT_INFO) return null;
    return { kind: 'transmission', session };
  }

  private metaContext(option: number, data: Buffer): void {
    const list = option === P.NBD_OPT_LIST_META_CONTEXT;
    const optionName = list ? 'NBD_OPT_LIST_META_CONTEXT' : 'NBD_OPT_SET_META_CONTEXT';
    // SET replaces the previous selection, even when it fails (proto.md).
    if (!list) this.allocationSelected = false;
    if (!this.structuredReplies) {
      this.replyError(option, P.NBD_REP_ERR_INVALID, `${optionName} requires structured replies`);
      return;
    }
    const parsed = parseMetaContextRequest(data);
    if (typeof parsed === 'string') {
      this.replyError(option, P.NBD_REP_ERR_INVALID, `${optionName}: ${parsed}`);
      return;
    }
    if (this.ctx.lookupExport(parsed.exportName) === undefined) {
      this.replyError(option, P.NBD_REP_ERR_UNKNOWN, `unknown export '${parsed.exportName}'`);
      return;
    }
    let matches: boolean;
    if (list) {
      // No query lists everything; the namespace alone lists the whole namespace.
      matches = parsed.queries.length === 0 || parsed.queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
    } else {
      matches = parsed.queries.some((q) => q === P.BASE_ALLOCATION);
      this.allocationSelected = matches;
      this.metaContextExportName = parsed.exportName;
    }
    if (matches) {
      const name = Buffer.from(P.BASE_ALLOCATION, 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length);
      payload.writeUInt32BE(list ? 0 : BASE_ALLOCATION_CONTEXT_ID, 0);
      name.copy(payload, 4);
      this.reply(option, P.NBD_REP_META_CONTEXT, payload);
    }
    this.reply(option, P.NBD_REP_ACK);
  }

  private session(nbdExport: NbdExport, requestedName: string): NegotiatedSession {
    // Contexts chosen for another export do not carry over (proto.md, NBD_OPT_SET_META_CONTEXT).
    const allocation = this.allocationSelected && this.structuredReplies && this.metaContextExportName === requestedName;
    return {
      nbdExport,
      structuredReplies: this.structuredReplies,
      allocationContextId: allocation ? BASE_ALLOCATION_CONTEXT_ID : 0,
      transmissionFlags: transmissionFlagsFor(nbdExport, this.structuredReplies),
      sizeBytes: nbdExport.backend.info().sizeBytes,
      leftover: Buffer.alloc(0),
    };
  }

  private reply(option: number, replyType: number, payload?: Buffer): void {
    const payloadBytes = payload === undefined ? 0 : payload.length;
    const header = Buffer.allocUnsafe(P.OPTION_REPLY_HEADER_BYTES);
    header.writeUInt32BE(P.OPTION_REPLY_MAGIC_HI, 0);
    header.writeUInt32BE(P.OPTION_REPLY_MAGIC_LO, 4);
    header.writeUInt32BE(option >>> 0, 8);
    header.writeUInt32BE(replyType >>> 0, 12);
    header.writeUInt32BE(payloadBytes, 16);
    this.socket.write(payload === undefined ? header : Buffer.concat([header, payload]));
  }

  private replyError(option: number, replyType: number, message: string): void {
    assert((replyType & P.NBD_REP_FLAG_ERROR) !== 0);
    this.ctx.logger.debug({ option, replyType: replyType >>> 0, reason: message }, 'nbd option refused');
    this.reply(option, replyType, Buffer.from(message, 'utf8'));
  }
}

function infoString(infoType: number, value: string): Buffer {
  const text = Buffer.from(value, 'utf8');
  const payload = Buffer.allocUnsafe(2 + text.length);
  payload.writeUInt16BE(infoType, 0);
  text.copy(payload, 2);
  return payload;
}

/** Parses `u32 name length, name, u32 query count, (u32 length, query)*`; a string is an error. */
function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return 'data too short';
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > P.STRING_BYTES_MAX || 4 + nameBytes + 4 > data.length) return 'export name length is invalid';
  const exportName = data.toString('utf8', 4, 4 + nameBytes);
  let position = 4 + nameBytes;
  const queryCount = data.readUInt32BE(position);
  position += 4;
  if (queryCount > META_CONTEXT_QUERIES_MAX) return `more than ${META_CONTEXT_QUERIES_MAX} queries`;
  const queries: string[] = [];
  for (let i = 0; i < queryCount; i++) {
    if (position + 4 > data.length) return 'query count does not match the data';
    const queryBytes = data.readUInt32BE(position);
    position += 4;
    if (queryBytes > P.STRING_BYTES_MAX || position + queryBytes > data.length) return 'query length is invalid';
    queries.push(data.toString('utf8', position, position + queryBytes));
    position += queryBytes;
  }
  if (position !== data.length) return 'trailing bytes after the queries';
  return { exportName, queries };
}

export function writeUInt64(target: Buffer, value: number, offset: number): void {
  assert(Number.isSafeInteger(value) && value >= 0);
  target.writeUInt32BE(Math.floor(value / P.TWO_POW_32), offset);
  target.writeUInt32BE(value >>> 0, offset + 4);
}

/** Runs the whole handshake on `socket`. Throws NbdError on a protocol violation; the caller
 *  closes the socket and bounds the time this may take. */
export async function negotiate(socket: Socket, reader: ByteReader, ctx: HandshakeContext): Promise<HandshakeResult> {
  const result = await new Negotiation(socket, reader, ctx).run();
  if (result.kind === 'transmission') result.session.leftover = reader.detach();
  return result;
}
