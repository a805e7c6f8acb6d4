// On-disk form of a volume's activity log: two 4 KiB slots, each a whole, checksummed copy of
// the set of "hot" extents (those a write may be in progress in). A transaction writes the slot
// not holding the latest state, so a write torn by a crash leaves the other slot, the state
// before that transaction, intact; loading takes the valid slot with the higher sequence.
//
// Slot layout (little-endian): crc32c of bytes 4..4095 | magic "BMAL" | format version | flags
// (bit 0: written by a clean shutdown; bit 1: writes are not being recorded, so after a crash
// nothing but a full copy is safe) | sequence (u64) | extent bytes | extent count | volume
// size (u64) | extent numbers (u32 each).
import { crc32c } from '../native/index';

export const SLOT_BYTES = 4096;
const HEADER_BYTES = 40;
const MAGIC = 0x4c414d42; // "BMAL"
const FORMAT_VERSION = 1;
const FLAG_CLEAN = 1;
const FLAG_UNTRACKED = 2;
export const ACTIVITY_LOG_EXTENTS_MAX = (SLOT_BYTES - HEADER_BYTES) / 4;

export interface ActivityLogSlot {
  sequence: number;
  clean: boolean;
  /** The daemon recorded write intent in this log (it may be switched off). */
  tracked: boolean;
  extents: number[];
}

export type ActivityLogLoad =
  | { state: 'missing' }
  /** Neither slot is valid: what was hot is unknown. */
  | { state: 'lost'; reason: string }
  | { state: 'ok'; slot: 0 | 1; latest: ActivityLogSlot };

export interface ActivityLogGeometry {
  sizeBytes: number;
  extentBytes: number;
}

export function encodeSlot(geometry: ActivityLogGeometry, slot: ActivityLogSlot): Buffer {
  if (slot.extents.length > ACTIVITY_LOG_EXTENTS_MAX) throw new RangeError(`an activity log slot holds at most ${ACTIVITY_LOG_EXTENTS_MAX} extents`);
  const bytes = Buffer.alloc(SLOT_BYTES);
  bytes.writeUInt32LE(MAGIC, 4);
  bytes.writeUInt32LE(FORMAT_VERSION, 8);
  bytes.writeUInt32LE((slot.clean ? FLAG_CLEAN : 0) | (slot.tracked ? 0 : FLAG_UNTRACKED), 12);
  bytes.writeBigUInt64LE(BigInt(slot.sequence), 16);
  bytes.writeUInt32LE(geometry.extentBytes, 24);
  bytes.writeUInt32LE(slot.extents.length, 28);
  bytes.writeBigUInt64LE(BigInt(geometry.sizeBytes), 32);
  slot.extents.forEach((extent, index) => bytes.writeUInt32LE(extent, HEADER_BYTES + 4 * index));
  bytes.writeUInt32LE(crc32c(bytes.subarray(4)), 0);
  return bytes;
}

/** Decodes one slot; a string says why it is not valid. */
export function decodeSlot(geometry: ActivityLogGeometry, bytes: Buffer): ActivityLogSlot | string {
  if (bytes.length < SLOT_BYTES) return 'short slot';
  if (bytes.readUInt32LE(0) !== crc32c(bytes.subarray(4, SLOT_BYTES))) return 'checksum mismatch';
  if (bytes.readUInt32LE(4) !== MAGIC) return 'bad magic';
  if (bytes.readUInt32LE(8) !== FORMAT_VERSION) return `unknown format version ${bytes.readUInt32LE(8)}`;
  if (bytes.readUInt32LE(24) !== geometry.extentBytes || bytes.readBigUInt64LE(32) !== BigInt(geometry.sizeBytes)) return 'written for another volume geometry';
  const count = bytes.readUInt32LE(28);
  if (count > ACTIVITY_LOG_EXTENTS_MAX) return 'extent count out of range';
  const extentCount = Math.ceil(geometry.sizeBytes / geometry.extentBytes);
  const extents: number[] = [];
  for (let index = 0; index < count; index++) {
    const extent = bytes.readUInt32LE(HEADER_BYTES + 4 * index);
    if (extent >= extentCount) return `extent ${extent} past the end of the volume`;
    extents.push(extent);
  }
  const flags = bytes.readUInt32LE(12);
  return { sequence: Number(bytes.readBigUInt64LE(16)), clean: (flags & FLAG_CLEAN) !== 0, tracked: (flags & FLAG_UNTRACKED) === 0, extents };
}

/** The latest valid state of a log file's content (undefined: no file). */
export function decodeActivityLog(geometry: ActivityLogGeometry, data: Buffer | undefined): ActivityLogLoad {
  if (data === undefined) return { state: 'missing' };
  const slots = [0, 1].map((index) => decodeSlot(geometry, data.subarray(index * SLOT_BYTES, (index + 1) * SLOT_BYTES)));
  let best: { slot: 0 | 1; latest: ActivityLogSlot } | undefined;
  slots.forEach((decoded, index) => {
    if (typeof decoded === 'string') return;
    if (best === undefined || decoded.sequence > best.latest.sequence) best = { slot: index as 0 | 1, latest: decoded };
  });
  if (best === undefined) return { state: 'lost', reason: `slot 0: ${slots[0] as string}; slot 1: ${slots[1] as string}` };
  return { state: 'ok', ...best };
}
