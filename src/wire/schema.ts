// Loads proto/blockmirror.proto once and converts between Envelope bytes and WireMessage.
// protobufjs decodes uint64 as Long; here every 64-bit field becomes a number, and a value that
// does not fit a safe integer is refused (BM_ERR_WIRE_RANGE) rather than silently rounded.

import assert from 'node:assert';
import fs from 'node:fs';
import path from 'node:path';

import protobuf from 'protobufjs';

import { WireError } from './errors';
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

const TO_OBJECT_OPTIONS: protobuf.IConversionOptions = {
  longs: String,
  enums: String,
  defaults: true,
  arrays: true,
  oneofs: true,
};

/** Converts a toObject() result in place: 64-bit strings -> numbers, null sub-messages dropped,
 *  unknown enum numbers -> the enum's zero (UNSPECIFIED) name. */
function normalizeDecoded(type: protobuf.Type, object: Record<string, unknown>, where: string): void {
  for (const field of type.fieldsArray) {
    const value = object[field.name];
    if (value === null || value === undefined) {
      delete object[field.name];
      continue;
    }
    const fieldWhere = `${where}.${field.name}`;
    const resolved = field.resolvedType;
    if (resolved instanceof protobuf.Type) {
      const items = field.repeated ? (value as Record<string, unknown>[]) : [value as Record<string, unknown>];
      for (const item of items) normalizeDecoded(resolved, item, fieldWhere);
    } else if (resolved instanceof protobuf.Enum) {
      const zeroName = resolved.valuesById[0];
      assert(zeroName !== undefined, `enum ${resolved.name} has a zero value`);
      if (field.repeated) {
        object[field.name] = (value as unknown[]).map((item) => (typeof item === 'number' ? zeroName : item));
      } else if (typeof value === 'number') {
        object[field.name] = zeroName;
      }
    } else if (LONG_TYPES.has(field.type)) {
      object[field.name] = field.repeated
        ? (value as string[]).map((item, index) => safeNumber(item, `${fieldWhere}[${index}]`))
        : safeNumber(value as string, fieldWhere);
    }
  }
}

function safeNumber(decimal: string, where: string): number {
  const value = Number(decimal);
  if (!Number.isSafeInteger(value)) {
    throw new WireError('BM_ERR_WIRE_RANGE', `${where} = ${decimal} is not a safe integer`);
  }
  return value;
}

/** Checks, before encoding, that every 64-bit field is a safe integer of the right sign:
 *  protobufjs would otherwise encode 1.5 or 2^60 + 1 as something else. */
function checkEncodable(type: protobuf.Type, object: Record<string, unknown>, where: string): void {
  for (const field of type.fieldsArray) {
    const value = object[field.name];
    if (value === null || value === undefined) continue;
    const fieldWhere = `${where}.${field.name}`;
    const items = field.repeated ? (value as unknown[]) : [value];
    if (field.resolvedType instanceof protobuf.Type) {
      for (const item of items) checkEncodable(field.resolvedType, item as Record<string, unknown>, fieldWhere);
    } else if (LONG_TYPES.has(field.type)) {
      for (const item of items) {
        const unsigned = field.type === 'uint64' || field.type === 'fixed64';
        if (typeof item !== 'number' || !Number.isSafeInteger(item) || (unsigned && item < 0)) {
          throw new WireError('BM_ERR_WIRE_RANGE', `${fieldWhere} = ${String(item)} is not a safe integer`);
        }
      }
    }
  }
}

export function encodeHeader(message: WireMessage): Uint8Array {
  if (!bodyKinds.has(message.kind)) {
    throw new WireError('BM_ERR_WIRE_UNKNOWN_MESSAGE', `unknown message kind ${String(message.kind)}`);
  }
  const envelopeObject = { [message.kind]: message.body } as Record<string, unknown>;
  checkEncodable(Envelope, envelopeObject, 'Envelope');
  return Envelope.encode(Envelope.fromObject(envelopeObject)).finish();
}

export function decodeHeader(header: Uint8Array): WireMessage {
  let decoded: protobuf.Message;
  try {
    decoded = Envelope.decode(header);
  } catch (error) {
    throw new WireError('BM_ERR_WIRE_DECODE', `Envelope decode failed: ${(error as Error).message}`);
  }
  const object = Envelope.toObject(decoded, TO_OBJECT_OPTIONS) as Record<string, unknown>;
  const kind = object.body;
  if (typeof kind !== 'string' || !bodyKinds.has(kind)) {
    throw new WireError('BM_ERR_WIRE_UNKNOWN_MESSAGE', 'Envelope has no body this version knows');
  }
  const bodyField = Envelope.fields[kind];
  assert(bodyField?.resolvedType instanceof protobuf.Type);
  const body = object[kind] as Record<string, unknown>;
  normalizeDecoded(bodyField.resolvedType, body, kind);
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
