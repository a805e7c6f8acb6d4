// Peers against a real daemon: validation, persistence across a restart, and the secret staying
// out of every reply, the state dir and the log.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { daemonPaths, spawnDaemon, startDaemon, type RunningDaemon } from '../helpers/daemon';

const secretText = 'correct-horse-battery-staple-0123456789';

function writeSecret(dir: string, name: string, content: string, mode = 0o600): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, content, { mode });
  fs.chmodSync(file, mode);
  return file;
}

function peersOnDisk(daemon: RunningDaemon): any {
  return JSON.parse(fs.readFileSync(path.join(daemon.paths.stateDir, 'peers.json'), 'utf8'));
}

t.test('peer add, list, info, remove; persisted across a restart', async (t) => {
  const paths = daemonPaths(t);
  const daemon = await startDaemon(t, { paths });
  const secretFile = writeSecret(paths.dir, 'hostB.key', secretText + '\n');

  const added = await daemon.request('peer.add', { name: 'hostB', address: '127.0.0.1:7802', secretFile });
  t.match(added, { name: 'hostB', address: '127.0.0.1:7802', host: '127.0.0.1', port: 7802, secretFile });
  t.notOk('secretFileError' in added);
  t.match(added.createdAt, /^\d{4}-\d\d-\d\dT/);
  const v6 = await daemon.request('peer.add', { name: 'host.c', address: '[::1]:7803', secretFile });
  t.match(v6, { host: '::1', port: 7803 });

  t.same((await daemon.request('peer.list')).peers.map((peer: { name: string }) => peer.name), ['hostB', 'host.c']);
  t.same(await daemon.request('peer.info', { name: 'hostB' }), added);
  t.equal((await daemon.request('status')).peers, 2);

  const onDisk = peersOnDisk(daemon);
  t.equal(onDisk.version, 1);
  t.same(onDisk.peers.map((peer: { name: string }) => peer.name), ['hostB', 'host.c']);
  t.equal(fs.statSync(path.join(paths.stateDir, 'peers.json')).mode & 0o777, 0o640);

  t.same(await daemon.stop(), { code: 0, signal: null });
  const stateText = fs.readFileSync(path.join(paths.stateDir, 'peers.json'), 'utf8');
  t.notMatch(stateText, secretText, 'the secret is not in the state dir');
  t.notMatch(daemon.stdout + daemon.stderr, secretText, 'the secret is not logged');

  const restarted = await startDaemon(t, { paths });
  t.same(await restarted.request('peer.info', { name: 'hostB' }), added, 'reloaded after restart');
  t.same(await restarted.request('peer.remove', { name: 'hostB' }), { name: 'hostB' });
  t.same((await restarted.request('peer.list')).peers.map((peer: { name: string }) => peer.name), ['host.c']);
  await t.rejects(restarted.request('peer.info', { name: 'hostB' }), { code: 'BM_ERR_PEER_NOT_FOUND' });
  await t.rejects(restarted.request('peer.remove', { name: 'hostB' }), { code: 'BM_ERR_PEER_NOT_FOUND' });
  t.same(peersOnDisk(restarted).peers.map((peer: { name: string }) => peer.name), ['host.c']);
  t.ok(fs.existsSync(secretFile), 'remove does not touch the secret file');
});

