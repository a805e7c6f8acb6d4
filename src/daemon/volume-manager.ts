// The set of volumes the daemon serves: the registry on disk, the open devices, and the NBD
// exports they back. Every change is persisted before it is acknowledged, and changes run one at
// a time so two control clients cannot interleave a read-modify-write of the registry.
import assert from 'node:assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { BmError, ControlErrorCode, errorCode, errorMessage } from '../control/errors';
import type { MethodParams, VolumeInfo, VolumeRemoveResult } from '../control/protocol';
import type { NbdExport } from '../nbd/types';
import type { BlockBackend } from '../volume/backend';
import type { ReplicaSource, ReplicaTarget } from '../volume/replica';
import type { VolumeSpec } from '../volume/volume';
import { describeErrno } from './errno';
import { saveRegistry, volumesMax, type MirrorSourceBinding, type VolumeRecord } from './registry';
import { ChangeQueue } from './change-queue';
import type { DirtyBitmap } from '../native/index';
import { DivergenceLog, type DivergenceLogOptions } from '../write-intent/divergence-log';
import { FsMetadataStore, type MetadataStore } from '../write-intent/metadata-file';
import { newGeneration } from '../replication/generation';

/** Region size of a promoted volume's divergence record: the mirrors' dirty-bitmap region. */
const DIVERGENCE_REGION_BYTES = 64 * 1024;

/** The part of an open volume the manager needs; src/volume/volume.ts's Volume satisfies it. */
export interface OpenVolume extends BlockBackend, ReplicaSource, ReplicaTarget {
  close(): Promise<void>;
  /** Mirror volumes: writable to clients (promoted) or not. */
  setPromoted(promoted: boolean): void;
  /** Mirror volumes: closed to the mirror service while diverged from their source. */
  setDiverged(diverged: boolean): void;
  /** Set once a device write or flush failed (see Volume.failure). */
  failure(): { code: string; message: string } | undefined;
}

export type OpenVolumeFn = (spec: VolumeSpec, logger: Logger) => OpenVolume;

/** The part of the NBD server the manager needs. */
export interface ExportConnections {
  connectionCount(exportName?: string): number;
  disconnectExport(exportName: string): unknown;
}

export interface VolumeUris {
  nbdUri: string;
  nbdTcpUri?: string;
}

export interface VolumeManagerOptions {
  stateDir: string;
  logger: Logger;
  openVolume: OpenVolumeFn;
  connections: () => ExportConnections;
  uris: (name: string) => VolumeUris;
  /** Why a volume cannot be removed now (a mirror uses it), or null. */
  inUse?: (name: string) => string | null;
  /** Where divergence records of promoted volumes go (the file system; tests' crash layer). */
  metadataStore?: MetadataStore;
  /** The peer replicating into a mirror volume now, and a way to end that session. */
  replicationSession?: (name: string) => { peer: string; end(reason: string): Promise<void> } | undefined;
}

/** A diverged mirror volume's state, for the replication server (split brain). */
export interface VolumeDivergence {
  generation: number;
  promoted: boolean;
  bits: DirtyBitmap;
}

interface Entry {
  record: VolumeRecord;
  volume: OpenVolume | null;
  /** Why `volume` is null: the open error, with the errno text. */
  reason: string | null;
  /** Identity of the device (block device number or inode), to refuse the same device twice
   *  under two paths. null when the device could not be stat'ed. */
  identity: string | null;
  /** Hidden from new NBD clients while a remove is deciding. */
  removing: boolean;
  /** What was written while promoted (record.divergence set and the volume open). */
  divergence: DivergenceLog | null;
}

const notFoundCodes = new Set(['ENOENT', 'ENXIO', 'ENODEV', 'ENOTDIR']);

/** Map an error from stat/open of a device to the control error a user should see. */
function deviceError(device: string, error: unknown): BmError {
  const code = errorCode(error) ?? 'EIO';
  const detail = `${device}: ${describeErrno(code)}`;
  if (notFoundCodes.has(code)) return new BmError(ControlErrorCode.DeviceNotFound, `device not found: ${detail}`, { cause: error });
  if (code === 'EBUSY') return new BmError(ControlErrorCode.DeviceInUse, `device in use (mounted or opened exclusively): ${detail}`, { cause: error });
  return new BmError(ControlErrorCode.DeviceOpen, `cannot open device ${detail}: ${errorMessage(error)}`, { cause: error });
}

