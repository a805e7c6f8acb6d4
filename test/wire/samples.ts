// One sample of every message with every field set to a non-default value, and its payload.
import { Capability, PROTOCOL_VERSION, WriteFlag, wireMessage, type WireMessage } from '../../src/wire/messages';

const BIG = Number.MAX_SAFE_INTEGER;

export interface Sample {
  message: WireMessage;
  payload?: Buffer;
}

function bytes(length: number, seed: number): Buffer {
  const buffer = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buffer[i] = (i * 31 + seed) & 0xff;
  return buffer;
}

export function allSamples(): Sample[] {
  const error = { code: 'ERROR_CODE_TARGET_TOO_SMALL' as const, message: 'target is 1 GiB, source 2 GiB' };
  return [
    { message: wireMessage('authChallenge', { nodeName: 'hostA', nonce: bytes(32, 1) }) },
    { message: wireMessage('authResponse', { mac: bytes(32, 2) }) },
    {
      message: wireMessage('hello', {
        protocolVersion: PROTOCOL_VERSION,
        nodeName: 'hostA',
        volumeUuid: '0b5e2f3c-6c1e-4f0c-9a55-1d1f8f8e2b7a',
        volumeName: 'vol0',
        sizeBytes: 2 ** 40,
        logicalSectorBytes: 512,
        generationIds: [BIG, 7, 1],
        capabilities: Capability.FUA | Capability.WRITE_ZEROES,
        targetVolumeName: 'vol0-mirror',
      }),
    },
    {
      message: wireMessage('helloReply', {
        accepted: true,
        error,
        protocolVersion: PROTOCOL_VERSION,
        nodeName: 'hostB',
        sizeBytes: 2 ** 41,
        logicalSectorBytes: 4096,
        generationIds: [9],
        capabilities: Capability.FUA,
        diverged: true,
        divergedBytes: 2 ** 40,
        promoted: true,
      }),
    },
    {
      message: wireMessage('write', { sequence: BIG, offsetBytes: 2 ** 50, lengthBytes: 4096, flags: WriteFlag.FUA }),
      payload: bytes(4096, 3),
    },
    { message: wireMessage('write', { sequence: 2, offsetBytes: 0, lengthBytes: 1 << 20, flags: WriteFlag.ZEROES }) },
    { message: wireMessage('writeAck', { sequence: 5, status: 'STATUS_NO_SPACE' }) },
    { message: wireMessage('flush', { sequence: 6 }) },
    { message: wireMessage('barrier', { sequence: 7 }) },
    { message: wireMessage('flushAck', { sequence: 6, status: 'STATUS_OK' }) },
    {
      message: wireMessage('resyncRequest', {
        sequence: 8,
        ranges: [
          { offsetBytes: 0, lengthBytes: 65536 },
          { offsetBytes: BIG - 1, lengthBytes: 1 },
        ],
      }),
    },
    { message: wireMessage('resyncData', { sequence: 9, offsetBytes: 65536, lengthBytes: 100 }), payload: bytes(100, 4) },
    { message: wireMessage('error', error) },
    { message: wireMessage('taskMarker', { sequence: 10, taskId: 'backup-1' }) },
    {
      message: wireMessage('bitmapExchange', {
        sequence: 11,
        regionBytes: 65536,
        firstRegion: 1024,
        regionCount: 17,
        last: true,
      }),
      payload: bytes(3, 5),
    },
    { message: wireMessage('snapshotRequest', { sequence: 12, snapshotName: 'nightly' }) },
    { message: wireMessage('snapshotReply', { sequence: 12, status: 'STATUS_OK', snapshotId: 'snap-0001' }) },
    {
      message: wireMessage('verify', {
        sequence: 13,
        ranges: [{ offsetBytes: 4096, lengthBytes: 8192 }],
        sha256: [bytes(32, 6)],
      }),
    },
    { message: wireMessage('verifyReply', { sequence: 13, mismatched: [{ offsetBytes: 4096, lengthBytes: 4096 }] }) },
    { message: wireMessage('bitmapRequest', { sequence: 14 }) },
    { message: wireMessage('resolve', { sequence: 15, generation: BIG }) },
  ];
}
