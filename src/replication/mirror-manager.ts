// The mirrors the daemon runs as a source: mirror.* control methods, persistence in
// <state>/mirrors.json, start at daemon start and an orderly stop that saves each dirty bitmap.
// Changes run one at a time and are persisted before they are acknowledged, like volumes.
import crypto from 'node:crypto';
import type { Logger } from 'pino';
import { BmError, ControlErrorCode, errorMessage } from '../control/errors';
import { syncTimeoutMsDefault, type MethodParams, type MirrorInfo, type MirrorRemoveResult } from '../control/protocol';
import { DirtyBitmap } from '../native/index';
import type { ReplicaSource } from '../volume/replica';
import { Mirror, MirrorError, newGeneration, REGION_BYTES, type MirrorTiming, type PeerEndpoint } from './mirror';
import { mirrorsMax, mirrorsPerVolumeMax, removeBitmapFile, saveBitmapFile, saveMirrors, takeBitmapFile, type MirrorRecord } from './mirror-store';
import { ChangeQueue } from '../daemon/change-queue';
import { defaultOnTimeout, settingsProblem, syncPolicyOf } from './sync-timeout';

export interface MirrorManagerOptions {
  stateDir: string;
  nodeName: string;
  logger: Logger;
  timing: MirrorTiming;
  /** The source volume named `name`: its role, whether it is writable, and the open volume. */
  lookupVolume: (name: string) => { role: string; readOnly: boolean; fastResync: boolean; volume: ReplicaSource | null; failed: boolean } | undefined;
  hasPeer: (name: string) => boolean;
  /** Address and secret of a peer; throws BmError when unknown or the secret is unusable. */
  peerEndpoint: (name: string) => PeerEndpoint;
}

export class MirrorManager {
  private readonly mirrors: Mirror[] = [];
  /** Records of mirrors whose source volume is not online: kept, shown, not run. */
  private readonly dormant: MirrorRecord[] = [];
  private readonly options: MirrorManagerOptions;
  private readonly logger: Logger;
  private readonly changes = new ChangeQueue();

  constructor(options: MirrorManagerOptions) {
    this.options = options;
    this.logger = options.logger;
  }

  get size(): number {
    return this.mirrors.length + this.dormant.length;
  }

  /** Starts every persisted mirror whose source volume is online. */
  load(records: readonly MirrorRecord[]): void {
    for (const record of records) {
      const source = this.options.lookupVolume(record.volume);
      if (source?.volume == null || source.failed) {
        this.logger.error({ volume: record.volume, peer: record.peer }, 'mirror not started: its source volume is not online');
        this.dormant.push(record);
        continue;
      }
      const mirror = this.create(record, source.volume, this.loadBitmap(record, source.volume));
      mirror.start();
    }
  }

  /** Whether a volume or peer is used by a mirror (they cannot be removed while it is). */
  usesVolume(name: string): boolean {
    return this.records().some((record) => record.volume === name);
  }

  usesPeer(name: string): boolean {
    return this.records().some((record) => record.peer === name);
  }

  list(): MirrorInfo[] {
    return [...this.mirrors.map((mirror) => mirror.info()), ...this.dormant.map(dormantInfo)];
  }

  status(params: MethodParams<'mirror.status'>): MirrorInfo[] {
    const matches = (key: { volume: string; peer: string }): boolean => key.volume === params.volume && (params.peer === undefined || key.peer === params.peer);
    const found = [...this.mirrors.filter((mirror) => matches(mirror.key)).map((mirror) => mirror.info()), ...this.dormant.filter(matches).map(dormantInfo)];
    if (found.length === 0) {
      throw new BmError(ControlErrorCode.MirrorNotFound, `volume ${params.volume} has no mirror${params.peer === undefined ? '' : ` to ${params.peer}`}`);
    }
    return found;
  }

