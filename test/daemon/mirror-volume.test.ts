// Mirror volumes: the target of replication. NBD clients get a read-only export (EPERM on every
// write command) while the daemon keeps the device open read-write and exclusively, and the
// mirror service's own write path (Volume.mirrorWrite) still reaches the device.
import fs from 'node:fs';
import pino from 'pino';
import t from 'tap';
import { Volume } from '../../src/volume/volume';
import * as P from '../../src/nbd/protocol';
import { daemonPaths, haveTool, runCli, runTool, startDaemon } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';
import { NbdTestClient } from '../helpers/nbd-client';

const deviceBytes = 8 * 1024 * 1024;
const logger = pino({ level: 'silent' });

t.test('a mirror volume refuses client writes with EPERM, reads work, the role persists', async (t) => {
  const paths = daemonPaths(t);
  const daemon = await startDaemon(t, { paths });
  const device = scratchDevice(t, deviceBytes);
  // Known content, so reads through NBD can be checked.
  const pattern = Buffer.alloc(65536, 0x5a);
  fs.writeFileSync(device.backingFile, pattern, { flag: 'r+' });

  const added = await daemon.request('volume.add', { name: 'm0', device: device.path, role: 'mirror' });
  t.match(added, { name: 'm0', role: 'mirror', readOnly: false, state: 'online', sizeBytes: deviceBytes });
  const primary = await daemon.request('volume.add', { name: 'p0', device: scratchDevice(t, deviceBytes).path });
  t.equal(primary.role, 'primary', 'role defaults to primary');

  const { client, transmissionFlags } = await NbdTestClient.open(paths.nbdSocket, 'm0', { structured: true });
  t.ok(transmissionFlags & P.NBD_FLAG_READ_ONLY, 'NBD_FLAG_READ_ONLY advertised');
  t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(4096, 1) })).error, P.NBD_EPERM);
  t.equal((await client.request({ type: P.NBD_CMD_TRIM, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EPERM);
  t.equal((await client.request({ type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EPERM);
  const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 65536 });
  t.equal(read.error, 0);
  t.ok(read.data?.equals(pattern), 'reads return the device content');
  t.equal((await client.request({ type: P.NBD_CMD_FLUSH })).error, 0, 'flush is allowed');
  await client.disconnect();
  t.ok(fs.readFileSync(device.backingFile).subarray(0, 65536).equals(pattern), 'device unchanged');

  if (device.isLoop) {
    // The daemon holds the device exclusively: nobody else may open it O_EXCL (mount, mkfs, ...).
    t.throws(() => fs.openSync(device.path, fs.constants.O_RDWR | fs.constants.O_EXCL), { code: 'EBUSY' });
  }

  t.same(await daemon.stop(), { code: 0, signal: null });
  const registry = JSON.parse(fs.readFileSync(`${paths.stateDir}/volumes.json`, 'utf8'));
  t.same(registry.volumes.map((volume: { name: string; role: string }) => [volume.name, volume.role]), [['m0', 'mirror'], ['p0', 'primary']]);

  const restarted = await startDaemon(t, { paths });
  const info = await restarted.request('volume.info', { name: 'm0' });
  t.match(info, { role: 'mirror', readOnly: false, state: 'online', uuid: added.uuid }, 'role persisted across restart');
  const again = await NbdTestClient.open(paths.nbdSocket, 'm0', { structured: true });
  t.ok(again.transmissionFlags & P.NBD_FLAG_READ_ONLY, 'still read-only to clients after restart');
  t.equal((await again.client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(512, 1) })).error, P.NBD_EPERM);
  await again.client.disconnect();
});

t.test('real clients: nbdinfo sees a read-only export, qemu-io cannot write', { skip: haveTool('qemu-io') && haveTool('nbdinfo') ? false : 'needs qemu-io and nbdinfo' }, async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  const added = await daemon.request('volume.add', { name: 'm0', device: device.path, role: 'mirror' });

  const nbdinfo = await runTool('nbdinfo', ['--json', added.nbdUri]);
  t.equal(nbdinfo.code, 0, nbdinfo.stderr);
  const exported = JSON.parse(nbdinfo.stdout).exports[0];
  t.equal(exported.is_read_only, true);
  t.equal(exported['export-size'], deviceBytes);

  const write = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', added.nbdUri]);
  t.not(write.code, 0, 'qemu-io write fails');
  t.match(write.stdout + write.stderr, /Operation not permitted|read-only|Permission denied/i);
  const readBack = await runTool('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 64k', added.nbdUri]);
  t.equal(readBack.code, 0, readBack.stderr);
  t.notMatch(readBack.stdout, /Pattern verification failed/);
  t.ok(fs.readFileSync(device.backingFile).subarray(0, 65536).equals(Buffer.alloc(65536)), 'device unchanged');
});

