import { Duplex, PassThrough } from 'node:stream';

import t from 'tap';

import { FrameChannel } from '../../src/wire/channel';
import { encodeFrame } from '../../src/wire/frame';
import { wireMessage } from '../../src/wire/messages';

/** One end of an in-memory pipe: what is written to `input` comes out of the channel's stream. */
function memoryStream(): { stream: Duplex; input: PassThrough; output: PassThrough } {
  const input = new PassThrough();
  const output = new PassThrough();
  const stream = Duplex.from({ readable: input, writable: output });
  return { stream, input, output };
}

t.test('frames queue up to the bound, then the stream is paused', async (t) => {
  const { stream, input } = memoryStream();
  const channel = new FrameChannel(stream, { queuedFramesMax: 4 });
  for (let sequence = 0; sequence < 10; sequence++) {
    for (const buffer of encodeFrame(wireMessage('flush', { sequence }))) input.write(buffer);
  }
  await new Promise((resolve) => setImmediate(resolve));
  t.ok(stream.isPaused(), 'paused above queuedFramesMax');
  for (let sequence = 0; sequence < 10; sequence++) {
    const frame = await channel.receive();
    t.same(frame.message, { kind: 'flush', body: { sequence } });
  }
  stream.destroy();
});

t.test('send writes a frame the other side decodes', async (t) => {
  const { stream, output } = memoryStream();
  const channel = new FrameChannel(stream);
  const payload = Buffer.alloc(4096, 1);
  channel.send(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), payload);
  const peer = new FrameChannel(Duplex.from({ readable: output, writable: new PassThrough() }));
  const frame = await peer.receive();
  t.equal(frame.message.kind, 'write');
  t.ok(frame.payload?.equals(payload));
  stream.destroy();
});

t.test('a decode error rejects the pending receive and every later one', async (t) => {
  const { stream, input } = memoryStream();
  const channel = new FrameChannel(stream);
  const pending = channel.receive();
  input.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
  await t.rejects(pending, { code: 'BM_ERR_WIRE_BAD_MAGIC' });
  await t.rejects(channel.receive(), { code: 'BM_ERR_WIRE_BAD_MAGIC' });
  stream.destroy();
});

t.test('end of stream in the middle of a frame is reported as such', async (t) => {
  const { stream, input } = memoryStream();
  const channel = new FrameChannel(stream);
  const [head] = encodeFrame(wireMessage('flush', { sequence: 1 }));
  input.end(head!.subarray(0, 5));
  await t.rejects(channel.receive(), { code: 'BM_ERR_WIRE_CLOSED', message: /middle of a frame/ });
});

t.test('an aborted receive rejects with the abort reason', async (t) => {
  const { stream } = memoryStream();
  const channel = new FrameChannel(stream);
  const controller = new AbortController();
  const pending = channel.receive(controller.signal);
  controller.abort(new Error('stop'));
  await t.rejects(pending, { message: 'stop' });
  stream.destroy();
});

t.test('payload bytes are bounded too: a few large frames pause the stream', async (t) => {
  const { stream, input } = memoryStream();
  const channel = new FrameChannel(stream, { queuedFramesMax: 64, queuedBytesMax: 3 * 65536 });
  const payload = Buffer.alloc(65536, 7);
  for (let sequence = 0; sequence < 8; sequence++) {
    for (const buffer of encodeFrame(wireMessage('write', { sequence, offsetBytes: sequence * 65536, lengthBytes: 65536, flags: 0 }), payload)) {
      input.write(buffer);
    }
  }
  await new Promise((resolve) => setImmediate(resolve));
  t.ok(stream.isPaused(), 'paused at queuedBytesMax, far below queuedFramesMax');
  for (let sequence = 0; sequence < 8; sequence++) {
    const frame = await channel.receive();
    t.equal(frame.message.kind, 'write');
    t.equal(frame.payload?.length, 65536);
  }
  stream.destroy();
});

t.test('limitPayloadBytes(0) refuses any payload from the prelude on', async (t) => {
  const { stream, input } = memoryStream();
  const channel = new FrameChannel(stream);
  channel.limitPayloadBytes(0);
  for (const buffer of encodeFrame(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: 4096, flags: 0 }), Buffer.alloc(4096))) {
    input.write(buffer);
  }
  await t.rejects(channel.receive(), { code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE' });
  stream.destroy();
});
