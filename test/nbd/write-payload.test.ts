// WRITE payloads are assembled in aligned buffers from the server's pool (so an O_DIRECT backend
// can write them without a second copy) and go back to the pool once the backend call settles,
// or when the connection dies before the payload is complete. A connection reads into one
// staging buffer it reuses, so no payload may stay a view of it; with Node's stream reads (the
// fallback) a payload lying whole in one chunk stays a view of that chunk.

import { readdirSync } from 'node:fs';

import t from 'tap';
import { isAlignedBuffer } from '../../src/native/index';
import * as P from '../../src/nbd/protocol';
import { errnoError } from '../helpers/memory-backend';
import { NbdTestClient } from '../helpers/nbd-client';
import { MiB, startServer, waitFor } from './fixture';

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) data[i] = (i * 13 + seed) & 0xff;
  return data;
}

/** A WRITE whose header and payload reach the server in two writes, some ms apart. */
async function splitWrite(client: NbdTestClient, offsetBytes: number, data: Buffer, cookie: bigint): Promise<number> {
  const header = NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes, lengthBytes: data.length }, cookie);
  client.write(Buffer.concat([header, data.subarray(0, 1000)]));
  await sleep(10);
  client.write(data.subarray(1000));
  const reply = await client.readReply();
  if (reply.cookie !== cookie) throw new Error(`reply for cookie ${reply.cookie}, expected ${cookie}`);
  return reply.error;
}

t.test('spanning payloads land in aligned pooled buffers, released when the write settles', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: 4 * MiB }]);
  const backend = fx.backends.get('vol0')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');

  const first = pattern(MiB, 1);
  t.equal(await splitWrite(client, 0, first, 1n), 0);
  t.ok(backend.data.subarray(0, MiB).equals(first), 'the assembled payload is intact');
  const firstCall = backend.calls.at(-1)!;
  t.equal(firstCall.op, 'write');
  t.equal(firstCall.data!.length, MiB, 'the backend sees exactly the payload');
  t.ok(isAlignedBuffer(firstCall.data!, 4096), 'the payload buffer is 4096-aligned pooled memory');
  const block = firstCall.data!.buffer;

  // A failed write settles too: its buffer goes back to the pool.
  backend.hook = () => {
    throw errnoError('EIO', 'injected');
  };
  t.equal(await splitWrite(client, MiB, pattern(MiB, 2), 2n), P.NBD_EIO);
  t.equal(backend.calls.at(-1)!.data!.buffer, block, 'the block released after the successful write is reused');
  backend.hook = null;

  const third = pattern(MiB - 512, 3); // an odd size shares the 1 MiB size class
  t.equal(await splitWrite(client, 2 * MiB, third, 3n), 0);
  t.equal(backend.calls.at(-1)!.data!.buffer, block, 'the block released after the failed write is reused');
  t.ok(backend.data.subarray(2 * MiB, 3 * MiB - 512).equals(third));

  // A payload that arrives whole in one read is copied out of the staging buffer into the pool.
  const small = Buffer.alloc(4096, 0x77);
  t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 3 * MiB, payload: small })).error, 0);
  t.ok(isAlignedBuffer(backend.calls.at(-1)!.data!, 4096), 'a whole-read payload goes to the backend in pooled memory');
  t.ok(backend.data.subarray(3 * MiB, 3 * MiB + 4096).equals(small));

  // A connection that dies with a payload half received gives its buffer back.
  const dying = await NbdTestClient.open(fx.socketPath, 'vol0');
  dying.client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: MiB }, 9n));
  dying.client.write(Buffer.alloc(100_000, 9));
  await sleep(20);
  dying.client.destroy();
  await waitFor(() => fx.server.connectionCount() === 1, 2000, 'the dying connection to close');
  t.ok(backend.data.subarray(0, MiB).equals(first), 'the partial payload was never written');
  t.equal(await splitWrite(client, 0, pattern(MiB, 4), 4n), 0);
  t.equal(backend.calls.at(-1)!.data!.buffer, block, 'the block the dead connection held is back in the pool');
  await client.disconnect();
});

t.test('a pooled payload is not reused while its write is still in flight', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: 4 * MiB }]);
  const backend = fx.backends.get('vol0')!;
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  backend.hook = (call) => (call.offsetBytes === 0 ? gate : undefined);
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
  const slow = pattern(MiB, 5);
  const header = NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: MiB }, 1n);
  client.write(Buffer.concat([header, slow]));
  await waitFor(() => backend.activeOps === 1, 2000, 'the slow write in flight');
  t.equal(await splitWrite(client, MiB, pattern(MiB, 6), 2n), 0);
  t.not(backend.calls.at(-1)!.data!.buffer, backend.calls[0]!.data!.buffer, 'the second write got a different block');
  release();
  const reply = await client.readReply();
  t.equal(reply.cookie, 1n);
  t.equal(reply.error, 0);
  t.ok(backend.data.subarray(0, MiB).equals(slow), 'the slow write landed intact');
  backend.hook = null;
  await client.disconnect();
});

