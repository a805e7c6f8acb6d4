// Mutual challenge-response authentication with HMAC-SHA256 over a per-peer shared secret.
// Runs on a fresh connection before Hello, so no volume data moves before both sides proved the
// secret. Exchange (docs/PROTOCOL.md, Authentication):
//   1. initiator -> AuthChallenge{initiator name, nonce I}
//   2. responder -> AuthChallenge{responder name, nonce R}
//   3. initiator -> AuthResponse{HMAC(secret, transcript(role=initiator))}
//   4. responder checks it; on failure sends Error{AUTH_FAILED}; else
//      responder -> AuthResponse{HMAC(secret, transcript(role=responder))}
//   5. initiator checks it; on failure sends Error{AUTH_FAILED}.
// The role is part of the MAC input, so a peer that sends back our own MAC (reflection) fails.

import crypto from 'node:crypto';
import fs from 'node:fs';

import type { FrameChannel } from './channel';
import { AuthError, peerText } from './errors';
import { wireMessage, type ErrorCodeName, type MessageBodies } from './messages';

export const AUTH_DOMAIN = 'blockmirror-auth-v1';
export const NONCE_BYTES = 32;
export const MAC_BYTES = 32;
export const SECRET_BYTES_MIN = 16;
export const SECRET_BYTES_MAX = 4096;
export const NODE_NAME_BYTES_MAX = 255;
export const AUTH_TIMEOUT_MS_DEFAULT = 10_000;

export type AuthRole = 'initiator' | 'responder';

const ROLE_BYTE: Record<AuthRole, number> = { initiator: 1, responder: 2 };

export interface AuthTranscript {
  initiatorName: string;
  responderName: string;
  initiatorNonce: Buffer;
  responderNonce: Buffer;
}

function lengthPrefixed(bytes: Buffer): Buffer {
  const prefix = Buffer.allocUnsafe(4);
  prefix.writeUInt32BE(bytes.length, 0);
  return Buffer.concat([prefix, bytes]);
}

/** MAC proving that `role` holds `secret` in this exchange. Every field is length-prefixed, so
 *  no two different transcripts have the same encoding. */
export function computeAuthMac(secret: Buffer, role: AuthRole, transcript: AuthTranscript): Buffer {
  const hmac = crypto.createHmac('sha256', secret);
  hmac.update(lengthPrefixed(Buffer.from(AUTH_DOMAIN, 'utf8')));
  hmac.update(Buffer.from([ROLE_BYTE[role]]));
  hmac.update(lengthPrefixed(transcript.initiatorNonce));
  hmac.update(lengthPrefixed(transcript.responderNonce));
  hmac.update(lengthPrefixed(Buffer.from(transcript.initiatorName, 'utf8')));
  hmac.update(lengthPrefixed(Buffer.from(transcript.responderName, 'utf8')));
  return hmac.digest();
}

/** Constant-time check of a MAC received from the peer acting as `role`. */
export function verifyAuthMac(secret: Buffer, role: AuthRole, transcript: AuthTranscript, mac: Buffer): boolean {
  const expected = computeAuthMac(secret, role, transcript);
  if (mac.length !== expected.length) return false;
  return crypto.timingSafeEqual(mac, expected);
}

/** Reads a shared secret: refuses files with any group/other permission bit or owned by another
 *  user than the daemon's (or root) (like ssh), reads at most SECRET_BYTES_MAX + 2 bytes whatever
 *  the file claims to be (/proc files report size 0), drops one trailing newline, and requires
 *  SECRET_BYTES_MIN..SECRET_BYTES_MAX bytes. */
