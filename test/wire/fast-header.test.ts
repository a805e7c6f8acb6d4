// The hand-written codec of the data path's headers (src/wire/fast-header.ts) against
// protobufjs: the same bytes when encoding, the same objects (or a hand-over to protobufjs) when
// decoding, for canonical, unusual and corrupted headers alike.
import t from 'tap';

import { decodeFastHeader, encodeFastHeader, FAST_HEADER_BYTES_MAX } from '../../src/wire/fast-header';
import { encodeFrame, FrameDecoder, PRELUDE_BYTES } from '../../src/wire/frame';
import { wireMessage, type StatusName, type WireMessage } from '../../src/wire/messages';
import { decodeGenericHeader, decodeHeader, encodeHeader } from '../../src/wire/schema';
import { allSamples } from './samples';

const BIG = Number.MAX_SAFE_INTEGER;
const STATUSES: StatusName[] = ['STATUS_UNSPECIFIED', 'STATUS_OK', 'STATUS_IO_ERROR', 'STATUS_NO_SPACE', 'STATUS_READ_ONLY', 'STATUS_INVALID'];

/** Deterministic pseudo-random numbers (xorshift), so a failure reproduces. */
function random(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32;
  };
}

/** A value spread over every varint length: 0, 1 byte, ..., up to 2^53 - 1. */
function spread(next: () => number, max = BIG): number {
  const choice = next();
  if (choice < 0.1) return 0;
  if (choice < 0.15) return max;
  const bits = Math.floor(next() * 53) + 1;
  return Math.min(max, Math.floor(next() * 2 ** bits));
}

function fastMessages(count: number): WireMessage[] {
  const next = random(42);
  const messages: WireMessage[] = [];
  for (let i = 0; i < count; i++) {
    const sequence = spread(next);
    const status = STATUSES[Math.floor(next() * STATUSES.length)] as StatusName;
    switch (i % 6) {
      case 0:
        messages.push(wireMessage('write', { sequence, offsetBytes: spread(next), lengthBytes: spread(next), flags: spread(next, 0xffffffff) }));
        break;
      case 1:
        messages.push(wireMessage('writeAck', { sequence, status }));
        break;
      case 2:
        messages.push(wireMessage('flush', { sequence }));
        break;
      case 3:
        messages.push(wireMessage('barrier', { sequence }));
        break;
      case 4:
        messages.push(wireMessage('flushAck', { sequence, status }));
        break;
      default:
        messages.push(wireMessage('resyncData', { sequence, offsetBytes: spread(next), lengthBytes: spread(next) }));
    }
  }
  return messages;
}

function fastEncode(message: WireMessage): Buffer | undefined {
  const target = Buffer.alloc(FAST_HEADER_BYTES_MAX);
  const bytes = encodeFastHeader(message, target, 0);
  return bytes < 0 ? undefined : target.subarray(0, bytes);
}

/** What protobufjs makes of `header`: the message, or the error code it refuses it with. */
function generic(header: Uint8Array): WireMessage | { error: string } {
  try {
    return decodeGenericHeader(header);
  } catch (error) {
    return { error: (error as { code?: string }).code ?? String(error) };
  }
}

t.test('the fast encoder writes the bytes protobufjs writes', async (t) => {
  let compared = 0;
  for (const message of fastMessages(6000)) {
    const fast = fastEncode(message);
    if (fast === undefined) {
      t.fail(`fast encoder declined ${JSON.stringify(message)}`);
      continue;
    }
    const expected = Buffer.from(encodeHeader(message));
    if (!fast.equals(expected)) t.fail(`${JSON.stringify(message)}: ${fast.toString('hex')} != ${expected.toString('hex')}`);
    compared++;
  }
  t.equal(compared, 6000, 'every data-path message encoded on the fast path');
});

t.test('the fast decoder gives what protobufjs gives for canonical headers', async (t) => {
  let compared = 0;
  for (const message of fastMessages(6000)) {
    const bytes = Buffer.from(encodeHeader(message));
    const fast = decodeFastHeader(bytes);
    if (fast === undefined) {
      t.fail(`fast decoder declined ${JSON.stringify(message)}`);
      continue;
    }
    const expected = decodeGenericHeader(bytes);
    // Same fields in the same order, same values and types (JSON keeps key order).
    if (JSON.stringify(fast) !== JSON.stringify(expected)) t.fail(`${JSON.stringify(fast)} != ${JSON.stringify(expected)}`);
    else if (JSON.stringify(fast) !== JSON.stringify(message)) t.fail(`round trip: ${JSON.stringify(fast)} != ${JSON.stringify(message)}`);
    else compared++;
  }
  t.equal(compared, 6000, 'every message decoded as protobufjs decodes it, and as it was sent');
});

