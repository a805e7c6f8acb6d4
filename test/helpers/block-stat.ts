// Flush requests a block device has completed, from /sys/block/<dev>/stat (field 16, kernel
// 5.5+). Lets tests prove that FLUSH and FUA reach the device instead of only reading data back,
// which would pass even if nothing were ever made durable.
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

export function deviceFlushCount(devicePath: string): number {
  const fields = readFileSync(`/sys/block/${basename(devicePath)}/stat`, 'utf8').trim().split(/\s+/);
  if (fields.length < 17) throw new Error(`${devicePath}: kernel reports no flush statistics`);
  return Number(fields[15]);
}
