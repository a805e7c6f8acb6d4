// Loads proto/blockmirror.proto once and converts between Envelope bytes and WireMessage.
// protobufjs decodes uint64 as Long; here every 64-bit field becomes a number, and a value that
// does not fit a safe integer is refused (BM_ERR_WIRE_RANGE) rather than silently rounded.

import assert from 'node:assert';
import fs from 'node:fs';
import path from 'node:path';

import protobuf from 'protobufjs';

import { WireError } from './errors';
import { decodeFastHeader } from './fast-header';
import { WriteFlag, type MessageKind, type WireMessage } from './messages';

const PROTO_FILE = path.join('proto', 'blockmirror.proto');
const PACKAGE = 'blockmirror.wire.v1';
const LONG_TYPES = new Set(['uint64', 'int64', 'sint64', 'fixed64', 'sfixed64']);

/** Walks up from this module to the repository root: the same lookup works from src/wire (ts)
 *  and from dist/src/wire (compiled). */
function findProtoFile(): string {
  let dir = __dirname;
  for (let depth = 0; depth < 6; depth++) {
    const candidate = path.join(dir, PROTO_FILE);
    if (fs.existsSync(candidate)) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error(`${PROTO_FILE} not found above ${__dirname}`);
}

export const protoRoot: protobuf.Root = protobuf.loadSync(findProtoFile());
protoRoot.resolveAll();
export const Envelope: protobuf.Type = protoRoot.lookupType(`${PACKAGE}.Envelope`);
const bodyOneof = Envelope.oneofsArray.find((oneof) => oneof.name === 'body');
assert(bodyOneof !== undefined, 'Envelope has a oneof body');
const bodyKinds: ReadonlySet<string> = new Set(bodyOneof.fieldsArray.map((field) => field.name));

/** Names of Envelope.body members, as the schema defines them. */
export function schemaMessageKinds(): string[] {
  return [...bodyKinds];
}

// longs: Number is only safe because checkDecodedRange refuses, before the conversion, every
// 64-bit value above 2^53 - 1 (protobufjs would round it silently).
const TO_OBJECT_OPTIONS: protobuf.IConversionOptions = {
  longs: Number,
  enums: String,
  defaults: true,
  arrays: true,
  oneofs: true,
};

/** Converts a toObject() result in place: null sub-messages dropped, unknown enum numbers ->
 *  the enum's zero (UNSPECIFIED) name. */
function normalizeDecoded(type: protobuf.Type, object: Record<string, unknown>): void {
  for (const field of type.fieldsArray) {
    const value = object[field.name];
    if (value === null || value === undefined) {
      delete object[field.name];
      continue;
    }
    const resolved = field.resolvedType;
    if (resolved instanceof protobuf.Type) {
      const items = field.repeated ? (value as Record<string, unknown>[]) : [value as Record<string, unknown>];
      for (const item of items) normalizeDecoded(resolved, item);
    } else if (resolved instanceof protobuf.Enum) {
      const zeroName = resolved.valuesById[0];
      assert(zeroName !== undefined, `enum ${resolved.name} has a zero value`);
      if (field.repeated) {
        object[field.name] = (value as unknown[]).map((item) => (typeof item === 'number' ? zeroName : item));
      } else if (typeof value === 'number') {
        object[field.name] = zeroName;
      }
    }
  }
}

interface LongBits {
  low: number;
  high: number;
  unsigned: boolean;
  toString(): string;
}

/** Refuses, on the decoded message, every 64-bit value that is not a safe integer. protobufjs
 *  gives them as Long objects (or numbers); the check reads the high word, no decimal strings. */
function checkDecodedRange(type: protobuf.Type, message: Record<string, unknown>, where: () => string): void {
  for (const field of type.fieldsArray) {
    const value = message[field.name];
    if (value === null || value === undefined) continue;
    const items = field.repeated ? (value as unknown[]) : [value];
    if (field.resolvedType instanceof protobuf.Type) {
      const nested = field.resolvedType;
      for (const item of items) checkDecodedRange(nested, item as Record<string, unknown>, () => `${where()}.${field.name}`);
    } else if (LONG_TYPES.has(field.type)) {
      for (const item of items) {
        if (isSafe64(item, field.type === 'uint64' || field.type === 'fixed64')) continue;
        throw new WireError('BM_ERR_WIRE_RANGE', `${where()}.${field.name} = ${String(item)} is not a safe integer`);
      }
    }
  }
}

function isSafe64(value: unknown, unsigned: boolean): boolean {
  if (typeof value === 'number') return Number.isSafeInteger(value) && (!unsigned || value >= 0);
  const long = value as LongBits;
  if (unsigned) return long.high >>> 0 <= 0x1fffff; // < 2^53
  // Signed: within [-(2^53 - 1), 2^53 - 1]; the high word alone decides all but the edge.
  const number = long.high * 2 ** 32 + (long.low >>> 0);
  return Number.isSafeInteger(number);
}

/** Checks, before encoding, that every 64-bit field is a safe integer of the right sign:
 *  protobufjs would otherwise encode 1.5 or 2^60 + 1 as something else. `where` is built only
 *  for the error: this runs for every frame sent. */
function checkEncodable(type: protobuf.Type, object: Record<string, unknown>, where: () => string): void {
  for (const field of type.fieldsArray) {
    const value = object[field.name];
    if (value === null || value === undefined) continue;
    const items = field.repeated ? (value as unknown[]) : [value];
    if (field.resolvedType instanceof protobuf.Type) {
      const nested = field.resolvedType;
      for (const item of items) checkEncodable(nested, item as Record<string, unknown>, () => `${where()}.${field.name}`);
    } else if (LONG_TYPES.has(field.type)) {
      const unsigned = field.type === 'uint64' || field.type === 'fixed64';
      for (const item of items) {
        if (typeof item !== 'number' || !Number.isSafeInteger(item) || (unsigned && item < 0)) {
          throw new WireError('BM_ERR_WIRE_RANGE', `${where()}.${field.name} = ${String(item)} is not a safe integer`);
        }
      }
    }
  }
}

/** Body type per Envelope member, resolved once. */
const bodyTypes: ReadonlyMap<string, protobuf.Type> = new Map(
  bodyOneof.fieldsArray.map((field) => {
    assert(field.resolvedType instanceof protobuf.Type, `Envelope.${field.name} is a message`);
    return [field.name, field.resolvedType];
  }),
);

export function encodeHeader(message: WireMessage): Uint8Array {
  if (!bodyKinds.has(message.kind)) {
    throw new WireError('BM_ERR_WIRE_UNKNOWN_MESSAGE', `unknown message kind ${String(message.kind)}`);
  }
  const bodyType = bodyTypes.get(message.kind);
  assert(bodyType !== undefined);
  checkEncodable(bodyType, message.body as unknown as Record<string, unknown>, () => `Envelope.${message.kind}`);
  return Envelope.encode(Envelope.fromObject({ [message.kind]: message.body })).finish();
}

export function decodeHeader(header: Uint8Array): WireMessage {
  // The data path's messages in their canonical layout: without protobufjs (fast-header.ts).
  return decodeFastHeader(header) ?? decodeGenericHeader(header);
}

/** decodeHeader through protobufjs alone (every message, every valid encoding). */
export function decodeGenericHeader(header: Uint8Array): WireMessage {
  let decoded: protobuf.Message;
  try {
    decoded = Envelope.decode(header);
  } catch (error) {
    throw new WireError('BM_ERR_WIRE_DECODE', `Envelope decode failed: ${(error as Error).message}`);
  }
  const kind = (decoded as unknown as { body?: unknown }).body;
  const bodyType = typeof kind === 'string' ? bodyTypes.get(kind) : undefined;
  if (typeof kind !== 'string' || bodyType === undefined) {
    throw new WireError('BM_ERR_WIRE_UNKNOWN_MESSAGE', 'Envelope has no body this version knows');
  }
  checkDecodedRange(bodyType, (decoded as unknown as Record<string, Record<string, unknown>>)[kind] as Record<string, unknown>, () => kind);
  const object = Envelope.toObject(decoded, TO_OBJECT_OPTIONS) as Record<string, unknown>;
  const body = object[kind] as Record<string, unknown>;
  normalizeDecoded(bodyType, body);
  return { kind: kind as MessageKind, body } as unknown as WireMessage;
}

/** The payload length a message announces; every other length is a protocol error. */
export function expectedPayloadBytes(message: WireMessage): number {
  switch (message.kind) {
    case 'write':
      return (message.body.flags & WriteFlag.ZEROES) !== 0 ? 0 : message.body.lengthBytes;
    case 'resyncData':
      return message.body.lengthBytes;
    case 'bitmapExchange':
      return Math.ceil(message.body.regionCount / 8);
    default:
      return 0;
  }
}
