import t from 'tap';
import * as P from '../../src/nbd/protocol';
import { NbdTestClient } from '../helpers/nbd-client';
import { deferred, MiB, startServer, waitFor } from './fixture';

const EXPORTS = [
  { name: 'a', sizeBytes: 4 * MiB },
  { name: 'b', sizeBytes: MiB },
];

t.test('replies go out as requests complete, out of order', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('a')!;
  for (const structured of [false, true]) {
    const gate = deferred();
    backend.hook = (call) => (call.op === 'read' && call.offsetBytes === 0 ? gate.promise : undefined);
    const { client } = await NbdTestClient.open(fx.socketPath, 'a', { structured });
    backend.data.fill(1, 0, 4096);
    backend.data.fill(2, 4096, 8192);
    const slow = client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 });
    const fast = client.send({ type: P.NBD_CMD_READ, offsetBytes: 4096, lengthBytes: 4096 });
    const first = await client.readReply();
    t.equal(first.cookie, fast, `${structured ? 'structured' : 'simple'}: the later request is answered first`);
    t.ok(first.data?.equals(Buffer.alloc(4096, 2)));
    gate.resolve();
    const second = await client.readReply();
    t.equal(second.cookie, slow);
    t.ok(second.data?.equals(Buffer.alloc(4096, 1)));
    await client.disconnect();
  }
});

t.test('client vanishing mid-request: backend calls finish, buffers released, nothing leaks', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('a')!;
  const gate = deferred();
  backend.hook = () => gate.promise;
  const { client } = await NbdTestClient.open(fx.socketPath, 'a', { structured: true });
  client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 });
  client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 2 * MiB }); // the zero-copy path
  client.send({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(8192, 3) });
  await waitFor(() => backend.activeOps === 3, 2000, 'three backend calls in flight');
  t.equal(fx.server.connectionCount('a'), 1);
  client.destroy();
  // The server cannot tell a vanished client from one that only half-closed after its last
  // request: it answers what it received (the replies then fail to send) and closes.
  await new Promise((r) => setTimeout(r, 50));
  t.equal(backend.activeOps, 3, 'the backend calls go on');
  gate.resolve();
  await waitFor(() => backend.activeOps === 0, 2000, 'backend calls to settle');
  await waitFor(() => fx.server.connectionCount('a') === 0, 2000, 'connection to be closed');
  await new Promise((r) => setImmediate(r));
  t.equal(backend.unreleasedReads, 0, 'every ReadResult was released');
  t.ok(backend.data.subarray(0, 8192).equals(Buffer.alloc(8192, 3)), 'the write still completed');

  // A client that vanishes in the middle of a WRITE payload.
  backend.hook = null;
  const second = await NbdTestClient.open(fx.socketPath, 'a');
  second.client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: 65536 }, 1n));
  second.client.write(Buffer.alloc(1000, 9));
  await new Promise((r) => setTimeout(r, 20));
  second.client.destroy();
  await waitFor(() => fx.server.connectionCount() === 0, 2000, 'second connection to close');
  t.ok(backend.data.subarray(0, 1000).equals(Buffer.alloc(1000, 3)), 'a partial payload is never written');

  // The server is still healthy.
  const third = await NbdTestClient.open(fx.socketPath, 'a');
  t.equal((await third.client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 })).error, 0);
  await third.client.disconnect();
});

t.test('32 connections at once, each on its own region, across two exports', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const connections = 32;
  const regionBytes = 64 * 1024;
  const clients = await Promise.all(
    Array.from({ length: connections }, (_, i) => NbdTestClient.open(fx.socketPath, i % 2 === 0 ? 'a' : 'b', { structured: i % 4 < 2 })),
  );
  t.equal(fx.server.connectionCount(), connections);
  t.equal(fx.server.connectionCount('a'), connections / 2);
  t.equal(fx.server.connectionCount('b'), connections / 2);
  await Promise.all(
    clients.map(async ({ client }, i) => {
      const offsetBytes = Math.floor(i / 2) * regionBytes;
      const payload = Buffer.alloc(regionBytes, i + 1);
      const cookies = [];
      for (let at = 0; at < regionBytes; at += 4096) {
        cookies.push(client.send({ type: P.NBD_CMD_WRITE, offsetBytes: offsetBytes + at, payload: payload.subarray(at, at + 4096) }));
      }
      for (const _ of cookies) {
        const reply = await client.readReply();
        if (reply.error !== 0) throw new Error(`write failed with ${reply.error}`);
      }
      const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes, lengthBytes: regionBytes });
      if (!read.data?.equals(payload)) throw new Error(`connection ${i} read back wrong data`);
    }),
  );
  t.pass('every connection wrote and read back its own region');
  await Promise.all(clients.map(({ client }) => client.disconnect()));
  await waitFor(() => fx.server.connectionCount() === 0, 2000, 'all connections closed');
  t.equal(fx.logs.filter((l) => l.msg === 'nbd connection open').length, connections);
  t.equal(fx.logs.filter((l) => l.msg === 'nbd connection closed').length, connections);
});

