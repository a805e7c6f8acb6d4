// The volume registry: which volumes exist, persisted in <state>/volumes.json. Versioned so later
// releases can migrate it; validated on load so a damaged file stops the daemon instead of
// silently forgetting volumes.
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { formatFirstIssue } from '../config/zod-issues';
import { BmError, errorCode } from '../control/errors';
import { volumeNamePattern, volumeRoles } from '../control/protocol';
import { writeFileAtomicSync } from './atomic-file';

export const registryVersion = 1;
export const registryFileName = 'volumes.json';
export const volumesMax = 1024;
const registryFileBytesMax = 4 * 1024 * 1024;

const volumeRecordSchema = z.strictObject({
  name: z.string().regex(volumeNamePattern),
  uuid: z.uuid(),
  device: z.string().startsWith('/'),
  readOnly: z.boolean(),
  // Added after version 1 was released; records written before it are primaries.
  role: z.enum(volumeRoles).default('primary'),
  createdAt: z.iso.datetime(),
}).refine((record) => !(record.role === 'mirror' && record.readOnly), 'a mirror volume cannot be readOnly (the mirror service writes to it)');
export type VolumeRecord = z.output<typeof volumeRecordSchema>;

const registryFileSchema = z.strictObject({
  version: z.literal(registryVersion),
  volumes: z.array(volumeRecordSchema).max(volumesMax),
});

export function registryPath(stateDir: string): string {
  return path.join(stateDir, registryFileName);
}

function corrupt(filePath: string, detail: string): BmError {
  return new BmError('BM_ERR_STATE_CORRUPT', `volume registry ${filePath}: ${detail}`);
}

/** Load the registry; a missing file is an empty registry (first start). */
export function loadRegistry(stateDir: string): VolumeRecord[] {
  const filePath = registryPath(stateDir);
  let text: string;
  try {
    const stat = fs.statSync(filePath);
    if (stat.size > registryFileBytesMax) throw corrupt(filePath, `larger than ${registryFileBytesMax} bytes`);
    text = fs.readFileSync(filePath, 'utf8');
  } catch (error) {
    if (errorCode(error) === 'ENOENT') return [];
    throw error;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw corrupt(filePath, `not valid JSON: ${(error as Error).message}`);
  }
  if (typeof raw === 'object' && raw !== null && 'version' in raw && raw.version !== registryVersion) {
    throw corrupt(filePath, `version ${JSON.stringify(raw.version)} is not supported (expected ${registryVersion})`);
  }
  const parsed = registryFileSchema.safeParse(raw);
  if (!parsed.success) throw corrupt(filePath, formatFirstIssue(parsed.error));
  const names = new Set<string>();
  const uuids = new Set<string>();
  for (const record of parsed.data.volumes) {
    if (names.has(record.name)) throw corrupt(filePath, `volume name ${record.name} appears twice`);
    if (uuids.has(record.uuid)) throw corrupt(filePath, `volume uuid ${record.uuid} appears twice`);
    names.add(record.name);
    uuids.add(record.uuid);
  }
  return parsed.data.volumes;
}

export function saveRegistry(stateDir: string, records: readonly VolumeRecord[]): void {
  const document = { version: registryVersion, volumes: records };
  // Validate what we write with the same schema we read with: a bug here must not produce a
  // file the next start refuses.
  registryFileSchema.parse(document);
  writeFileAtomicSync(registryPath(stateDir), JSON.stringify(document, null, 2) + '\n', 0o640);
}
