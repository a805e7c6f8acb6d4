import { connect, createServer, type Socket } from 'node:net';

import t from 'tap';

import { startTcpProxy } from '../helpers/tcp-proxy';

interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

interface EchoServer {
  port: number;
  /** Server-side sockets, open or closed, in accept order. */
  sockets: Socket[];
  /** Bytes the server has received over all connections. */
  receivedBytes(): number;
}

/** Echoes every byte back (with pipe backpressure); closed in teardown. */
async function startEchoServer(t: Teardown): Promise<EchoServer> {
  const sockets: Socket[] = [];
  let received = 0;
  const server = createServer((socket) => {
    sockets.push(socket);
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
    });
    socket.pipe(socket);
  });
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no TCP address');
  return { port: address.port, sockets, receivedBytes: () => received };
}

/** A port nothing listens on: bound by the OS, then released. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no TCP address');
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return address.port;
}

interface Client {
  socket: Socket;
  /** Everything received so far, concatenated. */
  received(): Buffer;
  /** Resolves once at least `length` bytes have been received. */
  receive(length: number): Promise<Buffer>;
  closed: Promise<void>;
}

/** Connects to 127.0.0.1:port and collects what arrives; destroyed in teardown. */
async function connectClient(t: Teardown, port: number): Promise<Client> {
  const socket = connect({ port, host: '127.0.0.1' });
  t.teardown(() => {
    socket.destroy();
  });
  // A cut may surface as ECONNRESET; the tests assert on 'close', which always follows.
  socket.on('error', () => {});
  const chunks: Buffer[] = [];
  let total = 0;
  let waiter: { length: number; resolve: () => void } | undefined;
  socket.on('data', (chunk: Buffer) => {
    chunks.push(chunk);
    total += chunk.length;
    if (waiter !== undefined && total >= waiter.length) waiter.resolve();
  });
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('close', () => reject(new Error('closed before connect')));
  });
  const received = (): Buffer => Buffer.concat(chunks);
  return {
    socket,
    received,
    closed,
    receive: (length) =>
      new Promise<Buffer>((resolve, reject) => {
        if (total >= length) return resolve(received());
        waiter = { length, resolve: () => resolve(received()) };
        void closed.then(() => reject(new Error(`closed after ${total} of ${length} bytes`)));
      }),
  };
}

