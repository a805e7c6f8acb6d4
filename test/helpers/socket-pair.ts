// A connected pair of sockets over a Unix socket in a fresh directory, torn down with the test.

import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

interface Teardown {
  teardown(fn: () => unknown): void;
}

/** [accepted side, client side]; both destroyed and the directory removed in teardown. */
export async function socketPair(t: Teardown): Promise<[net.Socket, net.Socket]> {
  const dir = mkdtempSync(path.join(tmpdir(), 'bm-pair-'));
  const socketPath = path.join(dir, 's.sock');
  const server = net.createServer();
  const acceptedP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  const client = net.connect(socketPath);
  const accepted = await acceptedP;
  t.teardown(() => {
    client.destroy();
    accepted.destroy();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return [accepted, client];
}
