// The mirrors the daemon runs as a source: mirror.* control methods, persistence in
// <state>/mirrors.json, each mirrored volume's write-intent log (src/write-intent/), recovery at
// daemon start and an orderly stop that saves each dirty bitmap. Changes run one at a time and
// are persisted before they are acknowledged, like volumes.
import crypto from 'node:crypto';
import type { Logger } from 'pino';
import { BmError, ControlErrorCode, errorMessage } from '../control/errors';
import { syncTimeoutMsDefault, type MethodParams, type MirrorInfo, type MirrorRemoveResult } from '../control/protocol';
import { ChangeQueue } from '../daemon/change-queue';
import type { ReplicaSource } from '../volume/replica';
import type { MetadataStore } from '../write-intent/metadata-file';
import { mirrorBitmapPath, newMirrorMetadata, openWriteIntentLog, recoverMirror, type RecoveredMirror, type VolumeMetadataOptions } from '../write-intent/recovery';
import { EXTENT_BYTES, type WriteIntentLog } from '../write-intent/write-intent-log';
import { newGeneration } from './generation';
import { Mirror, MirrorError, REGION_BYTES, type MirrorTiming, type PeerEndpoint } from './mirror';
import { mirrorsMax, mirrorsPerVolumeMax, saveMirrors, type MirrorRecord } from './mirror-store';
import { defaultOnTimeout, settingsProblem, syncPolicyOf } from './sync-timeout';

export interface MirrorManagerOptions {
  stateDir: string;
  nodeName: string;
  logger: Logger;
  timing: MirrorTiming;
  /** Where write-intent metadata goes (the file system; the tests' crash layer). */
  metadataStore: MetadataStore;
  /** Activity-log size per mirrored volume, in 4 MiB extents; 0 switches recording off. */
  activityLogExtents: number;
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
  /** mirror.add between its checks and its record (one at a time: changes run in order):
   *  volume.remove and peer.remove run on their own queues, so they must already see the volume
   *  and peer as used. */
  private adding: { volume: string; peer: string } | null = null;
  /** The write-intent log of each volume that has running mirrors, by volume name. */
  private readonly intents = new Map<string, { log: WriteIntentLog; volume: ReplicaSource; metadata: VolumeMetadataOptions }>();

  constructor(options: MirrorManagerOptions) {
    this.options = options;
    this.logger = options.logger;
  }

  get size(): number {
    return this.mirrors.length + this.dormant.length;
  }

