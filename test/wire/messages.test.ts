import protobuf from 'protobufjs';
import t from 'tap';

import { encodeFrame, FrameDecoder } from '../../src/wire/frame';
import { Envelope, schemaMessageKinds } from '../../src/wire/schema';
import { allSamples } from './samples';

t.test('every message round-trips through a frame unchanged', async (t) => {
  for (const sample of allSamples()) {
    const decoder = new FrameDecoder();
    const frames = decoder.push(Buffer.concat(encodeFrame(sample.message, sample.payload)));
    t.equal(frames.length, 1, sample.message.kind);
    t.same(frames[0]!.message, sample.message, `${sample.message.kind} header`);
    t.same(frames[0]!.payload, sample.payload, `${sample.message.kind} payload`);
    t.ok(decoder.atFrameBoundary);
  }
});

// Guards against the TypeScript types drifting from the schema: the samples set every field,
// so a schema field missing from the types (and samples) shows up here.
t.test('samples cover every message and every field of the schema', async (t) => {
  const samples = allSamples();
  const kinds = new Set(samples.map((sample) => sample.message.kind));
  t.same([...kinds].sort(), schemaMessageKinds().sort(), 'one sample per Envelope.body member');
  const seen = new Map<protobuf.Type, Set<string>>();
  const collect = (type: protobuf.Type, object: Record<string, unknown>): void => {
    const names = seen.get(type) ?? new Set<string>();
    seen.set(type, names);
    for (const key of Object.keys(object)) {
      t.ok(type.fields[key] !== undefined, `${type.name}.${key} exists in the schema`);
      names.add(key);
      const sub = type.fields[key]!.resolvedType;
      if (sub instanceof protobuf.Type) {
        const value = object[key];
        for (const item of Array.isArray(value) ? value : [value]) collect(sub, item as Record<string, unknown>);
      }
    }
  };
  for (const sample of samples) {
    const type = Envelope.fields[sample.message.kind]!.resolvedType as protobuf.Type;
    collect(type, sample.message.body as unknown as Record<string, unknown>);
  }
  for (const [type, names] of seen) {
    t.same([...names].sort(), Object.keys(type.fields).sort(), `${type.name}: all fields covered`);
  }
});

t.test('encoder refuses what the decoder would refuse', async (t) => {
  const write = { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 };
  t.throws(() => encodeFrame({ kind: 'write', body: write }, Buffer.alloc(100)), {
    code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
  });
  t.throws(() => encodeFrame({ kind: 'flush', body: { sequence: 1 } }, Buffer.alloc(1)), {
    code: 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED',
  });
  t.throws(() => encodeFrame({ kind: 'flush', body: { sequence: 2 ** 53 } }), { code: 'BM_ERR_WIRE_RANGE' });
  t.throws(() => encodeFrame({ kind: 'flush', body: { sequence: -1 } }), { code: 'BM_ERR_WIRE_RANGE' });
  t.throws(() => encodeFrame({ kind: 'flush', body: { sequence: 1.5 } }), { code: 'BM_ERR_WIRE_RANGE' });
  t.throws(() => encodeFrame({ kind: 'write', body: { ...write, lengthBytes: 64 } }, Buffer.alloc(64), { payloadBytesMax: 32 }), {
    code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE',
  });
  t.throws(() => encodeFrame({ kind: 'verify', body: { sequence: 1, ranges: [], sha256: [Buffer.alloc(70_000)] } }), {
    code: 'BM_ERR_WIRE_HEADER_TOO_LARGE',
  });
  t.throws(() => new FrameDecoder({ payloadBytesMax: 64 * 1024 * 1024 }), RangeError);
});

t.test('payload travels without a copy: the encoder hands back the caller buffer', async (t) => {
  const payload = Buffer.alloc(65536, 7);
  const buffers = encodeFrame({ kind: 'write', body: { sequence: 1, offsetBytes: 0, lengthBytes: 65536, flags: 0 } }, payload);
  t.equal(buffers.length, 2);
  t.equal(buffers[1], payload);
});
