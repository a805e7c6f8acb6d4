// Two real daemons replicating: a source (hostA) and a target (hostB, --listen on 127.0.0.1),
// each on its own scratch device, optionally with the TCP fault proxy between them. Everything
// is torn down with the test (daemons by pid, loop devices, files).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { daemonPaths, runCli, runTool, startDaemon, type CliResult, type DaemonPaths, type RunningDaemon } from './daemon';
import { scratchDevice, scratchDir, type ScratchDevice } from './loop';
import { startTcpProxy, type TcpProxy } from './tcp-proxy';

interface TestLike {
  teardown(fn: () => void | Promise<void>): void;
}

/** Short timings so tests see cracks, retries and recoveries in well under a second. */
export const testReplicationTiming = { connectTimeoutMs: 2000, ackTimeoutMs: 3000, backoffBaseMs: 50, backoffMaxMs: 400 };

export interface MirrorPairOptions {
  sizeBytes: number;
  targetSizeBytes?: number;
  /** Random bytes written at the start of the source device before it is added. */
  fillBytes?: number;
  proxy?: boolean;
  /** Source uses a different secret than the target expects. */
  wrongSecret?: boolean;
  /** Overrides of testReplicationTiming for both daemons. */
  timing?: Partial<typeof testReplicationTiming>;
  /** Extra environment of the target daemon (fault injection). */
  targetEnv?: NodeJS.ProcessEnv;
}

export interface MirrorPair {
  source: RunningDaemon;
  target: RunningDaemon;
  sourceDevice: ScratchDevice;
  targetDevice: ScratchDevice;
  proxy: TcpProxy | undefined;
  targetPort: number;
  sourceUri: string;
  targetUri: string;
  /** The secret file the source uses, and the one the target expects. */
  sourceSecretFile: string;
  targetSecretFile: string;
  restartTarget(): Promise<void>;
  restartSource(): Promise<void>;
  /** SIGKILL the source daemon (a crash), then start it again on the same state dir. */
  crashSource(beforeStart?: () => void | Promise<void>): Promise<void>;
  /** SIGKILL the target daemon, then start it again on the same state dir and port. */
  crashTarget(beforeStart?: () => void | Promise<void>): Promise<void>;
  addMirror(options?: { mode?: 'sync' | 'async' | 'stack'; onDisconnect?: 'continue' | 'block'; maxRateBytesPerSec?: number; asyncBufferBytes?: number }): Promise<MirrorStatus>;
  status(): Promise<MirrorStatus>;
  waitFor(predicate: (status: MirrorStatus) => boolean, what: string, timeoutMs?: number): Promise<MirrorStatus>;
}

/** The JSON `mirror status` gives for one mirror (the fields tests use). */
export interface MirrorStatus {
  mode: string;
  state: string;
  dirtyBytes: number;
  progressPercent: number;
  linkUp: boolean;
  fullCopyDone: boolean;
  fastResync: boolean;
  error: { code: string; reason: string } | null;
  cause: { event: string; reason: string; code: string | null };
  sent: { liveBytes: number; copyBytes: number; zeroBytes: number; liveWrites: number };
  history: Array<{ from: string; to: string; event: string; reason: string }>;
  recovery: { kind: string; detail: string; dirtyBytesAtStart: number };
  async: { ordered: boolean; bufferBytes: number; bufferedBytes: number; bufferedWrites: number; overflows: number; writes: number; epochs: number } | null;
  writeIntent: { capacityExtents: number; hotExtents: number; transactions: number; pageWrites: number; acquires: number; acquiresWaited: number } | null;
}

function writeConfig(paths: DaemonPaths, timing: Partial<typeof testReplicationTiming> = {}): void {
  fs.writeFileSync(path.join(paths.dir, 'config.json'), JSON.stringify({ replication: { ...testReplicationTiming, ...timing } }) + '\n');
}