export function readSecretFile(filePath: string): Buffer {
  const fd = fs.openSync(filePath, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new AuthError('BM_ERR_AUTH_SECRET_FILE', `${filePath} is not a regular file`);
    if ((stat.mode & 0o077) !== 0) {
      throw new AuthError(
        'BM_ERR_AUTH_SECRET_FILE',
        `${filePath} is accessible by group or others (mode ${(stat.mode & 0o777).toString(8)}); chmod 600 it`,
      );
    }
    const uid = process.getuid?.();
    if (uid !== undefined && stat.uid !== uid && stat.uid !== 0) {
      throw new AuthError('BM_ERR_AUTH_SECRET_FILE', `${filePath} is owned by uid ${stat.uid}, not by this daemon's user or root`);
    }
    if (stat.size > SECRET_BYTES_MAX + 2) {
      throw new AuthError('BM_ERR_AUTH_SECRET_FILE', `${filePath} is larger than ${SECRET_BYTES_MAX} bytes`);
    }
    // Bounded read: one byte more than a valid file can hold tells "too large" apart.
    const limit = Buffer.alloc(SECRET_BYTES_MAX + 3);
    let filled = 0;
    for (;;) {
      const got = fs.readSync(fd, limit, filled, limit.length - filled, null);
      if (got === 0) break;
      filled += got;
      if (filled === limit.length) {
        throw new AuthError('BM_ERR_AUTH_SECRET_FILE', `${filePath} is larger than ${SECRET_BYTES_MAX} bytes`);
      }
    }
    let secret = Buffer.from(limit.subarray(0, filled));
    limit.fill(0);
    if (secret.length > 0 && secret[secret.length - 1] === 0x0a) secret = secret.subarray(0, -1);
    if (secret.length > 0 && secret[secret.length - 1] === 0x0d) secret = secret.subarray(0, -1);
    if (secret.length < SECRET_BYTES_MIN) {
      throw new AuthError(
        'BM_ERR_AUTH_SECRET_FILE',
        `${filePath} holds ${secret.length} bytes; a secret needs at least ${SECRET_BYTES_MIN}`,
      );
    }
    if (secret.length > SECRET_BYTES_MAX) {
      throw new AuthError('BM_ERR_AUTH_SECRET_FILE', `${filePath} is larger than ${SECRET_BYTES_MAX} bytes`);
    }
    return secret;
  } finally {
    fs.closeSync(fd);
  }
}

export interface AuthOptions {
  role: AuthRole;
  nodeName: string;
  /** Shared secret for a peer name, or undefined when that peer is not known here. An
   *  initiator returns a secret only for the peer it meant to reach, so a different responder
   *  is refused as unknown. */
  secretForPeer: (peerName: string) => Buffer | undefined;
  /** Initiator: the peer it dialled. A responder announcing another name is refused before any
   *  secret is used, whatever secretForPeer would return. */
  expectedPeerName?: string;
  timeoutMs?: number;
  /** Test hook; default crypto.randomBytes. */
  randomBytes?: (bytes: number) => Buffer;
}

export interface AuthResult {
  peerName: string;
}

function checkNodeName(name: string, who: string): void {
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes === 0 || bytes > NODE_NAME_BYTES_MAX) {
    throw new AuthError('BM_ERR_AUTH_PROTOCOL', `${who} node name must be 1..${NODE_NAME_BYTES_MAX} bytes`);
  }
}

const ERROR_FOR_CODE: Partial<Record<ErrorCodeName, AuthError['code']>> = {
  ERROR_CODE_AUTH_FAILED: 'BM_ERR_AUTH_FAILED',
  ERROR_CODE_UNKNOWN_PEER: 'BM_ERR_AUTH_UNKNOWN_PEER',
};

const errorsFromPeer = new WeakSet<Error>();

const CODE_FOR_ERROR: Partial<Record<AuthError['code'], ErrorCodeName>> = {
  BM_ERR_AUTH_FAILED: 'ERROR_CODE_AUTH_FAILED',
  BM_ERR_AUTH_UNKNOWN_PEER: 'ERROR_CODE_UNKNOWN_PEER',
  BM_ERR_AUTH_PROTOCOL: 'ERROR_CODE_PROTOCOL',
};

/** Runs the exchange on a fresh channel. Resolves with the authenticated peer's name; rejects
 *  with AuthError (after telling the peer why, when it is still listening) or with the channel's
 *  WireError. The caller closes the connection on rejection. */
