// Where a volume's write-intent metadata lives, and what a start makes of it: each mirror's
// first dirty bitmap is its saved bitmap, plus, after a crash, the extents the activity log had
// hot; when the metadata cannot be trusted, everything. The verdict is logged and shown in
// `mirror status` (recovery.kind).
import path from 'node:path';
import type { Logger } from 'pino';
import type { MirrorRecovery } from '../control/protocol';
import { DirtyBitmap } from '../native/index';
import { decodeActivityLog, type ActivityLogLoad } from './activity-log-format';
import { BitmapFile } from './bitmap-file';
import type { MetadataStore } from './metadata-file';
import { EXTENT_BYTES, WriteIntentLog } from './write-intent-log';

export function activityLogPath(stateDir: string, volumeUuid: string): string {
  return path.join(stateDir, 'write-intent', `${volumeUuid}.log`);
}

export function mirrorBitmapPath(stateDir: string, mirrorId: string): string {
  return path.join(stateDir, 'mirrors', `${mirrorId}.dirty`);
}

export interface VolumeMetadataOptions {
  store: MetadataStore;
  stateDir: string;
  volumeUuid: string;
  sizeBytes: number;
  regionBytes: number;
  capacityExtents: number;
  logger: Logger;
}

export interface RecoveredMirror {
  file: BitmapFile;
  initialDirty: DirtyBitmap;
  recovery: MirrorRecovery;
}

/** Opens (or creates) a volume's activity log, returning it with what its file held. */
export async function openWriteIntentLog(options: VolumeMetadataOptions): Promise<{ log: WriteIntentLog; loaded: ActivityLogLoad }> {
  const file = options.store.open(activityLogPath(options.stateDir, options.volumeUuid));
  const loaded = decodeActivityLog({ sizeBytes: options.sizeBytes, extentBytes: EXTENT_BYTES }, await file.read());
  const log = new WriteIntentLog({ file, sizeBytes: options.sizeBytes, capacityExtents: options.capacityExtents, logger: options.logger }, loaded);
  return { log, loaded };
}

export function mirrorBitmapFile(options: VolumeMetadataOptions, mirrorId: string): BitmapFile {
  return new BitmapFile(options.store.open(mirrorBitmapPath(options.stateDir, mirrorId)), options.sizeBytes, options.regionBytes);
}

/** A new mirror: the target may lack everything. */
export function newMirrorMetadata(options: VolumeMetadataOptions, mirrorId: string): RecoveredMirror {
  const initialDirty = new DirtyBitmap(options.sizeBytes, options.regionBytes);
  initialDirty.setRange(0, options.sizeBytes);
  return {
    file: mirrorBitmapFile(options, mirrorId),
    initialDirty,
    recovery: { kind: 'new', detail: 'new mirror: every region is copied', dirtyBytesAtStart: options.sizeBytes },
  };
}

/** An existing mirror after a restart, from its bitmap file and the volume's activity log. */
export async function recoverMirror(options: VolumeMetadataOptions, mirrorId: string, loaded: ActivityLogLoad): Promise<RecoveredMirror> {
  const file = mirrorBitmapFile(options, mirrorId);
  const all = (): DirtyBitmap => {
    const bitmap = new DirtyBitmap(options.sizeBytes, options.regionBytes);
    bitmap.setRange(0, options.sizeBytes);
    return bitmap;
  };
  const lost = (detail: string): RecoveredMirror => ({
    file,
    initialDirty: all(),
    recovery: { kind: 'metadata-lost', detail: `${detail}: every region is resynced`, dirtyBytesAtStart: options.sizeBytes },
  });
  if (loaded.state === 'missing') return lost('no write-intent log for this volume');
  if (loaded.state === 'lost') return lost(`the write-intent log is unreadable (${loaded.reason})`);
  const { latest } = loaded;
  if (!latest.clean && !latest.tracked) return lost('the daemon did not stop cleanly while write-intent recording was off');
  let saved;
  try {
    saved = await file.load();
  } catch (error) {
    return lost(`reading the saved bitmap failed (${(error as Error).message})`);
  }
  if (saved.state === 'missing') return lost('the saved bitmap is missing');
  if (saved.state === 'mismatch') return lost('the saved bitmap belongs to another volume geometry');
  const damaged = saved.damagedPages > 0 ? `; ${saved.damagedPages} damaged bitmap page(s) counted dirty` : '';
  const initialDirty = saved.bitmap;
  if (latest.clean) {
    return {
      file,
      initialDirty,
      recovery: { kind: 'clean-shutdown', detail: `the bitmap saved at the last stop${damaged}`, dirtyBytesAtStart: initialDirty.dirtyBytes() },
    };
  }
  for (const run of WriteIntentLog.extentRuns(latest.extents, options.sizeBytes)) initialDirty.setRange(run.offsetBytes, run.lengthBytes);
  return {
    file,
    initialDirty,
    recovery: {
      kind: 'activity-log',
      detail: `the daemon did not stop cleanly: the saved bitmap plus ${latest.extents.length} hot extent(s) of ${EXTENT_BYTES / 1048576} MiB from the activity log${damaged}`,
      dirtyBytesAtStart: initialDirty.dirtyBytes(),
    },
  };
}