t.test('close(): in-flight requests complete, new requests get ESHUTDOWN, sockets close', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('a')!;
  const gate = deferred();
  backend.hook = (call) => (call.op === 'write' ? gate.promise : undefined);
  const { client } = await NbdTestClient.open(fx.socketPath, 'a', { structured: true });
  const held = client.send({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(4096, 4) });
  await waitFor(() => backend.activeOps === 1, 2000, 'write in flight');
  let closed = false;
  const closing = fx.server.close().then(() => (closed = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(closed, 'close() waits for the in-flight write');
  const refused = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
  t.equal(refused.error, P.NBD_ESHUTDOWN, 'new request gets ESHUTDOWN');
  const refusedWrite = await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(512) });
  t.equal(refusedWrite.error, P.NBD_ESHUTDOWN, 'a refused write payload is skipped');
  gate.resolve();
  const reply = await client.readReply();
  t.equal(reply.cookie, held);
  t.equal(reply.error, 0, 'the in-flight write is answered with success');
  t.ok(backend.data.subarray(0, 4096).equals(Buffer.alloc(4096, 4)));
  await client.closed;
  await closing;
  t.equal(fx.server.connectionCount(), 0);
  await t.rejects(NbdTestClient.connect(fx.socketPath), 'no longer listening');
  t.equal(await fx.server.close(), undefined, 'close() is idempotent');
});

t.test('close() drops connections still in the handshake', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  await fx.server.close();
  await client.closed;
  t.ok(client.isClosed, 'handshake connections are dropped on close');
});

t.test('disconnectExport drains and closes only that export', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('a')!;
  const gate = deferred();
  backend.hook = (call) => (call.op === 'flush' ? gate.promise : undefined);
  const a1 = await NbdTestClient.open(fx.socketPath, 'a');
  const a2 = await NbdTestClient.open(fx.socketPath, 'a', { structured: true });
  const b = await NbdTestClient.open(fx.socketPath, 'b');
  const held = a1.client.send({ type: P.NBD_CMD_FLUSH });
  await waitFor(() => backend.activeOps === 1, 2000, 'flush in flight');
  let done = false;
  const disconnecting = fx.server.disconnectExport('a').then(() => (done = true));
  // An idle connection has nothing to drain and is closed at once.
  await a2.client.closed;
  const refused = await a1.client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
  t.equal(refused.error, P.NBD_ESHUTDOWN, 'new requests get ESHUTDOWN while draining');
  t.notOk(done, 'waits for the in-flight flush');
  gate.resolve();
  const reply = await a1.client.readReply();
  t.equal(reply.cookie, held);
  t.equal(reply.error, 0, 'the in-flight flush is answered');
  await disconnecting;
  await a1.client.closed;
  t.equal(fx.server.connectionCount('a'), 0);
  t.equal(fx.server.connectionCount('b'), 1);
  t.equal((await b.client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 })).error, 0, 'other exports unaffected');
  // New connections to the export are still accepted (removing it is the caller's business).
  const again = await NbdTestClient.open(fx.socketPath, 'a');
  t.equal(fx.server.connectionCount('a'), 1);
  await again.client.disconnect();
  await b.client.disconnect();
});

t.test('in-flight request bound: the socket is paused, nothing is lost', async (t) => {
  const fx = await startServer(t, EXPORTS, { maxInFlightRequestsPerConnection: 4 });
  const backend = fx.backends.get('a')!;
  const gate = deferred();
  backend.hook = () => gate.promise;
  const { client } = await NbdTestClient.open(fx.socketPath, 'a');
  const cookies = new Set<bigint>();
  for (let i = 0; i < 40; i++) cookies.add(client.send({ type: P.NBD_CMD_READ, offsetBytes: i * 512, lengthBytes: 512 }));
  await waitFor(() => backend.activeOps === 4, 2000, 'four reads in flight');
  await new Promise((r) => setTimeout(r, 50));
  t.equal(backend.activeOps, 4, 'no more than the bound reach the backend');
  gate.resolve();
  for (let i = 0; i < 40; i++) cookies.delete((await client.readReply()).cookie);
  t.equal(cookies.size, 0, 'all 40 answered');
  t.equal(backend.peakActiveOps, 4);
  await client.disconnect();
});

