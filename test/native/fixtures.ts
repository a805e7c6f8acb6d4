// Shared fixtures for the addon tests: sparse backing files on a file system with O_DIRECT
// (not tmpfs /tmp), loop devices when root, and child processes that load TS like tap does.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;

/** A directory whose file system accepts O_DIRECT: /var/tmp first, then the checkout. */
export function directIoDir(): string {
  for (const candidate of ['/var/tmp', path.resolve(__dirname, '..', '..')]) {
    try {
      const probe = path.join(candidate, `.bm-odirect-probe-${process.pid}`);
      const fd = fs.openSync(probe, fs.constants.O_CREAT | fs.constants.O_RDWR | fs.constants.O_DIRECT, 0o600);
      fs.closeSync(fd);
      fs.unlinkSync(probe);
      return candidate;
    } catch {
      // try the next one
    }
  }
  throw new Error('no directory with O_DIRECT support found');
}

export interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

/** A sparse file of sizeBytes, removed at teardown. */
export function sparseFile(t: Teardown, sizeBytes: number, name = 'file'): string {
  const dir = fs.mkdtempSync(path.join(directIoDir(), 'bm-native-'));
  const filePath = path.join(dir, `${name}.img`);
  fs.writeFileSync(filePath, '');
  fs.truncateSync(filePath, sizeBytes);
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return filePath;
}

/** A loop device (direct I/O on) over a fresh sparse file, detached at teardown. Root only. */
export function loopDevice(t: Teardown, sizeBytes: number): string {
  const backing = sparseFile(t, sizeBytes, 'loop-backing');
  const device = execFileSync('losetup', ['--direct-io=on', '--find', '--show', backing], { encoding: 'utf8' }).trim();
  t.teardown(() => {
    execFileSync('losetup', ['--detach', device]);
  });
  return device;
}

/** Runs a TypeScript child with the same loader flags tap gave this process. */
export function runTsChild(
  script: string,
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...process.execArgv, script, ...args], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Deterministic PRNG (mulberry32) so failures reproduce from the printed seed. */
export function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let x = state;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
