// Daemon configuration: built-in defaults, then the optional JSON file, then command-line flags.
// The file is validated strictly (unknown fields are errors) so a typo is not silently ignored.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { ACTIVITY_LOG_EXTENTS_DEFAULT, ACTIVITY_LOG_EXTENTS_MAX, ACTIVITY_LOG_EXTENTS_MIN } from '../write-intent/write-intent-log';
import { BmError, errorCode } from '../control/errors';
import { BUSY_POLL_MICROS_MAX } from '../native/types';
import { formatFirstIssue } from './zod-issues';

export const defaultConfigPath = '/etc/blockmirror/blockmirror.json';
export const configFileBytesMax = 64 * 1024;

export const logLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof logLevels)[number];

export interface HostPort {
  host: string;
  port: number;
}

export interface DaemonConfig {
  controlSocket: string;
  nbdSocket: string;
  nbdListen: HostPort | null;
  /** Replication address (--listen): peers connect here to write this daemon's mirror volumes. */
  replicationListen: HostPort | null;
  /** This daemon's name towards its peers (they `peer add` it under this name). */
  nodeName: string;
  /** Replication timeouts and retry backoff, in ms. */
  replication: ReplicationTiming;
  /** Target side: flush a mirror volume at every async epoch boundary (file replication.epochFlush). */
  epochFlush: boolean;
  /** Write-intent log of mirrored volumes (docs/WRITE-INTENT.md). */
  writeIntent: { activityLogExtents: number };
  stateDir: string;
  logLevel: LogLevel;
  /** Busy-poll maximum of the I/O engine in microseconds, 0 off (native/busy_poll.h). */
  busyPollMicros: number;
  /** The file that was read, or null when the default file does not exist. */
  configPath: string | null;
}

export interface ReplicationTiming {
  connectTimeoutMs: number;
  ackTimeoutMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
}

export const replicationTimingDefaults: ReplicationTiming = {
  connectTimeoutMs: 10_000,
  ackTimeoutMs: 30_000,
  backoffBaseMs: 500,
  backoffMaxMs: 30_000,
};

/** Node names follow the peer name rules: they are matched against `peer add` names. */
const nodeNamePattern = /^(?!\.\.?$)[A-Za-z0-9._-]{1,64}$/;

/** The host name, shortened to what a node name may hold. */
function defaultNodeName(): string {
  const host = os.hostname().split('.')[0] ?? '';
  return nodeNamePattern.test(host) ? host : 'blockmirror';
}

export const defaults = {
  controlSocket: '/run/blockmirror/control.sock',
  nbdSocket: '/run/blockmirror/nbd.sock',
  stateDir: '/var/lib/blockmirror',
  logLevel: 'info',
  // qemu's AioContext default (poll-max-ns 32768): on the bench VM it is what closes the QD1 gap.
  busyPollMicros: 32,
} as const satisfies Partial<DaemonConfig>;

/** "127.0.0.1:10809", "[::1]:10809", "localhost:0" (port 0 picks a free port). */
export function parseHostPort(text: string): HostPort | null {
  const match = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s[\]]+)):(\d{1,5})$/.exec(text);
  if (match === null) return null;
  const host = match[1] ?? match[2];
  const port = Number(match[3]);
  if (host === undefined || port > 65535) return null;
  return { host, port };
}

/** Unix socket paths are limited to 107 bytes by sockaddr_un. */
const socketPathBytesMax = 107;
const absolutePath = z.string().min(1).startsWith('/', 'expected an absolute path');
const socketPath = absolutePath.refine((value) => Buffer.byteLength(value) <= socketPathBytesMax, `expected at most ${socketPathBytesMax} bytes (sockaddr_un limit)`);

export const configFileSchema = z.strictObject({
  controlSocket: socketPath.optional(),
  nbdSocket: socketPath.optional(),
  nbdListen: z
    .string()
    .refine((value) => parseHostPort(value) !== null, 'expected HOST:PORT')
    .nullable()
    .optional(),
  listen: z
    .string()
    .refine((value) => parseHostPort(value) !== null, 'expected HOST:PORT')
    .nullable()
    .optional(),
  stateDir: absolutePath.optional(),
  logLevel: z.enum(logLevels).optional(),
  busyPollMicros: z.number().int().min(0).max(BUSY_POLL_MICROS_MAX).optional(),
  nodeName: z.string().regex(nodeNamePattern, 'expected 1 to 64 characters from [A-Za-z0-9._-]').optional(),
  replication: z
    .strictObject({
      connectTimeoutMs: z.number().int().min(100).max(600_000).optional(),
      ackTimeoutMs: z.number().int().min(100).max(3_600_000).optional(),
      backoffBaseMs: z.number().int().min(1).max(3_600_000).optional(),
      backoffMaxMs: z.number().int().min(1).max(3_600_000).optional(),
      epochFlush: z.boolean().optional(),
    })
    .refine((timing) => (timing.backoffBaseMs ?? replicationTimingDefaults.backoffBaseMs) <= (timing.backoffMaxMs ?? replicationTimingDefaults.backoffMaxMs), 'backoffBaseMs must not exceed backoffMaxMs')
    .optional(),
  writeIntent: z
    .strictObject({
      /** 4 MiB extents kept hot per mirrored volume; 0 switches recording off (a crash then
       *  means a full copy). */
      activityLogExtents: z
        .number()
        .int()
        .refine((extents) => extents === 0 || (extents >= ACTIVITY_LOG_EXTENTS_MIN && extents <= ACTIVITY_LOG_EXTENTS_MAX), `expected 0 (off) or ${ACTIVITY_LOG_EXTENTS_MIN}..${ACTIVITY_LOG_EXTENTS_MAX}`)
        .optional(),
    })
    .optional(),
});
export type ConfigFile = z.infer<typeof configFileSchema>;

