import { isDeepStrictEqual } from 'node:util';

import t, { type Test } from 'tap';

import { WireError } from '../../src/wire/errors';
import { encodeFrame, FRAME_MAGIC, FrameDecoder, HEADER_BYTES_MAX, type Frame } from '../../src/wire/frame';
import { wireMessage, type WireMessage } from '../../src/wire/messages';
import { Envelope } from '../../src/wire/schema';
import { allSamples } from './samples';

function prelude(magic: number, headerBytes: number, payloadBytes: number): Buffer {
  const buffer = Buffer.alloc(12);
  buffer.writeUInt32BE(magic, 0);
  buffer.writeUInt32BE(headerBytes, 4);
  buffer.writeUInt32BE(payloadBytes, 8);
  return buffer;
}

/** A frame built around a raw header (bypassing the encoder's checks). */
function rawFrame(header: Uint8Array, payload: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([prelude(FRAME_MAGIC, header.length, payload.length), header, payload]);
}

function envelopeBytes(object: Record<string, unknown>): Uint8Array {
  return Envelope.encode(Envelope.fromObject(object)).finish();
}

const samples = allSamples();
const stream = Buffer.concat(samples.flatMap((sample) => encodeFrame(sample.message, sample.payload)));

function check(t: Test, frames: Frame[], label: string): void {
  t.equal(frames.length, samples.length, `${label}: frame count`);
  const same = frames.every((frame, index) => {
    const sample = samples[index]!;
    return (
      isDeepStrictEqual(frame.message, sample.message) &&
      (sample.payload === undefined ? frame.payload === undefined : sample.payload.equals(frame.payload!))
    );
  });
  t.ok(same, `${label}: frames equal`);
}

t.test('a multi-frame stream decodes the same at every split point', async (t) => {
  for (let split = 0; split <= stream.length; split++) {
    const decoder = new FrameDecoder();
    const frames = [...decoder.push(stream.subarray(0, split)), ...decoder.push(stream.subarray(split))];
    if (frames.length !== samples.length || !frames.every((f, i) => isDeepStrictEqual(f.message, samples[i]!.message))) {
      t.fail(`split at ${split}: frames differ`);
      return;
    }
    if (!decoder.atFrameBoundary) t.fail(`split at ${split}: left mid-frame`);
  }
  t.pass(`all ${stream.length + 1} split points`);
  // Two splits at once, in coarse steps so the test stays fast.
  for (let first = 0; first < stream.length; first += 97) {
    for (let second = first; second <= stream.length; second += 89) {
      const decoder = new FrameDecoder();
      const frames = [
        ...decoder.push(stream.subarray(0, first)),
        ...decoder.push(stream.subarray(first, second)),
        ...decoder.push(stream.subarray(second)),
      ];
      if (frames.length !== samples.length) t.fail(`splits at ${first},${second}`);
    }
  }
  const decoder = new FrameDecoder();
  const frames: Frame[] = [];
  for (let i = 0; i < stream.length; i++) frames.push(...decoder.push(stream.subarray(i, i + 1)));
  check(t, frames, '1-byte chunks');
});

t.test('payload is a zero-copy view when it lies in one chunk, assembled otherwise', async (t) => {
  const payload = Buffer.alloc(8192, 0xab);
  const message: WireMessage = { kind: 'write', body: { sequence: 1, offsetBytes: 0, lengthBytes: 8192, flags: 0 } };
  const chunk = Buffer.concat(encodeFrame(message, payload));
  const [whole] = new FrameDecoder().push(chunk);
  t.equal(whole!.payload!.buffer, chunk.buffer, 'view on the chunk');
  const allocated: number[] = [];
  const decoder = new FrameDecoder({
    allocatePayload: (bytes) => {
      allocated.push(bytes);
      return Buffer.alloc(bytes);
    },
  });
  t.same(decoder.push(chunk.subarray(0, 100)), []);
  t.ok(decoder.bufferedBytes <= chunk.length, 'never more than one frame buffered');
  const [split] = decoder.push(chunk.subarray(100));
  t.same(allocated, [8192], 'assembled in the allocator buffer');
  t.ok(split!.payload!.equals(payload));
  t.equal(decoder.bufferedBytes, 0);
});

t.test('bad magic is refused, and the decoder refuses everything after an error', async (t) => {
  const decoder = new FrameDecoder();
  t.throws(() => decoder.push(prelude(0x424d5732, 0, 0)), { code: 'BM_ERR_WIRE_BAD_MAGIC' });
  t.equal(decoder.failure?.code, 'BM_ERR_WIRE_BAD_MAGIC');
  t.throws(() => decoder.push(stream), { code: 'BM_ERR_WIRE_BAD_MAGIC' }, 'valid input after the error is refused');
});