  add(params: MethodParams<'mirror.add'>): Promise<MirrorInfo> {
    return this.changes.run(async () => {
      const source = this.options.lookupVolume(params.volume);
      if (source === undefined) throw new BmError(ControlErrorCode.VolumeNotFound, `volume ${params.volume} does not exist`);
      if (source.role === 'mirror') throw new BmError(ControlErrorCode.MirrorSource, `volume ${params.volume} is a mirror volume; only primary volumes can be mirrored`);
      if (source.readOnly) throw new BmError(ControlErrorCode.MirrorSource, `volume ${params.volume} is read-only; a mirror source must be writable`);
      if (source.volume === null || source.failed) throw new BmError(ControlErrorCode.MirrorSource, `volume ${params.volume} is not online`);
      if (!this.options.hasPeer(params.peer)) throw new BmError(ControlErrorCode.PeerNotFound, `peer ${params.peer} does not exist`);
      this.options.peerEndpoint(params.peer); // the secret must be usable now, not at the first connect
      const records = this.records();
      if (records.some((record) => record.volume === params.volume && record.peer === params.peer)) {
        throw new BmError(ControlErrorCode.MirrorExists, `volume ${params.volume} already has a mirror on ${params.peer}`);
      }
      const onDisconnect = params.onDisconnect ?? 'continue';
      const settings = { mode: params.mode ?? 'sync', onDisconnect, syncTimeoutMs: params.syncTimeoutMs ?? syncTimeoutMsDefault, onTimeout: params.onTimeout ?? defaultOnTimeout(onDisconnect) };
      const problem = settingsProblem(settings);
      if (problem !== undefined) throw new BmError(ControlErrorCode.InvalidArgument, problem);
      if (records.filter((record) => record.volume === params.volume).length >= mirrorsPerVolumeMax) {
        throw new BmError(ControlErrorCode.InvalidArgument, `volume ${params.volume} already has ${mirrorsPerVolumeMax} mirrors (the limit)`);
      }
      if (records.length >= mirrorsMax) throw new BmError(ControlErrorCode.InvalidArgument, `at most ${mirrorsMax} mirrors may be defined`);
      const record: MirrorRecord = {
        id: crypto.randomUUID(),
        volume: params.volume,
        peer: params.peer,
        target: params.target,
        mode: settings.mode,
        onDisconnect: settings.onDisconnect,
        maxRateBytesPerSec: params.maxRateBytesPerSec ?? null,
        syncTimeoutMs: settings.syncTimeoutMs,
        onTimeout: settings.onTimeout,
        generation: newGeneration(),
        fullCopyDone: false,
        suspended: false,
        error: null,
        createdAt: new Date().toISOString(),
      };
      this.persist([...records, record]);
      const mirror = this.create(record, source.volume, undefined);
      mirror.start();
      this.logger.info({ volume: record.volume, peer: record.peer, target: record.target, mode: record.mode, onDisconnect: record.onDisconnect }, 'mirror added');
      return mirror.info();
    });
  }

  remove(params: MethodParams<'mirror.remove'>): Promise<MirrorRemoveResult> {
    return this.changes.run(async () => {
      const dormant = this.dormant.filter((record) => record.volume === params.volume && (params.peer === undefined || record.peer === params.peer));
      if (dormant.length === 1 && !this.mirrors.some((mirror) => mirror.key.volume === params.volume)) {
        // Not running (its volume is not online): nothing to stop, only the record to forget.
        const record = dormant[0] as MirrorRecord;
        this.persist(this.records().filter((other) => other.id !== record.id));
        this.dormant.splice(this.dormant.indexOf(record), 1);
        removeBitmapFile(this.options.stateDir, record.id);
        this.logger.info({ volume: record.volume, peer: record.peer }, 'mirror removed (it was not running)');
        return { volume: record.volume, peer: record.peer };
      }
      const mirror = this.find(params.volume, params.peer);
      try {
        mirror.checkRemovable(params.force === true);
      } catch (error) {
        if (error instanceof MirrorError) throw new BmError(error.code, error.message);
        throw error;
      }
      const record = mirror.currentRecord;
      this.persist(this.records().filter((other) => other.id !== record.id));
      this.mirrors.splice(this.mirrors.indexOf(mirror), 1);
      await mirror.stop('mirror removed', 'remove');
      mirror.markRemoved();
      removeBitmapFile(this.options.stateDir, record.id);
      this.logger.info({ volume: record.volume, peer: record.peer }, 'mirror removed');
      return { volume: record.volume, peer: record.peer };
    });
  }

