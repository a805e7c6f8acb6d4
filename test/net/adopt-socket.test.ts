// adoptSocket: an accepted socket re-wrapped so reads land in the caller's buffers, or left as it
// is (null) whenever that cannot be done safely, still readable as a stream.

import { readdirSync } from 'node:fs';
import net from 'node:net';

import t from 'tap';

import { adoptSocket, type ReadSink } from '../../src/net/adopt-socket';
import { socketPair } from '../helpers/socket-pair';

/** A sink that alternates between two small buffers and collects what lands in them. */
function collectingSink(): ReadSink & { received: Buffer[]; buffersUsed: Set<Buffer> } {
  const buffers = [Buffer.alloc(5), Buffer.alloc(7)];
  let next = 0;
  const received: Buffer[] = [];
  const buffersUsed = new Set<Buffer>();
  return {
    received,
    buffersUsed,
    nextReadBuffer: () => buffers[next++ % 2]!,
    onRead(buffer, nread) {
      buffersUsed.add(buffer);
      received.push(Buffer.from(buffer.subarray(0, nread)));
      return true;
    },
  };
}

const until = async (condition: () => boolean, what: string): Promise<void> => {
  const deadline = Date.now() + 2000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
};

t.test('reads land in the sink buffers, after the bytes the original had already read', async (t) => {
  const [accepted, client] = await socketPair(t);
  client.write('early bytes|');
  await until(() => accepted.readableLength > 0, 'the original to read the first bytes');
  const openBefore = readdirSync('/proc/self/fd').length;
  const sink = collectingSink();
  const adopted = adoptSocket(accepted, sink)!;
  t.ok(adopted, 'adopted');
  t.equal(adopted.pending.toString(), 'early bytes|', 'what the original read comes back first');
  t.ok(accepted.destroyed, 'the original is closed');
  t.equal(readdirSync('/proc/self/fd').length, openBefore, 'one descriptor out (the original), one in (the copy)');
  client.write('later bytes, in small reads');
  await until(() => Buffer.concat(sink.received).length === 27, 'the later bytes');
  t.equal(Buffer.concat(sink.received).toString(), 'later bytes, in small reads');
  t.equal(sink.buffersUsed.size, 2, 'both sink buffers were read into');
  // Writing and closing go through the new socket.
  const echoed = new Promise<string>((resolve) => client.once('data', (data) => resolve(data.toString())));
  adopted.socket.write('reply');
  t.equal(await echoed, 'reply');
  const closed = new Promise((resolve) => adopted.socket.once('close', resolve));
  client.end();
  await closed;
  t.pass('the peer closing closes the adopted socket');
});

t.test('not adopted (null), and still a working stream, when it would not be safe', async (t) => {
  const [accepted, client] = await socketPair(t);
  const sink = collectingSink();

  accepted.on('data', () => undefined);
  t.equal(adoptSocket(accepted, sink), null, 'a socket someone already reads with a data listener');
  accepted.removeAllListeners('data');

  // Replies still queued on the original would be dropped by closing it.
  const stuck = accepted.write(Buffer.alloc(16 * 1024 * 1024)); // more than the kernel buffer takes
  t.notOk(stuck, 'the write is queued');
  t.equal(adoptSocket(accepted, sink), null, 'a socket with unsent writes');
  t.notOk(accepted.destroyed, 'left open');

  t.equal(adoptSocket(new net.Socket(), sink), null, 'a socket with no descriptor');
  const ended = await socketPair(t);
  ended[0].destroy();
  t.equal(adoptSocket(ended[0], sink), null, 'a destroyed socket');

  // The refused one still works as a stream: the client drains our write and we read its bytes.
  client.resume();
  const got = new Promise<string>((resolve) => accepted.once('data', (data) => resolve(data.toString())));
  client.write('still a stream');
  t.equal(await got, 'still a stream');
  t.same(sink.received, [], 'the sink never saw a byte');
});
