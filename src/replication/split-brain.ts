// The source's side of a split brain (issue 4 part 2, docs/SPLIT-BRAIN.md): the target reports
// in its HelloReply that its volume was written while promoted. Nothing moves until the admin
// picks a side with `mirror resolve --discard this|peer`; then the source takes the target's
// bitmap of what it wrote, ORs it into its own dirty bitmap (the union of both sides' changes)
// and either sends the union to the target (discard peer) or restores it from the target
// (discard this).
import type { DirtyBitmap } from '../native/index';
import type { BitmapExchange } from '../wire/index';
import type { BitmapPart, SourceLink } from './source-link';

export class SplitBrainProtocolError extends Error {
  readonly code = 'BM_ERR_REPLICATION_PROTOCOL';
}

/** Most bitmap parts a target may send for a volume of `sizeBytes` at 512-byte regions and 1
 *  MiB parts (the target's own part size is larger): a bound, not the expected count. */
export function bitmapPartsMax(sizeBytes: number): number {
  return Math.ceil(sizeBytes / 512 / (8 * 1024 * 1024)) + 1;
}

/** The region sizes a target's bitmap may use: a power of two from 512 bytes on. */
function checkRegionBytes(regionBytes: number): void {
  if (!Number.isSafeInteger(regionBytes) || regionBytes < 512 || (regionBytes & (regionBytes - 1)) !== 0) {
    throw new SplitBrainProtocolError(`the target's bitmap has ${regionBytes}-byte regions`);
  }
}

/** Checks each bitmap part as it arrives, before the source keeps its bytes: the parts must
 *  follow each other from region 0 within the target's volume, each exactly as long as its
 *  region count needs. So what a target can make the source hold is the bitmap of its volume,
 *  not a frame limit times the part count. */
export function bitmapPartChecker(peerSizeBytes: number): (header: BitmapExchange, payloadBytes: number) => void {
  let regionBytes = 0;
  let regionCount = 0;
  let nextRegion = 0;
  return (header, payloadBytes) => {
    if (regionBytes === 0) {
      checkRegionBytes(header.regionBytes);
      regionBytes = header.regionBytes;
      regionCount = Math.ceil(peerSizeBytes / regionBytes);
    }
    if (header.regionBytes !== regionBytes || header.firstRegion !== nextRegion || header.regionCount <= 0 || payloadBytes !== Math.ceil(header.regionCount / 8)) {
      throw new SplitBrainProtocolError(`bitmap part at region ${header.firstRegion} (${header.regionCount} regions, ${payloadBytes} bytes) does not follow the one before it`);
    }
    nextRegion += header.regionCount;
    if (nextRegion > regionCount) throw new SplitBrainProtocolError(`the target's bitmap covers more than its ${peerSizeBytes}-byte volume`);
  };
}

/**
 * ORs the target's regions (its bitmap parts, in order from region 0) into `into`, clipped to
 * our volume. Returns the bytes the target reported written. Parts that do not tile the
 * target's volume are a protocol error: a partial bitmap would hide changed regions.
 */
export function mergePeerBitmap(parts: readonly BitmapPart[], peerSizeBytes: number, into: DirtyBitmap): number {
  let nextRegion = 0;
  let peerBytes = 0;
  const first = parts[0];
  if (first === undefined) throw new SplitBrainProtocolError('the target sent no bitmap');
  const regionBytes = first.header.regionBytes;
  checkRegionBytes(regionBytes);
  const regionCount = Math.ceil(peerSizeBytes / regionBytes);
  for (const [index, part] of parts.entries()) {
    const { header, bits } = part;
    const last = index === parts.length - 1;
    if (header.regionBytes !== regionBytes || header.firstRegion !== nextRegion || header.regionCount <= 0 || header.last !== last || bits.length !== Math.ceil(header.regionCount / 8)) {
      throw new SplitBrainProtocolError(`bitmap part ${index} does not follow the one before it`);
    }
    nextRegion += header.regionCount;
    if (nextRegion > regionCount) throw new SplitBrainProtocolError(`the target's bitmap covers more than its ${peerSizeBytes}-byte volume`);
    for (let byte = 0; byte < bits.length; byte++) {
      const value = bits[byte] as number;
      if (value === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        if ((value & (1 << bit)) === 0 || byte * 8 + bit >= header.regionCount) continue;
        const startBytes = (header.firstRegion + byte * 8 + bit) * regionBytes;
        const endBytes = Math.min(startBytes + regionBytes, peerSizeBytes);
        peerBytes += endBytes - startBytes;
        if (startBytes < into.sizeBytes) into.setRange(startBytes, Math.min(endBytes, into.sizeBytes) - startBytes);
      }
    }
  }
  if (nextRegion !== regionCount) throw new SplitBrainProtocolError(`the target's bitmap covers ${nextRegion} of its ${regionCount} regions`);
  return peerBytes;
}

export interface RestoreOptions {
  link: SourceLink;
  /** What to restore: every dirty region (the union), read once in offset order. The caller
   *  clears the bits once the restored bytes are durable. */
  dirty: DirtyBitmap;
  /** Writes restored bytes to the source volume. */
  write: (offsetBytes: number, data: Buffer) => Promise<void>;
  chunkBytesMax: number;
  chunksInFlightMax: number;
  onRestored: (bytes: number) => void;
  /** Checked between chunks: stop early (the mirror is stopping). */
  cancelled: () => boolean;
}

/** Copies every dirty region from the target onto the source. 'lost': the link closed or the
 *  mirror stopped first (the regions not restored are still dirty; a retry starts over). */
export async function restoreFromPeer(options: RestoreOptions): Promise<'ok' | 'lost'> {
  const { link, dirty } = options;
  const inFlight = new Set<Promise<void>>();
  let outcome: 'ok' | 'lost' = 'ok';
  let failure: unknown;
  let cursor = 0;
  while (outcome === 'ok' && failure === undefined) {
    if (options.cancelled() || !link.isOpen) {
      outcome = 'lost';
      break;
    }
    const run = cursor < dirty.sizeBytes ? dirty.runs(cursor, 1)[0] : undefined;
    if (run === undefined) break;
    const offsetBytes = Math.max(run.offsetBytes, cursor);
    const lengthBytes = Math.min(run.offsetBytes + run.lengthBytes - offsetBytes, options.chunkBytesMax);
    cursor = offsetBytes + lengthBytes;
    const chunk = (async (): Promise<void> => {
      const data = await link.readRange(offsetBytes, lengthBytes);
      if (data === null) {
        outcome = 'lost';
        return;
      }
      await options.write(offsetBytes, data);
      options.onRestored(lengthBytes);
    })().catch((error: unknown) => {
      failure ??= error;
    });
    inFlight.add(chunk);
    void chunk.finally(() => inFlight.delete(chunk));
    if (inFlight.size >= options.chunksInFlightMax) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  if (failure !== undefined) throw failure;
  return outcome;
}
