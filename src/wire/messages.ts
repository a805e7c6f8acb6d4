// TypeScript view of proto/blockmirror.proto (camelCase, as protobufjs names fields). 64-bit
// fields are plain numbers: the decoder rejects values above Number.MAX_SAFE_INTEGER instead of
// rounding them. test/wire/messages.test.ts checks that every schema field appears here.

export type StatusName =
  | 'STATUS_UNSPECIFIED'
  | 'STATUS_OK'
  | 'STATUS_IO_ERROR'
  | 'STATUS_NO_SPACE'
  | 'STATUS_READ_ONLY'
  | 'STATUS_INVALID';

export type ErrorCodeName =
  | 'ERROR_CODE_UNSPECIFIED'
  | 'ERROR_CODE_PROTOCOL'
  | 'ERROR_CODE_UNSUPPORTED_VERSION'
  | 'ERROR_CODE_UNSUPPORTED_MESSAGE'
  | 'ERROR_CODE_AUTH_FAILED'
  | 'ERROR_CODE_UNKNOWN_PEER'
  | 'ERROR_CODE_UNKNOWN_VOLUME'
  | 'ERROR_CODE_VOLUME_MISMATCH'
  | 'ERROR_CODE_TARGET_TOO_SMALL'
  | 'ERROR_CODE_SECTOR_SIZE_MISMATCH'
  | 'ERROR_CODE_TARGET_BUSY'
  | 'ERROR_CODE_NOT_A_MIRROR'
  | 'ERROR_CODE_IO'
  | 'ERROR_CODE_SHUTTING_DOWN'
  | 'ERROR_CODE_INTERNAL'
  | 'ERROR_CODE_SPLIT_BRAIN';

/** Values of enum Capability (bits of Hello.capabilities). */
export const Capability = {
  WRITE_ZEROES: 1,
  FUA: 2,
  TASK_MARKER: 4,
  BITMAP_EXCHANGE: 8,
  SNAPSHOT: 16,
  VERIFY: 32,
  ORDERED_WRITES: 64,
} as const;

/** Values of enum WriteFlag (bits of Write.flags). */
export const WriteFlag = {
  FUA: 1,
  ZEROES: 2,
  ORDERED: 4,
} as const;

export const PROTOCOL_VERSION = 1;

export interface AuthChallenge {
  nodeName: string;
  nonce: Buffer;
}
export interface AuthResponse {
  mac: Buffer;
}
export interface Hello {
  protocolVersion: number;
  nodeName: string;
  volumeUuid: string;
  volumeName: string;
  sizeBytes: number;
  logicalSectorBytes: number;
  generationIds: number[];
  capabilities: number;
  /** The mirror volume on the target that should receive this volume. */
  targetVolumeName: string;
}
export interface WireErrorBody {
  code: ErrorCodeName;
  message: string;
}
export interface HelloReply {
  accepted: boolean;
  error?: WireErrorBody;
  protocolVersion: number;
  nodeName: string;
  sizeBytes: number;
  logicalSectorBytes: number;
  generationIds: number[];
  capabilities: number;
  /** The target volume was promoted since it last held this source's data (split brain). */
  diverged: boolean;
  /** Bytes of the regions written while promoted. */
  divergedBytes: number;
  /** Still writable to the target's own clients. */
  promoted: boolean;
}
export interface Write {
  sequence: number;
  offsetBytes: number;
  lengthBytes: number;
  flags: number;
}
export interface WriteAck {
  sequence: number;
  status: StatusName;
}
export interface Flush {
  sequence: number;
}
export interface Barrier {
  sequence: number;
}
export interface FlushAck {
  sequence: number;
  status: StatusName;
}
export interface Range {
  offsetBytes: number;
  lengthBytes: number;
}
export interface ResyncRequest {
  sequence: number;
  ranges: Range[];
}
export interface ResyncData {
  sequence: number;
  offsetBytes: number;
  lengthBytes: number;
}
export interface TaskMarker {
  sequence: number;
  /** Names a task defined on the target; never a command line. */
  taskId: string;
}
export interface BitmapExchange {
  sequence: number;
  regionBytes: number;
  firstRegion: number;
  regionCount: number;
  last: boolean;
}
export interface BitmapRequest {
  sequence: number;
}
export interface Resolve {
  sequence: number;
  /** The source generation the target holds again once resolved. */
  generation: number;
}
export interface SnapshotRequest {
  sequence: number;
  snapshotName: string;
}
export interface SnapshotReply {
  sequence: number;
  status: StatusName;
  snapshotId: string;
}
export interface Verify {
  sequence: number;
  ranges: Range[];
  sha256: Buffer[];
}
export interface VerifyReply {
  sequence: number;
  mismatched: Range[];
}

/** Envelope.body: oneof member name -> message. */
export interface MessageBodies {
  authChallenge: AuthChallenge;
  authResponse: AuthResponse;
  hello: Hello;
  helloReply: HelloReply;
  write: Write;
  writeAck: WriteAck;
  flush: Flush;
  barrier: Barrier;
  flushAck: FlushAck;
  resyncRequest: ResyncRequest;
  resyncData: ResyncData;
  error: WireErrorBody;
  taskMarker: TaskMarker;
  bitmapExchange: BitmapExchange;
  snapshotRequest: SnapshotRequest;
  snapshotReply: SnapshotReply;
  verify: Verify;
  verifyReply: VerifyReply;
  bitmapRequest: BitmapRequest;
  resolve: Resolve;
}

export type MessageKind = keyof MessageBodies;

/** One decoded Envelope: `kind` names the oneof member that was set. */
export type WireMessage = { [K in MessageKind]: { kind: K; body: MessageBodies[K] } }[MessageKind];

/** Builds a WireMessage with the body type checked against its kind. */
export function wireMessage<K extends MessageKind>(kind: K, body: MessageBodies[K]): WireMessage {
  return { kind, body } as WireMessage;
}
