// Engine selection and event-loop behaviour, observed from child processes.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import t from 'tap';

import { availableIoEngines, ioEngine } from '../../src/native/index';
import { runTsChild, sparseFile } from './fixtures';

const child = path.join(__dirname, 'child-engine.ts');

t.test('the default engine is io_uring where the kernel allows it', async (tt) => {
  tt.ok(availableIoEngines.includes('threadpool'));
  tt.equal(ioEngine, availableIoEngines[0]);
  const { ioEngine: childEngine } = JSON.parse((await runTsChild(child, ['info'])).stdout);
  tt.equal(childEngine, ioEngine);
});

t.test('BLOCKMIRROR_IO_ENGINE=threadpool selects the thread pool', async (tt) => {
  const result = await runTsChild(child, ['info'], { ...process.env, BLOCKMIRROR_IO_ENGINE: 'threadpool' });
  tt.same(JSON.parse(result.stdout), { ioEngine: 'threadpool' });
});

for (const engine of availableIoEngines) {
  t.test(`${engine}: Node stays alive for in-flight I/O and exits when idle`, async (tt) => {
    const env = { ...process.env, BLOCKMIRROR_IO_ENGINE: engine };
    const filePath = sparseFile(tt, 2 * 1024 * 1024);
    // The addon's handles are unref'd while idle: a child that loads it and does nothing exits.
    const idle = await runTsChild(child, ['info'], env);
    tt.equal(idle.code, 0, 'an idle process exits by itself');
    const result = await runTsChild(child, ['write', filePath], env);
    tt.equal(result.code, 0, result.stderr);
    tt.same(JSON.parse(result.stdout), { engine, done: true });
    const written = fs.readFileSync(filePath).subarray(0, 1024 * 1024);
    tt.ok(written.every((byte) => byte === 0xab), 'the write reached the file');
  });
}

t.test('terminating a worker with I/O in flight is clean', async (tt) => {
  const filePath = sparseFile(tt, 32 * 1024 * 1024);
  for (let round = 0; round < 2; round++) {
    const worker = new Worker(path.join(__dirname, 'worker-io.ts'), { workerData: filePath });
    const engine = await new Promise((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await new Promise((resolve) => setTimeout(resolve, round * 2));
    await worker.terminate();
    if (round === 0) tt.equal(engine, ioEngine, 'the worker has its own engine');
  }
  tt.pass('2 workers terminated mid-I/O');
});

t.test('terminating workers while they keep I/O of every kind in flight never aborts the process', async (tt) => {
  const filePath = sparseFile(tt, 4 * 1024 * 1024);
  const result = await runTsChild(child, ['terminate-workers', filePath]);
  tt.equal(result.code, 0, `the process survived 20 terminations (stderr: ${result.stderr.slice(-500)})`);
  tt.equal(result.stdout.trim(), 'done');
});

// io_uring_setup failing (ENOSYS/EPERM, io_uring_disabled) must select the thread pool. The
// kernel setting is global, so fake the refusal for one child with an LD_PRELOAD shim instead.
const refuseUringShim = `
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>
long syscall(long number, ...) {
  va_list ap;
  va_start(ap, number);
  long a[6];
  for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
  va_end(ap);
  if (number == __NR_io_uring_setup) { errno = EPERM; return -1; }
  long (*real)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
  return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
`;

const hasCompiler = (() => {
  try {
    execFileSync('cc', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

t.test('falls back to the thread pool when io_uring_setup is refused', { skip: !hasCompiler && 'no C compiler for the shim' }, async (tt) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-shim-'));
  tt.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'shim.c'), refuseUringShim);
  execFileSync('cc', ['-shared', '-fPIC', '-o', path.join(dir, 'shim.so'), path.join(dir, 'shim.c'), '-ldl']);
  const env: NodeJS.ProcessEnv = { ...process.env, LD_PRELOAD: path.join(dir, 'shim.so') };
  delete env.BLOCKMIRROR_IO_ENGINE;
  const filePath = sparseFile(tt, 2 * 1024 * 1024);
  const result = await runTsChild(child, ['write', filePath], env);
  tt.equal(result.code, 0, result.stderr);
  tt.same(JSON.parse(result.stdout), { engine: 'threadpool', done: true });
});