function deviceIdentity(device: string): string {
  const stat = fs.statSync(device);
  if (stat.isBlockDevice()) return `block:${stat.rdev}`;
  return `inode:${stat.dev}:${stat.ino}`;
}

export class VolumeManager {
  private readonly entries = new Map<string, Entry>();
  private readonly stateDir: string;
  private readonly logger: Logger;
  private readonly openVolume: OpenVolumeFn;
  private readonly connections: () => ExportConnections;
  private readonly uris: (name: string) => VolumeUris;
  private readonly inUse: (name: string) => string | null;
  private readonly changes = new ChangeQueue();
  private readonly metadataStore: MetadataStore;
  private readonly replicationSession: NonNullable<VolumeManagerOptions['replicationSession']>;

  constructor(options: VolumeManagerOptions) {
    this.metadataStore = options.metadataStore ?? new FsMetadataStore();
    this.replicationSession = options.replicationSession ?? (() => undefined);
    this.stateDir = options.stateDir;
    this.logger = options.logger;
    this.openVolume = options.openVolume;
    this.connections = options.connections;
    this.uris = options.uris;
    this.inUse = options.inUse ?? (() => null);
  }

  /** Open every registered volume. A device that cannot be opened stays registered in state
   *  'error' with the reason, so the daemon still starts and the volume is not forgotten. */
  openRegistered(records: readonly VolumeRecord[]): void {
    assert(this.entries.size === 0);
    for (const record of records) {
      const entry: Entry = { record, volume: null, reason: null, identity: null, removing: false, divergence: null };
      try {
        entry.identity = deviceIdentity(record.device);
        entry.volume = this.open(record);
      } catch (error) {
        const bmError = deviceError(record.device, error);
        entry.reason = `${bmError.code}: ${bmError.message}`;
        this.logger.error({ volume: record.name, device: record.device, err: error }, 'volume could not be opened; kept in state error');
      }
      this.entries.set(record.name, entry);
    }
  }

  /** Loads the divergence record of every diverged mirror volume and makes promoted ones
   *  writable again, before NBD clients or sources are served. */
  async loadDivergence(): Promise<void> {
    for (const entry of this.entries.values()) {
      const { record, volume } = entry;
      if (record.divergence === undefined || volume === null) continue;
      const { log, state } = await DivergenceLog.open(this.divergenceOptions(record, volume));
      entry.divergence = log;
      volume.setDiverged(true);
      if (record.promoted) {
        volume.setWriteIntent(log);
        volume.setPromoted(true);
      }
      this.logger.warn({ volume: record.name, promoted: record.promoted, divergedBytes: log.divergedBytes, record: state }, 'mirror volume diverged from its source (split brain until the source resolves it)');
    }
  }

  get size(): number {
    return this.entries.size;
  }

  get errorCount(): number {
    let count = 0;
    for (const entry of this.entries.values()) if (entry.volume === null) count++;
    return count;
  }

  /** For the NBD server: the export for `name`, if it is online and not being removed. */
  lookupExport(name: string): NbdExport | undefined {
    const entry = this.entries.get(name);
    if (entry === undefined || entry.volume === null || entry.removing) return undefined;
    return { name, description: `blockmirror volume ${name} (${entry.record.uuid})`, backend: entry.volume };
  }

  listExports(): NbdExport[] {
    const exports: NbdExport[] = [];
    for (const name of this.entries.keys()) {
      const found = this.lookupExport(name);
      if (found !== undefined) exports.push(found);
    }
    return exports;
  }

  list(): VolumeInfo[] {
    return [...this.entries.values()].map((entry) => this.describe(entry));
  }

  info(name: string): VolumeInfo {
    return this.describe(this.get(name));
  }

