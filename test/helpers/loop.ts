// Scratch block devices for tests: a loop device over a sparse file when root (the CI path),
// a plain file otherwise. Files live under /var/tmp, which is disk-backed here (O_DIRECT works);
// everything is removed in the test's teardown.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface ScratchDevice {
  /** /dev/loopN when root, else the backing file itself. */
  path: string;
  backingFile: string;
  isLoop: boolean;
  sizeBytes: number;
}

export const isRoot = process.getuid?.() === 0;

interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

export function scratchDir(t: Teardown, prefix = 'bm-test-'): string {
  const base = isRoot ? '/var/tmp' : tmpdir();
  const dir = mkdtempSync(join(base, prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Creates a sparse file of sizeBytes and, when root, a loop device on it with direct I/O. */
export function scratchDevice(
  t: Teardown,
  sizeBytes: number,
  options: { sectorBytes?: number; forceFile?: boolean; dir?: string } = {},
): ScratchDevice {
  const dir = options.dir ?? mkdtempSync(join(isRoot ? '/var/tmp' : tmpdir(), 'bm-dev-'));
  const backingFile = join(dir, 'device.img');
  // Registered first, so a failing losetup still removes the directory. Teardowns run in
  // reverse order: the loop device (registered below) is detached before this runs.
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(backingFile, '');
  truncateSync(backingFile, sizeBytes);
  if (!isRoot || options.forceFile) {
    return { path: backingFile, backingFile, isLoop: false, sizeBytes };
  }
  const args = ['--direct-io=on', '-f', '--show'];
  if (options.sectorBytes !== undefined) args.push('--sector-size', String(options.sectorBytes));
  const loop = execFileSync('losetup', [...args, backingFile], { encoding: 'utf8' }).trim();
  t.teardown(() => {
    execFileSync('losetup', ['-d', loop]);
  });
  return { path: loop, backingFile, isLoop: true, sizeBytes };
}
