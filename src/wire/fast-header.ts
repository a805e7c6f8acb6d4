// Hand-written protobuf codec for the data path's headers (Write, WriteAck, Flush, Barrier,
// FlushAck, ResyncData): one of these goes with every replicated write, and protobufjs'
// fromObject/encode/decode/toObject cost more CPU per frame than the rest of the framing. The
// bytes are the ones protobufjs writes (fields in number order, zero values left out, as proto3
// does): the wire is unchanged, and test/wire/fast-header.test.ts compares both
// codecs byte for byte and object for object.
//
// Anything off the canonical path (a field this codec does not know, another wire type, a
// repeated or second oneof member, a 64-bit value above 2^53 - 1, a bad number to encode) is
// left to the generic codec in schema.ts, which decodes it per protobuf's rules or refuses it
// with the exact error; this file never throws on input.

import type { MessageKind, StatusName, WireMessage } from './messages';

/** Envelope field numbers of the messages handled here. */
const FIELD_OF_KIND: Partial<Record<MessageKind, number>> = {
  write: 10,
  writeAck: 11,
  flush: 12,
  barrier: 13,
  flushAck: 14,
  resyncData: 16,
};

/** Field names in field-number order (field n is names[n - 1]). */
const FIELDS_OF_KIND: Partial<Record<MessageKind, readonly string[]>> = {
  write: ['sequence', 'offsetBytes', 'lengthBytes', 'flags'],
  writeAck: ['sequence', 'status'],
  flush: ['sequence'],
  barrier: ['sequence'],
  flushAck: ['sequence', 'status'],
  resyncData: ['sequence', 'offsetBytes', 'lengthBytes'],
};

/** Envelope field number -> kind. */
const KIND_OF_FIELD = new Map<number, MessageKind>(
  Object.entries(FIELD_OF_KIND).map(([kind, field]) => [field as number, kind as MessageKind]),
);

const STATUS_NAMES: readonly StatusName[] = [
  'STATUS_UNSPECIFIED',
  'STATUS_OK',
  'STATUS_IO_ERROR',
  'STATUS_NO_SPACE',
  'STATUS_READ_ONLY',
  'STATUS_INVALID',
];
const STATUS_NUMBERS = new Map<string, number>(STATUS_NAMES.map((name, index) => [name, index]));

/** Largest header this codec writes: tag (2) + length (1) + 4 fields of tag (1) + varint (10). */
export const FAST_HEADER_BYTES_MAX = 2 + 1 + 4 * 11;

function varintBytes(value: number): number {
  let bytes = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    bytes++;
  }
  return bytes;
}

function writeVarint(target: Buffer, offset: number, value: number): number {
  while (value >= 128) {
    target[offset++] = (value % 128) | 128;
    value = Math.floor(value / 128);
  }
  target[offset++] = value;
  return offset;
}

/**
 * Writes the Envelope of `message` at `offset` of `target` (which must have
 * FAST_HEADER_BYTES_MAX bytes from there) and returns its length, or -1 when this codec does
 * not handle the message (another kind, or a value the generic codec must check and refuse).
 */
