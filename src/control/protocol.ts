// The control protocol: newline-delimited JSON over a Unix socket, one request line answered by
// one response line. docs/CONTROL.md is the human description of what is defined here.
import { z } from 'zod';
import { parseHostPort, type HostPort } from '../config/config';
import type { BusyPollStats } from '../native/types';

/** Longest request or response line, newline excluded. Longer request lines close the connection. */
export const controlLineBytesMax = 1024 * 1024;
/** Control connections accepted at once. */
export const controlConnectionsMax = 64;

export const volumeNamePattern = /^[A-Za-z0-9._-]{1,64}$/;

const volumeName = z
  .string()
  .regex(volumeNamePattern, 'expected 1 to 64 characters from [A-Za-z0-9._-]')
  .refine((name) => name !== '.' && name !== '..', 'must not be "." or ".."');

/** Peers follow the volume name rules: the name appears in logs, status and (later) the wire. */
const peerName = volumeName;

/** Longest HOST:PORT a peer address may be (a DNS name is at most 253 bytes). */
export const peerAddressBytesMax = 261;

/** "host:port" or "[v6]:port", port 1-65535 (a peer has a real port; 0 means "any" only for
 *  listening). The host is not resolved here: DNS may change before the first connection. */
export function parsePeerAddress(text: string): HostPort | null {
  const parsed = parseHostPort(text);
  return parsed === null || parsed.port < 1 ? null : parsed;
}

/** sync: a write is acknowledged once on the local device and on the target (REC synchronous,
 *  DRBD protocol C). stack: acknowledged once local; only the dirty bitmap records it and the
 *  copier ships dirty regions in the background (REC asynchronous stack): lowest overhead, no
 *  ordering promise. Asynchronous consistency mode arrives with issue 4. */
export const mirrorModes = ['sync', 'async', 'stack'] as const;
/** Async mode's buffer of writes sent and not yet acknowledged: default and bounds. */
export const asyncBufferBytesDefault = 64 * 1024 * 1024;
export const asyncBufferBytesMin = 1024 * 1024;
export const asyncBufferBytesMax = 1024 * 1024 * 1024;
/** continue: a disconnected mirror records dirty regions and writes go on; block: writes wait
 *  until the mirror is in sync again (once it has been). */
export const onDisconnectPolicies = ['continue', 'block'] as const;
/** What a sync-mode mirror does when the target has not acknowledged a forwarded client write or
 *  flush within syncTimeoutMs. suspend: the write completes once local, its regions are dirty,
 *  the link is cracked (cause BM_ERR_SYNC_TIMEOUT) and the mirror reconnects and resyncs. block:
 *  the write keeps waiting for the target (until the ack timeout cracks the link) and, once the
 *  mirror has been in sync, is then held until the mirror is in sync again with its regions
 *  copied. Stack mode forwards nothing, so neither applies there. */
export const onTimeoutPolicies = ['suspend', 'block'] as const;
/** mirror.resolve --discard: `peer` keeps this side's data (the target is overwritten where
 *  either side changed), `this` keeps the target's (restored onto this side). */
export const splitBrainDiscards = ['this', 'peer'] as const;
export type SplitBrainDiscard = (typeof splitBrainDiscards)[number];
export const syncTimeoutMsDefault = 5000;
export const syncTimeoutMsMin = 10;
export const syncTimeoutMsMax = 3_600_000;
const syncTimeoutMs = z.number().int().min(syncTimeoutMsMin).max(syncTimeoutMsMax);
const maxRateBytesPerSec = z.number().int().positive().max(Number.MAX_SAFE_INTEGER);

export const volumeRoles = ['primary', 'mirror'] as const;
/** primary: read-write to NBD clients (unless readOnly); mirror: the target of replication,
 *  read-only to NBD clients while the daemon holds the device read-write for the mirror service. */
export type VolumeRole = (typeof volumeRoles)[number];

export const requestEnvelopeSchema = z.strictObject({
  id: z.union([z.string().max(128), z.number().int().safe()]),
  method: z.string().min(1).max(64),
  params: z.record(z.string(), z.unknown()).optional(),
});
export type RequestEnvelope = z.infer<typeof requestEnvelopeSchema>;
export type RequestId = RequestEnvelope['id'];