  /** Recovers and starts every persisted mirror whose source volume is online. Each mirrored
   *  volume's metadata is made consistent (bitmaps written, activity log emptied) before any
   *  client write can reach it. */
  async load(records: readonly MirrorRecord[]): Promise<void> {
    const byVolume = new Map<string, { volume: ReplicaSource; records: MirrorRecord[] }>();
    for (const record of records) {
      const source = this.options.lookupVolume(record.volume);
      if (source?.volume == null || source.failed) {
        this.logger.error({ volume: record.volume, peer: record.peer }, 'mirror not started: its source volume is not online');
        this.dormant.push(record);
        continue;
      }
      const group = byVolume.get(record.volume) ?? { volume: source.volume, records: [] };
      group.records.push(record);
      byVolume.set(record.volume, group);
    }
    for (const [name, group] of byVolume) {
      const metadata = this.metadataOptions(group.volume);
      const { log, loaded } = await openWriteIntentLog(metadata);
      const started: Mirror[] = [];
      for (const record of group.records) {
        const recovered = await recoverMirror(metadata, record.id, loaded);
        const level = recovered.recovery.kind === 'clean-shutdown' ? 'info' : 'warn';
        this.logger[level]({ volume: record.volume, peer: record.peer, recovery: recovered.recovery.kind, dirtyBytes: recovered.recovery.dirtyBytesAtStart }, `mirror recovery: ${recovered.recovery.detail}`);
        started.push(this.create(record, group.volume, recovered, log));
      }
      try {
        await log.start();
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `writing the write-intent metadata of volume ${name} failed: ${errorMessage(error)}`, { cause: error });
      }
      this.intents.set(name, { log, volume: group.volume, metadata });
      group.volume.setWriteIntent(log.tracking ? log : undefined);
      for (const mirror of started) mirror.start();
    }
  }

  /** Whether a volume or peer is used by a mirror (they cannot be removed while it is). */
  usesVolume(name: string): boolean {
    return this.records().some((record) => record.volume === name) || this.adding?.volume === name;
  }

  usesPeer(name: string): boolean {
    return this.records().some((record) => record.peer === name) || this.adding?.peer === name;
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
      if (params.asyncBufferBytes !== undefined && settings.mode !== 'async') {
        throw new BmError(ControlErrorCode.InvalidArgument, 'asyncBufferBytes applies to async mode only');
      }
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
        ...(params.asyncBufferBytes === undefined ? {} : { asyncBufferBytes: params.asyncBufferBytes }),
        syncTimeoutMs: settings.syncTimeoutMs,
        onTimeout: settings.onTimeout,
        generation: newGeneration(),
        fullCopyDone: false,
        suspended: false,
        error: null,
        createdAt: new Date().toISOString(),
      };
      // Everything above was checked without waiting; from here the volume and the peer count
      // as used, so a concurrent volume.remove or peer.remove is refused instead of winning too.
      this.adding = { volume: params.volume, peer: params.peer };
      let intent: Awaited<ReturnType<MirrorManager['intentFor']>>;
      try {
        intent = await this.intentFor(params.volume, source.volume);
        this.persist([...records, record]);
      } finally {
        this.adding = null;
      }
      const mirror = this.create(record, source.volume, newMirrorMetadata(intent.metadata, record.id), intent.log);
      // Its bitmap file (all dirty) exists before the first write: a crash then costs no more
      // than the copy it needs anyway, and is not mistaken for lost metadata.
      await intent.log.persistNow().catch((error: unknown) => this.logger.error({ err: error, volume: record.volume }, 'writing the new mirror\'s bitmap failed; it is retried'));
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
        await this.options.metadataStore.open(mirrorBitmapPath(this.options.stateDir, record.id)).remove();
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
      await this.forgetIntent(record);
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

  /** mirror.resolve: the admin's choice in a split brain (see Mirror.resolve). */
  resolve(params: MethodParams<'mirror.resolve'>): Promise<MirrorInfo> {
    return this.changes.run(async () => {
      const mirror = this.find(params.volume, params.peer);
      try {
        mirror.resolve(params.discard);
      } catch (error) {
        if (error instanceof MirrorError) throw new BmError(error.code, error.message);
        throw error;
      }
      this.logger.warn({ volume: params.volume, peer: mirror.key.peer, discard: params.discard }, 'split brain: resolve requested by the admin');
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

  /** Stops every mirror and saves its dirty bitmap, then marks each write-intent log clean:
   *  the next start resyncs only those regions. */
  async stopAll(): Promise<void> {
    await this.changes.close();
    const stopped = await Promise.allSettled(this.mirrors.map((mirror) => mirror.stop('daemon stopping')));
    const results = await Promise.allSettled(
      [...this.intents].map(async ([name, intent]) => {
        intent.volume.setWriteIntent(undefined);
        await intent.log.close(true);
        this.logger.info({ volume: name, mirrors: intent.log.trackerCount }, 'mirrors stopped; dirty bitmaps saved, write-intent log marked clean');
      }),
    );
    const failed = [...stopped, ...results].filter((result) => result.status === 'rejected');
    for (const failure of failed) this.logger.error({ err: (failure as PromiseRejectedResult).reason }, 'stopping a mirror or saving its bitmap failed; the next start treats it as a crash');
    if (failed.length > 0) throw new BmError('BM_ERR_STATE_WRITE', `${failed.length} mirror(s) or write-intent log(s) could not be stopped cleanly`);
  }

  private metadataOptions(volume: ReplicaSource): VolumeMetadataOptions {
    return {
      store: this.options.metadataStore,
      stateDir: this.options.stateDir,
      volumeUuid: volume.spec.uuid,
      sizeBytes: volume.info().sizeBytes,
      regionBytes: REGION_BYTES,
      capacityExtents: this.options.activityLogExtents,
      logger: this.logger.child({ volume: volume.spec.name, component: 'write-intent' }),
    };
  }

  /** The volume's write-intent log, opened and attached when its first mirror is added. */
  private async intentFor(name: string, volume: ReplicaSource): Promise<{ log: WriteIntentLog; metadata: VolumeMetadataOptions }> {
    const existing = this.intents.get(name);
    if (existing !== undefined) return existing;
    const metadata = this.metadataOptions(volume);
    const { log } = await openWriteIntentLog(metadata);
    try {
      await log.start();
    } catch (error) {
      throw new BmError(ControlErrorCode.StateWrite, `writing the write-intent log of volume ${name} failed: ${errorMessage(error)}`, { cause: error });
    }
    const intent = { log, volume, metadata };
    this.intents.set(name, intent);
    volume.setWriteIntent(log.tracking ? log : undefined);
    return intent;
  }

  /** Drops a removed mirror's bitmap, and the volume's log with its last mirror. */
  private async forgetIntent(record: MirrorRecord): Promise<void> {
    const intent = this.intents.get(record.volume);
    if (intent === undefined) return;
    await intent.log.removeTracker(record.id);
    if (intent.log.trackerCount > 0) return;
    this.intents.delete(record.volume);
    intent.volume.setWriteIntent(undefined);
    await intent.log.remove();
  }

  private create(record: MirrorRecord, volume: ReplicaSource, recovered: RecoveredMirror, log: WriteIntentLog): Mirror {
    const mirror = new Mirror({
      record,
      volume,
      nodeName: this.options.nodeName,
      resolvePeer: () => this.options.peerEndpoint(record.peer),
      fastResync: () => this.options.lookupVolume(record.volume)?.fastResync ?? true,
      persist: (next) => this.persist(this.records().map((other) => (other.id === next.id ? next : other))),
      initialDirty: recovered.initialDirty,
      recovery: recovered.recovery,
      writeIntentInfo: () => (log.tracking ? { ...log.stats(), extentBytes: EXTENT_BYTES } : null),
      onTargetDurable: () => log.persistSoon(),
      persistBitmap: () => log.persistNow(),
      timing: this.options.timing,
      logger: this.logger,
    });
    log.addTracker({ id: record.id, file: recovered.file, mayDiffer: (startBytes, endBytes) => mirror.mayDiffer(startBytes, endBytes) });
    this.mirrors.push(mirror);
    return mirror;
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
    async: null,
    recovery: { kind: 'metadata-lost', detail: 'not running: its source volume is not online', dirtyBytesAtStart: 0 },
    writeIntent: null,
    splitBrain: record.splitBrain === undefined ? null : { ...record.splitBrain, resolving: record.resolve ?? null, restoring: record.restoring === true },
    received: { restoreBytes: 0 },
  };
}
