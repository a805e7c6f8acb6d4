// Human output for the CLI. Scripts use --json; nothing here is meant to be parsed.
import type { StatusResult, VolumeInfo, VolumeRemoveResult } from '../control/protocol';

const sizeUnits = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function formatSize(bytes: number | null): string {
  if (bytes === null) return '-';
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < sizeUnits.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${sizeUnits[unit]}`;
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
      volume.readOnly ? 'ro' : 'rw',
      String(volume.connections),
      volume.device,
    ]),
  );
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
    ['mode', volume.readOnly ? 'read-only' : 'read-write'],
    ['connections', String(volume.connections)],
    ['nbd uri', volume.nbdUri],
  );
  if (volume.nbdTcpUri !== undefined) fields.push(['nbd tcp uri', volume.nbdTcpUri]);
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
    ['state dir', status.stateDir],
    ['volumes', `${status.volumes} (${status.volumesInError} in error)`],
    ['connections', String(status.connections)],
    ['io engine', status.ioEngine],
  ]);
}