export async function startMirrorPair(t: TestLike, options: MirrorPairOptions): Promise<MirrorPair> {
  const sourceDevice = scratchDevice(t, options.sizeBytes);
  const targetDevice = scratchDevice(t, options.targetSizeBytes ?? options.sizeBytes);
  if (options.fillBytes !== undefined) {
    const fd = fs.openSync(sourceDevice.path, 'r+');
    try {
      fs.writeSync(fd, crypto.randomBytes(options.fillBytes), 0, options.fillBytes, 0);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
  const keys = scratchDir(t, 'bm-keys-');
  const secretFile = path.join(keys, 'shared.key');
  fs.writeFileSync(secretFile, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
  const sourceSecretFile = options.wrongSecret === true ? path.join(keys, 'wrong.key') : secretFile;
  if (options.wrongSecret === true) fs.writeFileSync(sourceSecretFile, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });

  const targetPaths = daemonPaths(t);
  writeConfig(targetPaths, options.timing);
  let target = await startDaemon(t, { paths: targetPaths, args: ['--node-name', 'hostB', '--listen', '127.0.0.1:0'], env: options.targetEnv });
  const listen = String((await target.request('status')).replicationListen);
  const targetPort = Number(listen.slice(listen.lastIndexOf(':') + 1));
  await target.request('peer.add', { name: 'hostA', address: '127.0.0.1:9', secretFile });
  await target.request('volume.add', { name: 'vol0', device: targetDevice.path, role: 'mirror' });

  const proxy = options.proxy === true ? await startTcpProxy(t, targetPort) : undefined;
  const sourcePaths = daemonPaths(t);
  writeConfig(sourcePaths, options.timing);
  let source = await startDaemon(t, { paths: sourcePaths, args: ['--node-name', 'hostA'] });
  await source.request('peer.add', { name: 'hostB', address: `127.0.0.1:${proxy?.port ?? targetPort}`, secretFile: sourceSecretFile });
  await source.request('volume.add', { name: 'vol0', device: sourceDevice.path });

  const pair: MirrorPair = {
    get source() {
      return source;
    },
    get target() {
      return target;
    },
    sourceDevice,
    targetDevice,
    proxy,
    targetPort,
    sourceSecretFile,
    targetSecretFile: secretFile,
    sourceUri: `nbd+unix:///vol0?socket=${sourcePaths.nbdSocket}`,
    targetUri: `nbd+unix:///vol0?socket=${targetPaths.nbdSocket}`,
    async restartTarget() {
      await target.stop('SIGTERM');
      target = await startDaemon(t, { paths: targetPaths, args: ['--node-name', 'hostB', '--listen', `127.0.0.1:${targetPort}`], env: options.targetEnv });
    },
    async crashTarget(beforeStart) {
      await target.stop('SIGKILL');
      await beforeStart?.();
      target = await startDaemon(t, { paths: targetPaths, args: ['--node-name', 'hostB', '--listen', `127.0.0.1:${targetPort}`], env: options.targetEnv });
    },
    async restartSource() {
      await source.stop('SIGTERM');
      source = await startDaemon(t, { paths: sourcePaths, args: ['--node-name', 'hostA'] });
    },
    async crashSource(beforeStart) {
      await source.stop('SIGKILL');
      await beforeStart?.();
      source = await startDaemon(t, { paths: sourcePaths, args: ['--node-name', 'hostA'] });
    },
    async addMirror(mirrorOptions = {}) {
      return (await source.request('mirror.add', { volume: 'vol0', peer: 'hostB', target: 'vol0', mode: 'sync', ...mirrorOptions })) as MirrorStatus;
    },
    async status() {
      const result = (await source.request('mirror.status', { volume: 'vol0' })) as { mirrors: MirrorStatus[] };
      return result.mirrors[0] as MirrorStatus;
    },
    async waitFor(predicate, what, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs;
      let last: MirrorStatus | undefined;
      while (Date.now() < deadline) {
        last = await pair.status();
        if (predicate(last)) return last;
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
      throw new Error(`mirror did not reach ${what} in ${timeoutMs} ms; last status: ${JSON.stringify(last)}`);
    },
  };
  return pair;
}

/** sha256 of a whole device (or file), read with O_DIRECT so no stale page cache is hashed. */
export async function deviceSha256(devicePath: string): Promise<string> {
  const result = await runTool('sh', ['-c', `dd if='${devicePath}' iflag=direct bs=1M status=none | sha256sum`], 60_000);
  if (result.code !== 0) throw new Error(`hashing ${devicePath} failed: ${result.stderr}`);
  return result.stdout.split(' ')[0] ?? '';
}

export async function qemuIo(uri: string, commands: readonly string[]): Promise<{ code: number | null; output: string }> {
  const args = ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), uri];
  const result = await runTool('qemu-io', args, 60_000);
  return { code: result.code, output: result.stdout + result.stderr };
}

/** fio through NBD: random writes of mixed sizes over the range, then a crc32c verify pass. */
export async function fioVerify(t: TestLike, uri: string, offsetBytes: number, sizeBytes: number, extra: string[] = []): Promise<{ code: number | null; stderr: string }> {
  const output = path.join(scratchDir(t), 'fio.json');
  const result = await runTool('fio', [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bssplit=4k/50:16k/30:64k/20',
    '--iodepth=16',
    `--offset=${offsetBytes}`,
    `--size=${sizeBytes}`,
    '--verify=crc32c',
    '--verify_fatal=1',
    '--do_verify=1',
    '--verify_state_save=0',
    '--output-format=json',
    `--output=${output}`,
    ...extra,
  ], 120_000);
  return { code: result.code, stderr: result.stderr };
}

/** The `blockmirror` CLI against one daemon's control socket: `cliOn(pair.target)('--json', 'volume', 'info', 'vol0')`. */
export function cliOn(daemon: RunningDaemon): (...args: string[]) => Promise<CliResult> {
  return (...args) => runCli(['--socket', daemon.paths.controlSocket, ...args]);
}

/** `volume info <name> --json` through the control socket (the fields the CLI prints). */
export async function volumeInfo(daemon: RunningDaemon, name = 'vol0'): Promise<Record<string, any>> {
  return (await daemon.request('volume.info', { name })) as Record<string, any>;
}

/** Poll `volume.info` until predicate holds (e.g. no NBD connection left after a client exited). */
export async function waitForVolume(daemon: RunningDaemon, predicate: (info: Record<string, any>) => boolean, what: string, name = 'vol0', timeoutMs = 5000): Promise<Record<string, any>> {
  const deadline = Date.now() + timeoutMs;
  let last: Record<string, any> | undefined;
  while (Date.now() < deadline) {
    last = await volumeInfo(daemon, name);
    if (predicate(last)) return last;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`volume ${name} did not reach ${what} in ${timeoutMs} ms; last info: ${JSON.stringify(last)}`);
}

/** Take the path between a pair's daemons down (refuse new connections, cut open ones; needs
 *  `proxy: true`) and wait until the source's mirror has noticed. Flush first if unflushed
 *  regions must not count as dirty. */
export async function cutLink(pair: MirrorPair): Promise<MirrorStatus> {
  if (pair.proxy === undefined) throw new Error('cutLink needs a pair started with proxy: true');
  pair.proxy.refuse(true);
  pair.proxy.cut();
  return pair.waitFor((status) => status.state !== 'INSYNC' && !status.linkUp, 'link down');
}

/** Let the source reach the target again (undoes cutLink). */
export function restoreLink(pair: MirrorPair): void {
  if (pair.proxy === undefined) throw new Error('restoreLink needs a pair started with proxy: true');
  pair.proxy.refuse(false);
}
