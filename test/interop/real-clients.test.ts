// Interop with NBD clients nobody here wrote, through the real stack: NbdServer -> Volume ->
// native addon -> loop device (a file when not root). Clients run as child processes started
// asynchronously so the in-process server keeps serving.
import t from 'tap';
import { execFile, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { NbdServer } from '../../src/nbd/server';
import { Volume } from '../../src/volume/volume';
import { deviceFlushCount } from '../helpers/block-stat';
import { isRoot, scratchDevice, scratchDir } from '../helpers/loop';

const run = promisify(execFile);
const logger = pino({ level: 'silent' });
const deviceBytes = 64 * 1024 * 1024;

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A skip reason when a client is missing, else false (for the test's `skip` option). */
function missing(tool: string): string | false {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return false;
  } catch {
    return `${tool} not installed`;
  }
}

// Debian's python3: python3-libnbd's module lives there, not in a pyenv python earlier on PATH.
const python = '/usr/bin/python3';
function missingLibnbdPython(): string | false {
  if (!isRoot) return 'flush statistics need a loop device (root)';
  try {
    execFileSync(python, ['-c', 'import nbd'], { stdio: 'ignore' });
    return false;
  } catch {
    return 'python3-libnbd not installed';
  }
}

async function startStack(t: tap.Test, readOnly = false) {
  const dir = scratchDir(t);
  const device = scratchDevice(t, deviceBytes);
  const volume = Volume.open({ name: 'vol0', uuid: 'test-uuid', devicePath: device.path, readOnly }, logger);
  const exports = [{ name: 'vol0', description: 'interop test volume', backend: volume }];
  const server = new NbdServer({
    lookupExport: (name) => exports.find((e) => e.name === name),
    listExports: () => exports,
    logger,
  });
  const socketPath = join(dir, 'nbd.sock');
  await server.listenUnix(socketPath);
  t.teardown(async () => {
    await server.close();
    await volume.close();
  });
  return { device, volume, server, socketPath, uri: `nbd+unix:///vol0?socket=${socketPath}` };
}

t.test('qemu-io patterns, unaligned I/O and qemu-img compare against the device', { skip: missing('qemu-io') }, async (t) => {
  const { device, volume, uri } = await startStack(t);
  const { stdout } = await run('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0xab 0 1M',
    '-c', 'write -P 0x11 1048577 4095',   // unaligned offset and length: read-modify-write
    '-c', 'write -z 2M 64k',              // NBD_CMD_WRITE_ZEROES
    '-c', 'write -P 0x22 3M 8M',          // larger than one pooled class
    '-c', 'flush',
    '-c', 'read -P 0xab 0 1M',
    '-c', 'read -P 0x11 1048577 4095',
    '-c', 'read -P 0 2M 64k',
    '-c', 'read -P 0x22 3M 8M',
    '-c', 'discard 20M 1M',
    uri,
  ]);
  t.notMatch(stdout, /fail|error|Pattern verification/i, 'qemu-io reported no failure');
  t.match(stdout, /wrote 4095\/4095 bytes at offset 1048577/);
  await volume.flush();
  const backing = readFileSync(device.backingFile);
  t.ok(backing.subarray(0, 1048576).equals(Buffer.alloc(1048576, 0xab)), 'pattern on the device');
  t.equal(backing[1048576], 0, 'byte before the unaligned write untouched');
  t.ok(backing.subarray(1048577, 1048577 + 4095).equals(Buffer.alloc(4095, 0x11)), 'unaligned write on the device');
  t.equal(backing[1048577 + 4095], 0, 'byte after the unaligned write untouched');
  // The device itself, read by qemu-img, equals what the NBD export serves.
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, device.path]);
});

