// blockmirrord as a process: start, lock, signals, sd_notify, restart with the registry.
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { daemonPaths, haveTool, runTool, spawnDaemon, startDaemon, startNotifyListener } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';

const deviceBytes = 16 * 1024 * 1024;
const haveQemuIo = haveTool('qemu-io');

t.test('starts, answers status, and SIGTERM exits 0 removing both sockets', async (t) => {
  const daemon = await startDaemon(t);
  const { paths } = daemon;
  const status = await daemon.request('status');
  t.equal(status.pid, daemon.pid);
  t.equal(status.controlSocket, paths.controlSocket);
  t.equal(status.nbdSocket, paths.nbdSocket);
  t.equal(status.stateDir, paths.stateDir);
  t.equal(status.volumes, 0);
  t.equal(status.nbdListen, null);
  t.type(status.version, 'string');
  t.type(status.ioEngine, 'string');
  t.equal(status.busyPoll.maxMicros, 32, 'busy polling up to 32 us by default');
  t.equal(fs.statSync(paths.controlSocket).mode & 0o777, 0o660);
  t.equal(fs.statSync(paths.nbdSocket).mode & 0o777, 0o660);
  t.equal(fs.statSync(paths.stateDir).mode & 0o777, 0o750);

  const exit = await daemon.stop('SIGTERM');
  t.same(exit, { code: 0, signal: null });
  t.notOk(fs.existsSync(paths.controlSocket), 'control socket removed');
  t.notOk(fs.existsSync(paths.nbdSocket), 'nbd socket removed');
  const messages = daemon.logs().map((line) => line.msg);
  t.ok(messages.includes('ready'));
  t.ok(messages.includes('stopped'));
  t.equal(daemon.stderr, '');
});

t.test('a control client that never reads its replies does not hold up SIGTERM', async (t) => {
  const daemon = await startDaemon(t);
  const client = net.connect(daemon.paths.controlSocket);
  client.on('error', () => undefined);
  await new Promise((resolve) => client.once('connect', resolve));
  client.pause(); // never reads
  const request = JSON.stringify({ id: 'x', method: 'status', params: {} }) + '\n';
  client.write(request.repeat(3000));
  await new Promise((resolve) => setTimeout(resolve, 500)); // replies fill every buffer on the way
  const started = Date.now();
  t.same(await daemon.stop('SIGTERM'), { code: 0, signal: null }, 'a clean stop (volumes closed, bitmaps saved)');
  const seconds = (Date.now() - started) / 1000;
  t.ok(seconds < 10, `within ${seconds.toFixed(1)} s, not at the 25 s shutdown bound`);
  client.destroy();
});

t.test('SIGINT also stops cleanly', async (t) => {
  const daemon = await startDaemon(t);
  t.same(await daemon.stop('SIGINT'), { code: 0, signal: null });
});

t.test('a second daemon on the same state dir is refused and the first keeps serving', async (t) => {
  const first = await startDaemon(t);
  const other = daemonPaths(t);
  const second = spawnDaemon(t, { paths: { ...other, stateDir: first.paths.stateDir } });
  const exit = await second.exited;
  t.equal(exit.code, 1);
  t.match(second.stderr, /^blockmirrord: BM_ERR_LOCKED: state dir .* is in use by another blockmirrord/);
  t.notOk(fs.existsSync(other.controlSocket), 'the refused daemon created no control socket');
  t.notOk(fs.existsSync(other.nbdSocket), 'the refused daemon created no NBD socket');
  t.ok(fs.existsSync(first.paths.nbdSocket), "the first daemon's NBD socket is untouched");
  t.equal((await first.request('status')).pid, first.pid);
});

t.test('a second daemon on the same control socket is refused without stealing it', async (t) => {
  const first = await startDaemon(t);
  const other = daemonPaths(t);
  const second = spawnDaemon(t, { paths: { ...other, controlSocket: first.paths.controlSocket } });
  const exit = await second.exited;
  t.equal(exit.code, 1);
  t.match(second.stderr, /BM_ERR_SOCKET_IN_USE/);
  t.equal((await first.request('status')).pid, first.pid, 'first daemon still answers on its socket');
  t.notOk(fs.existsSync(other.nbdSocket), 'the refused daemon removed the NBD socket it had created');
});

