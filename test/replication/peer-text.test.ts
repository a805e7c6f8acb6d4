// Text a peer sends (an Error frame's message) ends up in the mirror's ERROR reason, which
// mirrors.json keeps. Whatever its length, it must be cut before it gets there: one over-long
// reason used to fail every later save of mirrors.json (every mirror add, reset, resume).
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { encodeFrame, wireMessage } from '../../src/wire/index';
import { runCli, startDaemon } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';

const MiB = 1024 * 1024;

t.test('a peer refusing with a 60,000-character message (the 64 KiB header allows it): ERROR with a bounded reason, mirrors.json still writable', async (t) => {
  // Something at the peer's address that answers every connection with an Error frame.
  const listener = net.createServer((socket) => {
    socket.on('error', () => undefined);
    socket.resume(); // reads to the daemon's FIN, so the socket closes and listener.close() can finish
    socket.end(Buffer.concat(encodeFrame(wireMessage('error', { code: 'ERROR_CODE_AUTH_FAILED', message: 'x'.repeat(60_000) }))));
  });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => listener.close(() => resolve())));
  const port = (listener.address() as net.AddressInfo).port;

  const daemon = await startDaemon(t, { args: ['--node-name', 'hostA'] });
  const secretFile = path.join(daemon.paths.dir, 'hostB.key');
  fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  const cli = async (...args: string[]) => {
    const result = await runCli(['--socket', daemon.paths.controlSocket, '--json', ...args]);
    return { ...result, json: result.code === 0 ? JSON.parse(result.stdout) : undefined };
  };
  t.equal((await cli('peer', 'add', 'hostB', '--address', `127.0.0.1:${port}`, '--secret-file', secretFile)).code, 0);
  t.equal((await cli('volume', 'add', 'vol0', '--device', scratchDevice(t, MiB).path)).code, 0);
  t.equal((await cli('volume', 'add', 'vol1', '--device', scratchDevice(t, MiB).path)).code, 0);
  t.equal((await cli('mirror', 'add', 'vol0', '--peer', 'hostB', '--target', 'vol0')).code, 0);

  let status: any;
  const deadline = Date.now() + 15_000;
  do {
    await new Promise((resolve) => setTimeout(resolve, 50));
    status = (await cli('mirror', 'status', 'vol0')).json?.mirrors?.[0];
  } while (status?.state !== 'ERROR' && Date.now() < deadline);
  t.equal(status?.state, 'ERROR', `the refusal is severe: ERROR (${JSON.stringify({ state: status?.state, cause: status?.cause, error: status?.error }).slice(0, 400)})`);
  t.ok(status.error.reason.length <= 4096, `the reason is bounded (${status.error.reason.length} characters)`);

  const added = await cli('mirror', 'add', 'vol1', '--peer', 'hostB', '--target', 'vol1');
  t.equal(added.code, 0, `another mirror can still be added: ${added.stderr}`);
  const saved = JSON.parse(fs.readFileSync(path.join(daemon.paths.stateDir, 'mirrors.json'), 'utf8'));
  t.equal(saved.mirrors.length, 2, 'and both are in mirrors.json');
});
