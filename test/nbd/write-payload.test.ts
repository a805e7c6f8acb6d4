// WRITE payloads that span socket chunks are assembled in aligned buffers from the server's pool
// (so an O_DIRECT backend can write them without a second copy) and go back to the pool once
// the backend call settles, or when the connection dies before the payload is complete.

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

  // A payload that arrives whole in one chunk stays a view of that chunk: no pool, no copy.
  const small = Buffer.alloc(4096, 0x77);
  t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 3 * MiB, payload: small })).error, 0);
  t.notOk(isAlignedBuffer(backend.calls.at(-1)!.data!, 4096), 'a whole-chunk payload is not copied into the pool');
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
