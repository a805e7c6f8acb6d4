// Replication peers: name, address and the path of the shared-secret file, persisted in
// <state>/peers.json the same way as the volume registry (versioned, validated on load, written
// atomically). Only the path is stored: the secret stays in its 0600 file, is read when needed
// and never appears in the state dir, in replies or in logs.
import assert from 'node:assert';
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { BmError, ControlErrorCode, errorCode, errorMessage } from '../control/errors';
import { parsePeerAddress, volumeNamePattern, type MethodParams, type PeerInfo, type PeerRemoveResult } from '../control/protocol';
import { readSecretFile } from '../wire/auth';
import { describeErrno } from './errno';
import { loadStateFile, saveStateFile, stateFileCorrupt, type StateFile } from './state-file';
import { ChangeQueue } from './change-queue';

export const peersVersion = 1;
export const peersFileName = 'peers.json';
export const peersMax = 256;
const peersFileBytesMax = 1024 * 1024;

const peerRecordSchema = z.strictObject({
  name: z.string().regex(volumeNamePattern),
  address: z.string().refine((value) => parsePeerAddress(value) !== null, 'expected HOST:PORT with a port from 1 to 65535'),
  secretFile: z.string().startsWith('/'),
  createdAt: z.iso.datetime(),
});
export type PeerRecord = z.infer<typeof peerRecordSchema>;

const peersFileSchema = z.strictObject({
  version: z.literal(peersVersion),
  peers: z.array(peerRecordSchema).max(peersMax),
});

export function peersPath(stateDir: string): string {
  return path.join(stateDir, peersFileName);
}

const peersFile: StateFile<z.output<typeof peersFileSchema>> = {
  what: 'peer registry',
  version: peersVersion,
  bytesMax: peersFileBytesMax,
  schema: peersFileSchema,
};

/** Load the peers; a missing file means none (first start, or a state dir from before peers). */
export function loadPeers(stateDir: string): PeerRecord[] {
  const filePath = peersPath(stateDir);
  const document = loadStateFile(filePath, peersFile);
  if (document === undefined) return [];
  const names = new Set<string>();
  for (const record of document.peers) {
    if (names.has(record.name)) throw stateFileCorrupt(peersFile.what, filePath, `peer name ${record.name} appears twice`);
    names.add(record.name);
  }
  return document.peers;
}

export function savePeers(stateDir: string, records: readonly PeerRecord[]): void {
  saveStateFile(peersPath(stateDir), peersFile, { version: peersVersion, peers: [...records] });
}

/** Check that a secret file is usable now; the reason names the file, never its content. */
export function checkSecretFile(secretFile: string): string | null {
  try {
    const secret = readSecretFile(secretFile);
    secret.fill(0);
    return null;
  } catch (error) {
    const code = errorCode(error);
    if (code === 'BM_ERR_AUTH_SECRET_FILE') return errorMessage(error);
    // O_NOFOLLOW on a symlink fails with ELOOP: say what that means here.
    if (code === 'ELOOP') return `${secretFile} is a symbolic link; give the path of the file itself`;
    if (code !== undefined && code.startsWith('E')) return `${secretFile}: ${describeErrno(code)}`;
    return `${secretFile}: ${errorMessage(error)}`;
  }
}

export interface PeerManagerOptions {
  stateDir: string;
  logger: Logger;
  /** Why a peer cannot be removed now (a mirror uses it), or null. */
  inUse?: (name: string) => string | null;
}

/** The peers the daemon knows. Changes run one at a time and are persisted before they are
 *  acknowledged, like volume changes. */
export class PeerManager {
  private readonly peers = new Map<string, PeerRecord>();
  private readonly stateDir: string;
  private readonly logger: Logger;
  private readonly inUse: (name: string) => string | null;
  private readonly changes = new ChangeQueue();

  constructor(options: PeerManagerOptions) {
    this.stateDir = options.stateDir;
    this.logger = options.logger;
    this.inUse = options.inUse ?? (() => null);
  }

  has(name: string): boolean {
    return this.peers.has(name);
  }

