// Errors that cross the control socket. `code` is stable and is what scripts and tests match on;
// `message` is for humans and may change.

export const ControlErrorCode = {
  /** The request line is not JSON, or not a {id, method, params} object. */
  BadRequest: 'BM_ERR_BAD_REQUEST',
  /** A request line longer than the limit; the connection is closed after this reply. */
  LineTooLong: 'BM_ERR_LINE_TOO_LONG',
  UnknownMethod: 'BM_ERR_UNKNOWN_METHOD',
  InvalidArgument: 'BM_ERR_INVALID_ARGUMENT',
  VolumeExists: 'BM_ERR_VOLUME_EXISTS',
  VolumeNotFound: 'BM_ERR_VOLUME_NOT_FOUND',
  VolumeBusy: 'BM_ERR_VOLUME_BUSY',
  DeviceInUse: 'BM_ERR_DEVICE_IN_USE',
  DeviceNotFound: 'BM_ERR_DEVICE_NOT_FOUND',
  DeviceOpen: 'BM_ERR_DEVICE_OPEN',
  PeerExists: 'BM_ERR_PEER_EXISTS',
  PeerNotFound: 'BM_ERR_PEER_NOT_FOUND',
  /** The peer is used by a mirror: remove the mirror first. */
  PeerBusy: 'BM_ERR_PEER_BUSY',
  /** The command needs another role: promote/demote a mirror volume, not a primary; demote only
   *  a promoted one. */
  VolumeRole: 'BM_ERR_VOLUME_ROLE',
  /** The volume's device is not open (state error or failed). */
  VolumeOffline: 'BM_ERR_VOLUME_OFFLINE',
  MirrorExists: 'BM_ERR_MIRROR_EXISTS',
  MirrorNotFound: 'BM_ERR_MIRROR_NOT_FOUND',
  /** The volume cannot be a mirror source (a mirror volume, read-only, or not online). */
  MirrorSource: 'BM_ERR_MIRROR_SOURCE',
  /** A peer's secret file is missing, unreadable, too open, too short or too long. */
  SecretFile: 'BM_ERR_SECRET_FILE',
  ShuttingDown: 'BM_ERR_SHUTTING_DOWN',
  /** Every control connection is busy (none idle enough to close for it); the new one is closed
   *  after this reply. */
  TooManyConnections: 'BM_ERR_TOO_MANY_CONNECTIONS',
  /** Persisting the registry failed; the change was rolled back. */
  StateWrite: 'BM_ERR_STATE_WRITE',
  Internal: 'BM_ERR_INTERNAL',
  /** Client side only: the daemon's socket could not be reached. */
  DaemonUnreachable: 'BM_ERR_DAEMON_UNREACHABLE',
  /** Client side only: the daemon did not answer in time or hung up mid-reply. */
  DaemonTimeout: 'BM_ERR_DAEMON_TIMEOUT',
} as const;

export type ControlErrorCodeValue = (typeof ControlErrorCode)[keyof typeof ControlErrorCode];

/** An error with a stable code, safe to send to a control client as {code, message}. */
export class BmError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BmError';
    this.code = code;
  }
}

export function isBmError(error: unknown): error is BmError {
  return error instanceof BmError;
}

/** The `code` of any error-like value (Node system errors, native errors), or undefined. */
export function errorCode(error: unknown): string | undefined {
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code;
    if (typeof code === 'string') return code;
  }
  return undefined;
}

export function errorMessage(error: unknown): string {
  if (error instanceof Error) return error.message;
  return String(error);
}
