// The control protocol: newline-delimited JSON over a Unix socket, one request line answered by
// one response line. docs/CONTROL.md is the human description of what is defined here.
import { z } from 'zod';

/** Longest request or response line, newline excluded. Longer request lines close the connection. */
export const controlLineBytesMax = 1024 * 1024;
/** Control connections accepted at once. */
export const controlConnectionsMax = 64;

export const volumeNamePattern = /^[A-Za-z0-9._-]{1,64}$/;

const volumeName = z
  .string()
  .regex(volumeNamePattern, 'expected 1 to 64 characters from [A-Za-z0-9._-]')
  .refine((name) => name !== '.' && name !== '..', 'must not be "." or ".."');

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
  }),
  'volume.list': z.strictObject({}),
  'volume.info': z.strictObject({ name: volumeName }),
  'volume.remove': z.strictObject({ name: volumeName, force: z.boolean().optional() }),
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
  readOnly: boolean;
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
}

export interface VolumeRemoveResult {
  name: string;
  uuid: string;
  /** NBD connections that were closed because of force. */
  disconnected: number;
}

export interface StatusResult {
  version: string;
  pid: number;
  uptimeSeconds: number;
  controlSocket: string;
  nbdSocket: string;
  nbdListen: string | null;
  stateDir: string;
  volumes: number;
  volumesInError: number;
  connections: number;
  ioEngine: string;
}

export interface MethodResults {
  'volume.add': VolumeInfo;
  'volume.list': { volumes: VolumeInfo[] };
  'volume.info': VolumeInfo;
  'volume.remove': VolumeRemoveResult;
  status: StatusResult;
}

export interface ErrorBody {
  code: string;
  message: string;
}

export type Response =
  | { id: RequestId | null; ok: true; result: unknown }
  | { id: RequestId | null; ok: false; error: ErrorBody };
