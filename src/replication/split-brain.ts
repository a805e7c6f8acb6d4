// The source's side of a split brain (issue 4 part 2, docs/SPLIT-BRAIN.md): the target reports
// in its HelloReply that its volume was written while promoted. Nothing moves until the admin
// picks a side with `mirror resolve --discard this|peer`; then the source takes the target's
// bitmap of what it wrote, ORs it into its own dirty bitmap (the union of both sides' changes)
// and either sends the union to the target (discard peer) or restores it from the target
// (discard this).
import { DirtyBitmap } from '../native/index';
import type { BitmapExchange } from '../wire/index';
import type { SourceLink } from './source-link';

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

/**
 * Takes the target's bitmap parts as they arrive and ORs their regions, clipped to our volume,
 * into a bitmap of our own size: nothing of a part is kept, so what the source holds does not
 * depend on the size the target claims. Each part must follow the one before it from region 0,
 * exactly as long as its region count needs, and the parts must tile the target's volume (a
 * partial bitmap would hide changed regions); anything else is a protocol error.
 */
export class PeerBitmapReceiver {
  /** The target's regions, on our volume. Merged into the mirror's dirty bitmap by the caller
   *  once finish() accepted the whole bitmap. */
  readonly union: DirtyBitmap;
  /** Bytes the target reported written (its whole volume, not clipped). */
  peerBytes = 0;
  private regionBytes = 0;
  private regionCount = 0;
  private nextRegion = 0;
  private ended = false;

  constructor(
    private readonly peerSizeBytes: number,
    own: { sizeBytes: number; regionBytes: number },
  ) {
    this.union = new DirtyBitmap(own.sizeBytes, own.regionBytes);
  }

  take(header: BitmapExchange, bits: Buffer): void {
    if (this.ended) throw new SplitBrainProtocolError('a bitmap part after the last one');
    if (this.regionBytes === 0) {
      checkRegionBytes(header.regionBytes);
      this.regionBytes = header.regionBytes;
      this.regionCount = Math.ceil(this.peerSizeBytes / this.regionBytes);
    }
    const { regionBytes } = this;
    if (header.regionBytes !== regionBytes || header.firstRegion !== this.nextRegion || header.regionCount <= 0 || bits.length !== Math.ceil(header.regionCount / 8)) {
      throw new SplitBrainProtocolError(`bitmap part at region ${header.firstRegion} (${header.regionCount} regions, ${bits.length} bytes) does not follow the one before it`);
    }
    this.nextRegion += header.regionCount;
    if (this.nextRegion > this.regionCount) throw new SplitBrainProtocolError(`the target's bitmap covers more than its ${this.peerSizeBytes}-byte volume`);
    if (header.last !== (this.nextRegion === this.regionCount)) {
      throw new SplitBrainProtocolError(`bitmap part at region ${header.firstRegion} is ${header.last ? '' : 'not '}marked last, at ${this.nextRegion} of ${this.regionCount} regions`);
    }
    this.ended = header.last;
    const into = this.union;
    for (let byte = 0; byte < bits.length; byte++) {
      const value = bits[byte] as number;
      if (value === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        if ((value & (1 << bit)) === 0 || byte * 8 + bit >= header.regionCount) continue;
        const startBytes = (header.firstRegion + byte * 8 + bit) * regionBytes;
        const endBytes = Math.min(startBytes + regionBytes, this.peerSizeBytes);
        this.peerBytes += endBytes - startBytes;
        if (startBytes < into.sizeBytes) into.setRange(startBytes, Math.min(endBytes, into.sizeBytes) - startBytes);
      }
    }
  }

  /** Throws unless the parts taken cover the target's whole volume. */
  finish(): void {
    if (!this.ended) throw new SplitBrainProtocolError(`the target's bitmap covers ${this.nextRegion} of its ${this.regionCount} regions`);
  }
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