  command(params: MethodParams<'mirror.suspend'>, command: 'suspend' | 'resume' | 'reset'): Promise<MirrorInfo> {
    return this.changes.run(async () => {
      const mirror = this.find(params.volume, params.peer);
      try {
        if (command === 'suspend') mirror.suspend();
        else if (command === 'resume') mirror.resume();
        else mirror.reset();
      } catch (error) {
        if (error instanceof MirrorError) throw new BmError(error.code, error.message);
        throw error;
      }
      this.logger.info({ volume: params.volume, peer: mirror.key.peer, command }, `mirror ${command}`);
      return mirror.info();
    });
  }

  /** mirror.set: changes a running mirror's mode, policies or copy rate, persisted before the
   *  answer. The resulting combination must make sense (settingsProblem). */
  set(params: MethodParams<'mirror.set'>): Promise<MirrorInfo> {
    return this.changes.run(async () => {
      const mirror = this.find(params.volume, params.peer);
      const { volume: _volume, peer: _peer, ...change } = params;
      if (Object.values(change).every((value) => value === undefined)) {
        throw new BmError(ControlErrorCode.InvalidArgument, 'nothing to change: give at least one of mode, onDisconnect, onTimeout, syncTimeoutMs, maxRateBytesPerSec');
      }
      const record = mirror.currentRecord;
      const current = { mode: record.mode, onDisconnect: record.onDisconnect, ...syncPolicyOf(record) };
      const next = { ...current, ...Object.fromEntries(Object.entries(change).filter(([key, value]) => value !== undefined && key in current)) };
      const problem = settingsProblem(next);
      if (problem !== undefined) throw new BmError(ControlErrorCode.InvalidArgument, problem);
      try {
        mirror.set(change);
      } catch (error) {
        if (error instanceof MirrorError) throw new BmError(error.code, error.message);
        throw error;
      }
      this.logger.info({ volume: params.volume, peer: mirror.key.peer, ...change }, 'mirror settings changed');
      return mirror.info();
    });
  }

  /** Fails writes a strict mirror holds, so the NBD server can drain at shutdown. */
  releaseHeldForShutdown(): void {
    for (const mirror of this.mirrors) mirror.releaseHeldForShutdown();
  }

  /** Stops every mirror and saves its dirty bitmap: the next start resyncs only those regions. */
  async stopAll(): Promise<void> {
    await this.changes.close();
    const results = await Promise.allSettled(
      this.mirrors.map(async (mirror) => {
        const dirty = await mirror.stop('daemon stopping');
        saveBitmapFile(this.options.stateDir, mirror.currentRecord.id, dirty.serialize());
        this.logger.info({ volume: mirror.key.volume, peer: mirror.key.peer, dirtyBytes: dirty.dirtyBytes() }, 'mirror stopped; dirty bitmap saved');
      }),
    );
    const failed = results.filter((result) => result.status === 'rejected');
    for (const failure of failed) this.logger.error({ err: (failure as PromiseRejectedResult).reason }, 'saving a dirty bitmap failed; that mirror will copy everything at the next start');
    if (failed.length > 0) throw new BmError('BM_ERR_STATE_WRITE', `${failed.length} mirror bitmap(s) could not be saved`);
  }