/** Event-driven state (e.g. a socket closing inside the proxy) settles within a few turns. */
async function until(condition: () => boolean, what: string, timeoutMs = 1000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

const delay = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const options = { timeout: 5000 };

t.test('forwards both ways, counts bytes and connections', options, async (t) => {
  const echo = await startEchoServer(t);
  const proxy = await startTcpProxy(t, echo.port);
  t.equal(proxy.connectionCount, 0);

  const client = await connectClient(t, proxy.port);
  client.socket.write('hello');
  t.equal((await client.receive(5)).toString(), 'hello');
  t.equal(proxy.bytesUp, 5);
  t.equal(proxy.bytesDown, 5);
  t.equal(proxy.connectionCount, 1);
  t.equal(proxy.acceptedCount, 1);

  // Large enough to fill socket buffers, so the drain path of the backpressure is taken.
  proxy.resetCounters();
  t.equal(proxy.bytesUp, 0);
  const payload = Buffer.alloc(4 << 20);
  for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
  client.socket.write(payload);
  const echoed = await client.receive(5 + payload.length);
  t.ok(echoed.subarray(5).equals(payload), 'payload echoed intact and in order');
  t.equal(proxy.bytesUp, payload.length);
  t.equal(proxy.bytesDown, payload.length);

  // A clean half-close travels through: the server ends in turn, then both proxy sockets close.
  client.socket.end();
  await client.closed;
  await until(() => proxy.connectionCount === 0, 'the proxied connection to close');
  t.equal(proxy.acceptedCount, 1);
});

t.test('cut() closes both ends; new connections still go through', options, async (t) => {
  const echo = await startEchoServer(t);
  const proxy = await startTcpProxy(t, echo.port);
  const client = await connectClient(t, proxy.port);
  client.socket.write('ping');
  await client.receive(4);
  const serverSide = echo.sockets[0]!;
  const serverClosed = new Promise<void>((resolve) => serverSide.once('close', () => resolve()));

  proxy.cut();
  await Promise.all([client.closed, serverClosed]);
  t.pass('client and server both saw close');
  await until(() => proxy.connectionCount === 0, 'the proxy to forget the connection');

  const again = await connectClient(t, proxy.port);
  again.socket.write('pong');
  t.equal((await again.receive(4)).toString(), 'pong');
  t.equal(proxy.acceptedCount, 2);
  t.equal(proxy.connectionCount, 1);
});

t.test('refuse() accepts then drops new connections, leaves existing ones', options, async (t) => {
  const echo = await startEchoServer(t);
  const proxy = await startTcpProxy(t, echo.port);
  const existing = await connectClient(t, proxy.port);
  existing.socket.write('a');
  await existing.receive(1);

  proxy.refuse(true);
  const refused = await connectClient(t, proxy.port);
  await refused.closed;
  t.equal(refused.received().length, 0, 'nothing received');
  t.equal(proxy.acceptedCount, 2, 'the refused connection was accepted');
  t.equal(echo.sockets.length, 1, 'the target never saw it');
  t.equal(proxy.connectionCount, 1);

  existing.socket.write('b');
  t.equal((await existing.receive(2)).toString(), 'ab', 'the existing connection still works');

  proxy.refuse(false);
  const accepted = await connectClient(t, proxy.port);
  accepted.socket.write('c');
  t.equal((await accepted.receive(1)).toString(), 'c');
  t.equal(echo.sockets.length, 2);
});

t.test('stall() holds data without buffering it; resume() delivers it in order', options, async (t) => {
  const echo = await startEchoServer(t);
  const proxy = await startTcpProxy(t, echo.port);
  const client = await connectClient(t, proxy.port);
  client.socket.write('x');
  await client.receive(1);
  proxy.resetCounters();

  proxy.stall();
  // A connection opened while stalled is accepted and connected, but forwards nothing either.
  const late = await connectClient(t, proxy.port);
  late.socket.write('late');
  client.socket.write('one');
  client.socket.write('two');
  // More than the kernel buffers on both sides can hold while the proxy reads nothing.
  const payload = Buffer.alloc(16 << 20);
  for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
  client.socket.write(payload);
  await delay(100);
  t.equal(echo.receivedBytes(), 1, 'nothing reached the server while stalled');
  t.equal(proxy.bytesUp, 0);
  t.equal(client.received().toString(), 'x');
  t.equal(late.received().length, 0);
  t.ok(client.socket.writableLength > 0, 'the rest waits in the client: the proxy does not absorb it');

  proxy.resume();
  const echoed = await client.receive(1 + 6 + payload.length);
  t.equal(echoed.subarray(0, 7).toString(), 'xonetwo');
  t.ok(echoed.subarray(7).equals(payload), 'held data delivered intact and in order');
  t.equal((await late.receive(4)).toString(), 'late');
  t.equal(proxy.bytesUp, 6 + payload.length + 4);
  t.equal(proxy.bytesDown, proxy.bytesUp);
});

t.test('setTarget() sends new connections to another server', options, async (t) => {
  const first = await startEchoServer(t);
  const second = await startEchoServer(t);
  const proxy = await startTcpProxy(t, first.port);
  const old = await connectClient(t, proxy.port);
  old.socket.write('1');
  await old.receive(1);

  proxy.setTarget(second.port);
  const moved = await connectClient(t, proxy.port);
  moved.socket.write('2');
  t.equal((await moved.receive(1)).toString(), '2');
  t.equal(second.sockets.length, 1, 'the new connection reached the second server');
  t.equal(second.receivedBytes(), 1);

  old.socket.write('3');
  t.equal((await old.receive(2)).toString(), '13', 'the old connection stays with the first server');
  t.equal(first.sockets.length, 1);
  t.equal(first.receivedBytes(), 2);
});

t.test('an unreachable target (ECONNREFUSED) destroys the client side', options, async (t) => {
  const proxy = await startTcpProxy(t, await closedPort());
  const client = await connectClient(t, proxy.port);
  client.socket.write('lost');
  await client.closed;
  t.equal(client.received().length, 0);
  t.equal(proxy.bytesUp, 0, 'nothing was forwarded');
  t.equal(proxy.acceptedCount, 1);
  await until(() => proxy.connectionCount === 0, 'the failed connection to be dropped');
});

t.test('close() leaves nothing open', options, async (t) => {
  const echo = await startEchoServer(t);
  const proxy = await startTcpProxy(t, echo.port);
  const clients = [await connectClient(t, proxy.port), await connectClient(t, proxy.port)];
  for (const client of clients) {
    client.socket.write('hi');
    await client.receive(2);
  }
  proxy.stall(); // a stalled connection is closed all the same
  const serverClosed = echo.sockets.map((socket) => new Promise<void>((resolve) => socket.once('close', () => resolve())));

  await proxy.close();
  t.equal(proxy.connectionCount, 0, 'close() resolves once every proxied socket has closed');
  await Promise.all([...clients.map((client) => client.closed), ...serverClosed]);
  t.pass('clients and server sockets all closed');

  const refused = connect({ port: proxy.port, host: '127.0.0.1' });
  const error = await new Promise<NodeJS.ErrnoException>((resolve) => refused.once('error', resolve));
  t.equal(error.code, 'ECONNREFUSED', 'the listener is gone');
  await proxy.close(); // idempotent: teardown calls it again
});
