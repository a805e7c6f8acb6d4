// Entry point of the blockmirror CLI (bin/blockmirror.js calls main(process.argv)).
// Exit status: 0 success, 1 the daemon answered with an error (or the config file read for the
// socket is unusable), 2 bad usage, 3 daemon unreachable.
import path from 'node:path';
import { Command, CommanderError } from 'commander';
import { defaultConfigPath, defaults, loadConfigFile } from '../config/config';
import { ControlClient } from '../control/client';
import { BmError, ControlErrorCode, errorCode, errorMessage } from '../control/errors';
import { asyncBufferBytesMax, asyncBufferBytesMin, syncTimeoutMsMax, syncTimeoutMsMin, type MethodName, type MethodParams, type MethodResults } from '../control/protocol';
import { packageVersion } from '../daemon/version';
import {
  formatMirrorList,
  formatMirrorRemoved,
  formatMirrorStatus,
  formatPeerInfo,
  formatPeerList,
  formatPeerRemoved,
  formatRemoved,
  formatStatus,
  formatVolumeInfo,
  formatVolumeList,
  parseDurationMs,
  parseRate,
  parseSize,
} from './format';

export const exitCodes = { ok: 0, daemonError: 1, usage: 2, unreachable: 3 } as const;
const requestTimeoutMsDefault = 60_000;

interface GlobalOptions {
  socket?: string;
  config?: string;
  json: boolean;
  timeout: string;
}

function usageError(message: string): BmError {
  return new BmError('BM_ERR_USAGE', message);
}

const timeoutMsMax = 2 ** 31 - 1;

/** A path argument, relative to the working directory; empty is a usage error (path.resolve('')
 *  would silently be the working directory). */
function cliPath(flag: string, value: string): string {
  if (value.trim() === '') throw usageError(`${flag}: expected a path, got an empty string`);
  return path.resolve(value);
}

/** --socket, else the controlSocket of the daemon's config file (--config, or the default path
 *  when it exists), else the built-in default. A default file this user may not read (EACCES:
 *  root's file, the CLI run by a member of the socket's group) is skipped, as before the CLI
 *  read it; any other problem with the file is an error rather than a guess. */
export function controlSocketPath(options: Pick<GlobalOptions, 'socket' | 'config'>, load: typeof loadConfigFile = loadConfigFile): string {
  if (options.socket !== undefined) return cliPath('--socket', options.socket);
  if (options.config !== undefined) return load(cliPath('--config', options.config), false)?.controlSocket ?? defaults.controlSocket;
  try {
    return load(defaultConfigPath, true)?.controlSocket ?? defaults.controlSocket;
  } catch (error) {
    if (errorCode((error as { cause?: unknown }).cause) === 'EACCES') return defaults.controlSocket;
    throw error;
  }
}

/** Run one request and print its result: JSON with --json, else the human rendering. */
async function call<M extends MethodName>(
  program: Command,
  method: M,
  params: MethodParams<M>,
  render: (result: MethodResults[M]) => string,
): Promise<void> {
  const options = program.opts<GlobalOptions>();
  // Node's timers wait at most 2^31-1 ms (about 24.8 days); a longer one fires at once.
  const timeoutMs = /^\d+$/.test(options.timeout) ? Number(options.timeout) : NaN;
  if (!Number.isSafeInteger(timeoutMs) || timeoutMs <= 0 || timeoutMs > timeoutMsMax) {
    throw usageError(`--timeout: expected a whole number of milliseconds from 1 to ${timeoutMsMax}`);
  }
  const client = await ControlClient.connect({ socketPath: controlSocketPath(options), timeoutMs });
  try {
    const result = await client.request(method, params);
    process.stdout.write(options.json ? JSON.stringify(result, null, 2) + '\n' : render(result));
  } finally {
    client.close();
  }
}

interface TunableOptions {
  maxRate?: string;
  syncTimeout?: string;
  onTimeout?: string;
}

/** --max-rate, --sync-timeout and --on-timeout as control params. Rates and durations are parsed
 *  here (BM_ERR_USAGE); the policy names are checked by the daemon (BM_ERR_INVALID_ARGUMENT). */