export async function authenticate(channel: FrameChannel, options: AuthOptions): Promise<AuthResult> {
  checkNodeName(options.nodeName, 'own');
  const timeoutMs = options.timeoutMs ?? AUTH_TIMEOUT_MS_DEFAULT;
  const controller = new AbortController();
  const timer = setTimeout(() => {
    controller.abort(new AuthError('BM_ERR_AUTH_TIMEOUT', `authentication did not finish in ${timeoutMs} ms`));
  }, timeoutMs);
  // No auth message carries a payload: until the peer has proved the secret it may not make us
  // allocate payload memory at all.
  const payloadBytesMax = channel.payloadBytesMax;
  channel.limitPayloadBytes(0);
  try {
    const result = await runExchange(channel, options, controller.signal);
    channel.limitPayloadBytes(payloadBytesMax);
    return result;
  } catch (error) {
    const code = error instanceof AuthError ? CODE_FOR_ERROR[error.code] : undefined;
    if (code !== undefined && !errorsFromPeer.has(error as Error) && !channel.stream.destroyed) {
      channel.send(wireMessage('error', { code, message: (error as Error).message }));
    }
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

async function receiveKind<K extends 'authChallenge' | 'authResponse'>(
  channel: FrameChannel,
  kind: K,
  signal: AbortSignal,
  peerName?: string,
): Promise<MessageBodies[K]> {
  const frame = await channel.receive(signal);
  const message = frame.message;
  if (message.kind === 'error') {
    const code = ERROR_FOR_CODE[message.body.code] ?? 'BM_ERR_AUTH_FAILED';
    const error = new AuthError(code, `peer refused authentication: ${peerText(message.body.message)}`, peerName);
    errorsFromPeer.add(error); // the peer has already given up: do not answer its error with ours
    throw error;
  }
  if (message.kind !== kind) {
    throw new AuthError('BM_ERR_AUTH_PROTOCOL', `expected ${kind}, got ${message.kind}`, peerName);
  }
  return message.body as MessageBodies[K];
}

async function runExchange(channel: FrameChannel, options: AuthOptions, signal: AbortSignal): Promise<AuthResult> {
  const randomBytes = options.randomBytes ?? crypto.randomBytes;
  const ownNonce = randomBytes(NONCE_BYTES);
  const ownChallenge = wireMessage('authChallenge', { nodeName: options.nodeName, nonce: ownNonce });
  if (options.role === 'initiator') channel.send(ownChallenge);
  const peerChallenge = await receiveKind(channel, 'authChallenge', signal);
  const peerName = peerChallenge.nodeName;
  checkNodeName(peerName, 'peer');
  if (peerChallenge.nonce.length !== NONCE_BYTES) {
    throw new AuthError('BM_ERR_AUTH_PROTOCOL', `peer nonce is ${peerChallenge.nonce.length} bytes`, peerName);
  }
  if (crypto.timingSafeEqual(peerChallenge.nonce, ownNonce)) {
    throw new AuthError('BM_ERR_AUTH_FAILED', 'peer echoed our nonce (reflection)', peerName);
  }
  if (options.expectedPeerName !== undefined && peerName !== options.expectedPeerName) {
    throw new AuthError(
      'BM_ERR_AUTH_UNKNOWN_PEER',
      `dialled ${JSON.stringify(options.expectedPeerName)} but ${JSON.stringify(peerName)} answered`,
      peerName,
    );
  }
  const secret = options.secretForPeer(peerName);
  if (secret === undefined) {
    throw new AuthError('BM_ERR_AUTH_UNKNOWN_PEER', `no secret for peer ${JSON.stringify(peerName)}`, peerName);
  }
  if (options.role === 'responder') channel.send(ownChallenge);
  const isInitiator = options.role === 'initiator';
  const transcript: AuthTranscript = {
    initiatorName: isInitiator ? options.nodeName : peerName,
    responderName: isInitiator ? peerName : options.nodeName,
    initiatorNonce: isInitiator ? ownNonce : peerChallenge.nonce,
    responderNonce: isInitiator ? peerChallenge.nonce : ownNonce,
  };
  const peerRole: AuthRole = isInitiator ? 'responder' : 'initiator';
  const ownMac = wireMessage('authResponse', { mac: computeAuthMac(secret, options.role, transcript) });
  if (isInitiator) channel.send(ownMac);
  const peerResponse = await receiveKind(channel, 'authResponse', signal, peerName);
  if (!verifyAuthMac(secret, peerRole, transcript, peerResponse.mac)) {
    throw new AuthError('BM_ERR_AUTH_FAILED', `peer ${JSON.stringify(peerName)} failed to prove the secret`, peerName);
  }
  if (!isInitiator) channel.send(ownMac);
  return { peerName };
}
