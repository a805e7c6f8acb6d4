// Control methods against a real daemon and real devices (loop devices as root, files otherwise).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { haveTool, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';

const deviceBytes = 8 * 1024 * 1024;
const haveQemuIo = haveTool('qemu-io');

function registryNames(daemon: RunningDaemon): string[] {
  const registry = JSON.parse(fs.readFileSync(path.join(daemon.paths.stateDir, 'volumes.json'), 'utf8'));
  return registry.volumes.map((volume: { name: string }) => volume.name);
}

t.test('add, list, info, remove; the registry follows every change', async (t) => {
  const daemon = await startDaemon(t, { args: ['--nbd-listen', '127.0.0.1:0'] });
  const a = scratchDevice(t, deviceBytes);
  const b = scratchDevice(t, deviceBytes * 2);
  const added = await daemon.request('volume.add', { name: 'vol-a', device: a.path });
  t.match(added, {
    name: 'vol-a',
    device: a.path,
    readOnly: false,
    state: 'online',
    sizeBytes: deviceBytes,
    connections: 0,
    nbdUri: `nbd+unix:///vol-a?socket=${daemon.paths.nbdSocket}`,
  });
  t.match(added.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  t.ok(added.logicalSectorBytes >= 512);
  t.ok(added.physicalSectorBytes >= added.logicalSectorBytes);
  const status = await daemon.request('status');
  t.match(status.nbdListen, /^127\.0\.0\.1:\d+$/);
  t.equal(added.nbdTcpUri, `nbd://${status.nbdListen}/vol-a`);
  t.same(registryNames(daemon), ['vol-a']);

  const second = await daemon.request('volume.add', { name: 'vol.b_2', device: b.path, readOnly: true });
  t.equal(second.readOnly, true);
  t.not(second.uuid, added.uuid);
  t.same(registryNames(daemon), ['vol-a', 'vol.b_2']);

  const list = await daemon.request('volume.list');
  t.same(list.volumes.map((volume: { name: string }) => volume.name), ['vol-a', 'vol.b_2']);
  t.same(await daemon.request('volume.info', { name: 'vol-a' }), added);

  const removed = await daemon.request('volume.remove', { name: 'vol-a' });
  t.same(removed, { name: 'vol-a', uuid: added.uuid, disconnected: 0 });
  t.same(registryNames(daemon), ['vol.b_2']);
  await t.rejects(daemon.request('volume.info', { name: 'vol-a' }), { code: 'BM_ERR_VOLUME_NOT_FOUND' });
  // The device is free again: it can be added back.
  const again = await daemon.request('volume.add', { name: 'vol-a', device: a.path });
  t.not(again.uuid, added.uuid, 'a re-added volume gets a new uuid');
  t.same(await daemon.stop(), { code: 0, signal: null });
});

t.test('add errors carry stable codes and change nothing', async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  await daemon.request('volume.add', { name: 'vol0', device: device.path });
  const other = scratchDevice(t, deviceBytes);

  await t.rejects(daemon.request('volume.add', { name: 'vol0', device: other.path }), { code: 'BM_ERR_VOLUME_EXISTS' });
  await t.rejects(daemon.request('volume.add', { name: 'vol1', device: device.path }), {
    code: 'BM_ERR_DEVICE_IN_USE',
    message: /already used by volume vol0/,
  });
  const alias = path.join(daemon.paths.dir, 'alias');
  fs.symlinkSync(device.path, alias);
  await t.rejects(daemon.request('volume.add', { name: 'vol1', device: alias }), { code: 'BM_ERR_DEVICE_IN_USE' }, 'same device under another path');
  await t.rejects(daemon.request('volume.add', { name: 'vol1', device: path.join(daemon.paths.dir, 'no-such-device') }), {
    code: 'BM_ERR_DEVICE_NOT_FOUND',
    message: /ENOENT \(no such file or directory\)/i,
  });
  await t.rejects(daemon.request('volume.add', { name: 'vol1', device: daemon.paths.dir }), { code: 'BM_ERR_DEVICE_OPEN' }, 'a directory is not a device');
  await t.rejects(daemon.request('volume.add', { name: '../etc', device: other.path }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^name: / });
  await t.rejects(daemon.request('volume.remove', { name: 'nope' }), { code: 'BM_ERR_VOLUME_NOT_FOUND' });
  t.same(registryNames(daemon), ['vol0']);
  t.equal((await daemon.request('status')).volumes, 1);
});

t.test('a block device opened exclusively elsewhere is BM_ERR_DEVICE_IN_USE', { skip: process.getuid?.() === 0 ? false : 'needs root for loop devices' }, async (t) => {
  const first = await startDaemon(t);
  const second = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  t.ok(device.isLoop);
  await first.request('volume.add', { name: 'vol0', device: device.path });
  // The other daemon's O_EXCL open fails with EBUSY.
  await t.rejects(second.request('volume.add', { name: 'vol0', device: device.path }), { code: 'BM_ERR_DEVICE_IN_USE', message: /EBUSY/ });
});

/** qemu-io in interactive mode keeps its NBD connection open until stdin closes. */
function holdNbdConnection(t: Parameters<typeof startDaemon>[0], uri: string) {
  const child = spawn('qemu-io', ['-f', 'raw', uri], { stdio: ['pipe', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      process.kill(child.pid, 'SIGKILL');
      await exited;
    }
  });
  return { child, exited };
}

async function waitForConnections(daemon: RunningDaemon, name: string, count: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  while ((await daemon.request('volume.info', { name })).connections !== count) {
    if (Date.now() > deadline) throw new Error(`volume ${name} never reached ${count} connection(s)`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

t.test('remove with a connected NBD client: refused, then forced', { skip: haveQemuIo ? false : 'qemu-io not installed' }, async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  const added = await daemon.request('volume.add', { name: 'vol0', device: device.path });
  const client = holdNbdConnection(t, added.nbdUri);
  await waitForConnections(daemon, 'vol0', 1);
  t.equal((await daemon.request('status')).connections, 1);

  await t.rejects(daemon.request('volume.remove', { name: 'vol0' }), { code: 'BM_ERR_VOLUME_BUSY', message: /1 NBD connection/ });
  await t.rejects(daemon.request('volume.remove', { name: 'vol0', force: false }), { code: 'BM_ERR_VOLUME_BUSY' });
  t.same(registryNames(daemon), ['vol0'], 'still registered');
  t.equal((await daemon.request('volume.info', { name: 'vol0' })).connections, 1, 'client still connected');

  const removed = await daemon.request('volume.remove', { name: 'vol0', force: true });
  t.equal(removed.disconnected, 1);
  t.same(registryNames(daemon), []);
  t.equal((await daemon.request('status')).connections, 0);
  client.child.stdin.end('quit\n');
  await client.exited;
  t.same(await daemon.stop(), { code: 0, signal: null });
});

t.test('SIGTERM with a connected client still exits 0', { skip: haveQemuIo ? false : 'qemu-io not installed' }, async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  const added = await daemon.request('volume.add', { name: 'vol0', device: device.path });
  holdNbdConnection(t, added.nbdUri);
  await waitForConnections(daemon, 'vol0', 1);
  t.same(await daemon.stop('SIGTERM'), { code: 0, signal: null });
  t.notOk(fs.existsSync(daemon.paths.nbdSocket));
});