export function encodeFastHeader(message: WireMessage, target: Buffer, offset: number): number {
  const kind = message.kind;
  // Own properties only: a kind such as 'constructor' must reach the generic codec's refusal.
  if (!Object.hasOwn(FIELD_OF_KIND, kind)) return -1;
  const field = FIELD_OF_KIND[kind];
  const names = FIELDS_OF_KIND[kind];
  if (field === undefined || names === undefined) return -1;
  const body = message.body as unknown as Record<string, unknown>;
  // Values as protobufjs would write them, and the inner length.
  const values: number[] = [];
  let innerBytes = 0;
  for (let index = 0; index < names.length; index++) {
    const raw = body[names[index] as string];
    if (raw === undefined || raw === null) {
      values.push(0); // absent: the default, not written
      continue;
    }
    let value: number;
    if (names[index] === 'status') {
      const number = typeof raw === 'string' ? STATUS_NUMBERS.get(raw) : undefined;
      if (number === undefined) return -1;
      value = number;
    } else if (names[index] === 'flags') {
      if (typeof raw !== 'number' || !Number.isInteger(raw) || raw < 0 || raw > 0xffffffff) return -1;
      value = raw;
    } else {
      if (typeof raw !== 'number' || !Number.isSafeInteger(raw) || raw < 0) return -1;
      value = raw;
    }
    values.push(value);
    if (value !== 0) innerBytes += 1 + varintBytes(value);
  }
  if (innerBytes >= 128) return -1; // never for these messages; keeps the length one byte
  let at = offset;
  // Envelope tag: field << 3 | 2 (length-delimited), as a varint.
  at = writeVarint(target, at, field * 8 + 2);
  target[at++] = innerBytes;
  for (let index = 0; index < values.length; index++) {
    const value = values[index] as number;
    if (value === 0) continue; // proto3: a zero is not written
    target[at++] = (index + 1) * 8; // field << 3 | 0 (varint)
    at = writeVarint(target, at, value);
  }
  return at - offset;
}

/**
 * Decodes an Envelope holding one of the messages above in the layout protobufjs writes (fields
 * in any order, each at most once, varints only), with every field defaulted as the generic
 * decoder does. Returns undefined for anything else: the caller then uses the generic decoder.
 */
export function decodeFastHeader(header: Uint8Array): WireMessage | undefined {
  const end = header.length;
  if (end < 2) return undefined;
  let at = 0;
  // Envelope tag: one byte for fields 10-15, two for field 16.
  let tag = header[at++] as number;
  if (tag >= 128) {
    if (at >= end) return undefined;
    const high = header[at++] as number;
    if (high >= 128) return undefined;
    tag = (tag & 127) + high * 128;
  }
  if ((tag & 7) !== 2) return undefined;
  const kind = KIND_OF_FIELD.get(tag >>> 3);
  if (kind === undefined) return undefined;
  const names = FIELDS_OF_KIND[kind] as readonly string[];
  if (at >= end) return undefined;
  const innerBytes = header[at++] as number;
  if (innerBytes >= 128 || at + innerBytes !== end) return undefined; // exactly one member, nothing after
  const values = [0, 0, 0, 0];
  let seen = 0;
  while (at < end) {
    const fieldTag = header[at++] as number;
    const number = fieldTag >>> 3;
    if ((fieldTag & 7) !== 0 || number < 1 || number > names.length || fieldTag >= 128) return undefined;
    const bit = 1 << number;
    if ((seen & bit) !== 0) return undefined; // repeated field: protobuf's last-wins, generic
    seen |= bit;
    // Varint of at most 53 bits: 8 bytes carry 56 bits, so the eighth byte must be small.
    let value = 0;
    let scale = 1;
    for (let count = 0; ; count++) {
      if (at >= end || count === 8) return undefined;
      const byte = header[at++] as number;
      value += (byte & 127) * scale;
      if (byte < 128) break;
      scale *= 128;
    }
    if (!Number.isSafeInteger(value)) return undefined;
    values[number - 1] = value;
  }
  let body: Record<string, unknown>;
  switch (kind) {
    case 'write':
      if ((values[3] as number) > 0xffffffff) return undefined;
      body = { sequence: values[0], offsetBytes: values[1], lengthBytes: values[2], flags: values[3] };
      break;
    case 'writeAck':
    case 'flushAck':
      // protobufjs reads an enum as int32 (the low 32 bits): leave such values to it.
      if ((values[1] as number) > 0x7fffffff) return undefined;
      body = { sequence: values[0], status: STATUS_NAMES[values[1] as number] ?? 'STATUS_UNSPECIFIED' };
      break;
    case 'resyncData':
      body = { sequence: values[0], offsetBytes: values[1], lengthBytes: values[2] };
      break;
    default:
      body = { sequence: values[0] };
  }
  return { kind, body } as unknown as WireMessage;
}
