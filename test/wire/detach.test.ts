// Handing a stream on after the frame layer: nothing read after detach() may be lost, and a
// half-received frame must not be detached from.
import { PassThrough } from 'node:stream';
import t from 'tap';
import { FrameChannel } from '../../src/wire/channel';
import { encodeFrame } from '../../src/wire/frame';
import { wireMessage } from '../../src/wire/messages';

t.test('bytes arriving after detach() stay in the stream for the next reader', async (t) => {
  const stream = new PassThrough();
  const channel = new FrameChannel(stream);
  stream.write(Buffer.concat(encodeFrame(wireMessage('flush', { sequence: 1 }))));
  const frame = await channel.receive();
  t.same(frame.message, { kind: 'flush', body: { sequence: 1 } });
  t.same(channel.detach(), [], 'nothing was queued');
  stream.write(Buffer.from('raw bytes for the next layer'));
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(stream.read()?.toString(), 'raw bytes for the next layer', 'not dropped by a flowing stream');
});

t.test('detach() in the middle of a frame is refused and changes nothing', async (t) => {
  const stream = new PassThrough();
  const channel = new FrameChannel(stream);
  const bytes = Buffer.concat(encodeFrame(wireMessage('flush', { sequence: 2 })));
  stream.write(bytes.subarray(0, 5));
  await new Promise((resolve) => setImmediate(resolve));
  t.throws(() => channel.detach(), { code: 'BM_ERR_WIRE_DECODE' });
  stream.write(bytes.subarray(5));
  const frame = await channel.receive();
  t.same(frame.message, { kind: 'flush', body: { sequence: 2 } }, 'the frame still arrives whole');
});
