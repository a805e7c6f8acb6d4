// Human output for the CLI. Scripts use --json; nothing here is meant to be parsed.
import type { MirrorInfo, MirrorRemoveResult, PeerInfo, PeerRemoveResult, StatusResult, VolumeInfo, VolumeRemoveResult } from '../control/protocol';

const sizeUnits = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function formatSize(bytes: number | null): string {
  if (bytes === null) return '-';
  let value = bytes;
  let unit = 0;
  const shown = (): string => value.toFixed(value >= 100 ? 0 : 1);
  // Step up also when rounding would show 1024 of a unit (1048575 B is "1.0 MiB", not "1024 KiB").
  while ((value >= 1024 || Number(shown()) >= 1024) && unit < sizeUnits.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${shown()} ${sizeUnits[unit]}`;
}

/** Left-aligned columns separated by two spaces, header first. */
export function formatTable(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, column) => (column === cells.length - 1 ? cell : cell.padEnd(widths[column] ?? 0)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n') + '\n';
}

function formatFields(fields: ReadonlyArray<readonly [string, string]>): string {
  const width = Math.max(...fields.map(([key]) => key.length));
  return fields.map(([key, value]) => `${(key + ':').padEnd(width + 1)}  ${value}`).join('\n') + '\n';
}

export function formatVolumeList(volumes: readonly VolumeInfo[]): string {
  if (volumes.length === 0) return 'no volumes\n';
  return formatTable(
    ['NAME', 'STATE', 'SIZE', 'MODE', 'CONNECTIONS', 'DEVICE'],
    volumes.map((volume) => [
      volume.name,
      volume.state,
      formatSize(volume.sizeBytes),
      volumeMode(volume),
      String(volume.connections),
      volume.device,
    ]),
  );
}

/** The MODE column: what an NBD client may do. */
function volumeMode(volume: VolumeInfo): string {
  if (volume.readOnly) return 'ro';
  return volume.role === 'mirror' ? 'mirror' : 'rw';
}

export function formatVolumeInfo(volume: VolumeInfo): string {
  const fields: Array<[string, string]> = [
    ['name', volume.name],
    ['uuid', volume.uuid],
    ['device', volume.device],
    ['state', volume.state],
  ];
  if (volume.reason !== undefined) fields.push(['reason', volume.reason]);
  fields.push(
    ['size', volume.sizeBytes === null ? '-' : `${formatSize(volume.sizeBytes)} (${volume.sizeBytes} bytes)`],
    ['sectors', volume.logicalSectorBytes === null ? '-' : `${volume.logicalSectorBytes} logical, ${volume.physicalSectorBytes} physical`],
    ['role', volume.role],
    ['fast resync', volume.fastResync ? 'on' : 'off'],
    ['mode', volume.readOnly ? 'read-only' : volume.promoted ? 'read-write (promoted mirror volume)' : volume.role === 'mirror' ? 'read-only to clients (mirror target)' : 'read-write'],
    ['connections', String(volume.connections)],
    ['nbd uri', volume.nbdUri],
  );
  if (volume.nbdTcpUri !== undefined) fields.push(['nbd tcp uri', volume.nbdTcpUri]);
  if (volume.divergence !== null) {
    fields.push(['diverged', `since ${volume.divergence.since}: ${formatSize(volume.divergence.divergedBytes)} written while promoted (split brain until the source resolves it)`]);
  }
  return formatFields(fields);
}

export function formatRemoved(result: VolumeRemoveResult): string {
  const disconnected = result.disconnected > 0 ? ` (${result.disconnected} NBD connection(s) closed)` : '';
  return `removed volume ${result.name} ${result.uuid}${disconnected}\n`;
}

export function formatStatus(status: StatusResult): string {
  return formatFields([
    ['version', status.version],
    ['pid', String(status.pid)],
    ['uptime', `${status.uptimeSeconds} s`],
    ['control socket', status.controlSocket],
    ['nbd socket', status.nbdSocket],
    ['nbd tcp', status.nbdListen ?? '-'],
    ['node name', status.nodeName],
    ['replication', status.replicationListen === null ? '- (not listening)' : `${status.replicationListen} (${status.replicationSessions} session(s))`],
    ['mirrors', String(status.mirrors)],
    ['state dir', status.stateDir],
    ['peers', String(status.peers)],
    ['volumes', `${status.volumes} (${status.volumesInError} in error)`],
    ['connections', String(status.connections)],
    ['io engine', status.ioEngine],
    ['busy poll', formatBusyPoll(status)],
  ]);
}

function formatBusyPoll(status: StatusResult): string {
  const poll = status.busyPoll as StatusResult['busyPoll'] | undefined;
  if (poll === undefined) return '- (daemon older than this CLI)';
  if (poll.maxMicros === 0) return 'off';
  if (status.ioEngine !== 'io_uring') return `off (${poll.maxMicros} us asked; the ${status.ioEngine} engine does not poll)`;
  return `up to ${poll.maxMicros} us (caught ${poll.eventPollHits}/${poll.eventPolls} events, ${poll.completionPollHits}/${poll.completionPolls} completions)`;
}

export function formatPeerList(peers: readonly PeerInfo[]): string {
  if (peers.length === 0) return 'no peers\n';
  return formatTable(
    ['NAME', 'ADDRESS', 'SECRET', 'SECRET FILE'],
    peers.map((peer) => [peer.name, peer.address, peer.secretFileError === undefined ? 'ok' : 'unusable', peer.secretFile]),
  );
}

export function formatPeerInfo(peer: PeerInfo): string {
  const fields: Array<[string, string]> = [
    ['name', peer.name],
    ['address', peer.address],
    ['secret file', peer.secretFile],
    ['secret', peer.secretFileError === undefined ? 'ok' : `unusable: ${peer.secretFileError}`],
    ['created', peer.createdAt],
  ];
  return formatFields(fields);
}

export function formatPeerRemoved(result: PeerRemoveResult): string {
  return `removed peer ${result.name}\n`;
}

const rateUnits: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 };

/** "50M" -> 52428800 bytes per second (K, M, G are powers of 1024); null when not a rate. */
export function parseRate(text: string): number | null {
  return parseBytes(text, true);
}

/** "64M" -> 67108864, as parseRate without the "/s". */
export function parseSize(text: string): number | null {
  return parseBytes(text, false);
}

function parseBytes(text: string, perSecond: boolean): number | null {
  const match = (perSecond ? /^(\d+(?:\.\d+)?)([KMG]?)(?:i?B)?(?:\/s)?$/i : /^(\d+(?:\.\d+)?)([KMG]?)(?:i?B)?$/i).exec(text.trim());
  if (match === null) return null;
  const value = Math.floor(Number(match[1]) * (rateUnits[(match[2] ?? '').toUpperCase()] ?? 1));
  return Number.isSafeInteger(value) && value > 0 ? value : null;
}

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** "500ms" -> 500, "5s" -> 5000, "1.5s" -> 1500, "2m" -> 120000 (a unit is required: a bare
 *  number could mean seconds or milliseconds); null when not a positive whole number of ms. */
export function parseDurationMs(text: string): number | null {
  const match = /^(\d+)(?:\.(\d+))?\s*(ms|s|m|min|h)$/i.exec(text.trim());
  if (match === null) return null;
  const unit = durationUnits[(match[3] ?? '').toLowerCase()] ?? NaN;
  // Integer arithmetic: 4.1 * 60000 in floating point is 245999.99999999997, not a whole number.
  const fraction = match[2] ?? '';
  const scale = 10n ** BigInt(fraction.length);
  const total = (BigInt(match[1] as string) * scale + BigInt(fraction === '' ? '0' : fraction)) * BigInt(unit);
  if (total % scale !== 0n) return null; // not a whole number of milliseconds
  const value = Number(total / scale);
  return Number.isSafeInteger(value) && value > 0 ? value : null;
}

/** 500 -> "500 ms", 5000 -> "5 s". */
export function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function formatDuration(seconds: number | null): string {
  if (seconds === null) return '-';
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function formatWriteIntent(info: MirrorInfo['writeIntent']): string {
  if (info === null) return 'off (a crash means a full resync)';
  const error = info.lastError === null ? '' : `, last error: ${info.lastError}`;
  return `${info.hotExtents}/${info.capacityExtents} extents hot, ${info.transactions} log writes, ${info.evictions} evictions, ${info.pageWrites} bitmap pages written${error}`;
}

export function formatMirrorStatus(mirrors: readonly MirrorInfo[]): string {
  return mirrors
    .map((mirror) => {
      const fields: Array<[string, string]> = [
        ['mirror', `${mirror.volume} -> ${mirror.peer}:${mirror.target}`],
        ['state', `${mirror.state}${mirror.suspended ? ' (suspended)' : ''} since ${mirror.since}`],
        ['cause', `${mirror.cause.reason}${mirror.cause.code === null ? '' : ` [${mirror.cause.code}]`}`],
      ];
      if (mirror.error !== null) fields.push(['error', `${mirror.error.code}: ${mirror.error.reason}`]);
      if (mirror.nextRetryAt !== null) fields.push(['next retry', mirror.nextRetryAt]);
      const split = mirror.splitBrain;
      if (split !== null) {
        const resolving = split.resolving === null ? 'waiting for mirror resolve --discard this|peer' : `resolving: discarding ${split.resolving === 'this' ? 'this side' : 'the peer'}`;
        const restoring = split.restoring ? '; restore from the target incomplete: client writes wait' : '';
        fields.push(['split brain', `since ${split.detectedAt}: peer wrote ${formatSize(split.peerDivergedBytes)}${split.peerPromoted ? ' (still promoted)' : ''}, this side ${formatSize(split.localDirtyBytes)}; ${resolving}${restoring}`]);
      }
      if (mirror.received.restoreBytes > 0) fields.push(['restored', `${formatSize(mirror.received.restoreBytes)} from the target`]);
      fields.push(
        ['mode', `${mirror.mode}, on disconnect ${mirror.onDisconnect}${mirror.maxRateBytesPerSec === null ? '' : `, copy capped at ${formatSize(mirror.maxRateBytesPerSec)}/s`}, fast resync ${mirror.fastResync ? 'on' : 'off'}`],
        ['sync timeout', `${formatMs(mirror.syncTimeoutMs)}, on timeout ${mirror.onTimeout}${mirror.mode === 'sync' ? '' : ' (not used in this mode)'}; ${mirror.syncTimeouts} timed out${mirror.lastSyncTimeoutAt === null ? '' : `, last at ${mirror.lastSyncTimeoutAt}`}`],
        ['progress', `${mirror.progressPercent.toFixed(1)}% (${formatSize(mirror.copiedBytes)} copied, ${formatSize(mirror.dirtyBytes)} to go of ${formatSize(mirror.sizeBytes)})`],
        ['rate', `${formatSize(mirror.rateBytesPerSec)}/s`],
        ['eta', formatDuration(mirror.etaSeconds)],
        ['sent', `${formatSize(mirror.sent.liveBytes)} live in ${mirror.sent.liveWrites} writes, ${formatSize(mirror.sent.copyBytes)} copied, ${formatSize(mirror.sent.zeroBytes)} as zeroes`],
        ['recovery', `${mirror.recovery.kind}: ${mirror.recovery.detail} (${formatSize(mirror.recovery.dirtyBytesAtStart)} dirty at start)`],
        ['write intent', formatWriteIntent(mirror.writeIntent)],
      );
      return formatFields(fields);
    })
    .join('\n');
}

export function formatMirrorList(mirrors: readonly MirrorInfo[]): string {
  if (mirrors.length === 0) return 'no mirrors\n';
  return formatTable(
    ['VOLUME', 'PEER', 'TARGET', 'STATE', 'MODE', 'PROGRESS', 'DIRTY'],
    mirrors.map((mirror) => [
      mirror.volume,
      mirror.peer,
      mirror.target,
      mirror.suspended ? `${mirror.state} (suspended)` : mirror.state,
      mirror.mode,
      `${mirror.progressPercent.toFixed(1)}%`,
      formatSize(mirror.dirtyBytes),
    ]),
  );
}

export function formatMirrorRemoved(result: MirrorRemoveResult): string {
  return `removed mirror of ${result.volume} on ${result.peer}\n`;
}
