// Helpers shared by the benchmarks (nbd-fio.ts, replication.ts): the daemon's V8 flags, waiting
// for paths, medians, tmpfs-backed loop devices, child processes stopped by pid, and fio runs
// whose JSON goes to a file (fio's nbd engine prints a line of its own on stdout, so stdout is
// not JSON).
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { ControlClient } from '../src/control/client';
import type { MirrorInfo } from '../src/control/protocol';

/** The repository root, from dist/bench/*.js. */
export const repoRoot = resolve(__dirname, '..', '..');
export const daemonBin = join(repoRoot, 'bin', 'blockmirrord.js');
export const MiB = 1024 * 1024;

/** The node flags the daemon's own shebang asks for, so a benchmark runs what users run. */
export function daemonNodeFlags(): string[] {
  const shebang = readFileSync(daemonBin, 'utf8').split('\n')[0];
  const match = /^#!\/usr\/bin\/env -S node(.*)$/.exec(shebang);
  return match === null ? [] : match[1].trim().split(/\s+/).filter((flag) => flag !== '');
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitForPath(path: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${path}`);
    await sleep(50);
  }
}

/** Fails before anything is created when the benchmark runs as non-root or lacks a tool. */
export function requireRootAndCommands(commands: string[]): void {
  if (process.getuid?.() !== 0) throw new Error('the benchmark needs root (losetup)');
  const missing = commands.filter((command) => {
    try {
      execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
      return false;
    } catch {
      return true;
    }
  });
  if (missing.length > 0) throw new Error(`the benchmark needs ${missing.join(', ')} (Debian: qemu-utils, fio, libnbd-bin)`);
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function timestampForFile(date = new Date()): string {
  return date.toISOString().replace(/[:.]/g, '-');
}

/** A loop device with direct I/O over a new file of sizeBytes in dir. */
export interface LoopDevice {
  path: string;
  backingFile: string;
}

/** allocate: reserve the file's pages with fallocate. zeroFill: write zeros over the whole file
 *  (with dd, before attaching), so every page has been written once. */
export function createLoopDevice(
  dir: string,
  name: string,
  sizeBytes: number,
  options: { allocate?: boolean; zeroFill?: boolean } = {},
): LoopDevice {
  const backingFile = join(dir, name);
  writeFileSync(backingFile, '');
  truncateSync(backingFile, sizeBytes);
  // Reserved up front, so a full tmpfs fails here and not mid-run. (On a VM the host may back
  // the pages only when they are first written: fill a device once before measuring it.)
  if (options.allocate === true) execFileSync('fallocate', ['-l', String(sizeBytes), backingFile]);
  if (options.zeroFill === true) {
    execFileSync('dd', ['if=/dev/zero', `of=${backingFile}`, 'bs=1M', 'iflag=count_bytes', `count=${sizeBytes}`, 'conv=notrunc', 'status=none']);
  }
  const path = execFileSync('losetup', ['--direct-io=on', '-f', '--show', backingFile], { encoding: 'utf8' }).trim();
  return { path, backingFile };
}

/** Detaches each device, reporting (not throwing) failures so cleanup goes on. */
export function detachLoopDevices(devices: LoopDevice[]): void {
  for (const device of devices) {
    try {
      execFileSync('losetup', ['-d', device.path]);
    } catch (error) {
      console.error(`losetup -d ${device.path}: ${(error as Error).message}`);
    }
  }
}

/** Child processes started by a benchmark, stopped by pid (SIGTERM, SIGKILL after a bound). */
export class Children {
  private readonly children: ChildProcess[] = [];

  spawn(command: string, args: string[]): ChildProcess {
    const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    // A failed spawn (ENOENT) must not crash the bench past its cleanup; the caller's wait fails.
    child.once('error', (error) => console.error(`${command}: ${error.message}`));
    this.children.push(child);
    return child;
  }

  /** Start blockmirrord (with its shebang's V8 flags, plus BENCH_DAEMON_NODE_FLAGS, e.g.
   *  "--cpu-prof --cpu-prof-dir=/tmp/prof") and wait for its control socket. */
  async startDaemon(args: string[], controlSocket: string): Promise<ChildProcess> {
    const extraFlags = (process.env.BENCH_DAEMON_NODE_FLAGS ?? '').split(/\s+/).filter((flag) => flag !== '');
    const child = this.spawn(process.execPath, [...daemonNodeFlags(), ...extraFlags, daemonBin, ...args]);
    const deadline = Date.now() + 15_000;
    while (!existsSync(controlSocket)) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`blockmirrord exited during start (${child.exitCode ?? child.signalCode})`);
      if (Date.now() > deadline) throw new Error(`blockmirrord did not create ${controlSocket} in 15 s`);
      await sleep(20);
    }
    return child;
  }

  /** SIGTERM every child still running and wait for it to exit, so its devices are free. */
  async stopAll(): Promise<void> {
    await Promise.all(this.children.map(stopChild));
  }
}

/** SIGTERM (a clean stop), SIGKILL after 30 s; waits for the exit. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise((r) => child.once('exit', r));
  const signal = (name: NodeJS.Signals): void => {
    try {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) process.kill(child.pid, name);
    } catch {
      // exited meanwhile
    }
  };
  signal('SIGTERM');
  const timer = setTimeout(() => signal('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

const runningFio = new Set<ChildProcess>();

/** Ends the fio runs still going (an interrupted benchmark), by pid, and waits for them. */
export async function stopRunningFio(): Promise<void> {
  await Promise.all(
    [...runningFio].map(async (child) => {
      if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      try {
        process.kill(child.pid, 'SIGTERM');
      } catch {
        return;
      }
      await exited;
    }),
  );
}

/** One direction of a fio job's JSON report. */
export interface FioSide {
  iops: number;
  bw_bytes: number;
  io_bytes: number;
  runtime: number;
  clat_ns: { percentile?: Record<string, number>; mean: number };
}

/** One job of a fio JSON report. */
export interface FioJob {
  jobname: string;
  error: number;
  read: FioSide;
  write: FioSide;
}

/** Runs fio with `args` (no output options; several jobs when the args hold several --name) and
 *  returns every job of the report. Async, so the caller's timers (status polls, samplers) keep
 *  running meanwhile. */
export async function runFioJobs(args: string[], outputFile: string): Promise<FioJob[]> {
  rmSync(outputFile, { force: true });
  const child = spawn('fio', [...args, '--output-format=json', `--output=${outputFile}`], { stdio: ['ignore', 'ignore', 'inherit'] });
  runningFio.add(child);
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (exitCode) => resolve(exitCode));
  }).finally(() => runningFio.delete(child));
  if (code !== 0) throw new Error(`fio ${args.join(' ')} exited with ${code}`);
  const jobs = JSON.parse(readFileSync(outputFile, 'utf8')).jobs as FioJob[];
  const failed = jobs.find((job) => job.error !== 0);
  if (failed !== undefined) throw new Error(`fio ${args.join(' ')}: job ${failed.jobname} error ${failed.error}`);
  return jobs;
}

/** Runs one fio job and returns its read or write side. */
export async function runFio(args: string[], side: 'read' | 'write', outputFile: string): Promise<FioSide> {
  const [job] = await runFioJobs(args, outputFile);
  return job[side];
}

export function p50Us(side: FioSide): number {
  return (side.clat_ns.percentile?.['50.000000'] ?? Number.NaN) / 1000;
}

/**
 * CPU used by processes outside this benchmark (not this process nor its descendants, not kernel
 * threads): other sessions' tests, builds or daemons on a small shared machine skew every
 * figure, so they are measured. sample() as often as practical (a process that lives and dies
 * between two samples goes unseen); totalSeconds is the foreign CPU seen so far.
 */
export class ForeignCpu {
  private readonly last = new Map<number, number>();
  private readonly byCommand = new Map<string, number>();
  totalSeconds = 0;

  constructor() {
    this.sample();
    this.totalSeconds = 0;
    this.byCommand.clear();
  }

  sample(): void {
    const ours = new Set<number>([process.pid]);
    const stats = new Map<number, { ppid: number; cpuSeconds: number; command: string }>();
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        stats.set(Number(entry), procStat(Number(entry)));
      } catch {
        // exited meanwhile
      }
    }
    const isOurs = (pid: number): boolean => {
      for (let current = pid, hops = 0; current > 1 && hops < 64; hops++) {
        if (ours.has(current)) return true;
        const stat = stats.get(current);
        if (stat === undefined) return false;
        current = stat.ppid;
      }
      return false;
    };
    for (const [pid, stat] of stats) {
      if (pid === 2 || stat.ppid === 2 || isOurs(pid)) continue;
      const previous = this.last.get(pid);
      this.last.set(pid, stat.cpuSeconds);
      const delta = stat.cpuSeconds - (previous ?? stat.cpuSeconds);
      if (delta <= 0) continue;
      this.totalSeconds += delta;
      const command = commandLine(pid) ?? stat.command;
      this.byCommand.set(command, (this.byCommand.get(command) ?? 0) + delta);
    }
  }

  /** Commands by CPU seconds used, most first. */
  top(count: number): Array<{ command: string; cpuSeconds: number }> {
    return [...this.byCommand]
      .sort((x, y) => y[1] - x[1])
      .slice(0, count)
      .map(([command, cpuSeconds]) => ({ command, cpuSeconds: Math.round(cpuSeconds * 100) / 100 }));
  }
}

function commandLine(pid: number): string | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
    return text === '' ? undefined : text.slice(0, 100);
  } catch {
    return undefined;
  }
}

const clockTicksPerSecond = 100;

function procStat(pid: number): { ppid: number; cpuSeconds: number; command: string } {
  const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces), from field 3 (state) on.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { ppid: Number(fields[1]), cpuSeconds: (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond, command: text.slice(text.indexOf('(') + 1, text.lastIndexOf(')')) };
}

/** CPU time of named processes and of the whole machine, to say whether a phase was CPU-bound. */
export interface CpuSnapshot {
  atMs: number;
  processSeconds: Record<string, number>;
  machineBusySeconds: number;
  foreignSeconds: number;
}

/** Snapshot of the named processes, the machine and (sampled now) the foreign processes. */
export function cpuSnapshot(pids: Record<string, number>, foreign: ForeignCpu): CpuSnapshot {
  foreign.sample();
  const processSeconds: Record<string, number> = {};
  for (const [name, pid] of Object.entries(pids)) {
    try {
      processSeconds[name] = procStat(pid).cpuSeconds;
    } catch {
      processSeconds[name] = Number.NaN;
    }
  }
  const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal: busy = user + nice + system + irq + softirq.
  const busyTicks = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6];
  return { atMs: performance.now(), processSeconds, machineBusySeconds: busyTicks / clockTicksPerSecond, foreignSeconds: foreign.totalSeconds };
}

/** Per process and for the machine: CPU used between two snapshots, in cores (1.0 = one core busy). */
export function cpuCores(from: CpuSnapshot, to: CpuSnapshot): Record<string, number> {
  const seconds = (to.atMs - from.atMs) / 1000;
  const cores: Record<string, number> = {};
  for (const name of Object.keys(from.processSeconds)) cores[name] = (to.processSeconds[name] - from.processSeconds[name]) / seconds;
  cores.machine = (to.machineBusySeconds - from.machineBusySeconds) / seconds;
  cores.foreign = (to.foreignSeconds - from.foreignSeconds) / seconds;
  return cores;
}

export function formatCores(cores: Record<string, number>): string {
  return Object.entries(cores)
    .map(([name, value]) => `${name} ${value.toFixed(2)}`)
    .join(', ');
}

/**
 * What a benchmark creates, released once on every path (done, failure, SIGINT or SIGTERM):
 * fio, control clients, daemons (by pid), loop devices, then scratch directories.
 */
export class BenchResources {
  readonly devices: LoopDevice[] = [];
  readonly children = new Children();
  readonly clients = new Set<{ close(): void }>();
  private readonly dirs: string[] = [];
  private readonly timers: NodeJS.Timeout[] = [];
  private cleaned: Promise<void> | undefined;
  private readonly onSignal = (signal: NodeJS.Signals): void => {
    console.error(`\n${signal}: cleaning up`);
    void this.cleanup().finally(() => process.exit(130));
  };

  constructor() {
    process.once('SIGINT', this.onSignal).once('SIGTERM', this.onSignal);
  }

  /** A scratch directory under `parent`, removed at cleanup. */
  tempDir(parent: string, prefix: string): string {
    const dir = mkdtempSync(join(parent, prefix));
    this.dirs.push(dir);
    return dir;
  }

  /** An interval cleared at cleanup. */
  every(ms: number, tick: () => void): NodeJS.Timeout {
    const timer = setInterval(tick, ms);
    this.timers.push(timer);
    return timer;
  }

  cleanup(): Promise<void> {
    this.cleaned ??= (async () => {
      for (const timer of this.timers) clearInterval(timer);
      await stopRunningFio();
      for (const client of this.clients) client.close();
      await this.children.stopAll();
      detachLoopDevices(this.devices);
      for (const dir of this.dirs) rmSync(dir, { recursive: true, force: true });
      process.off('SIGINT', this.onSignal).off('SIGTERM', this.onSignal);
    })();
    return this.cleaned;
  }
}

/** Progress lines go to stderr, so stdout holds only the result table. */
export function log(message: string): void {
  process.stderr.write(`  ${message}\n`);
}

/** In sync with nothing owed: connected, not suspended, nothing dirty. */
export const inSync = (info: MirrorInfo): boolean => info.state === 'INSYNC' && info.linkUp && !info.suspended && info.dirtyBytes === 0;

/** The single mirror of `volume` (what `blockmirror --json mirror status` prints). */
export async function mirrorStatus(client: ControlClient, volume: string): Promise<MirrorInfo> {
  const { mirrors } = await client.request('mirror.status', { volume });
  if (mirrors.length !== 1) throw new Error(`expected one mirror of ${volume}, got ${mirrors.length}`);
  return mirrors[0] as MirrorInfo;
}

/** Polls the mirror every 20 ms until `done`; fails in ERROR or after timeoutMs. */
export async function waitForMirror(client: ControlClient, volume: string, what: string, done: (info: MirrorInfo) => boolean, timeoutMs: number): Promise<MirrorInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await mirrorStatus(client, volume);
    if (done(info)) return info;
    if (info.state === 'ERROR') throw new Error(`mirror in ERROR while waiting for ${what}: ${JSON.stringify(info.error)}`);
    if (Date.now() > deadline) throw new Error(`mirror not ${what} after ${timeoutMs} ms: ${JSON.stringify({ state: info.state, dirtyBytes: info.dirtyBytes, cause: info.cause })}`);
    await sleep(20);
  }
}