export const paramsSchemas = {
  'volume.add': z.strictObject({
    name: volumeName,
    device: z.string().min(1).max(4096).startsWith('/', 'expected an absolute path'),
    readOnly: z.boolean().optional(),
    role: z.enum(volumeRoles).optional(),
  }),
  'volume.list': z.strictObject({}),
  'volume.info': z.strictObject({ name: volumeName }),
  'volume.remove': z.strictObject({ name: volumeName, force: z.boolean().optional() }),
  'volume.set': z.strictObject({ name: volumeName, fastResync: z.boolean().optional() }),
  /** A mirror volume becomes writable to NBD clients (failover by hand); force cuts a source
   *  replicating into it. */
  'volume.promote': z.strictObject({ name: volumeName, force: z.boolean().optional() }),
  /** Read-only to clients again; force disconnects connected NBD clients. */
  'volume.demote': z.strictObject({ name: volumeName, force: z.boolean().optional() }),
  'peer.add': z.strictObject({
    name: peerName,
    address: z
      .string()
      .max(peerAddressBytesMax)
      .refine((value) => parsePeerAddress(value) !== null, 'expected HOST:PORT with a port from 1 to 65535'),
    secretFile: z.string().min(1).max(4096).startsWith('/', 'expected an absolute path'),
  }),
  'peer.list': z.strictObject({}),
  'peer.info': z.strictObject({ name: peerName }),
  'peer.remove': z.strictObject({ name: peerName }),
  'mirror.add': z.strictObject({
    volume: volumeName,
    peer: peerName,
    target: volumeName,
    mode: z.enum(mirrorModes).optional(),
    onDisconnect: z.enum(onDisconnectPolicies).optional(),
    maxRateBytesPerSec: maxRateBytesPerSec.optional(),
    syncTimeoutMs: syncTimeoutMs.optional(),
    onTimeout: z.enum(onTimeoutPolicies).optional(),
    asyncBufferBytes: z.number().int().min(asyncBufferBytesMin).max(asyncBufferBytesMax).optional(),
  }),
  /** Changes a running mirror's settings; maxRateBytesPerSec null removes the cap. */
  'mirror.set': z.strictObject({
    volume: volumeName,
    peer: peerName.optional(),
    mode: z.enum(mirrorModes).optional(),
    onDisconnect: z.enum(onDisconnectPolicies).optional(),
    maxRateBytesPerSec: maxRateBytesPerSec.nullable().optional(),
    syncTimeoutMs: syncTimeoutMs.optional(),
    onTimeout: z.enum(onTimeoutPolicies).optional(),
  }),
  'mirror.list': z.strictObject({}),
  'mirror.status': z.strictObject({ volume: volumeName, peer: peerName.optional() }),
  'mirror.remove': z.strictObject({ volume: volumeName, peer: peerName.optional(), force: z.boolean().optional() }),
  'mirror.suspend': z.strictObject({ volume: volumeName, peer: peerName.optional() }),
  'mirror.resume': z.strictObject({ volume: volumeName, peer: peerName.optional() }),
  'mirror.reset': z.strictObject({ volume: volumeName, peer: peerName.optional() }),
  /** Split brain: which side's changes are discarded (docs/SPLIT-BRAIN.md). */
  'mirror.resolve': z.strictObject({ volume: volumeName, peer: peerName.optional(), discard: z.enum(splitBrainDiscards) }),
  status: z.strictObject({}),
} as const;

export type MethodName = keyof typeof paramsSchemas;
export type MethodParams<M extends MethodName> = z.infer<(typeof paramsSchemas)[M]>;

export function isMethodName(method: string): method is MethodName {
  return Object.prototype.hasOwnProperty.call(paramsSchemas, method);
}

/** online: serving; error: the device could not be opened; failed: a device write or flush failed, so writes and flushes are refused until the volume is removed and added again. */
export type VolumeState = 'online' | 'error' | 'failed';

