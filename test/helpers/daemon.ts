// Runs a real blockmirrord child process (the compiled dist/ build, as installed) with its own
// control socket, NBD socket and state dir under a temp dir. Teardown kills it by pid if a test
// left it running, and the temp dir goes with the scratch-dir teardown.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ControlClient } from '../../src/control/client';
import { scratchDir } from './loop';

export const repoRoot = path.resolve(__dirname, '..', '..');
const daemonBin = path.join(repoRoot, 'bin', 'blockmirrord.js');
const cliBin = path.join(repoRoot, 'bin', 'blockmirror.js');
const readyTimeoutMs = 15_000;
const exitTimeoutMs = 30_000;

interface TestLike {
  teardown(fn: () => void | Promise<void>): void;
}

function newestMtimeMs(directory: string, suffix: string): number {
  let newest = 0;
  for (const entry of fs.readdirSync(directory, { withFileTypes: true })) {
    const full = path.join(directory, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestMtimeMs(full, suffix));
    else if (entry.name.endsWith(suffix)) newest = Math.max(newest, fs.statSync(full).mtimeMs);
  }
  return newest;
}

/** Compile src/ to dist/ when dist is missing or older than any source file (once per run). */
export function ensureBuilt(): void {
  const outputs = ['daemon/main.js', 'cli/main.js'].map((file) => path.join(repoRoot, 'dist', 'src', file));
  const builtMs = Math.min(...outputs.map((file) => (fs.existsSync(file) ? fs.statSync(file).mtimeMs : 0)));
  if (builtMs > newestMtimeMs(path.join(repoRoot, 'src'), '.ts')) return;
  // A type error anywhere fails the run: daemon tests must not run on code that does not compile.
  execFileSync(process.execPath, [path.join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], {
    cwd: repoRoot,
    stdio: 'inherit',
  });
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface DaemonPaths {
  dir: string;
  controlSocket: string;
  nbdSocket: string;
  stateDir: string;
}

export function daemonPaths(t: TestLike): DaemonPaths {
  const dir = scratchDir(t, 'bm-daemon-');
  // An empty config file, so the host's /etc/blockmirror/blockmirror.json is never read.
  fs.writeFileSync(path.join(dir, 'config.json'), '{}\n');
  return {
    dir,
    controlSocket: path.join(dir, 'run', 'control.sock'),
    nbdSocket: path.join(dir, 'run', 'nbd.sock'),
    stateDir: path.join(dir, 'state'),
  };
}

export function daemonArgs(paths: DaemonPaths, extraArgs: readonly string[] = []): string[] {
  return [
    '--control-socket', paths.controlSocket,
    '--nbd-socket', paths.nbdSocket,
    '--state-dir', paths.stateDir,
    '--config', path.join(paths.dir, 'config.json'),
    ...extraArgs,
  ];
}

export class RunningDaemon {
  readonly exited: Promise<Exit>;
  private stdoutText = '';
  private stderrText = '';
  private exit: Exit | null = null;

  constructor(readonly child: ChildProcess, readonly paths: DaemonPaths) {
    child.stdout?.setEncoding('utf8').on('data', (text: string) => (this.stdoutText += text));
    child.stderr?.setEncoding('utf8').on('data', (text: string) => (this.stderrText += text));
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
  }

  get pid(): number {
    const pid = this.child.pid;
    if (pid === undefined) throw new Error('daemon has no pid');
    return pid;
  }

  get running(): boolean {
    return this.exit === null;
  }

  get stdout(): string {
    return this.stdoutText;
  }

  get stderr(): string {
    return this.stderrText;
  }

  /** stdout parsed as pino JSON lines. */
  logs(): Array<Record<string, unknown>> {
    return this.stdoutText
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as Record<string, unknown>);
  }

  async request(method: string, params: Record<string, unknown> = {}): Promise<any> {
    const client = await ControlClient.connect({ socketPath: this.paths.controlSocket, timeoutMs: 10_000 });
    try {
      return await client.request(method, params);
    } finally {
      client.close();
    }
  }

  /** Send `signal` by pid and wait for the exit (bounded). */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<Exit> {
    if (this.exit !== null) return this.exit;
    process.kill(this.pid, signal);
    return withTimeout(this.exited, exitTimeoutMs, `blockmirrord ${this.pid} did not exit after ${signal}`);
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export interface SpawnOptions {
  paths?: DaemonPaths;
  args?: readonly string[];
  /** Replaces the argument list entirely (for config and usage tests). */
  rawArgs?: readonly string[];
  env?: NodeJS.ProcessEnv;
}

/** Start blockmirrord without waiting; killed by pid in teardown if still running. */
export function spawnDaemon(t: TestLike, options: SpawnOptions = {}): RunningDaemon {
  ensureBuilt();
  const paths = options.paths ?? daemonPaths(t);
  const args = options.rawArgs ?? daemonArgs(paths, options.args);
  const env = { ...process.env, ...options.env };
  if (options.env?.NOTIFY_SOCKET === undefined) delete env.NOTIFY_SOCKET;
  const child = spawn(process.execPath, [daemonBin, ...args], { cwd: repoRoot, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const daemon = new RunningDaemon(child, paths);
  t.teardown(async () => {
    if (!daemon.running) return;
    process.kill(daemon.pid, 'SIGKILL');
    await daemon.exited;
  });
  return daemon;
}

/** Start blockmirrord and wait until its control socket answers `status`. */
export async function startDaemon(t: TestLike, options: SpawnOptions = {}): Promise<RunningDaemon> {
  const daemon = spawnDaemon(t, options);
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (!daemon.running) {
      throw new Error(`blockmirrord exited during start: ${JSON.stringify(await daemon.exited)}\nstderr: ${daemon.stderr}\nstdout: ${daemon.stdout}`);
    }
    try {
      await daemon.request('status');
      return daemon;
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`blockmirrord not ready after ${readyTimeoutMs} ms: ${String(error)}\nstdout: ${daemon.stdout}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run the blockmirror CLI as a child process (asynchronously, so an in-test server keeps running). */
export function runCli(args: readonly string[]): Promise<CliResult> {
  ensureBuilt();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliBin, ...args], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Run a child to completion asynchronously (qemu-io, dd, ...). */
export function runTool(command: string, args: readonly string[], timeoutMs = 30_000): Promise<CliResult & { stdoutBytes: Buffer }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs });
    const chunks: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => chunks.push(chunk));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.once('error', reject);
    child.once('close', (code) => {
      const stdoutBytes = Buffer.concat(chunks);
      resolve({ code, stdout: stdoutBytes.toString('utf8'), stderr, stdoutBytes });
    });
  });
}

export function haveTool(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A datagram socket playing systemd's NOTIFY_SOCKET, run by python3 (Node has no AF_UNIX
 *  datagrams). Each received message is one JSON string per line on its stdout. */
export interface NotifyListener {
  socketPath: string;
  messages(): string[];
  waitFor(predicate: (message: string) => boolean, timeoutMs?: number): Promise<string>;
}

const notifyListenerPy = `
import json, os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
print(json.dumps("LISTENING"), flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps(data.decode("utf-8", "replace")), flush=True)
`;

export async function startNotifyListener(t: TestLike, socketPath: string): Promise<NotifyListener> {
  const child = spawn('python3', ['-c', notifyListenerPy, socketPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      process.kill(child.pid, 'SIGKILL');
      await exited;
    }
    fs.rmSync(socketPath, { force: true });
  });
  const received: string[] = [];
  const waiters = new Set<() => void>();
  let buffered = '';
  child.stdout.setEncoding('utf8').on('data', (text: string) => {
    buffered += text;
    let end: number;
    while ((end = buffered.indexOf('\n')) !== -1) {
      received.push(JSON.parse(buffered.slice(0, end)) as string);
      buffered = buffered.slice(end + 1);
    }
    for (const wake of waiters) wake();
  });
  const listener: NotifyListener = {
    socketPath,
    messages: () => received.filter((message) => message !== 'LISTENING'),
    waitFor: (predicate, timeoutMs = 10_000) =>
      withTimeout(
        new Promise<string>((resolve) => {
          const check = (): void => {
            const found = listener.messages().find(predicate);
            if (found === undefined) return;
            waiters.delete(check);
            resolve(found);
          };
          waiters.add(check);
          check();
        }),
        timeoutMs,
        `no matching sd_notify message; got ${JSON.stringify(received)}`,
      ),
  };
  await withTimeout(
    new Promise<void>((resolve) => {
      const check = (): void => {
        if (received.includes('LISTENING')) resolve();
      };
      waiters.add(check);
      check();
    }),
    10_000,
    'notify listener did not start',
  );
  return listener;
}