t.test('other messages and values the generic codec must check are left to it', async (t) => {
  for (const sample of allSamples()) {
    if (['write', 'writeAck', 'flush', 'barrier', 'flushAck', 'resyncData'].includes(sample.message.kind)) continue;
    t.equal(fastEncode(sample.message), undefined, `${sample.message.kind} not encoded on the fast path`);
    t.equal(decodeFastHeader(encodeHeader(sample.message)), undefined, `${sample.message.kind} not decoded on the fast path`);
  }
  const declined: WireMessage[] = [
    wireMessage('flush', { sequence: 2 ** 53 }),
    wireMessage('flush', { sequence: -1 }),
    wireMessage('flush', { sequence: 1.5 }),
    wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 2 ** 32 }),
    wireMessage('writeAck', { sequence: 1, status: 'STATUS_NOT_A_STATUS' as StatusName }),
  ];
  for (const message of declined) t.equal(fastEncode(message), undefined, JSON.stringify(message));
  for (const kind of ['constructor', 'toString', '__proto__', 'nope']) {
    const odd = { kind, body: { sequence: 1 } } as unknown as WireMessage;
    t.equal(fastEncode(odd), undefined, `kind ${kind} left to the generic codec`);
    t.throws(() => encodeFrame(odd), { code: 'BM_ERR_WIRE_UNKNOWN_MESSAGE' }, `kind ${kind} refused`);
  }
  // And the frame encoder still refuses them with the generic codec's error.
  t.throws(() => encodeFrame(wireMessage('flush', { sequence: 2 ** 53 })), { code: 'BM_ERR_WIRE_RANGE' });
  t.throws(() => encodeFrame(wireMessage('flush', { sequence: -1 })), { code: 'BM_ERR_WIRE_RANGE' });
});

t.test('unusual encodings: decoded as protobufjs does, or handed to it', async (t) => {
  const hex = (text: string): Buffer => Buffer.from(text.replace(/ /g, ''), 'hex');
  const cases: Array<[string, Buffer]> = [
    ['fields in reverse order', hex('52 08 2000 1800 1001 0807')],
    ['a field missing', hex('52 04 0807 1001')],
    ['an empty write', hex('52 00')],
    ['an unknown field', hex('52 06 0807 2800 1001')],
    ['a field twice', hex('52 04 0801 0802')],
    ['a length-delimited field where a varint belongs', hex('52 03 0a 01 00')],
    ['two oneof members (the last wins)', hex('62 02 0801 62 02 0802')],
    ['a varint past 2^53', hex('62 0b 08 ffffffffffffffff7f 00')],
    ['an overlong varint', hex('62 03 08 8000')],
    ['an unknown status number', hex('5a 04 0801 1009')],
    ['a negative status', hex('5a 0d 0801 10 ffffffffffffffffff01')],
    ['flags past 32 bits', hex('52 08 0801 20 8080808010')],
    ['a status past 32 bits (protobufjs keeps its low 32)', hex('5a 08 0801 10 8180808010')],
    ['ResyncData (two-byte tag)', hex('8201 06 0801 1002 1803')],
    ['a truncated header', hex('52 04 0801')],
    ['a length past the end', hex('52 7f 0801')],
  ];
  for (const [what, bytes] of cases) {
    const fast = decodeFastHeader(bytes);
    const expected = generic(bytes);
    if (fast === undefined) t.pass(`${what}: handed to protobufjs (${JSON.stringify(expected)})`);
    else t.same(fast, expected, `${what}: same as protobufjs`);
    t.same(generic(bytes), expected);
    // decodeHeader (fast, then generic) always agrees with protobufjs, refusals included.
    let combined: WireMessage | { error: string };
    try {
      combined = decodeHeader(bytes);
    } catch (error) {
      combined = { error: (error as { code?: string }).code ?? String(error) };
    }
    t.same(combined, expected, `${what}: decodeHeader agrees`);
  }
});

t.test('corrupted headers: the fast decoder never disagrees with protobufjs', async (t) => {
  const next = random(7);
  let fastDecoded = 0;
  let disagreements = 0;
  for (const message of fastMessages(3000)) {
    const bytes = Buffer.from(encodeHeader(message));
    for (let round = 0; round < 4; round++) {
      const corrupted = Buffer.from(bytes);
      const flips = 1 + Math.floor(next() * 3);
      for (let i = 0; i < flips; i++) corrupted[Math.floor(next() * corrupted.length)] = Math.floor(next() * 256);
      const cut = next() < 0.2 ? corrupted.subarray(0, Math.floor(next() * corrupted.length)) : corrupted;
      const fast = decodeFastHeader(cut);
      if (fast === undefined) continue;
      fastDecoded++;
      const expected = generic(cut);
      if (JSON.stringify(fast) !== JSON.stringify(expected)) {
        disagreements++;
        if (disagreements <= 5) t.fail(`${cut.toString('hex')}: fast ${JSON.stringify(fast)}, protobufjs ${JSON.stringify(expected)}`);
      }
    }
  }
  t.equal(disagreements, 0, 'no disagreement');
  t.ok(fastDecoded > 1000, `the fast path took many corrupted but valid headers (${fastDecoded})`);
});

t.test('frames carry the same bytes as with protobufjs alone', async (t) => {
  const message = wireMessage('write', { sequence: 12345, offsetBytes: 2 ** 40, lengthBytes: 4096, flags: 1 });
  const payload = Buffer.alloc(4096, 7);
  const [head, body] = encodeFrame(message, payload);
  const header = Buffer.from(encodeHeader(message));
  t.equal(head!.readUInt32BE(4), header.length, 'prelude header length');
  t.equal(head!.readUInt32BE(8), 4096, 'prelude payload length');
  t.ok(head!.subarray(PRELUDE_BYTES).equals(header), 'header bytes');
  t.equal(head!.length, PRELUDE_BYTES + header.length);
  t.equal(body, payload, 'payload not copied');
  const frames = new FrameDecoder().push(Buffer.concat([head!, body!]));
  t.same(frames[0]!.message, message);
});