function tunables(options: TunableOptions): Record<string, unknown> {
  const params: Record<string, unknown> = {};
  if (options.maxRate !== undefined) {
    // "none": no cap (mirror set removes one; mirror add has none by default).
    const rate = /^none$/i.test(options.maxRate) ? null : parseRate(options.maxRate);
    if (rate === null && !/^none$/i.test(options.maxRate)) throw usageError('--max-rate: expected a positive number of bytes per second, e.g. 50M, or none');
    params.maxRateBytesPerSec = rate;
  }
  if (options.syncTimeout !== undefined) {
    const ms = parseDurationMs(options.syncTimeout);
    if (ms === null || ms < syncTimeoutMsMin || ms > syncTimeoutMsMax) {
      throw usageError(`--sync-timeout: expected a duration from ${syncTimeoutMsMin}ms to ${syncTimeoutMsMax / 3_600_000}h with a unit (ms, s, m, h), e.g. 500ms or 5s`);
    }
    params.syncTimeoutMs = ms;
  }
  if (options.onTimeout !== undefined) params.onTimeout = options.onTimeout;
  return params;
}

function buildProgram(): Command {
  const program = new Command('blockmirror')
    .description('Manage blockmirrord through its control socket.')
    .version(packageVersion())
    .option('--socket <path>', `control socket of blockmirrord (default: controlSocket of the config file, else ${defaults.controlSocket})`)
    .option('--config <path>', `blockmirrord's JSON config file, read for its controlSocket (default ${defaultConfigPath}, optional)`)
    .option('--json', 'print the result as JSON', false)
    .option('--timeout <ms>', 'give up on a request after this many milliseconds', String(requestTimeoutMsDefault))
    .exitOverride()
    .showHelpAfterError(false)
    // Usage errors in the same "blockmirror: CODE: message" form as every other error (commander
    // says "error: ..."); subcommands created below inherit this.
    .configureOutput({ outputError: (text, write) => write(`blockmirror: BM_ERR_USAGE: ${text.replace(/^error: /, '')}`) });

  const volume = program.command('volume').description('add, list, inspect and remove volumes').exitOverride();
  volume
    .command('add <name>')
    .description('register a block device (or file) as a volume and export it over NBD')
    .requiredOption('--device <path>', 'block device or file to serve')
    .option('--read-only', 'export read-only', false)
    .option('--mirror', 'a replication target: read-only to NBD clients, written only by the mirror service', false)
    .exitOverride()
    .action((name: string, options: { device: string; readOnly: boolean; mirror: boolean }) =>
      call(
        program,
        'volume.add',
        { name, device: cliPath('--device', options.device), readOnly: options.readOnly, role: options.mirror ? 'mirror' : 'primary' },
        formatVolumeInfo,
      ),
    );
  volume
    .command('list')
    .description('list volumes')
    .exitOverride()
    .action(() => call(program, 'volume.list', {}, (result) => formatVolumeList(result.volumes)));
  volume
    .command('info <name>')
    .description('show one volume, including its NBD URI')
    .exitOverride()
    .action((name: string) => call(program, 'volume.info', { name }, formatVolumeInfo));
  volume
    .command('remove <name>')
    .description('stop exporting a volume and forget it (the device is not touched)')
    .option('--force', 'disconnect NBD clients first instead of refusing', false)
    .exitOverride()
    .action((name: string, options: { force: boolean }) => call(program, 'volume.remove', { name, force: options.force }, formatRemoved));
  volume
    .command('set <name>')
    .description('change a volume\'s settings')
    .option('--fast-resync <on|off>', 'on: a reconnecting mirror resends only dirty regions; off: it copies the whole volume')
    .exitOverride()
    .action((name: string, options: { fastResync?: string }) => {
      const params: MethodParams<'volume.set'> = { name };
      if (options.fastResync !== undefined) {
        if (options.fastResync !== 'on' && options.fastResync !== 'off') throw usageError('--fast-resync: expected on or off');
        params.fastResync = options.fastResync === 'on';
      }
      return call(program, 'volume.set', params, formatVolumeInfo);
    });
  volume
    .command('promote <name>')
    .description('make a mirror volume writable to NBD clients (failover by hand); its source will find a split brain')
    .option('--force', 'cut a source replicating into it instead of refusing', false)
    .exitOverride()
    .action((name: string, options: { force: boolean }) => call(program, 'volume.promote', { name, force: options.force }, formatVolumeInfo));
  volume
    .command('demote <name>')
    .description('make a promoted mirror volume read-only to NBD clients again (the split brain stays until its source resolves it)')
    .option('--force', 'disconnect NBD clients first instead of refusing', false)
    .exitOverride()
    .action((name: string, options: { force: boolean }) => call(program, 'volume.demote', { name, force: options.force }, formatVolumeInfo));
  const peer = program.command('peer').description('add, list, inspect and remove replication peers').exitOverride();
  peer
    .command('add <name>')
    .description('register a peer daemon and the file holding the secret shared with it')
    .requiredOption('--address <host:port>', "the peer's replication address")
    .requiredOption('--secret-file <path>', 'file with the shared secret (mode 0600, at least 16 bytes); only the path is stored')
    .exitOverride()
    .action((name: string, options: { address: string; secretFile: string }) =>
      call(program, 'peer.add', { name, address: options.address, secretFile: cliPath('--secret-file', options.secretFile) }, formatPeerInfo),
    );
  peer
    .command('list')
    .description('list peers')
    .exitOverride()
    .action(() => call(program, 'peer.list', {}, (result) => formatPeerList(result.peers)));
  peer
    .command('info <name>')
    .description('show one peer and whether its secret file is usable')
    .exitOverride()
    .action((name: string) => call(program, 'peer.info', { name }, formatPeerInfo));
  peer
    .command('remove <name>')
    .description('forget a peer (its secret file is not touched)')
    .exitOverride()
    .action((name: string) => call(program, 'peer.remove', { name }, formatPeerRemoved));
  const mirror = program.command('mirror').description('replicate volumes to peers: add, status, set, suspend, resume, reset, remove').exitOverride();
  mirror
    .command('add <volume>')
    .description('start mirroring a volume to a mirror volume on a peer (first a full copy, then live)')
    .requiredOption('--peer <name>', 'the peer daemon that holds the target')
    .requiredOption('--target <name>', 'the mirror volume on the peer (added there with --mirror)')
    .option('--mode <mode>', 'sync: a write is acknowledged once written locally and on the target; async: once written locally, then sent in order (the target stays crash consistent); stack: once written locally, dirty regions shipped in the background', 'sync')
    .option('--async-buffer <size>', 'async mode: bytes of writes in flight to the target before the mirror falls back to its dirty bitmap (K, M or G suffix; default 64M)')
    .option('--on-disconnect <policy>', 'continue: keep writing and resync the dirty regions later; block: hold writes until in sync again', 'continue')
    .option('--max-rate <rate>', 'cap the copy traffic, bytes per second with an optional K, M or G suffix (live writes are never capped)')
    .option('--sync-timeout <duration>', 'sync mode: how long a forwarded write or flush may wait for the target, e.g. 500ms, 5s (default 5s)')
    .option('--on-timeout <policy>', 'suspend: past the sync timeout the write completes locally and the mirror resyncs later; block: it keeps waiting for the target (default: block with --on-disconnect block, else suspend)')
    .exitOverride()
    .action((volumeName: string, options: { peer: string; target: string; mode: string; onDisconnect: string; asyncBuffer?: string } & TunableOptions) => {
      const params: Record<string, unknown> = { volume: volumeName, peer: options.peer, target: options.target, mode: options.mode, onDisconnect: options.onDisconnect, ...tunables(options) };
      if (params.maxRateBytesPerSec === null) delete params.maxRateBytesPerSec;
      if (options.asyncBuffer !== undefined) {
        const bytes = parseSize(options.asyncBuffer);
        if (bytes === null || bytes < asyncBufferBytesMin || bytes > asyncBufferBytesMax) {
          throw usageError('--async-buffer: expected a size from 1M to 1G with an optional K, M or G suffix, e.g. 64M');
        }
        params.asyncBufferBytes = bytes;
      }
      return call(program, 'mirror.add', params as MethodParams<'mirror.add'>, (result) => formatMirrorStatus([result]));
    });
  mirror
    .command('set <volume>')
    .description('change a running mirror: mode, policies, sync timeout, copy rate (persisted; applies to the next write)')
    .option('--peer <name>', 'the mirror on this peer (needed when the volume has several)')
    .option('--mode <mode>', 'sync, async or stack')
    .option('--on-disconnect <policy>', 'continue or block')
    .option('--on-timeout <policy>', 'suspend or block')
    .option('--sync-timeout <duration>', 'e.g. 500ms, 5s, 1m')
    .option('--max-rate <rate>', 'cap the copy traffic (e.g. 50M), or "none" to remove the cap')
    .exitOverride()
    .action((volumeName: string, options: { peer?: string; mode?: string; onDisconnect?: string } & TunableOptions) => {
      const params: Record<string, unknown> = { volume: volumeName, ...tunables(options) };
      if (options.peer !== undefined) params.peer = options.peer;
      if (options.mode !== undefined) params.mode = options.mode;
      if (options.onDisconnect !== undefined) params.onDisconnect = options.onDisconnect;
      if (Object.keys(params).length === (options.peer === undefined ? 1 : 2)) {
        throw usageError('mirror set: nothing to change; give --mode, --on-disconnect, --on-timeout, --sync-timeout or --max-rate');
      }
      return call(program, 'mirror.set', params as MethodParams<'mirror.set'>, (result) => formatMirrorStatus([result]));
    });
  mirror
    .command('status <volume>')
    .description('state, mode, progress, bytes, rate and ETA of a volume\'s mirrors')
    .option('--peer <name>', 'only the mirror on this peer')
    .exitOverride()
    .action((volumeName: string, options: { peer?: string }) =>
      call(program, 'mirror.status', { volume: volumeName, ...(options.peer === undefined ? {} : { peer: options.peer }) }, (result) => formatMirrorStatus(result.mirrors)),
    );
  mirror
    .command('list')
    .description('list every mirror and its state')
    .exitOverride()
    .action(() => call(program, 'mirror.list', {}, (result) => formatMirrorList(result.mirrors)));
  for (const [command, description] of [
    ['suspend', 'stop replicating (writes go on and are recorded dirty)'],
    ['resume', 'retry now: leaves RESET, ERROR (once the cause is fixed) or a suspension'],
    ['reset', 'clear an ERROR and start over with a full copy'],
  ] as const) {
    mirror
      .command(`${command} <volume>`)
      .description(description)
      .option('--peer <name>', 'the mirror on this peer (needed when the volume has several)')
      .exitOverride()
      .action((volumeName: string, options: { peer?: string }) =>
        call(program, `mirror.${command}`, { volume: volumeName, ...(options.peer === undefined ? {} : { peer: options.peer }) }, (result) => formatMirrorStatus([result])),
      );
  }
  mirror
    .command('resolve <volume>')
    .description('end a split brain: --discard peer keeps this side (the target is overwritten where either side changed), --discard this keeps the target\'s data (restored here)')
    .requiredOption('--discard <side>', 'this or peer: whose changes made while apart are thrown away')
    .option('--peer <name>', 'the mirror on this peer (needed when the volume has several)')
    .exitOverride()
    .action((volumeName: string, options: { peer?: string; discard: string }) => {
      if (options.discard !== 'this' && options.discard !== 'peer') throw usageError('--discard: expected this or peer');
      return call(program, 'mirror.resolve', { volume: volumeName, discard: options.discard, ...(options.peer === undefined ? {} : { peer: options.peer }) }, (result) => formatMirrorStatus([result]));
    });
  mirror
    .command('remove <volume>')
    .description('stop and forget a mirror (the target volume keeps its data)')
    .option('--peer <name>', 'the mirror on this peer (needed when the volume has several)')
    .option('--force', 'remove even while the target is mid-copy (not a consistent image)', false)
    .exitOverride()
    .action((volumeName: string, options: { peer?: string; force: boolean }) =>
      call(program, 'mirror.remove', { volume: volumeName, force: options.force, ...(options.peer === undefined ? {} : { peer: options.peer }) }, formatMirrorRemoved),
    );
  program
    .command('status')
    .description('show daemon status')
    .exitOverride()
    .action(() => call(program, 'status', {}, formatStatus));
  return program;
}

function exitCodeFor(code: string): number {
  if (code === ControlErrorCode.DaemonUnreachable || code === ControlErrorCode.DaemonTimeout) return exitCodes.unreachable;
  if (code === 'BM_ERR_USAGE') return exitCodes.usage;
  return exitCodes.daemonError;
}

export async function run(argv: readonly string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync([...argv]);
    return exitCodes.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      // commander already printed its message; help/version exit 0.
      return error.exitCode === 0 ? exitCodes.ok : exitCodes.usage;
    }
    const code = errorCode(error) ?? ControlErrorCode.Internal;
    process.stderr.write(`blockmirror: ${code}: ${errorMessage(error)}\n`);
    return exitCodeFor(code);
  }
}

export function main(argv: readonly string[]): void {
  run(argv).then(
    (exitCode) => {
      process.exitCode = exitCode;
    },
    (error: unknown) => {
      process.stderr.write(`blockmirror: ${ControlErrorCode.Internal}: ${errorMessage(error)}\n`);
      process.exitCode = exitCodes.daemonError;
    },
  );
}