t.test('sd_notify: READY=1 with STATUS, WATCHDOG=1 pings, STOPPING=1 on SIGTERM', async (t) => {
  const paths = daemonPaths(t);
  const notify = await startNotifyListener(t, path.join(paths.dir, 'notify.sock'));
  const daemon = await startDaemon(t, { paths, env: { NOTIFY_SOCKET: notify.socketPath, WATCHDOG_USEC: '200000' } });
  const ready = await notify.waitFor((message) => message.includes('READY=1'));
  t.match(ready, /STATUS=serving 0 volume\(s\)/);
  await notify.waitFor((message) => message === 'WATCHDOG=1');
  // Pings keep coming every WATCHDOG_USEC/2 = 100 ms.
  await new Promise((resolve) => setTimeout(resolve, 350));
  t.ok(notify.messages().filter((message) => message === 'WATCHDOG=1').length >= 3, 'several watchdog pings');
  t.same(await daemon.stop('SIGTERM'), { code: 0, signal: null });
  await notify.waitFor((message) => message.startsWith('STOPPING=1'));
  const order = notify.messages().filter((message) => message !== 'WATCHDOG=1');
  t.match(order[0], /^READY=1/);
  t.match(order[order.length - 1], /^STOPPING=1/);
});

t.test('WATCHDOG_PID for another process disables pings', async (t) => {
  const paths = daemonPaths(t);
  const notify = await startNotifyListener(t, path.join(paths.dir, 'notify.sock'));
  const daemon = await startDaemon(t, { paths, env: { NOTIFY_SOCKET: notify.socketPath, WATCHDOG_USEC: '100000', WATCHDOG_PID: '1' } });
  await notify.waitFor((message) => message.includes('READY=1'));
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.equal(notify.messages().filter((message) => message === 'WATCHDOG=1').length, 0);
  await daemon.stop();
});

t.test('--busy-poll-us reaches the I/O engine: lone NBD writes are polled for and read back intact', { skip: haveQemuIo ? false : 'qemu-io not installed' }, async (t) => {
  const off = await startDaemon(t, { args: ['--busy-poll-us', '0'] });
  t.equal((await off.request('status')).busyPoll.maxMicros, 0);
  await off.stop();

  // 1000 us, not the default: on a loaded machine a 4k write may take longer than 32 us, and
  // then the adaptive budget would (rightly) stay at 0.
  const daemon = await startDaemon(t, { args: ['--busy-poll-us', '1000'] });
  const added = await daemon.request('volume.add', { name: 'vol0', device: scratchDevice(t, deviceBytes).path });
  const commands: string[] = [];
  for (let i = 0; i < 64; i++) commands.push('-c', `write -P ${i + 1} ${i * 4096} 4k`);
  const written = await runTool('qemu-io', ['-f', 'raw', ...commands, added.nbdUri]);
  t.equal(written.code, 0, written.stderr);
  const checks: string[] = [];
  for (let i = 0; i < 64; i++) checks.push('-c', `read -P ${i + 1} ${i * 4096} 4k`);
  const read = await runTool('qemu-io', ['-f', 'raw', '-r', ...checks, added.nbdUri]);
  t.equal(read.code, 0, read.stderr);
  t.notMatch(read.stdout, /Pattern verification failed/);
  const { busyPoll } = await daemon.request('status');
  t.equal(busyPoll.maxMicros, 1000);
  if ((await daemon.request('status')).ioEngine === 'io_uring') {
    t.ok(busyPoll.completionPolls > 0, `the 128 lone requests were polled for (${JSON.stringify(busyPoll)})`);
  }
  await daemon.stop();
});

t.test('restart keeps volumes (same uuid) and their data', { skip: haveQemuIo ? false : 'qemu-io not installed' }, async (t) => {
  const device = scratchDevice(t, deviceBytes);
  const paths = daemonPaths(t);
  const first = await startDaemon(t, { paths });
  const added = await first.request('volume.add', { name: 'vol0', device: device.path });
  t.equal(added.state, 'online');
  t.equal(added.sizeBytes, deviceBytes);
  const written = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'flush', added.nbdUri]);
  t.equal(written.code, 0, written.stderr);
  t.match(written.stdout, /wrote 1048576\/1048576 bytes/);
  t.same(await first.stop('SIGTERM'), { code: 0, signal: null });

  const registry = JSON.parse(fs.readFileSync(path.join(paths.stateDir, 'volumes.json'), 'utf8'));
  t.same(registry.volumes.map((volume: { name: string }) => volume.name), ['vol0']);

  const second = await startDaemon(t, { paths });
  const info = await second.request('volume.info', { name: 'vol0' });
  t.equal(info.uuid, added.uuid);
  t.equal(info.state, 'online');
  t.equal(info.device, device.path);
  t.equal(info.nbdUri, `nbd+unix:///vol0?socket=${paths.nbdSocket}`);
  const read = await runTool('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xab 0 1M', '-c', 'read -P 0 1M 1M', info.nbdUri]);
  t.equal(read.code, 0, read.stderr);
  t.notMatch(read.stdout, /Pattern verification failed/);
  t.match(read.stdout, /read 1048576\/1048576 bytes at offset 0/);
  t.same(await second.stop('SIGTERM'), { code: 0, signal: null });
});