t.test('in-flight byte bound', async (t) => {
  const maxInFlightBytesPerConnection = 64 * 1024;
  const fx = await startServer(t, EXPORTS, { maxInFlightBytesPerConnection });
  const backend = fx.backends.get('a')!;
  let gate = deferred();
  backend.hook = () => gate.promise;
  const { client } = await NbdTestClient.open(fx.socketPath, 'a');
  for (let i = 0; i < 16; i++) client.send({ type: P.NBD_CMD_WRITE, offsetBytes: i * 16384, payload: Buffer.alloc(16384, i) });
  for (let i = 0; i < 16; i++) client.send({ type: P.NBD_CMD_READ, offsetBytes: i * 16384, lengthBytes: 16384 });
  await waitFor(() => backend.activeOps === 4, 2000, 'four 16 KiB requests in flight');
  await new Promise((r) => setTimeout(r, 50));
  t.equal(backend.activeBytes, maxInFlightBytesPerConnection, 'exactly the byte bound in flight');
  const released = gate;
  gate = { promise: Promise.resolve(), resolve: () => undefined };
  released.resolve();
  let errors = 0;
  for (let i = 0; i < 32; i++) errors += (await client.readReply()).error === 0 ? 0 : 1;
  t.equal(errors, 0);
  t.ok(backend.peakActiveBytes <= maxInFlightBytesPerConnection, `peak ${backend.peakActiveBytes} within the bound`);
  await client.disconnect();
});

/** Rejects if `promise` has not settled within `timeoutMs` (a hang fails the test, not tap). */
async function within<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

t.test('a header split 10+14 bytes, completed while at the in-flight bound, is handled on resume', async (t) => {
  const fx = await startServer(t, EXPORTS, { maxInFlightRequestsPerConnection: 1 });
  const backend = fx.backends.get('a')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'a');

  // A FLUSH whose header's second piece ends exactly at the header's end.
  let gate = deferred();
  backend.hook = (call) => (call.op === 'read' ? gate.promise : undefined);
  const blocker = client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
  await waitFor(() => backend.activeOps === 1, 2000, 'read in flight');
  const flushHeader = NbdTestClient.requestHeader({ type: P.NBD_CMD_FLUSH }, 77n);
  client.write(flushHeader.subarray(0, 10));
  await sleep(20);
  client.write(flushHeader.subarray(10));
  await sleep(20);
  t.equal(backend.flushCount, 0, 'the flush waits for the bound');
  gate.resolve();
  const first = await within(client.readReply(), 2000, 'the read reply');
  t.equal(first.cookie, blocker);
  const second = await within(client.readReply(), 2000, 'the reply to the held FLUSH');
  t.equal(second.cookie, 77n);
  t.equal(second.error, 0);
  t.equal(backend.flushCount, 1);

  // The same with a WRITE whose payload arrives while the connection is paused.
  gate = deferred();
  const blocker2 = client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
  await waitFor(() => backend.activeOps === 1, 2000, 'second read in flight');
  const writeHeader = NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 8192, lengthBytes: 4096 }, 78n);
  client.write(writeHeader.subarray(0, 10));
  await sleep(20);
  client.write(writeHeader.subarray(10));
  await sleep(20);
  client.write(Buffer.alloc(4096, 0x5a));
  gate.resolve();
  t.equal((await within(client.readReply(), 2000, 'the second read reply')).cookie, blocker2);
  const write = await within(client.readReply(), 2000, 'the reply to the held WRITE');
  t.equal(write.cookie, 78n);
  t.equal(write.error, 0);
  t.ok(backend.data.subarray(8192, 12288).equals(Buffer.alloc(4096, 0x5a)), 'the held write landed');
  backend.hook = null;
  await client.disconnect();
});

t.test('close() answers a request held back by a full socket write buffer with ESHUTDOWN', async (t) => {
  const fx = await startServer(t, EXPORTS, { maxInFlightBytesPerConnection: 64 * 1024 });
  const backend = fx.backends.get('a')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'a');
  // The client stops reading, so most of a 4 MiB reply stays in the server's write buffer.
  client.socket.pause();
  const big = client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4 * MiB });
  await waitFor(() => backend.calls.length === 1 && backend.activeOps === 0, 2000, 'the big read to complete');
  await sleep(20); // the reply is handed to the socket
  const held = client.send({ type: P.NBD_CMD_FLUSH });
  await sleep(20); // parsed and held back: the write buffer is over the byte bound
  t.equal(backend.flushCount, 0, 'the flush is held back');
  let closed = false;
  const closing = fx.server.close().then(() => (closed = true));
  await sleep(20);
  t.notOk(closed, 'close() waits until the held request is answered');
  client.socket.resume();
  const first = await within(client.readReply(), 5000, 'the big read reply');
  t.equal(first.cookie, big);
  t.equal(first.error, 0);
  const second = await within(client.readReply(), 5000, 'the ESHUTDOWN reply to the held FLUSH');
  t.equal(second.cookie, held);
  t.equal(second.error, P.NBD_ESHUTDOWN);
  t.equal(backend.flushCount, 0, 'the held flush never reached the backend');
  await within(client.closed, 5000, 'the connection to close');
  await within(closing, 5000, 'close() to resolve');
  t.equal(backend.unreleasedReads, 0);
});