  /** Where a peer listens and the secret shared with it, read from its file now. */
  endpoint(name: string): { host: string; port: number; secret: Buffer } {
    const record = this.get(name);
    const address = parsePeerAddress(record.address);
    assert(address !== null, 'validated on add and on load');
    try {
      return { host: address.host, port: address.port, secret: readSecretFile(record.secretFile) };
    } catch (error) {
      throw new BmError(ControlErrorCode.SecretFile, `peer ${name}: ${checkSecretFile(record.secretFile) ?? errorMessage(error)}`, { cause: error });
    }
  }

  /** For the replication listener: the secret of a known peer, or undefined (unknown peer, or
   *  its secret file is unusable, which is logged). */
  secretFor(name: string): Buffer | undefined {
    if (!this.peers.has(name)) return undefined;
    try {
      return this.endpoint(name).secret;
    } catch (error) {
      this.logger.error({ peer: name, reason: errorMessage(error) }, 'peer secret file is not usable; refusing the peer');
      return undefined;
    }
  }

  /** Take the loaded records. A secret file that no longer passes is logged, not fatal: the
   *  admin may be rotating it, and peer.info shows the reason. */
  load(records: readonly PeerRecord[]): void {
    assert(this.peers.size === 0);
    for (const record of records) {
      this.peers.set(record.name, record);
      const problem = checkSecretFile(record.secretFile);
      if (problem !== null) this.logger.warn({ peer: record.name, secretFile: record.secretFile, reason: problem }, 'peer secret file is not usable');
    }
  }

  get size(): number {
    return this.peers.size;
  }

  list(): PeerInfo[] {
    return [...this.peers.values()].map(describe);
  }

  info(name: string): PeerInfo {
    return describe(this.get(name));
  }

  add(params: MethodParams<'peer.add'>): Promise<PeerInfo> {
    return this.changes.run(async () => {
      if (this.peers.has(params.name)) throw new BmError(ControlErrorCode.PeerExists, `peer ${params.name} already exists`);
      if (this.peers.size >= peersMax) throw new BmError(ControlErrorCode.InvalidArgument, `name: at most ${peersMax} peers may be registered`);
      const secretFile = path.resolve(params.secretFile);
      const problem = checkSecretFile(secretFile);
      if (problem !== null) throw new BmError(ControlErrorCode.SecretFile, `peer ${params.name} not added: ${problem}`);
      const record: PeerRecord = { name: params.name, address: params.address, secretFile, createdAt: new Date().toISOString() };
      try {
        savePeers(this.stateDir, [...this.peers.values(), record]);
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `peer ${params.name} not added: writing the peer registry failed: ${errorMessage(error)}`, { cause: error });
      }
      this.peers.set(record.name, record);
      this.logger.info({ peer: record.name, address: record.address, secretFile }, 'peer added');
      return describe(record);
    });
  }

  remove(params: MethodParams<'peer.remove'>): Promise<PeerRemoveResult> {
    return this.changes.run(async () => {
      this.get(params.name);
      const busy = this.inUse(params.name);
      if (busy !== null) throw new BmError(ControlErrorCode.PeerBusy, `peer ${params.name} not removed: ${busy}`);
      const remaining = [...this.peers.values()].filter((record) => record.name !== params.name);
      try {
        savePeers(this.stateDir, remaining);
      } catch (error) {
        throw new BmError(ControlErrorCode.StateWrite, `peer ${params.name} not removed: writing the peer registry failed: ${errorMessage(error)}`, { cause: error });
      }
      this.peers.delete(params.name);
      this.logger.info({ peer: params.name }, 'peer removed');
      return { name: params.name };
    });
  }

  /** Wait for a running change, so shutdown does not cut a registry write short. */
  async close(): Promise<void> {
    await this.changes.close();
  }

  private get(name: string): PeerRecord {
    const record = this.peers.get(name);
    if (record === undefined) throw new BmError(ControlErrorCode.PeerNotFound, `peer ${name} does not exist`);
    return record;
  }
}

function describe(record: PeerRecord): PeerInfo {
  const address = parsePeerAddress(record.address);
  assert(address !== null, 'validated on add and on load');
  const info: PeerInfo = {
    name: record.name,
    address: record.address,
    host: address.host,
    port: address.port,
    secretFile: record.secretFile,
    createdAt: record.createdAt,
  };
  const problem = checkSecretFile(record.secretFile);
  if (problem !== null) info.secretFileError = problem;
  return info;
}