t.test('payloads held by slow writes survive the staging buffer being read into again', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: 16 * MiB }]);
  const backend = fx.backends.get('vol0')!;
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  // The last write only keeps the connection reading after the others: each earlier payload
  // then has later reads landing in the staging buffer while it waits.
  const sizes = [4096, 512, 28, 65536, 4096 + 512, 32 * 1024 - 1, 32 * 1024, 200_000, MiB, 4096, 3 * 4096, 4096];
  const writes = sizes.map((lengthBytes, index) => ({ offsetBytes: index * MiB, data: pattern(lengthBytes, 40 + index) }));
  // Every write waits until all are in flight, then checks the buffer it was handed, as a device
  // reading it with O_DIRECT would: one still pointing into the staging buffer has been
  // overwritten by the later reads.
  const intactWhileInFlight: boolean[] = [];
  backend.hook = async (call) => {
    if (call.op !== 'write') return;
    await gate;
    const index = call.offsetBytes / MiB;
    intactWhileInFlight[index] = call.data!.equals(writes[index]!.data);
  };
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
  // One burst: many requests per read, payloads split across reads at every kind of boundary.
  const burst = Buffer.concat(
    writes.flatMap((write, index) => [
      NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: write.offsetBytes, lengthBytes: write.data.length }, BigInt(index + 1)),
      write.data,
    ]),
  );
  const lastBytes = 28 + 4096;
  for (let at = 0; at < burst.length - lastBytes; at += 7000) client.write(burst.subarray(at, Math.min(at + 7000, burst.length - lastBytes)));
  await waitFor(() => backend.activeOps === writes.length - 1, 5000, 'every write but the last in flight at once');
  client.write(burst.subarray(burst.length - lastBytes));
  await waitFor(() => backend.activeOps === writes.length, 5000, 'the last write in flight too');
  release();
  const errors = new Map<bigint, number>();
  for (let i = 0; i < writes.length; i++) {
    const reply = await client.readReply();
    errors.set(reply.cookie, reply.error);
  }
  t.same([...errors.values()], writes.map(() => 0), 'every write succeeded');
  // The check that can fail: the backend copies what it is handed at once, so the device
  // contents below would be right even if a payload had been a view of the staging buffer.
  t.same(intactWhileInFlight, writes.map(() => true), 'each payload buffer held its bytes until its write settled');
  const [transmission] = (fx.server as unknown as { transmissions: Set<{ directReadBytes: number }> }).transmissions;
  t.ok(transmission!.directReadBytes > MiB / 2, `most of the large payloads were read straight into their buffers (${transmission!.directReadBytes} bytes)`);
  for (const [index, write] of writes.entries()) {
    t.ok(backend.data.subarray(write.offsetBytes, write.offsetBytes + write.data.length).equals(write.data), `write ${index} (${write.data.length} bytes) intact`);
  }
  backend.hook = null;
  await client.disconnect();
});

t.test('with stream reads (ownReadBuffers: false) a whole-chunk payload stays a view of the chunk', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: 4 * MiB }], { ownReadBuffers: false });
  const backend = fx.backends.get('vol0')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
  const small = Buffer.alloc(4096, 0x77);
  t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: small })).error, 0);
  t.notOk(isAlignedBuffer(backend.calls.at(-1)!.data!, 4096), 'no pool, no copy');
  const large = pattern(MiB, 7);
  t.equal(await splitWrite(client, MiB, large, 2n), 0);
  t.ok(isAlignedBuffer(backend.calls.at(-1)!.data!, 4096), 'a spanning payload is assembled in the pool');
  t.ok(backend.data.subarray(0, 4096).equals(small));
  t.ok(backend.data.subarray(MiB, 2 * MiB).equals(large));
  await client.disconnect();
});

t.test('adopting connections leaves no descriptor behind, whether clients leave cleanly or vanish mid-payload', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: 4 * MiB }]);
  const openDescriptors = (): number => readdirSync('/proc/self/fd').length;
  // One connection first, so lazily opened descriptors (the addon, the pool) are counted in the baseline.
  const warm = await NbdTestClient.open(fx.socketPath, 'vol0');
  t.equal((await warm.client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(4096, 1) })).error, 0);
  await warm.client.disconnect();
  await waitFor(() => fx.server.connectionCount() === 0, 2000, 'the warm-up connection to close');
  const baseline = openDescriptors();
  for (let round = 0; round < 20; round++) {
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
    if (round % 2 === 0) {
      t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: round * 4096, payload: Buffer.alloc(4096, round) })).error, 0);
      await client.disconnect();
    } else {
      // Half a large payload (the rest would be read straight into its pooled buffer), then gone.
      client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: MiB }, 1n));
      client.write(Buffer.alloc(300_000, 0xee));
      await sleep(5);
      client.destroy();
    }
  }
  await waitFor(() => fx.server.connectionCount() === 0, 5000, 'every connection to close');
  t.equal(openDescriptors(), baseline, 'as many descriptors open as before the 20 connections');
  t.ok(fx.backends.get('vol0')!.data.subarray(0, 4096).equals(Buffer.alloc(4096, 0)), 'no half-received payload was written');
});