t.test('mirror and readOnly together are refused', async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  await t.rejects(daemon.request('volume.add', { name: 'm0', device: device.path, role: 'mirror', readOnly: true }), {
    code: 'BM_ERR_INVALID_ARGUMENT',
    message: /^readOnly: /,
  });
  await t.rejects(daemon.request('volume.add', { name: 'm0', device: device.path, role: 'secondary' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^role: / });
  t.same((await daemon.request('volume.list')).volumes, []);
});

t.test('CLI: volume add --mirror, info and list show the role', async (t) => {
  const daemon = await startDaemon(t);
  const socket = ['--socket', daemon.paths.controlSocket];
  const device = scratchDevice(t, deviceBytes);
  const add = await runCli([...socket, 'volume', 'add', 'm0', '--device', device.path, '--mirror']);
  t.equal(add.code, 0, add.stderr);
  t.match(add.stdout, /^role:\s+mirror$/m);
  t.match(add.stdout, /^mode:\s+read-only to clients \(mirror target\)$/m);
  const json = JSON.parse((await runCli([...socket, '--json', 'volume', 'info', 'm0'])).stdout);
  t.equal(json.role, 'mirror');
  const list = await runCli([...socket, 'volume', 'list']);
  t.match(list.stdout, /^m0\s+online\s+8\.0 MiB\s+mirror\s+0\s+/m);
  const both = await runCli([...socket, 'volume', 'add', 'm1', '--device', scratchDevice(t, deviceBytes).path, '--mirror', '--read-only']);
  t.equal(both.code, 1);
  t.match(both.stderr, /^blockmirror: BM_ERR_INVALID_ARGUMENT: readOnly: /);
});

t.test('Volume.mirrorWrite reaches the device; client writes do not', async (t) => {
  const device = scratchDevice(t, 1024 * 1024, { forceFile: true });
  const mirror = Volume.open({ name: 'm', uuid: 'u', devicePath: device.path, readOnly: false, role: 'mirror' }, logger);
  t.teardown(() => mirror.close());
  t.equal(mirror.info().readOnly, true, 'the NBD-facing backend reports read-only');
  await t.rejects(mirror.write(0, Buffer.alloc(4096, 1), false), { code: 'EPERM', message: /mirror volume/ });
  await t.rejects(mirror.trim(0, 4096, false), { code: 'EPERM' });
  await t.rejects(mirror.writeZeroes(0, 4096, { fua: false, noHole: false, fastZero: false }), { code: 'EPERM' });

  await mirror.mirrorWrite(4096, Buffer.alloc(8192, 0x77), true);
  await mirror.mirrorWrite(100, Buffer.from('unaligned'), false);
  // Ranges come from a peer: bad ones are input errors (EINVAL), not assertion failures.
  await t.rejects(mirror.mirrorWrite(1024 * 1024 - 100, Buffer.alloc(512), false), { code: 'EINVAL' });
  await t.rejects(mirror.mirrorWrite(0, Buffer.alloc(0), false), { code: 'EINVAL' });
  await t.rejects(mirror.mirrorWrite(-512, Buffer.alloc(512), false), { code: 'EINVAL' });
  await mirror.flush();
  const read = await mirror.read(0, 16384);
  t.ok(read.data.subarray(4096, 12288).equals(Buffer.alloc(8192, 0x77)));
  t.equal(read.data.subarray(100, 109).toString(), 'unaligned');
  read.release();
  const onDisk = fs.readFileSync(device.path);
  t.ok(onDisk.subarray(4096, 12288).equals(Buffer.alloc(8192, 0x77)), 'durable on the device');

  const primary = Volume.open({ name: 'p', uuid: 'u2', devicePath: scratchDevice(t, 1024 * 1024, { forceFile: true }).path, readOnly: false }, logger);
  t.teardown(() => primary.close());
  t.equal(primary.info().readOnly, false);
  await t.rejects(primary.mirrorWrite(0, Buffer.alloc(512), false), { code: 'EPERM', message: /not a mirror volume/ });
  await mirror.close();
  await t.rejects(mirror.mirrorWrite(0, Buffer.alloc(512), false), { code: 'ESHUTDOWN' });
});
