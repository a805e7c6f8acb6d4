// The volume registry: which volumes exist, persisted in <state>/volumes.json. Versioned so later
// releases can migrate it; validated on load so a damaged file stops the daemon instead of
// silently forgetting volumes.
import path from 'node:path';
import { z } from 'zod';
import type { BmError } from '../control/errors';
import { volumeNamePattern, volumeRoles } from '../control/protocol';
import { loadStateFile, saveStateFile, stateFileCorrupt, type StateFile } from './state-file';

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
  /** FastResync (VxVM): a reconnecting mirror resends only its dirty regions. Off: it copies the
   *  whole volume every time. Added after version 1 was released; older records have it on. */
  fastResync: z.boolean().default(true),
  createdAt: z.iso.datetime(),
  /** Mirror volumes only: the source this target is bound to since its first accepted Hello.
   *  Another source is refused (TARGET_BUSY) until the volume is removed and added again. */
  mirrorSource: z
    .strictObject({
      peer: z.string().regex(volumeNamePattern),
      volumeUuid: z.uuid(),
      volumeName: z.string().regex(volumeNamePattern),
      generation: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
      boundAt: z.iso.datetime(),
    })
    .optional(),
  /** Mirror volumes only: made writable to NBD clients by hand (volume promote). */
  promoted: z.boolean().default(false),
  /** Mirror volumes only: written while promoted, so it no longer holds its source's data (split
   *  brain) until the source resolves it. `generation` is the data generation this side started
   *  at the promotion; the regions written are in <state>/diverged/<uuid>.dirty. */
  divergence: z.strictObject({ generation: z.number().int().positive().max(Number.MAX_SAFE_INTEGER), since: z.iso.datetime() }).optional(),
})
  .refine((record) => !(record.role === 'mirror' && record.readOnly), 'a mirror volume cannot be readOnly (the mirror service writes to it)')
  .refine((record) => !record.promoted || (record.role === 'mirror' && record.divergence !== undefined), 'only a mirror volume with a divergence record can be promoted')
  .refine((record) => record.divergence === undefined || record.role === 'mirror', 'only a mirror volume can diverge');
export type VolumeRecord = z.output<typeof volumeRecordSchema>;
export type MirrorSourceBinding = NonNullable<VolumeRecord['mirrorSource']>;

const registryFileSchema = z.strictObject({
  version: z.literal(registryVersion),
  volumes: z.array(volumeRecordSchema).max(volumesMax),
});

export function registryPath(stateDir: string): string {
  return path.join(stateDir, registryFileName);
}

const registryFile: StateFile<z.output<typeof registryFileSchema>> = {
  what: 'volume registry',
  version: registryVersion,
  bytesMax: registryFileBytesMax,
  schema: registryFileSchema,
};

/** Load the registry; a missing file is an empty registry (first start). */
export function loadRegistry(stateDir: string): VolumeRecord[] {
  const filePath = registryPath(stateDir);
  const document = loadStateFile(filePath, registryFile);
  if (document === undefined) return [];
  const corrupt = (detail: string): BmError => stateFileCorrupt(registryFile.what, filePath, detail);
  const names = new Set<string>();
  const uuids = new Set<string>();
  for (const record of document.volumes) {
    if (names.has(record.name)) throw corrupt(`volume name ${record.name} appears twice`);
    if (uuids.has(record.uuid)) throw corrupt(`volume uuid ${record.uuid} appears twice`);
    names.add(record.name);
    uuids.add(record.uuid);
  }
  return document.volumes;
}

export function saveRegistry(stateDir: string, records: readonly VolumeRecord[]): void {
  saveStateFile(registryPath(stateDir), registryFile, { version: registryVersion, volumes: [...records] });
}