  private create(record: MirrorRecord, volume: ReplicaSource, savedBitmap: DirtyBitmap | undefined): Mirror {
    const mirror = new Mirror({
      record,
      volume,
      nodeName: this.options.nodeName,
      resolvePeer: () => this.options.peerEndpoint(record.peer),
      fastResync: () => this.options.lookupVolume(record.volume)?.fastResync ?? true,
      persist: (next) => this.persist(this.records().map((other) => (other.id === next.id ? next : other))),
      savedBitmap,
      timing: this.options.timing,
      logger: this.logger,
    });
    this.mirrors.push(mirror);
    return mirror;
  }

  private loadBitmap(record: MirrorRecord, volume: ReplicaSource): DirtyBitmap | undefined {
    let data: Buffer | undefined;
    try {
      data = takeBitmapFile(this.options.stateDir, record.id);
    } catch (error) {
      this.logger.error({ volume: record.volume, peer: record.peer, err: error }, 'reading the saved dirty bitmap failed; copying everything');
      return undefined;
    }
    if (data === undefined) {
      if (record.fullCopyDone) this.logger.warn({ volume: record.volume, peer: record.peer }, 'no dirty bitmap saved (the daemon did not stop cleanly): the whole volume will be resynced');
      return undefined;
    }
    try {
      const bitmap = DirtyBitmap.deserialize(data);
      if (bitmap.sizeBytes !== volume.info().sizeBytes || bitmap.regionBytes !== REGION_BYTES) {
        this.logger.warn({ volume: record.volume, peer: record.peer }, 'saved dirty bitmap does not match the volume size; copying everything');
        return undefined;
      }
      return bitmap;
    } catch (error) {
      this.logger.error({ volume: record.volume, peer: record.peer, err: error }, 'saved dirty bitmap is damaged; copying everything');
      return undefined;
    }
  }

  private find(volume: string, peer: string | undefined): Mirror {
    const found = this.mirrors.filter((mirror) => mirror.key.volume === volume && (peer === undefined || mirror.key.peer === peer));
    if (found.length === 0) throw new BmError(ControlErrorCode.MirrorNotFound, `volume ${volume} has no running mirror${peer === undefined ? '' : ` to ${peer}`}`);
    if (found.length > 1) throw new BmError(ControlErrorCode.InvalidArgument, `volume ${volume} has ${found.length} mirrors; name one with --peer`);
    return found[0] as Mirror;
  }

  private records(): MirrorRecord[] {
    return [...this.mirrors.map((mirror) => mirror.currentRecord), ...this.dormant];
  }

  private persist(records: readonly MirrorRecord[]): void {
    try {
      saveMirrors(this.options.stateDir, records);
    } catch (error) {
      throw new BmError(ControlErrorCode.StateWrite, `writing the mirror registry failed: ${errorMessage(error)}`, { cause: error });
    }
  }
}

/** Status of a mirror that is not running because its source volume is not online. */
function dormantInfo(record: MirrorRecord): MirrorInfo {
  return {
    volume: record.volume,
    peer: record.peer,
    target: record.target,
    mode: record.mode,
    onDisconnect: record.onDisconnect,
    maxRateBytesPerSec: record.maxRateBytesPerSec,
    ...syncPolicyOf(record),
    syncTimeouts: 0,
    lastSyncTimeoutAt: null,
    state: record.error === null ? 'INIT' : 'ERROR',
    since: record.createdAt,
    cause: { event: 'stop', reason: `not running: source volume ${record.volume} is not online`, code: null },
    error: record.error,
    suspended: record.suspended,
    linkUp: false,
    fullCopyDone: record.fullCopyDone,
    fastResync: true,
    sizeBytes: 0,
    dirtyBytes: 0,
    progressPercent: 0,
    copiedBytes: 0,
    rateBytesPerSec: 0,
    etaSeconds: null,
    sent: { liveBytes: 0, copyBytes: 0, zeroBytes: 0, liveWrites: 0 },
    nextRetryAt: null,
    history: [],
  };
}