  add(params: MethodParams<'volume.add'>): Promise<VolumeInfo> {
    return this.changes.run(async () => {
      const device = path.resolve(params.device);
      if (this.entries.has(params.name)) {
        throw new BmError(ControlErrorCode.VolumeExists, `volume ${params.name} already exists`);
      }
      if (this.entries.size >= volumesMax) {
        throw new BmError(ControlErrorCode.InvalidArgument, `name: at most ${volumesMax} volumes may be registered`);
      }
      let identity: string;
      try {
        identity = deviceIdentity(device);
      } catch (error) {
        throw deviceError(device, error);
      }
      for (const other of this.entries.values()) {
        const sameDevice = other.identity !== null ? other.identity === identity : path.resolve(other.record.device) === device;
        if (sameDevice) {
          throw new BmError(ControlErrorCode.DeviceInUse, `device ${device} is already used by volume ${other.record.name}`);
        }
      }
      const role = params.role ?? 'primary';
      const readOnly = params.readOnly ?? false;
      if (role === 'mirror' && readOnly) {
        throw new BmError(ControlErrorCode.InvalidArgument, 'readOnly: a mirror volume is already read-only to NBD clients, and the mirror service must write to its device');
      }
      const record: VolumeRecord = {
        name: params.name,
        uuid: crypto.randomUUID(),
        device,
        readOnly,
        role,
        fastResync: true,
        createdAt: new Date().toISOString(),
        promoted: false,
      };
      let volume: OpenVolume;
      try {
        volume = this.open(record);
      } catch (error) {
        throw deviceError(device, error);
      }
      const entry: Entry = { record, volume, reason: null, identity, removing: false, divergence: null };
      try {
        this.persist([...this.records(), record]);
      } catch (error) {
        await volume.close().catch((closeError: unknown) => this.logger.error({ err: closeError }, 'closing volume after a failed registry write'));
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not added: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      this.entries.set(record.name, entry);
      this.logger.info({ volume: record.name, uuid: record.uuid, device, role }, 'volume added');
      return this.describe(entry);
    });
  }

  remove(params: MethodParams<'volume.remove'>): Promise<VolumeRemoveResult> {
    return this.changes.run(async () => {
      const entry = this.get(params.name);
      const busy = this.inUse(params.name);
      if (busy !== null) throw new BmError(ControlErrorCode.VolumeBusy, `volume ${params.name} not removed: ${busy}`);
      // Hide it first so no client connects between the check and the disconnect.
      entry.removing = true;
      const connected = this.connections().connectionCount(params.name);
      if (connected > 0 && params.force !== true) {
        entry.removing = false;
        throw new BmError(ControlErrorCode.VolumeBusy, `volume ${params.name} has ${connected} NBD connection(s); disconnect them or use force`);
      }
      if (connected > 0) await this.connections().disconnectExport(params.name);
      try {
        this.persist(this.records().filter((record) => record.name !== params.name));
      } catch (error) {
        entry.removing = false;
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not removed: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      this.entries.delete(params.name);
      this.logger.info({ volume: params.name, uuid: entry.record.uuid, disconnected: connected }, 'volume removed');
      if (entry.record.divergence !== undefined) {
        await entry.divergence?.close();
        await DivergenceLog.remove({ store: this.metadataStore, stateDir: this.stateDir, volumeUuid: entry.record.uuid }).catch((error: unknown) =>
          this.logger.error({ volume: params.name, err: error }, 'removing the divergence record failed'),
        );
      }
      if (entry.volume !== null) {
        try {
          await entry.volume.close();
        } catch (error) {
          throw new BmError('BM_ERR_DEVICE_CLOSE', `volume ${params.name} was removed, but flushing and closing ${entry.record.device} failed: ${errorMessage(error)}`, { cause: error });
        }
      }
      return { name: params.name, uuid: entry.record.uuid, disconnected: connected };
    });
  }

  /** Changes a volume's settings; persisted before it is acknowledged. */
  set(params: MethodParams<'volume.set'>): Promise<VolumeInfo> {
    return this.changes.run(async () => {
      const entry = this.get(params.name);
      const record: VolumeRecord = { ...entry.record, ...(params.fastResync === undefined ? {} : { fastResync: params.fastResync }) };
      try {
        this.persist(this.records().map((other) => (other.name === params.name ? record : other)));
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not changed: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      entry.record = record;
      this.logger.info({ volume: params.name, fastResync: record.fastResync }, 'volume settings changed');
      return this.describe(entry);
    });
  }

  /** volume.promote: a mirror volume becomes writable to NBD clients. Its divergence record is
   *  durable (empty) and in the registry before the first client write can reach it, and every
   *  region is recorded before it is written (DivergenceLog). */
  promote(params: MethodParams<'volume.promote'>): Promise<VolumeInfo> {
    return this.changes.run(async () => {
      const entry = this.get(params.name);
      const { record, volume } = entry;
      if (record.role !== 'mirror') throw new BmError(ControlErrorCode.VolumeRole, `volume ${params.name} is a primary volume; only mirror volumes are promoted`);
      if (record.promoted) throw new BmError(ControlErrorCode.VolumeRole, `volume ${params.name} is already promoted`);
      if (volume === null || volume.failure() !== undefined) throw new BmError(ControlErrorCode.VolumeOffline, `volume ${params.name} is not online`);
      const session = this.replicationSession(params.name);
      if (session !== undefined && params.force !== true) {
        throw new BmError(ControlErrorCode.VolumeBusy, `peer ${session.peer} is replicating into volume ${params.name}; stop or suspend that mirror first, or use force to cut it`);
      }
      // A volume promoted before (demoted, never resolved) keeps what it recorded then.
      let log = entry.divergence;
      const divergence = record.divergence ?? { generation: newGeneration(), since: new Date().toISOString() };
      try {
        log ??= await DivergenceLog.create(this.divergenceOptions(record, volume));
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not promoted: writing its divergence record failed: ${errorMessage(error)}`, { cause: error });
      }
      const next: VolumeRecord = { ...record, promoted: true, divergence };
      try {
        this.persist(this.records().map((other) => (other.name === params.name ? next : other)));
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not promoted: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      entry.record = next;
      entry.divergence = log;
      volume.setDiverged(true);
      // From here a new source connection finds the volume diverged and the volume refuses
      // the mirror service's writes. The session connected now (looked up again: one may have
      // been admitted while the record was written) ends after the writes it started landed.
      const current = this.replicationSession(params.name);
      await current?.end(`volume ${params.name} was promoted by the admin`);
      volume.setWriteIntent(log);
      volume.setPromoted(true);
      this.logger.warn({ volume: params.name, generation: divergence.generation, cutSource: current?.peer ?? null }, 'mirror volume promoted: writable to NBD clients; its source will find it diverged (split brain)');
      return this.describe(entry);
    });
  }

  /** volume.demote: read-only to NBD clients again. The divergence record stays until the
   *  source resolves the split brain. */
  demote(params: MethodParams<'volume.demote'>): Promise<VolumeInfo> {
    return this.changes.run(async () => {
      const entry = this.get(params.name);
      const { record, volume } = entry;
      if (!record.promoted) throw new BmError(ControlErrorCode.VolumeRole, `volume ${params.name} is not promoted`);
      const connected = this.connections().connectionCount(params.name);
      if (connected > 0 && params.force !== true) {
        throw new BmError(ControlErrorCode.VolumeBusy, `volume ${params.name} has ${connected} NBD connection(s); disconnect them or use force`);
      }
      if (connected > 0) await this.connections().disconnectExport(params.name);
      if (volume !== null) {
        volume.setPromoted(false);
        await entry.divergence?.settle();
        volume.setWriteIntent(undefined);
        // What the clients wrote is durable before the volume is a replica again.
        await volume.flush().catch((error: unknown) => this.logger.error({ volume: params.name, err: error }, 'flushing the demoted volume failed'));
      }
      const next: VolumeRecord = { ...record, promoted: false };
      try {
        this.persist(this.records().map((other) => (other.name === params.name ? next : other)));
      } catch (error) {
        if (volume !== null && entry.divergence !== null) {
          volume.setWriteIntent(entry.divergence);
          volume.setPromoted(true);
        }
        throw new BmError(ControlErrorCode.StateWrite, `volume ${params.name} not demoted: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      entry.record = next;
      this.logger.warn({ volume: params.name, disconnected: connected, divergedBytes: entry.divergence?.divergedBytes ?? null }, 'mirror volume demoted: read-only to NBD clients; the divergence stays until the source resolves it');
      return this.describe(entry);
    });
  }

  /** For the replication server: the divergence of a mirror volume, if it has one. */
  divergence(name: string): VolumeDivergence | undefined {
    const entry = this.entries.get(name);
    if (entry?.record.divergence === undefined) return undefined;
    const bits = entry.divergence?.bits;
    if (bits === undefined) return undefined; // not open: the server refuses it as offline anyway
    return { generation: entry.record.divergence.generation, promoted: entry.record.promoted, bits };
  }

  /** The source resolved the split brain: the volume holds `binding`'s generation again and the
   *  divergence record goes. Refused while the volume is promoted. */
  resolveDivergence(name: string, binding: MirrorSourceBinding): Promise<void> {
    return this.changes.run(async () => {
      const entry = this.get(name);
      if (entry.record.promoted) throw new BmError(ControlErrorCode.VolumeRole, `volume ${name} is promoted; demote it before the split brain is resolved`);
      const { divergence: _gone, ...rest } = entry.record;
      const next: VolumeRecord = { ...rest, mirrorSource: binding };
      try {
        this.persist(this.records().map((other) => (other.name === name ? next : other)));
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `resolving the split brain of volume ${name} failed: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      entry.record = next;
      entry.volume?.setDiverged(false);
      const log = entry.divergence;
      entry.divergence = null;
      await log?.close();
      // After the registry: a file left behind by a crash here is never read again.
      await DivergenceLog.remove({ store: this.metadataStore, stateDir: this.stateDir, volumeUuid: next.uuid }).catch((error: unknown) =>
        this.logger.error({ volume: name, err: error }, 'removing the divergence record failed'),
      );
      this.logger.warn({ volume: name, source: binding }, 'split brain resolved by the source: the mirror volume holds its source generation again');
    });
  }

  /** The record and open volume named `name`, for replication (source or target). */
  lookup(name: string): { record: VolumeRecord; volume: OpenVolume | null } | undefined {
    const entry = this.entries.get(name);
    if (entry === undefined || entry.removing) return undefined;
    return { record: entry.record, volume: entry.volume };
  }

  /** Records which source a mirror volume replicates, persisted before it is relied on. */
  bindMirrorSource(name: string, binding: MirrorSourceBinding): Promise<void> {
    return this.changes.run(async () => {
      const entry = this.get(name);
      const record: VolumeRecord = { ...entry.record, mirrorSource: binding };
      try {
        this.persist(this.records().map((other) => (other.name === name ? record : other)));
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `binding volume ${name} to its source failed: writing the registry failed: ${errorMessage(error)}`, { cause: error });
      }
      entry.record = record;
      this.logger.info({ volume: name, source: binding }, 'mirror volume bound to its source');
    });
  }

  /** Close every open volume (drain in-flight I/O, flush). Waits for a running change first. */
  async closeAll(): Promise<void> {
    await this.changes.close();
    const closing = [...this.entries.values()].map(async (entry) => {
      if (entry.volume === null) return;
      try {
        await entry.volume.close();
        await entry.divergence?.close();
        this.logger.info({ volume: entry.record.name }, 'volume closed');
      } catch (error) {
        this.logger.error({ volume: entry.record.name, err: error }, 'closing volume failed');
        throw error;
      }
    });
    const results = await Promise.allSettled(closing);
    const failed = results.filter((result) => result.status === 'rejected');
    if (failed.length > 0) throw new BmError('BM_ERR_DEVICE_CLOSE', `${failed.length} volume(s) failed to flush and close`);
  }

  private open(record: VolumeRecord): OpenVolume {
    const spec: VolumeSpec = { name: record.name, uuid: record.uuid, devicePath: record.device, readOnly: record.readOnly, role: record.role };
    // Volume adds its own { volume: name } binding.
    return this.openVolume(spec, this.logger);
  }

  private divergenceOptions(record: VolumeRecord, volume: OpenVolume): DivergenceLogOptions {
    return {
      store: this.metadataStore,
      stateDir: this.stateDir,
      volumeUuid: record.uuid,
      sizeBytes: volume.info().sizeBytes,
      regionBytes: DIVERGENCE_REGION_BYTES,
      logger: this.logger.child({ volume: record.name, component: 'divergence' }),
    };
  }

  private get(name: string): Entry {
    const entry = this.entries.get(name);
    if (entry === undefined) throw new BmError(ControlErrorCode.VolumeNotFound, `volume ${name} does not exist`);
    return entry;
  }

  private records(): VolumeRecord[] {
    return [...this.entries.values()].map((entry) => entry.record);
  }

  private persist(records: readonly VolumeRecord[]): void {
    saveRegistry(this.stateDir, records);
  }

  private describe(entry: Entry): VolumeInfo {
    const { record, volume } = entry;
    const backendInfo = volume?.info();
    const info: VolumeInfo = {
      name: record.name,
      uuid: record.uuid,
      device: record.device,
      readOnly: record.readOnly,
      role: record.role,
      fastResync: record.fastResync,
      state: volume === null ? 'error' : volume.failure() !== undefined ? 'failed' : 'online',
      sizeBytes: backendInfo?.sizeBytes ?? null,
      logicalSectorBytes: backendInfo?.logicalSectorBytes ?? null,
      physicalSectorBytes: backendInfo?.physicalSectorBytes ?? null,
      ...this.uris(record.name),
      connections: volume === null ? 0 : this.connections().connectionCount(record.name),
      promoted: record.promoted,
      divergence:
        record.divergence === undefined
          ? null
          : { generation: record.divergence.generation, since: record.divergence.since, divergedBytes: entry.divergence?.divergedBytes ?? 0 },
    };
    if (entry.reason !== null) info.reason = entry.reason;
    const failure = volume?.failure();
    if (failure !== undefined) info.reason = failure.message;
    return info;
  }
}
