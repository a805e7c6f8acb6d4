// Interop with real clients nobody here wrote: nbdinfo, nbdcopy (libnbd) and qemu-io (QEMU).
// They run as child processes spawned asynchronously, so the in-process server keeps serving.

import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { MiB, startServer, waitFor } from './fixture';

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function run(command: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: 30_000, maxBuffer: 16 * MiB }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : -1;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

function have(binary: string): boolean {
  return ['/usr/bin', '/usr/local/bin', '/bin'].some((dir) => existsSync(path.join(dir, binary)));
}

function uri(exportName: string, socketPath: string): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

/** Deterministic bytes (xorshift32 from a fixed seed), so a failure reproduces. */
function seededBytes(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  let state = seed >>> 0 || 1;
  for (let i = 0; i < lengthBytes; i += 4) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    data.writeUInt32LE(state, i);
  }
  return data;
}

const EXPORTS = [
  { name: 'vol0', description: 'first volume', sizeBytes: 4 * MiB },
  { name: 'ro', description: 'read-only', sizeBytes: 4 * MiB, readOnly: true },
  { name: 'src', description: 'copy source', sizeBytes: 8 * MiB },
  { name: 'dst', description: 'copy target', sizeBytes: 8 * MiB },
];

t.test('nbdinfo --list shows every export', { skip: !have('nbdinfo') && 'nbdinfo not installed' }, async (t) => {
  const fx = await startServer(t, EXPORTS);
  const result = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${fx.socketPath}`]);
  t.equal(result.code, 0, result.stderr);
  const listed = JSON.parse(result.stdout) as { exports: Array<{ 'export-name': string; description?: string; 'export-size': number; can_multi_conn?: boolean }> };
  const byName = new Map(listed.exports.map((e) => [e['export-name'], e]));
  t.same([...byName.keys()].sort(), ['dst', 'ro', 'src', 'vol0']);
  t.equal(byName.get('vol0')?.['export-size'], 4 * MiB);
  t.equal(byName.get('vol0')?.description, 'first volume');
  t.equal(byName.get('src')?.can_multi_conn, true);
});

t.test('nbdinfo --map reports base:allocation', { skip: !have('nbdinfo') && 'nbdinfo not installed' }, async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('vol0')!;
  await backend.write(MiB, Buffer.alloc(64 * 1024, 1), false);
  const result = await run('nbdinfo', ['--map', '--json', uri('vol0', fx.socketPath)]);
  t.equal(result.code, 0, result.stderr);
  const extents = (JSON.parse(result.stdout) as Array<{ offset: number; length: number; type: number }>).map((e) => [e.offset, e.length, e.type]);
  t.same(extents, [
    [0, MiB, 3],
    [MiB, 64 * 1024, 0],
    [MiB + 64 * 1024, 3 * MiB - 64 * 1024, 3],
  ]);
});

t.test('qemu-io writes and reads a pattern', { skip: !have('qemu-io') && 'qemu-io not installed' }, async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('vol0')!;
  const result = await run('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0xab 0 1M',
    '-c', 'read -P 0xab 0 1M',
    '-c', 'write -P 0xcd 1000 3000', // unaligned
    '-c', 'read -P 0xcd 1000 3000',
    '-c', 'write -z 2M 512k',
    '-c', 'read -P 0 2M 512k',
    '-c', 'discard 3M 64k',
    '-c', 'flush',
    uri('vol0', fx.socketPath),
  ]);
  t.equal(result.code, 0, result.stderr);
  if (/Pattern verification failed|error/i.test(result.stdout)) t.comment(result.stdout);
  t.notMatch(result.stdout, /Pattern verification failed|error/i, 'every pattern verified');
  t.ok(backend.data.subarray(0, 1000).equals(Buffer.alloc(1000, 0xab)));
  t.ok(backend.data.subarray(1000, 4000).equals(Buffer.alloc(3000, 0xcd)));
  t.ok(backend.data.subarray(4000, MiB).equals(Buffer.alloc(MiB - 4000, 0xab)));
  t.ok(backend.flushCount >= 1, 'flush reached the backend');
  t.equal(backend.unreleasedReads, 0);

  // A read-only export reads fine and refuses writes.
  fx.backends.get('ro')!.data.fill(0x5a);
  const readOnly = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 0 64k', uri('ro', fx.socketPath)]);
  t.equal(readOnly.code, 0, readOnly.stderr + readOnly.stdout);
  const refused = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', uri('ro', fx.socketPath)]);
  t.not(refused.code, 0, 'qemu refuses to open a read-only export for writing');
  t.ok(fx.backends.get('ro')!.data.equals(Buffer.alloc(4 * MiB, 0x5a)), 'read-only export unchanged');
});

t.test('nbdcopy round trip preserves every byte', { skip: !have('nbdcopy') && 'nbdcopy not installed' }, async (t) => {
  const fx = await startServer(t, EXPORTS);
  const source = fx.backends.get('src')!;
  const target = fx.backends.get('dst')!;
  // Data with a hole in the middle, so nbdcopy's sparse path (block status, zeroing) is used.
  const data = seededBytes(8 * MiB, 0x5eed);
  data.fill(0, 2 * MiB, 5 * MiB);
  await source.write(0, data.subarray(0, 2 * MiB), false);
  await source.write(5 * MiB, data.subarray(5 * MiB), false);
  target.data.fill(0xee);
  await target.write(0, Buffer.alloc(8 * MiB, 0xee), false);

  const file = path.join(fx.dir, 'copy.img');
  const out = await run('nbdcopy', ['--connections=4', uri('src', fx.socketPath), file]);
  t.equal(out.code, 0, out.stderr);
  t.ok(readFileSync(file).equals(data), 'export -> file matches');

  const back = await run('nbdcopy', ['--connections=4', '--requests=16', file, uri('dst', fx.socketPath)]);
  t.equal(back.code, 0, back.stderr);
  t.ok(target.data.equals(data), 'file -> export matches (holes zeroed)');

  target.data.fill(0x11);
  const direct = await run('nbdcopy', [uri('src', fx.socketPath), uri('dst', fx.socketPath)]);
  t.equal(direct.code, 0, direct.stderr);
  t.ok(target.data.equals(data), 'export -> export matches');
  // nbdcopy has exited; the server notices the closed sockets a moment later.
  await waitFor(() => fx.server.connectionCount() === 0, 2000, 'nbdcopy connections to close');
  t.equal(source.unreleasedReads, 0);
});

t.test('fio (nbd engine) random writes at QD32 verify with crc32c', { skip: !have('fio') && 'fio not installed' }, async (t) => {
  const fx = await startServer(t, EXPORTS);
  const result = await run('fio', [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri('vol0', fx.socketPath)}`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=32',
    '--size=4M',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_state_save=0',
    '--randseed=1234',
    `--output=${path.join(fx.dir, 'fio.out')}`,
  ]);
  const report = existsSync(path.join(fx.dir, 'fio.out')) ? readFileSync(path.join(fx.dir, 'fio.out'), 'utf8') : '';
  if (result.code !== 0) t.comment(result.stderr + report);
  t.equal(result.code, 0, 'fio exited 0');
  t.match(report, /err= 0/, 'fio reports no error');
  t.notMatch(report, /verify: bad|crc32c: verify failed/, 'no verify failure');
  t.equal(fx.backends.get('vol0')!.unreleasedReads, 0);
});
