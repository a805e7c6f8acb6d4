import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pino from 'pino';
import t from 'tap';
import * as P from '../../src/nbd/protocol';
import { NbdServer } from '../../src/nbd/server';
import { MemoryBackend } from '../helpers/memory-backend';
import { NbdTestClient } from '../helpers/nbd-client';
import { MiB, startServer, waitFor } from './fixture';

function makeServer(t: { teardown(fn: () => unknown): void }, options: Partial<ConstructorParameters<typeof NbdServer>[0]> = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'bm-nbd-srv-'));
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const nbdExport = { name: 'vol0', description: 'v', backend };
  const server = new NbdServer({
    lookupExport: (name) => (name === 'vol0' ? nbdExport : undefined),
    listExports: () => [nbdExport],
    logger: pino({ level: 'silent' }),
    ...options,
  });
  t.teardown(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { server, dir, backend };
}

t.test('listenUnix: socket mode 0660, stale socket replaced, other files refused, removed on close', async (t) => {
  const { server, dir } = makeServer(t);
  const socketPath = path.join(dir, 'nbd.sock');
  // A stale socket file, as a crashed daemon leaves it: bound by a process that exited.
  await new Promise<void>((resolve, reject) =>
    execFile('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', socketPath], (error) =>
      error === null ? resolve() : reject(error),
    ),
  );
  t.ok(statSync(socketPath).isSocket(), 'stale socket file exists');
  await server.listenUnix(socketPath);
  t.equal(statSync(socketPath).mode & 0o777, 0o660);
  const { client } = await NbdTestClient.open(socketPath, 'vol0');
  await client.disconnect();

  const filePath = path.join(dir, 'not-a-socket');
  writeFileSync(filePath, 'data');
  await t.rejects(server.listenUnix(filePath), { code: 'BM_ERR_NBD_SOCKET_PATH_IN_USE' });

  await server.close();
  t.notOk(existsSync(socketPath), 'socket file removed on close');
  await t.rejects(server.listenUnix(socketPath), { code: 'BM_ERR_NBD_SERVER_CLOSED' });
});

t.test('listenTcp on port 0 serves a real client', async (t) => {
  const { server, backend } = makeServer(t);
  const port = await server.listenTcp('127.0.0.1', 0);
  t.ok(port > 0);
  backend.data.fill(0x42, 0, 65536);
  const result = await new Promise<{ code: number; out: string }>((resolve) => {
    execFile('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x42 0 64k', `nbd://127.0.0.1:${port}/vol0`], { timeout: 20_000 }, (error, stdout, stderr) =>
      resolve({ code: error === null ? 0 : 1, out: `${stdout}${stderr}` }),
    );
  });
  if (result.code !== 0) t.comment(result.out);
  t.equal(result.code, 0, 'qemu-io over TCP exited 0');
  t.notMatch(result.out, /Pattern verification failed/, 'pattern verified');
});

t.test('listenTcp with the raw client: NO_DELAY path, export by name', async (t) => {
  const { server } = makeServer(t);
  const port = await server.listenTcp('127.0.0.1', 0);
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  const greeting = await new Promise<Buffer>((resolve) => socket.once('data', resolve));
  t.equal(greeting.readUInt16BE(16), P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  socket.destroy();
});

t.test('invalid options are refused with a stable code', async (t) => {
  const logger = pino({ level: 'silent' });
  const base = { lookupExport: () => undefined, listExports: () => [], logger };
  t.throws(() => new NbdServer({ ...base, maxPayloadBytes: 100 }), { code: 'BM_ERR_NBD_INVALID_OPTION' });
  t.throws(() => new NbdServer({ ...base, maxInFlightRequestsPerConnection: 0 }), { code: 'BM_ERR_NBD_INVALID_OPTION' });
  t.throws(() => new NbdServer({ ...base, maxInFlightBytesPerConnection: 1.5 }), { code: 'BM_ERR_NBD_INVALID_OPTION' });
  t.throws(() => new NbdServer({ ...base, maxConnections: 0 }), { code: 'BM_ERR_NBD_INVALID_OPTION' });
  t.throws(() => new NbdServer({ ...base, maxPooledPayloadBytes: -1 }), { code: 'BM_ERR_NBD_INVALID_OPTION' });
});

t.test('maxConnections bounds handshaking plus transmitting connections', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: MiB }], { maxConnections: 2 });
  const transmitting = await NbdTestClient.open(fx.socketPath, 'vol0');
  const handshaking = await NbdTestClient.connect(fx.socketPath);
  await handshaking.readGreeting();

  const refused = await NbdTestClient.connect(fx.socketPath);
  await refused.closed;
  t.equal(refused.unreadBytes, 0, 'the third connection is closed before the greeting');
  const refusedAgain = await NbdTestClient.connect(fx.socketPath);
  await refusedAgain.closed;
  const warnings = fx.logs.filter((l) => l.msg === 'nbd connection limit reached, refusing new connections');
  t.equal(warnings.length, 1, 'one warning per interval, not one per refused socket');
  t.equal(warnings[0]?.maxConnections, 2);
  t.equal(warnings[0]?.level, 40, 'logged at warn');

  t.notOk(handshaking.isClosed, 'connections under the bound are untouched');
  t.equal((await transmitting.client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 })).error, 0);

  // A slot freed by a closed connection can be used again.
  await transmitting.client.disconnect();
  await waitFor(() => fx.server.connectionCount() === 0, 2000, 'the transmitting connection to close');
  const again = await NbdTestClient.open(fx.socketPath, 'vol0');
  t.equal(fx.server.connectionCount(), 1);
  await again.client.disconnect();
  handshaking.destroy();
});