t.test('a volume whose device is gone comes back in state error; the daemon still starts', async (t) => {
  const paths = daemonPaths(t);
  const kept = scratchDevice(t, deviceBytes);
  const doomedFile = path.join(paths.dir, 'doomed.img');
  fs.writeFileSync(doomedFile, '');
  fs.truncateSync(doomedFile, deviceBytes);
  const first = await startDaemon(t, { paths });
  await first.request('volume.add', { name: 'kept', device: kept.path });
  await first.request('volume.add', { name: 'doomed', device: doomedFile });
  await first.stop();
  fs.rmSync(doomedFile);

  const second = await startDaemon(t, { paths });
  const doomed = await second.request('volume.info', { name: 'doomed' });
  t.equal(doomed.state, 'error');
  t.match(doomed.reason, /^BM_ERR_DEVICE_NOT_FOUND: .*doomed\.img: ENOENT \(no such file or directory\)/i);
  t.equal(doomed.sizeBytes, null);
  t.equal((await second.request('volume.info', { name: 'kept' })).state, 'online');
  const status = await second.request('status');
  t.equal(status.volumes, 2);
  t.equal(status.volumesInError, 1);
  // Still removable, and the removal is persisted.
  await second.request('volume.remove', { name: 'doomed' });
  const registry = JSON.parse(fs.readFileSync(path.join(paths.stateDir, 'volumes.json'), 'utf8'));
  t.same(registry.volumes.map((volume: { name: string }) => volume.name), ['kept']);
  t.same(await second.stop(), { code: 0, signal: null });
});

t.test('a damaged registry stops the start with BM_ERR_STATE_CORRUPT instead of forgetting volumes', async (t) => {
  const paths = daemonPaths(t);
  fs.mkdirSync(paths.stateDir, { recursive: true });
  fs.writeFileSync(path.join(paths.stateDir, 'volumes.json'), '{"version": 1, "volumes": [{"name": "x"}]}');
  const daemon = spawnDaemon(t, { paths });
  t.equal((await daemon.exited).code, 1);
  t.match(daemon.stderr, /BM_ERR_STATE_CORRUPT: volume registry .*volumes\.json: volumes\[0\]\./);
  t.notOk(fs.existsSync(paths.controlSocket));
});

t.test('SIGTERM while the start is still loading mirrors: the stop waits for that step, then exits 0 with nothing left half-done', async (t) => {
  const first = await startDaemon(t, { args: ['--node-name', 'hostA'] });
  const paths = first.paths;
  const secretFile = path.join(paths.dir, 'hostB.key');
  fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  await first.request('peer.add', { name: 'hostB', address: '127.0.0.1:9', secretFile });
  await first.request('volume.add', { name: 'vol0', device: scratchDevice(t, 4 * 1024 * 1024, { forceFile: true }).path });
  await first.request('mirror.add', { volume: 'vol0', peer: 'hostB', target: 'vol0' });
  t.same(await first.stop('SIGTERM'), { code: 0, signal: null });

  const second = spawnDaemon(t, { paths, args: ['--node-name', 'hostA'], env: { BLOCKMIRROR_FAULT_START_DELAY_MS: '5000' } });
  const deadline = Date.now() + 15_000;
  while (!second.logs().some((line) => line.msg === 'FAULT INJECTION: start pauses after loading mirrors (testing only)') && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  process.kill(second.pid, 'SIGTERM');
  t.same(await second.exited, { code: 0, signal: null }, 'a clean stop');
  const messages = second.logs().map((line) => String(line.msg));
  t.ok(messages.indexOf('FAULT INJECTION: start resumes') !== -1, 'the start step finished');
  t.ok(messages.indexOf('FAULT INJECTION: start resumes') < messages.indexOf('stopping'), 'before the teardown began');
  t.same(second.logs().filter((line) => Number(line.level) >= 50).map((line) => line.msg), [], 'nothing failed during the stop');
  t.notOk(messages.includes('ready'), 'it never reported ready');

  const third = await startDaemon(t, { paths, args: ['--node-name', 'hostA'] });
  const status = await third.request('mirror.status', { volume: 'vol0' });
  t.equal(status.mirrors.length, 1, 'the mirror is still there after the interrupted start');
});