t.test('NBD FUA writes and FLUSH from libnbd reach the device before the reply', { skip: missingLibnbdPython() }, async (t) => {
  const { device, uri } = await startStack(t);
  // libnbd sends exactly the commands asked for (qemu-io would also flush when it closes).
  const counts = async (code: string): Promise<number> => {
    const before = deviceFlushCount(device.path);
    await run(python, ['-c', `import nbd\nh = nbd.NBD()\nh.connect_uri(${JSON.stringify(uri)})\n${code}\nh.shutdown()`]);
    return deviceFlushCount(device.path) - before;
  };
  t.equal(await counts('h.pwrite(b"\\x07" * 65536, 0)'), 0, 'a plain write issues no flush');
  t.ok((await counts('h.pwrite(b"\\x08" * 65536, 65536, nbd.CMD_FLAG_FUA)')) > 0, 'a FUA write is flushed');
  t.ok((await counts('h.flush()')) > 0, 'FLUSH reaches the device');
});

t.test('nbdinfo --list and --map', { skip: missing('nbdinfo') }, async (t) => {
  const { uri, socketPath } = await startStack(t);
  const list = await run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${socketPath}`]);
  const listed = JSON.parse(list.stdout);
  const exported = listed.exports.find((e: { 'export-name': string }) => e['export-name'] === 'vol0');
  t.ok(exported, 'vol0 listed');
  t.equal(exported['export-size'], deviceBytes);
  t.equal(exported['is_read_only'], false);
  t.equal(exported['can_multi_conn'], true, 'CAN_MULTI_CONN advertised');
  t.equal(exported['can_flush'], true);
  t.equal(exported['can_fua'], true);
  t.equal(exported['can_zero'], true);
  t.equal(exported['can_trim'], true);
  t.ok(exported['block_size_preferred'] >= 4096, 'preferred block size advertised');
  const map = await run('nbdinfo', ['--map', '--json', uri]);
  const extents = JSON.parse(map.stdout) as Array<{ offset: number; length: number; type: number }>;
  const covered = extents.reduce((sum, extent) => sum + extent.length, 0);
  t.equal(covered, deviceBytes, 'base:allocation map covers the whole export');
});

t.test('nbdcopy round trip', { skip: missing('nbdcopy') }, async (t) => {
  const { uri, volume } = await startStack(t);
  const dir = scratchDir(t);
  const source = join(dir, 'source.img');
  const back = join(dir, 'back.img');
  const content = randomBytes(deviceBytes);
  writeFileSync(source, content);
  await run('nbdcopy', ['--flush', source, uri]);
  await run('nbdcopy', [uri, back]);
  t.equal(sha256(readFileSync(back)), sha256(content), 'bytes copied in equal bytes copied out');
  t.ok(volume.stats().writeBytes >= deviceBytes - 1, 'writes went through the volume');
});

t.test('fio ioengine=nbd with verify=crc32c', { skip: missing('fio') }, async (t) => {
  const { uri } = await startStack(t);
  const dir = scratchDir(t);
  const output = join(dir, 'fio.json');
  await run('fio', [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    '--bssplit=4k/50:16k/30:64k/20',
    '--iodepth=16',
    '--size=32M',
    '--verify=crc32c',
    '--verify_fatal=1',
    '--do_verify=1',
    '--verify_state_save=0',
    '--output-format=json',
    `--output=${output}`,
  ]);
  const report = JSON.parse(readFileSync(output, 'utf8'));
  t.equal(report.jobs[0].error, 0, 'fio verify passed');
  t.ok(report.jobs[0].write.io_bytes >= 32 * 1024 * 1024, 'fio wrote the whole area');
});

t.test('read-only export: writes fail with EPERM for a real client', { skip: missing('qemu-io') }, async (t) => {
  const { uri } = await startStack(t, true);
  const result = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x1 0 4k', uri]).catch((error) => error);
  const output = `${result.stdout ?? ''}${result.stderr ?? ''}`;
  t.match(output, /Operation not permitted|read-only|Permission denied/i, 'client saw the write refused');
});