/** One volume as volume.info, volume.list and volume.add report it. */
export interface VolumeInfo {
  name: string;
  uuid: string;
  device: string;
  /** Opened O_RDONLY and exported read-only (volume.add readOnly). */
  readOnly: boolean;
  /** A mirror volume is read-only to NBD clients even though readOnly is false. */
  role: VolumeRole;
  /** Whether this volume's mirrors resync only dirty regions after a reconnect (volume.set). */
  fastResync: boolean;
  state: VolumeState;
  /** Why the volume is in state 'error' or 'failed'; absent when online. */
  reason?: string;
  /** null while the device is not open (state 'error'). */
  sizeBytes: number | null;
  logicalSectorBytes: number | null;
  physicalSectorBytes: number | null;
  nbdUri: string;
  nbdTcpUri?: string;
  connections: number;
  /** Mirror volumes: writable to NBD clients since volume.promote. */
  promoted: boolean;
  /** Mirror volumes written while promoted (split brain until the source resolves it), else null. */
  divergence: { generation: number; since: string; divergedBytes: number } | null;
}

export interface VolumeRemoveResult {
  name: string;
  uuid: string;
  /** NBD connections that were closed because of force. */
  disconnected: number;
}

/** One peer as peer.info, peer.list and peer.add report it. The secret itself is never sent. */
export interface PeerInfo {
  name: string;
  /** HOST:PORT of the peer's replication listener. */
  address: string;
  host: string;
  port: number;
  /** Path of the shared-secret file, as registered. */
  secretFile: string;
  /** Why the secret file fails the check now (it passed at peer.add); absent when it is usable. */
  secretFileError?: string;
  createdAt: string;
}

export interface PeerRemoveResult {
  name: string;
}

/** One mirror as mirror.status and mirror.list report it. */
export interface MirrorInfo {
  volume: string;
  peer: string;
  target: string;
  mode: string;
  onDisconnect: string;
  maxRateBytesPerSec: number | null;
  /** How long a forwarded client write or flush may wait for the target (sync mode). */
  syncTimeoutMs: number;
  /** suspend or block: what happens when syncTimeoutMs passes (see onTimeoutPolicies). */
  onTimeout: string;
  /** Forwarded writes and flushes that waited longer than syncTimeoutMs since the daemon started. */
  syncTimeouts: number;
  /** When the last of them passed its timeout, or null. */
  lastSyncTimeoutAt: string | null;
  /** INIT, MAKEPARTS, RESET, ERROR, READY, REPLICATE, OUTOFSYNC or INSYNC. */
  state: string;
  since: string;
  /** The event that led to the current state. */
  cause: { event: string; reason: string; code: string | null };
  /** Set in ERROR: what the admin must fix before resume or reset. */
  error: { code: string; reason: string } | null;
  suspended: boolean;
  linkUp: boolean;
  fullCopyDone: boolean;
  /** The source volume's FastResync setting: off, every reconnect copies the whole volume. */
  fastResync: boolean;
  sizeBytes: number;
  /** Bytes the target lacks (whole 64 KiB regions), counting copy chunks sent and not yet acknowledged. */
  dirtyBytes: number;
  /** Of the current copy or resync pass; 100 when in sync. */
  progressPercent: number;
  copiedBytes: number;
  rateBytesPerSec: number;
  etaSeconds: number | null;
  sent: { liveBytes: number; copyBytes: number; zeroBytes: number; liveWrites: number };
  nextRetryAt: string | null;
  history: Array<{ from: string; to: string; event: string; reason: string; code: string | null; at: string }>;
  /** Async mode only (else null): the ordered buffer of writes sent and not yet acknowledged,
   *  and whether writes travel ordered with no catch-up copy still landing (the target is crash
   *  consistent), or the mirror fell back to the dirty bitmap after the buffer filled or a crack
   *  (catching up; ordered again once clean). */
  async: { ordered: boolean; bufferBytes: number; bufferedBytes: number; bufferedWrites: number; overflows: number; writes: number; epochs: number } | null;
  /** Where this run's dirty bitmap came from (see docs/WRITE-INTENT.md). */
  recovery: MirrorRecovery;
  /** The source volume's write-intent log; null when it is switched off. */
  writeIntent: WriteIntentInfo | null;
  /** Set while the target diverged (split brain) and until mirror.resolve has finished. */
  splitBrain: SplitBrainInfo | null;
  /** Bytes copied from the target onto the source (mirror.resolve --discard this). */
  received: { restoreBytes: number };
}