function configError(configPath: string, detail: string, cause?: unknown): BmError {
  return new BmError('BM_ERR_CONFIG', `config ${configPath}: ${detail}`, { cause });
}

/** Read and validate a config file. A missing file is an error unless `missingOk` (the default path). */
export function loadConfigFile(configPath: string, missingOk: boolean): ConfigFile | null {
  let text: string;
  try {
    const stat = fs.statSync(configPath);
    if (!stat.isFile()) throw configError(configPath, 'not a regular file');
    if (stat.size > configFileBytesMax) throw configError(configPath, `larger than ${configFileBytesMax} bytes`);
    text = fs.readFileSync(configPath, 'utf8');
  } catch (error) {
    if (error instanceof BmError) throw error;
    if (errorCode(error) === 'ENOENT' && missingOk) return null;
    throw configError(configPath, `cannot read: ${errorCode(error) ?? String(error)}`, error);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw configError(configPath, `not valid JSON: ${(error as Error).message}`, error);
  }
  const parsed = configFileSchema.safeParse(raw);
  if (!parsed.success) throw configError(configPath, formatFirstIssue(parsed.error));
  return parsed.data;
}

/** What the command line gave; undefined means "not given". */
export interface CliConfig {
  config?: string;
  controlSocket?: string;
  nbdSocket?: string;
  nbdListen?: string;
  listen?: string;
  nodeName?: string;
  stateDir?: string;
  logLevel?: string;
  busyPollUs?: string;
}

function cliError(flag: string, detail: string): BmError {
  return new BmError('BM_ERR_INVALID_ARGUMENT', `${flag}: ${detail}`);
}

/** A path from the command line, relative to the working directory. Empty is refused:
 *  path.resolve('') is the working directory (/ under systemd). */
function cliPath(flag: string, value: string): string {
  if (value.trim() === '') throw cliError(flag, 'expected a path, got an empty string');
  return path.resolve(value);
}

function cliSocketPath(flag: string, value: string): string {
  const resolved = cliPath(flag, value);
  if (Buffer.byteLength(resolved) > socketPathBytesMax) throw cliError(flag, `expected at most ${socketPathBytesMax} bytes (sockaddr_un limit)`);
  return resolved;
}

/** Merge defaults, file and flags (flags win). Relative paths on the command line are taken from
 *  the working directory; the file only accepts absolute paths. */
export function resolveConfig(cli: CliConfig): DaemonConfig {
  const configPath = cli.config === undefined ? defaultConfigPath : cliPath('--config', cli.config);
  const file = loadConfigFile(configPath, cli.config === undefined) ?? null;

  let nbdListen: HostPort | null = null;
  if (cli.nbdListen !== undefined) {
    nbdListen = parseHostPort(cli.nbdListen);
    if (nbdListen === null) throw cliError('--nbd-listen', 'expected HOST:PORT');
  } else if (file?.nbdListen != null) {
    nbdListen = parseHostPort(file.nbdListen);
  }

  let replicationListen: HostPort | null = null;
  if (cli.listen !== undefined) {
    replicationListen = parseHostPort(cli.listen);
    if (replicationListen === null) throw cliError('--listen', 'expected HOST:PORT');
  } else if (file?.listen != null) {
    replicationListen = parseHostPort(file.listen);
  }

  let logLevel: LogLevel = file?.logLevel ?? defaults.logLevel;
  if (cli.logLevel !== undefined) {
    const parsed = z.enum(logLevels).safeParse(cli.logLevel);
    if (!parsed.success) throw cliError('--log-level', `expected one of ${logLevels.join(', ')}`);
    logLevel = parsed.data;
  }

  let busyPollMicros: number = file?.busyPollMicros ?? defaults.busyPollMicros;
  if (cli.busyPollUs !== undefined) {
    if (!/^\d{1,4}$/.test(cli.busyPollUs) || Number(cli.busyPollUs) > BUSY_POLL_MICROS_MAX) throw cliError('--busy-poll-us', `expected an integer 0..${BUSY_POLL_MICROS_MAX} (microseconds; 0 turns polling off)`);
    busyPollMicros = Number(cli.busyPollUs);
  }

  let nodeName = file?.nodeName ?? defaultNodeName();
  if (cli.nodeName !== undefined) {
    if (!nodeNamePattern.test(cli.nodeName)) throw cliError('--node-name', 'expected 1 to 64 characters from [A-Za-z0-9._-]');
    nodeName = cli.nodeName;
  }

  const { epochFlush = false, ...replicationTiming } = file?.replication ?? {};
  return {
    nodeName,
    replication: { ...replicationTimingDefaults, ...replicationTiming },
    epochFlush,
    writeIntent: { activityLogExtents: file?.writeIntent?.activityLogExtents ?? ACTIVITY_LOG_EXTENTS_DEFAULT },
    controlSocket: cli.controlSocket !== undefined ? cliSocketPath('--control-socket', cli.controlSocket) : (file?.controlSocket ?? defaults.controlSocket),
    nbdSocket: cli.nbdSocket !== undefined ? cliSocketPath('--nbd-socket', cli.nbdSocket) : (file?.nbdSocket ?? defaults.nbdSocket),
    nbdListen,
    replicationListen,
    stateDir: cli.stateDir !== undefined ? cliPath('--state-dir', cli.stateDir) : (file?.stateDir ?? defaults.stateDir),
    logLevel,
    busyPollMicros,
    configPath: file === null ? null : configPath,
  };
}
