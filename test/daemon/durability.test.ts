// Data an NBD client saw acknowledged after FLUSH is on the device even if the daemon is killed
// with SIGKILL right after (no shutdown path runs).
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { haveTool, runTool, startDaemon } from '../helpers/daemon';
import { deviceFlushCount } from '../helpers/block-stat';
import { scratchDevice } from '../helpers/loop';

const deviceBytes = 16 * 1024 * 1024;
const haveTools = haveTool('qemu-io') && haveTool('dd');

t.test('flushed writes survive SIGKILL', { skip: haveTools ? false : 'qemu-io or dd not installed' }, async (t) => {
  const device = scratchDevice(t, deviceBytes);
  const daemon = await startDaemon(t);
  const added = await daemon.request('volume.add', { name: 'vol0', device: device.path });
  const flushesBefore = device.isLoop ? deviceFlushCount(device.path) : 0;
  const written = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xc3 4M 64k', '-c', 'flush', added.nbdUri]);
  t.equal(written.code, 0, written.stderr);
  // Reading the data back below would pass even without a flush (the loop device's backing file
  // keeps it in the page cache); the block layer's flush counter shows NBD_CMD_FLUSH reached it.
  if (device.isLoop) t.ok(deviceFlushCount(device.path) > flushesBefore, 'NBD FLUSH reached the device before it was acknowledged');

  t.same(await daemon.stop('SIGKILL'), { code: null, signal: 'SIGKILL' });
  // Read the device itself, bypassing the page cache, as the next opener would.
  const head = await runTool('dd', [`if=${device.path}`, 'iflag=direct', 'bs=1M', 'count=1', 'status=none']);
  t.equal(head.code, 0, head.stderr);
  t.equal(head.stdoutBytes.length, 1024 * 1024);
  t.ok(head.stdoutBytes.every((byte) => byte === 0x5a), 'first MiB is 0x5a');
  const tail = await runTool('dd', [`if=${device.path}`, 'iflag=direct', 'bs=64k', 'skip=64', 'count=2', 'status=none']);
  t.equal(tail.stdoutBytes.length, 128 * 1024);
  t.ok(tail.stdoutBytes.subarray(0, 64 * 1024).every((byte) => byte === 0xc3), '64 KiB at 4 MiB is 0xc3');
  t.ok(tail.stdoutBytes.subarray(64 * 1024).every((byte) => byte === 0), 'the bytes after it were not touched');

  // The stale sockets a SIGKILL leaves behind do not stop the next start.
  t.ok(fs.existsSync(daemon.paths.controlSocket));
  const restarted = await startDaemon(t, { paths: daemon.paths });
  t.equal((await restarted.request('volume.info', { name: 'vol0' })).uuid, added.uuid);
  t.same(await restarted.stop(), { code: 0, signal: null });
  t.notOk(fs.existsSync(path.join(daemon.paths.stateDir, '.volumes.json.tmp-' + restarted.pid)));
});
