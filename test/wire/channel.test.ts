import { Duplex, PassThrough } from 'node:stream';
import { isDeepStrictEqual } from 'node:util';

import t from 'tap';

import { FrameChannel } from '../../src/wire/channel';
import { encodeFrame } from '../../src/wire/frame';
import { wireMessage, type WireMessage } from '../../src/wire/messages';
import { socketPair } from '../helpers/socket-pair';

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

t.test('ownReadBuffers: an adopted socket delivers every frame intact, bytes read before adoption first', async (t) => {
  const [accepted, client] = await socketPair(t);
  const frames: Array<{ message: WireMessage; payload?: Buffer }> = [];
  for (let sequence = 0; sequence < 40; sequence++) {
    // Small and large payloads mixed: large ones are read straight into their buffers.
    const lengthBytes = sequence % 5 === 0 ? 1024 * 1024 : 4096;
    const payload = Buffer.alloc(lengthBytes, sequence);
    frames.push({ message: wireMessage('write', { sequence, offsetBytes: sequence * 4096, lengthBytes, flags: 0 }), payload });
    frames.push({ message: wireMessage('flush', { sequence: 1000 + sequence }) });
  }
  const bytes = Buffer.concat(frames.flatMap((frame) => encodeFrame(frame.message, frame.payload)));
  // The first frames arrive (and are read by Node) before the channel exists.
  client.write(bytes.subarray(0, 5000));
  await new Promise((resolve) => setTimeout(resolve, 20));
  accepted.pause();
  const channel = new FrameChannel(accepted, { ownReadBuffers: true, queuedFramesMax: 8 });
  t.not(channel.stream, accepted, 'the channel reads through a new socket');
  t.ok(accepted.destroyed, 'the original is closed');
  t.throws(() => channel.detach(), /cannot be handed on/);
  for (let at = 5000; at < bytes.length; at += 300_000) client.write(bytes.subarray(at, at + 300_000));
  for (const [index, expected] of frames.entries()) {
    const frame = await channel.receive();
    if (!isDeepStrictEqual(frame.message, expected.message) || (expected.payload !== undefined && !expected.payload.equals(frame.payload!))) {
      t.fail(`frame ${index} differs`);
      return;
    }
    await new Promise((resolve) => setImmediate(resolve)); // a slow consumer: the queue bound pauses reading
  }
  t.pass('all 80 frames equal');
  t.ok(channel.directReadBytes > 4 * 1024 * 1024, `most of the 8 MiB of large payloads were read straight into their buffers (${channel.directReadBytes} bytes)`);
  // Sending works on the adopted socket, and the peer's close reaches the channel.
  const peer = new FrameChannel(client);
  channel.send(wireMessage('flush', { sequence: 7 }));
  t.same((await peer.receive()).message, wireMessage('flush', { sequence: 7 }));
  client.end();
  await t.rejects(channel.receive(), { code: 'BM_ERR_WIRE_CLOSED' });
});