t.test('oversize header and payload are refused from the prelude alone', async (t) => {
  const header = new FrameDecoder();
  t.throws(() => header.push(prelude(FRAME_MAGIC, HEADER_BYTES_MAX + 1, 0)), { code: 'BM_ERR_WIRE_HEADER_TOO_LARGE' });
  t.equal(header.bufferedBytes, 0, 'nothing buffered');
  const payload = new FrameDecoder({ payloadBytesMax: 1 << 20 });
  t.throws(() => payload.push(prelude(FRAME_MAGIC, 10, (1 << 20) + 1)), { code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE' });
  const hard = new FrameDecoder();
  t.throws(() => hard.push(prelude(FRAME_MAGIC, 10, 0xffffffff)), { code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE' });
  // Prelude arriving byte by byte: refused on its 12th byte.
  const slow = new FrameDecoder();
  const bad = prelude(FRAME_MAGIC, HEADER_BYTES_MAX + 1, 0);
  for (let i = 0; i < 11; i++) slow.push(bad.subarray(i, i + 1));
  t.throws(() => slow.push(bad.subarray(11)), { code: 'BM_ERR_WIRE_HEADER_TOO_LARGE' });
});

t.test('garbage protobuf, empty oneof, mismatched payloads and unsafe integers', async (t) => {
  const cases: { label: string; bytes: Buffer; code: string }[] = [
    { label: 'garbage', bytes: rawFrame(Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff])), code: 'BM_ERR_WIRE_DECODE' },
    { label: 'truncated field', bytes: rawFrame(Buffer.from([0x52, 0x10, 0x08])), code: 'BM_ERR_WIRE_DECODE' },
    { label: 'empty header', bytes: rawFrame(Buffer.alloc(0)), code: 'BM_ERR_WIRE_UNKNOWN_MESSAGE' },
    {
      label: 'unknown body field only',
      bytes: rawFrame(Buffer.from([0xa0, 0x06, 0x01])), // field 100, varint 1
      code: 'BM_ERR_WIRE_UNKNOWN_MESSAGE',
    },
    {
      label: 'write payload shorter than its length',
      bytes: rawFrame(envelopeBytes({ write: { sequence: 1, offsetBytes: 0, lengthBytes: 4096 } }), Buffer.alloc(4095)),
      code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
    },
    {
      label: 'write without payload',
      bytes: rawFrame(envelopeBytes({ write: { sequence: 1, offsetBytes: 0, lengthBytes: 4096 } })),
      code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
    },
    {
      label: 'write-zeroes with payload',
      bytes: rawFrame(envelopeBytes({ write: { sequence: 1, lengthBytes: 4, flags: 2 } }), Buffer.alloc(4)),
      code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
    },
    {
      label: 'resync data length mismatch',
      bytes: rawFrame(envelopeBytes({ resyncData: { sequence: 1, lengthBytes: 10 } }), Buffer.alloc(11)),
      code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
    },
    {
      label: 'payload on flush',
      bytes: rawFrame(envelopeBytes({ flush: { sequence: 1 } }), Buffer.alloc(1)),
      code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
    },
    {
      label: 'offset 2^53 + 1',
      bytes: rawFrame(envelopeBytes({ write: { sequence: 1, offsetBytes: '9007199254740993', lengthBytes: 0 } })),
      code: 'BM_ERR_WIRE_RANGE',
    },
    {
      label: 'length 2^64 - 1',
      bytes: rawFrame(envelopeBytes({ resyncData: { sequence: 1, lengthBytes: '18446744073709551615' } })),
      code: 'BM_ERR_WIRE_RANGE',
    },
    {
      label: 'nested range offset 2^53',
      bytes: rawFrame(envelopeBytes({ resyncRequest: { sequence: 1, ranges: [{ offsetBytes: '9007199254740992' }] } })),
      code: 'BM_ERR_WIRE_RANGE',
    },
    {
      label: 'repeated generation id 2^60',
      bytes: rawFrame(envelopeBytes({ hello: { generationIds: ['1152921504606846976'] } })),
      code: 'BM_ERR_WIRE_RANGE',
    },
  ];
  for (const { label, bytes, code } of cases) {
    const decoder = new FrameDecoder();
    t.throws(() => decoder.push(bytes), { code }, label);
    t.throws(() => decoder.push(stream), { code }, `${label}: refuses later input`);
  }
});

t.test('a mismatched payload is refused before the payload is buffered', async (t) => {
  const header = envelopeBytes({ write: { sequence: 1, lengthBytes: 4096 } });
  const decoder = new FrameDecoder();
  const head = Buffer.concat([prelude(FRAME_MAGIC, header.length, 1 << 20), header]);
  t.throws(() => decoder.push(head), { code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED' });
});

t.test('valid frames before a bad one in another chunk are delivered', async (t) => {
  const decoder = new FrameDecoder();
  const good = Buffer.concat(encodeFrame({ kind: 'flush', body: { sequence: 1 } }));
  t.equal(decoder.push(good).length, 1);
  t.throws(() => decoder.push(prelude(0, 0, 0)), { code: 'BM_ERR_WIRE_BAD_MAGIC' });
});

t.test('mutated streams end in frames or a WireError, never another exception', async (t) => {
  let seed = 12345;
  const random = (): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31; // seeded LCG: failures reproduce
    return seed / 2 ** 31;
  };
  for (let round = 0; round < 2000; round++) {
    const mutated = Buffer.from(stream);
    const flips = 1 + Math.floor(random() * 4);
    for (let i = 0; i < flips; i++) mutated[Math.floor(random() * mutated.length)] = Math.floor(random() * 256);
    const decoder = new FrameDecoder({ payloadBytesMax: 1 << 20 });
    try {
      const chunkBytes = 1 + Math.floor(random() * 300);
      for (let offset = 0; offset < mutated.length; offset += chunkBytes) {
        decoder.push(mutated.subarray(offset, offset + chunkBytes));
      }
    } catch (error) {
      if (!(error instanceof WireError)) {
        t.fail(`round ${round} (seeded, reproducible): ${String(error)}`);
        return;
      }
    }
    if (decoder.bufferedBytes > (1 << 20) + HEADER_BYTES_MAX + 12) t.fail(`round ${round}: buffered too much`);
  }
  t.pass('2000 mutated streams');
});

t.test('copyChunks: a stream decoded from one reused buffer keeps every frame intact', async (t) => {
  // What an adopted socket does: each read overwrites the same buffer. Any frame part left as a
  // view of it (payload, or a protobufjs bytes field such as an auth nonce) would be clobbered.
  for (const readBytes of [1, 7, 100, 4096, 65536]) {
    const decoder = new FrameDecoder({ copyChunks: true });
    const reused = Buffer.alloc(readBytes);
    const frames: Frame[] = [];
    for (let at = 0; at < stream.length; at += readBytes) {
      const length = Math.min(readBytes, stream.length - at);
      stream.copy(reused, 0, at, at + length);
      frames.push(...decoder.push(reused.subarray(0, length)));
      reused.fill(0xee); // the next read lands here
    }
    check(t, frames, `reads of ${readBytes} bytes`);
  }
});

t.test('directReadTarget and landed: the rest of a payload read straight into its buffer', async (t) => {
  const payload = Buffer.alloc(100_000);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
  const message: WireMessage = { kind: 'write', body: { sequence: 3, offsetBytes: 0, lengthBytes: payload.length, flags: 0 } };
  const bytes = Buffer.concat([...encodeFrame(message, payload), ...encodeFrame(wireMessage('flush', { sequence: 4 }))]);
  const headBytes = bytes.length - payload.length - encodeFrame(wireMessage('flush', { sequence: 4 }))[0]!.length;
  const allocated: Buffer[] = [];
  const decoder = new FrameDecoder({ copyChunks: true, allocatePayload: (size) => (allocated.push(Buffer.alloc(size)), allocated.at(-1)!) });
  t.equal(decoder.directReadTarget(1), undefined, 'nothing to read into before a header');
  t.same(decoder.push(bytes.subarray(0, headBytes + 1000)), []);
  t.equal(decoder.directReadTarget(payload.length), undefined, 'less than asked is still to come');
  const target = decoder.directReadTarget(32 * 1024)!;
  t.equal(target.length, payload.length - 1000, 'the unfilled rest of the payload');
  t.equal(target.buffer, allocated[0]!.buffer, 'inside the allocator buffer');
  bytes.copy(target, 0, headBytes + 1000, headBytes + 50_000);
  t.same(decoder.landed(49_000), [], 'not complete yet');
  const rest = decoder.directReadTarget(1)!;
  t.equal(rest.length, payload.length - 50_000);
  bytes.copy(rest, 0, headBytes + 50_000, headBytes + payload.length);
  const [frame] = decoder.landed(rest.length);
  t.same(frame!.message, message);
  t.ok(frame!.payload!.equals(payload), 'the payload assembled from a copy and two direct reads');
  t.equal(frame!.payload, allocated[0]);
  t.equal(decoder.directReadTarget(1), undefined);
  t.same(decoder.push(bytes.subarray(headBytes + payload.length)).map((next) => next.message), [wireMessage('flush', { sequence: 4 })], 'the stream goes on after it');
  t.throws(() => decoder.landed(1), 'landed outside a payload is a bug');
});