t.test('peer.add errors carry stable codes and change nothing', async (t) => {
  const daemon = await startDaemon(t);
  const dir = daemon.paths.dir;
  const good = writeSecret(dir, 'good.key', secretText);
  await daemon.request('peer.add', { name: 'p0', address: 'peer.example:7801', secretFile: good });

  await t.rejects(daemon.request('peer.add', { name: 'p0', address: '127.0.0.1:7801', secretFile: good }), { code: 'BM_ERR_PEER_EXISTS' });
  for (const address of ['127.0.0.1', '127.0.0.1:0', '127.0.0.1:65536', ':7801', 'host:port', '::1:7801', 'a b:1']) {
    await t.rejects(daemon.request('peer.add', { name: 'p1', address, secretFile: good }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^address: / }, address);
  }
  await t.rejects(daemon.request('peer.add', { name: '../x', address: '127.0.0.1:1', secretFile: good }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^name: / });
  await t.rejects(daemon.request('peer.add', { name: 'p1', address: '127.0.0.1:1', secretFile: 'relative.key' }), {
    code: 'BM_ERR_INVALID_ARGUMENT',
    message: /^secretFile: /,
  });

  await t.rejects(daemon.request('peer.add', { name: 'p1', address: '127.0.0.1:1', secretFile: path.join(dir, 'absent.key') }), {
    code: 'BM_ERR_SECRET_FILE',
    message: /absent\.key: ENOENT/,
  });
  const open = writeSecret(dir, 'open.key', secretText, 0o644);
  await t.rejects(daemon.request('peer.add', { name: 'p1', address: '127.0.0.1:1', secretFile: open }), {
    code: 'BM_ERR_SECRET_FILE',
    message: /accessible by group or others \(mode 644\); chmod 600/,
  });
  const short = writeSecret(dir, 'short.key', 'tooshort\n');
  await t.rejects(daemon.request('peer.add', { name: 'p1', address: '127.0.0.1:1', secretFile: short }), {
    code: 'BM_ERR_SECRET_FILE',
    message: /holds 8 bytes; a secret needs at least 16/,
  });
  await t.rejects(daemon.request('peer.add', { name: 'p1', address: '127.0.0.1:1', secretFile: dir }), { code: 'BM_ERR_SECRET_FILE' }, 'a directory');

  t.same(peersOnDisk(daemon).peers.map((peer: { name: string }) => peer.name), ['p0']);
  t.equal((await daemon.request('status')).peers, 1);
});

t.test('a secret file that became unusable is reported, not fatal', async (t) => {
  const paths = daemonPaths(t);
  const daemon = await startDaemon(t, { paths });
  const secretFile = writeSecret(paths.dir, 'rotating.key', secretText);
  await daemon.request('peer.add', { name: 'p0', address: '127.0.0.1:7801', secretFile });
  fs.chmodSync(secretFile, 0o640);
  t.match((await daemon.request('peer.info', { name: 'p0' })).secretFileError, /accessible by group or others/);
  t.same(await daemon.stop(), { code: 0, signal: null });

  const restarted = await startDaemon(t, { paths });
  t.match((await restarted.request('peer.info', { name: 'p0' })).secretFileError, /accessible by group or others/);
  t.ok(restarted.logs().some((line) => line.msg === 'peer secret file is not usable' && line.peer === 'p0'));
  fs.chmodSync(secretFile, 0o600);
  t.notOk('secretFileError' in (await restarted.request('peer.info', { name: 'p0' })));
});

t.test('a damaged peers.json stops the daemon with BM_ERR_STATE_CORRUPT', async (t) => {
  const paths = daemonPaths(t);
  fs.mkdirSync(paths.stateDir, { recursive: true });
  fs.writeFileSync(path.join(paths.stateDir, 'peers.json'), JSON.stringify({ version: 1, peers: [{ name: 'p', address: 'x:0', secretFile: '/k', createdAt: '2026-01-01T00:00:00.000Z' }] }));
  const daemon = spawnDaemon(t, { paths });
  const exit = await daemon.exited;
  t.equal(exit.code, 1);
  t.match(daemon.stderr, /BM_ERR_STATE_CORRUPT: peer registry .*peers\.json: peers\[0\]\.address: /);
});

t.test('--listen is validated, listens, and is reported in status with the bound port', async (t) => {
  const daemon = await startDaemon(t, { args: ['--listen', '127.0.0.1:0'] });
  const status = await daemon.request('status');
  t.match(status.replicationListen, /^127\.0\.0\.1:[1-9]\d*$/);
  const port = Number(String(status.replicationListen).split(':')[1]);
  const connected = await new Promise<boolean>((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
  t.ok(connected, 'the replication port accepts connections');
  const plain = await startDaemon(t);
  t.equal((await plain.request('status')).replicationListen, null);

  const bad = spawnDaemon(t, { args: ['--listen', 'nowhere'] });
  t.equal((await bad.exited).code, 2);
  t.match(bad.stderr, /BM_ERR_INVALID_ARGUMENT: --listen: expected HOST:PORT/);
});
