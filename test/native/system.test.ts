// lockFileExclusive across processes, and sdNotify to a datagram socket bound by python3.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import t from 'tap';

import { lockFileExclusive, sdNotify } from '../../src/native/index';
import { directIoDir, runTsChild } from './fixtures';

const child = path.join(__dirname, 'child-engine.ts');

function tempDir(tt: tap.Test): string {
  const dir = fs.mkdtempSync(path.join(directIoDir(), 'bm-system-'));
  tt.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('lockFileExclusive: a second process gets BM_ERR_LOCKED until release', async (tt) => {
  const lockPath = path.join(tempDir(tt), 'state.lock');
  const lock = lockFileExclusive(lockPath);
  tt.ok(fs.existsSync(lockPath), 'the lock file is created');
  const blocked = await runTsChild(child, ['lock', lockPath]);
  tt.same(JSON.parse(blocked.stdout), { code: 'BM_ERR_LOCKED' });
  tt.throws(() => lockFileExclusive(lockPath), { code: 'BM_ERR_LOCKED', syscall: 'flock', path: lockPath }, 'also within one process');
  lock.release();
  lock.release(); // idempotent
  const holder = spawn(process.execPath, [...process.execArgv, child, 'lock', lockPath], { stdio: ['pipe', 'pipe', 'inherit'] });
  tt.teardown(() => {
    if (holder.exitCode === null) holder.kill('SIGKILL');
  });
  await new Promise<void>((resolve, reject) => {
    holder.stdout.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('locked')) resolve();
    });
    holder.on('exit', () => reject(new Error('lock holder exited early')));
  });
  tt.throws(() => lockFileExclusive(lockPath), { code: 'BM_ERR_LOCKED' }, 'held by the other process now');
  holder.kill('SIGKILL');
  await new Promise((resolve) => holder.on('close', resolve));
  const again = lockFileExclusive(lockPath);
  again.release();
  tt.pass('the lock dies with its process');
});

t.test('lockFileExclusive reports open errors', async (tt) => {
  tt.throws(() => lockFileExclusive('/nonexistent-dir/x.lock'), { code: 'ENOENT', syscall: 'open' });
});

// python3 binds the datagram socket (Node cannot), prints "ready", then prints what it receives.
const receiver = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1].replace('@', '\\0', 1) if sys.argv[1].startswith('@') else sys.argv[1])
s.settimeout(10)
print('ready', flush=True)
print(s.recv(4096).decode(), flush=True)
`;

async function notifyThrough(tt: tap.Test, address: string, state: string): Promise<string> {
  const python = spawn('python3', ['-c', receiver, address], { stdio: ['ignore', 'pipe', 'inherit'] });
  tt.teardown(() => {
    if (python.exitCode === null) python.kill('SIGKILL');
  });
  let output = '';
  await new Promise<void>((resolve, reject) => {
    python.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      if (output.startsWith('ready\n')) resolve();
    });
    python.on('exit', () => reject(new Error('receiver exited early')));
  });
  const saved = process.env.NOTIFY_SOCKET;
  process.env.NOTIFY_SOCKET = address;
  try {
    tt.equal(sdNotify(state), true);
  } finally {
    if (saved === undefined) delete process.env.NOTIFY_SOCKET;
    else process.env.NOTIFY_SOCKET = saved;
  }
  await new Promise((resolve) => python.on('close', resolve));
  return output.slice('ready\n'.length).trim();
}

t.test('sdNotify', async (tt) => {
  const saved = process.env.NOTIFY_SOCKET;
  delete process.env.NOTIFY_SOCKET;
  tt.equal(sdNotify('READY=1'), false, 'false when NOTIFY_SOCKET is unset');
  if (saved !== undefined) process.env.NOTIFY_SOCKET = saved;

  const socketPath = path.join(tempDir(tt), 'notify.sock');
  tt.equal(await notifyThrough(tt, socketPath, 'READY=1\nSTATUS=serving'), 'READY=1\nSTATUS=serving', 'path socket');
  tt.equal(await notifyThrough(tt, `@bm-notify-${process.pid}`, 'WATCHDOG=1'), 'WATCHDOG=1', 'abstract socket');

  process.env.NOTIFY_SOCKET = path.join(tempDir(tt), 'nobody-listens.sock');
  try {
    tt.throws(() => sdNotify('READY=1'), { code: 'ENOENT', syscall: 'sendto' });
  } finally {
    if (saved === undefined) delete process.env.NOTIFY_SOCKET;
    else process.env.NOTIFY_SOCKET = saved;
  }
});
