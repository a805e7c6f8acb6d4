// Device errors, FAST_ZERO honesty and devices the volume must refuse.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { Volume } from '../../src/volume/volume';
import { isRoot, scratchDir } from '../helpers/loop';

const logger = pino({ level: 'silent' });

function tmpfsMount(t: tap.Test, sizeBytes: number): string {
  const dir = mkdtempSync('/var/tmp/bm-tmpfs-');
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeBytes}`, 'tmpfs', dir]);
  t.teardown(() => {
    execFileSync('umount', [dir]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

t.test('a failed device write puts the volume in a failed state: no later flush claims durability', { skip: !isRoot && 'needs root to mount a tiny tmpfs' }, async (t) => {
  // A 1 MiB tmpfs holding an 8 MiB sparse file: writes past the first MiB fail with ENOSPC.
  const dir = tmpfsMount(t, 1024 * 1024);
  const path = join(dir, 'device.img');
  writeFileSync(path, '');
  truncateSync(path, 8 * 1024 * 1024);
  const volume = Volume.open({ name: 'small', uuid: 'u', devicePath: path, readOnly: false }, logger);
  t.teardown(() => volume.close().catch(() => undefined));
  await volume.write(0, Buffer.alloc(65536, 1), false);
  await volume.flush();
  t.equal(volume.failure(), undefined, 'healthy before the error');
  const failedWrites = [];
  for (let i = 1; i < 64; i++) failedWrites.push(volume.write(i * 131072, Buffer.alloc(131072, 2), false).then(() => 'ok', (error) => error.code));
  const outcomes = await Promise.all(failedWrites);
  t.ok(outcomes.includes('ENOSPC'), 'the device ran out of space');
  t.equal(volume.failure()?.code, 'EIO', 'volume marked failed');
  await t.rejects(volume.flush(), { code: 'EIO' }, 'flush refused after the failure');
  await t.rejects(volume.write(0, Buffer.alloc(4096, 3), false), { code: 'EIO' }, 'writes refused');
  const read = await volume.read(0, 4096);
  t.equal(read.data[0], 1, 'reads still served');
  read.release();
  await volume.close();
});

t.test('FAST_ZERO fails at once where zeroing would mean writing zeroes', { skip: !isRoot && 'needs root to mount tmpfs' }, async (t) => {
  const dir = tmpfsMount(t, 16 * 1024 * 1024);
  const path = join(dir, 'device.img');
  writeFileSync(path, '');
  truncateSync(path, 4 * 1024 * 1024);
  const volume = Volume.open({ name: 'tmpfs', uuid: 'u', devicePath: path, readOnly: false }, logger);
  t.teardown(() => volume.close());
  // tmpfs can punch holes but has no ZERO_RANGE: keeping blocks allocated means writing zeroes.
  await t.rejects(volume.writeZeroes(0, 65536, { fua: false, noHole: true, fastZero: true }), { code: 'ENOTSUP' });
  await volume.writeZeroes(0, 65536, { fua: false, noHole: false, fastZero: true });
  await volume.writeZeroes(0, 65536, { fua: false, noHole: true, fastZero: false });
});

t.test('FAST_ZERO succeeds on ext4 files (ZERO_RANGE)', async (t) => {
  const dir = scratchDir(t);
  const path = join(dir, 'device.img');
  writeFileSync(path, '');
  truncateSync(path, 4 * 1024 * 1024);
  const fsType = execFileSync('stat', ['-f', '-c', '%T', dir], { encoding: 'utf8' }).trim();
  if (fsType !== 'ext2/ext3' && fsType !== 'xfs') {
    t.comment(`scratch dir is on ${fsType}, which has no ZERO_RANGE: nothing to check`);
    return;
  }
  const volume = Volume.open({ name: 'ext4', uuid: 'u', devicePath: path, readOnly: false }, logger);
  t.teardown(() => volume.close());
  await volume.write(0, Buffer.alloc(65536, 9), false);
  await volume.writeZeroes(0, 65536, { fua: true, noHole: true, fastZero: true });
  const read = await volume.read(0, 65536);
  t.ok(read.data.equals(Buffer.alloc(65536)), 'zeroed');
  read.release();
});

t.test('a file whose size is not a whole number of sectors is refused', async (t) => {
  const dir = scratchDir(t);
  const path = join(dir, 'odd.img');
  writeFileSync(path, Buffer.alloc(1000));
  t.throws(() => Volume.open({ name: 'odd', uuid: 'u', devicePath: path, readOnly: false }, logger), { code: 'BM_ERR_DEVICE_SIZE' });
});
