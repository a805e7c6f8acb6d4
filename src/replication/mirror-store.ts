// Mirrors, persisted in <state>/mirrors.json like volumes and peers (versioned, validated on
// load, written atomically). Each mirror's dirty bitmap lives in src/write-intent/.
import path from 'node:path';
import { z } from 'zod';
import { asyncBufferBytesMax, asyncBufferBytesMin, mirrorModes, onDisconnectPolicies, onTimeoutPolicies, splitBrainDiscards, syncTimeoutMsMax, syncTimeoutMsMin, volumeNamePattern } from '../control/protocol';
import { loadStateFile, saveStateFile, stateFileCorrupt, type StateFile } from '../daemon/state-file';
import { MIRROR_ERROR_CODES } from './mirror-state';

export const mirrorsVersion = 1;
export const mirrorsFileName = 'mirrors.json';
export const mirrorsMax = 1024;
/** Fujitsu REC's limit, and a bound on the work one client write fans out to. */
export const mirrorsPerVolumeMax = 8;
const mirrorsFileBytesMax = 4 * 1024 * 1024;


const name = z.string().regex(volumeNamePattern);

/** The ERROR reason kept in mirrors.json; a longer one is cut (a reason may quote a peer). */
export const MIRROR_ERROR_REASON_CHARS_MAX = 4096;

const mirrorRecordSchema = z.strictObject({
  id: z.uuid(),
  volume: name,
  peer: name,
  target: name,
  mode: z.enum(mirrorModes),
  onDisconnect: z.enum(onDisconnectPolicies),
  maxRateBytesPerSec: z.number().int().positive().nullable(),
  /** Async mode's buffer bound (absent in files written before async mode: the default). */
  asyncBufferBytes: z.number().int().min(asyncBufferBytesMin).max(asyncBufferBytesMax).optional(),
  /** Sync-mode timeout and its policy (issue 4 part 6). Optional: files written before them load
   *  with the defaults (sync-timeout.ts, syncPolicyOf). */
  syncTimeoutMs: z.number().int().min(syncTimeoutMsMin).max(syncTimeoutMsMax).optional(),
  onTimeout: z.enum(onTimeoutPolicies).optional(),
  /** Names this mirror's history on the target; a new one (admin reset) forces a full copy. */
  generation: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
  /** The first full copy finished: from now on the bitmap alone says what the target lacks. */
  fullCopyDone: z.boolean(),
  suspended: z.boolean(),
  /** Split brain: what the target reported when it was found (kept across restarts until it is
   *  resolved), and the side the admin chose to discard (mirror resolve), until that is done. */
  splitBrain: z
    .strictObject({
      detectedAt: z.iso.datetime(),
      peerDivergedBytes: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
      peerPromoted: z.boolean(),
      localDirtyBytes: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
    })
    .optional(),
  resolve: z.enum(splitBrainDiscards).optional(),
  /** resolve --discard this began restoring the target's bytes: client writes wait until the
   *  target acknowledged the Resolve (a retry restores the union again). */
  restoring: z.literal(true).optional(),
  /** Set while the mirror is in ERROR, so a restart does not forget why. */
  error: z.strictObject({ code: z.enum(MIRROR_ERROR_CODES), reason: z.string().max(MIRROR_ERROR_REASON_CHARS_MAX) }).nullable(),
  createdAt: z.iso.datetime(),
});
export type MirrorRecord = z.infer<typeof mirrorRecordSchema>;

const mirrorsFileSchema = z.strictObject({
  version: z.literal(mirrorsVersion),
  mirrors: z.array(mirrorRecordSchema).max(mirrorsMax),
});

const mirrorsFile: StateFile<z.output<typeof mirrorsFileSchema>> = {
  what: 'mirror registry',
  version: mirrorsVersion,
  bytesMax: mirrorsFileBytesMax,
  schema: mirrorsFileSchema,
};

export function mirrorsPath(stateDir: string): string {
  return path.join(stateDir, mirrorsFileName);
}

/** Rules beyond the schema: one mirror per (volume, peer), unique ids (they name bitmap files). */
function duplicateIn(records: readonly MirrorRecord[]): string | undefined {
  const keys = new Set<string>();
  const ids = new Set<string>();
  for (const record of records) {
    const key = `${record.volume}\0${record.peer}`;
    if (keys.has(key)) return `mirror of ${record.volume} to ${record.peer} appears twice`;
    if (ids.has(record.id)) return `mirror id ${record.id} appears twice`;
    keys.add(key);
    ids.add(record.id);
  }
  return undefined;
}

export function loadMirrors(stateDir: string): MirrorRecord[] {
  const filePath = mirrorsPath(stateDir);
  const document = loadStateFile(filePath, mirrorsFile);
  if (document === undefined) return [];
  const duplicate = duplicateIn(document.mirrors);
  if (duplicate !== undefined) throw stateFileCorrupt(mirrorsFile.what, filePath, duplicate);
  return document.mirrors;
}

/** Refuses (like loading would) a list with duplicates: a bug must not write a file the next
 *  start refuses. */
export function saveMirrors(stateDir: string, records: readonly MirrorRecord[]): void {
  const duplicate = duplicateIn(records);
  if (duplicate !== undefined) throw new Error(`refusing to save the mirror registry: ${duplicate}`);
  saveStateFile(mirrorsPath(stateDir), mirrorsFile, { version: mirrorsVersion, mirrors: [...records] });
}