export interface SplitBrainInfo {
  detectedAt: string;
  /** Bytes of the regions the target's clients wrote while it was promoted. */
  peerDivergedBytes: number;
  /** The target volume is still promoted (it must be demoted before a resolve can run). */
  peerPromoted: boolean;
  /** Bytes of the regions this side changed that the target lacks. */
  localDirtyBytes: number;
  /** The side being discarded by a mirror.resolve in progress, or null. */
  resolving: SplitBrainDiscard | null;
  /** A restore of the target's bytes (discard this) began and is not acknowledged by the
   *  target yet: client writes to the volume wait (or fail while the mirror is in ERROR or
   *  suspended). */
  restoring: boolean;
}

/** new: a new mirror (everything is copied); clean-shutdown: the bitmap saved at the last
 *  stop; activity-log: after a crash, the saved bitmap plus the extents the activity log had
 *  hot; metadata-lost: the metadata was missing or unreadable, so everything counts as dirty. */
export const mirrorRecoveryKinds = ['new', 'clean-shutdown', 'activity-log', 'metadata-lost'] as const;

export interface MirrorRecovery {
  kind: (typeof mirrorRecoveryKinds)[number];
  detail: string;
  /** Dirty bytes right after the daemon started (what the first resync had to send). */
  dirtyBytesAtStart: number;
}

export interface WriteIntentInfo {
  capacityExtents: number;
  extentBytes: number;
  hotExtents: number;
  /** Activity-log slot writes (each followed by fdatasync). */
  transactions: number;
  evictions: number;
  /** Bitmap pages written (grouped, each group followed by fdatasync). */
  pageWrites: number;
  /** Replicated client changes, and how many of them waited for a log write. */
  acquires: number;
  acquiresWaited: number;
  lastError: string | null;
}

export interface MirrorRemoveResult {
  volume: string;
  peer: string;
}

export interface StatusResult {
  version: string;
  pid: number;
  uptimeSeconds: number;
  controlSocket: string;
  nbdSocket: string;
  nbdListen: string | null;
  /** Replication address (--listen) with the bound port, or null when not listening. */
  replicationListen: string | null;
  nodeName: string;
  mirrors: number;
  /** Authenticated replication sessions writing this daemon's mirror volumes. */
  replicationSessions: number;
  stateDir: string;
  peers: number;
  volumes: number;
  volumesInError: number;
  connections: number;
  ioEngine: string;
  /** Busy polling of the I/O engine: the maximum (0 off) and how often it spun and caught. */
  busyPoll: BusyPollStats;
}

export interface MethodResults {
  'volume.add': VolumeInfo;
  'volume.list': { volumes: VolumeInfo[] };
  'volume.info': VolumeInfo;
  'volume.remove': VolumeRemoveResult;
  'volume.set': VolumeInfo;
  'volume.promote': VolumeInfo;
  'volume.demote': VolumeInfo;
  'peer.add': PeerInfo;
  'peer.list': { peers: PeerInfo[] };
  'peer.info': PeerInfo;
  'peer.remove': PeerRemoveResult;
  'mirror.add': MirrorInfo;
  'mirror.list': { mirrors: MirrorInfo[] };
  'mirror.status': { mirrors: MirrorInfo[] };
  'mirror.remove': MirrorRemoveResult;
  'mirror.suspend': MirrorInfo;
  'mirror.resume': MirrorInfo;
  'mirror.reset': MirrorInfo;
  'mirror.set': MirrorInfo;
  'mirror.resolve': MirrorInfo;
  status: StatusResult;
}

export interface ErrorBody {
  code: string;
  message: string;
}

export type Response =
  | { id: RequestId | null; ok: true; result: unknown }
  | { id: RequestId | null; ok: false; error: ErrorBody };
