// Typed errors of the wire layer. Tests and callers match on `code`, never on the message.

export type WireErrorCode =
  | 'BM_ERR_WIRE_BAD_MAGIC'
  | 'BM_ERR_WIRE_HEADER_TOO_LARGE'
  | 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE'
  | 'BM_ERR_WIRE_DECODE' // the header is not a valid Envelope
  | 'BM_ERR_WIRE_UNKNOWN_MESSAGE' // the Envelope's oneof is empty (or a body this version does not know)
  | 'BM_ERR_WIRE_PAYLOAD_UNEXPECTED' // payload length does not match what the message says
  | 'BM_ERR_WIRE_RANGE' // a 64-bit field is not a safe integer (> 2^53 - 1)
  | 'BM_ERR_WIRE_CLOSED'; // the stream ended (or ended mid-frame) while a frame was awaited

/** Text a peer sent (an Error frame's message): at most this many characters reach our logs,
 *  errors and state files, whatever the peer sends. */
export const PEER_TEXT_CHARS_MAX = 1024;

export function peerText(text: string): string {
  return text.length <= PEER_TEXT_CHARS_MAX ? text : `${text.slice(0, PEER_TEXT_CHARS_MAX)}... (${text.length} characters)`;
}

export class WireError extends Error {
  readonly code: WireErrorCode;
  constructor(code: WireErrorCode, message: string) {
    super(message);
    this.name = 'WireError';
    this.code = code;
  }
}

export type AuthErrorCode =
  | 'BM_ERR_AUTH_FAILED' // a MAC did not verify (wrong secret, reflection, tampering)
  | 'BM_ERR_AUTH_UNKNOWN_PEER' // the peer's node name has no secret here, or is not the expected peer
  | 'BM_ERR_AUTH_TIMEOUT'
  | 'BM_ERR_AUTH_PROTOCOL' // unexpected message or malformed field during the exchange
  | 'BM_ERR_AUTH_SECRET_FILE'; // the secret file is unusable (permissions, too short, too long)

export class AuthError extends Error {
  readonly code: AuthErrorCode;
  /** Node name the peer announced, when it got that far. */
  readonly peerName: string | undefined;
  constructor(code: AuthErrorCode, message: string, peerName?: string) {
    super(message);
    this.name = 'AuthError';
    this.code = code;
    this.peerName = peerName;
  }
}
