// Error types of the NBD layer and the mapping from backend errors to NBD error values.

import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from './protocol';

export type NbdErrorCode =
  | 'BM_ERR_NBD_PROTOCOL' // the peer broke a MUST of the protocol; the connection is dropped
  | 'BM_ERR_NBD_HANDSHAKE_TIMEOUT'
  | 'BM_ERR_NBD_CONNECTION_CLOSED'
  | 'BM_ERR_NBD_SOCKET_PATH_IN_USE'
  | 'BM_ERR_NBD_SERVER_CLOSED'
  | 'BM_ERR_NBD_INVALID_OPTION';

export class NbdError extends Error {
  readonly code: NbdErrorCode;
  constructor(code: NbdErrorCode, message: string) {
    super(message);
    this.name = 'NbdError';
    this.code = code;
  }
}

/** Maps an error raised by a backend (errno name in `code`) to an NBD error value. Unknown
 *  codes become EIO: the client must not think a failed write succeeded, and EIO is the value
 *  every client treats as a plain I/O failure. `fastZero` says whether the request was a
 *  WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO: the one case where the spec lets the server answer
 *  ENOTSUP. EOVERFLOW is about reply fragmenting, which a backend error never is: EIO. */
export function nbdErrnoFromError(error: unknown, fastZero: boolean): number {
  const code = typeof error === 'object' && error !== null ? (error as { code?: unknown }).code : undefined;
  switch (code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_EPERM;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EINVAL':
      return NBD_EINVAL;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
    case 'BM_ERR_NOT_FAST':
      return fastZero ? NBD_ENOTSUP : NBD_EIO;
    case 'ESHUTDOWN':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EIO;
  }
}

export function nbdErrnoName(value: number): string {
  switch (value) {
    case NBD_EPERM:
      return 'EPERM';
    case NBD_EIO:
      return 'EIO';
    case NBD_ENOMEM:
      return 'ENOMEM';
    case NBD_EINVAL:
      return 'EINVAL';
    case NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ENOTSUP:
      return 'ENOTSUP';
    case NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return `E#${value}`;
  }
}
