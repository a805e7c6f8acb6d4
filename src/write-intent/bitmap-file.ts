// A mirror's dirty bitmap on stable storage, in independently checksummed 4 KiB pages, so an
// update rewrites only the pages it changes and a page torn by a crash costs only its own
// regions (they count as dirty), never the whole volume.
//
// Page layout (little-endian): crc32c of bytes 4..4095 | magic "BMDP" | format version | page
// index | volume size in bytes (u64) | region bytes | reserved | 4064 bytes of bits (bit i of
// byte j is region page*32512 + j*8 + i).
import { crc32c, DirtyBitmap, type DirtyRun } from '../native/index';
import type { MetadataFile } from './metadata-file';

export const BITMAP_PAGE_BYTES = 4096;
const HEADER_BYTES = 32;
const MAGIC = 0x50444d42; // "BMDP"
const FORMAT_VERSION = 1;
export const REGIONS_PER_PAGE = (BITMAP_PAGE_BYTES - HEADER_BYTES) * 8;

/** Dirty runs of [startBytes, endBytes) (runs may reach outside it; they are clipped). */
export type DirtyRunSource = (startBytes: number, endBytes: number) => DirtyRun[];

export type BitmapLoadState = 'ok' | 'missing' | 'damaged' | 'mismatch';

export interface BitmapLoad {
  /** Every region the file marks, plus every region of a damaged page. All dirty unless 'ok'
   *  or 'damaged'. */
  bitmap: DirtyBitmap;
  state: BitmapLoadState;
  damagedPages: number;
}

export class BitmapFile {
  readonly pageCount: number;
  private readonly regionCount: number;
  /** What each page holds on disk as far as we know; undefined when unknown (never written by
   *  us, or a write of it failed), so the next persist writes it whatever it holds. */
  private readonly onDisk: Array<Buffer | undefined>;

  constructor(
    readonly file: MetadataFile,
    readonly sizeBytes: number,
    readonly regionBytes: number,
  ) {
    this.regionCount = Math.ceil(sizeBytes / regionBytes);
    this.pageCount = Math.ceil(this.regionCount / REGIONS_PER_PAGE);
    this.onDisk = new Array<Buffer | undefined>(this.pageCount).fill(undefined);
  }

  async load(): Promise<BitmapLoad> {
    const bitmap = new DirtyBitmap(this.sizeBytes, this.regionBytes);
    const data = await this.file.read();
    if (data === undefined) {
      bitmap.setRange(0, this.sizeBytes);
      return { bitmap, state: 'missing', damagedPages: 0 };
    }
    // What was read may be only in the page cache (a process killed between its write and its
    // fdatasync): make it durable before anything below treats it as what the disk holds.
    await this.file.sync();
    let damagedPages = 0;
    let goodPages = 0;
    for (let page = 0; page < this.pageCount; page++) {
      const bytes = data.subarray(page * BITMAP_PAGE_BYTES, (page + 1) * BITMAP_PAGE_BYTES);
      const verdict = this.checkPage(bytes, page);
      if (verdict === 'ok') {
        goodPages++;
        this.onDisk[page] = Buffer.from(bytes);
        for (const run of bitRuns(bytes.subarray(HEADER_BYTES), this.regionsIn(page))) {
          const first = page * REGIONS_PER_PAGE + run.first;
          bitmap.setRange(first * this.regionBytes, Math.min(run.count * this.regionBytes, this.sizeBytes - first * this.regionBytes));
        }
      } else {
        if (verdict === 'mismatch') {
          // A file for another geometry (the volume was resized, or this is not our file):
          // nothing in it can be trusted.
          bitmap.setRange(0, this.sizeBytes);
          return { bitmap, state: 'mismatch', damagedPages: this.pageCount };
        }
        damagedPages++;
        const [start, length] = this.pageRange(page);
        bitmap.setRange(start, length);
      }
    }
    return { bitmap, state: goodPages === 0 ? 'mismatch' : damagedPages > 0 ? 'damaged' : 'ok', damagedPages };
  }

  /** The pages holding regions of [offsetBytes, offsetBytes + lengthBytes). */
  pagesFor(offsetBytes: number, lengthBytes: number): number[] {
    const first = Math.floor(offsetBytes / this.regionBytes / REGIONS_PER_PAGE);
    const last = Math.floor((Math.min(offsetBytes + lengthBytes, this.sizeBytes) - 1) / this.regionBytes / REGIONS_PER_PAGE);
    const pages: number[] = [];
    for (let page = first; page <= last; page++) pages.push(page);
    return pages;
  }

  /** Writes the given pages (all by default) from `source` where they differ from what is on
   *  disk, then syncs. Returns how many pages were written. */
  async persist(source: DirtyRunSource, pages?: Iterable<number>): Promise<number> {
    const changed: Array<{ page: number; bytes: Buffer }> = [];
    for (const page of pages ?? this.allPages()) {
      const bytes = this.encodePage(page, source);
      const known = this.onDisk[page];
      if (known === undefined || !known.equals(bytes)) changed.push({ page, bytes });
    }
    if (changed.length === 0) return 0;
    for (const { page } of changed) this.onDisk[page] = undefined; // unknown until synced
    // Neighbouring pages go in one write.
    for (let i = 0; i < changed.length; ) {
      let j = i + 1;
      while (j < changed.length && (changed[j] as { page: number }).page === (changed[j - 1] as { page: number }).page + 1) j++;
      const group = changed.slice(i, j);
      await this.file.write((group[0] as { page: number }).page * BITMAP_PAGE_BYTES, Buffer.concat(group.map((entry) => entry.bytes)));
      i = j;
    }
    await this.file.sync();
    for (const { page, bytes } of changed) this.onDisk[page] = bytes;
    return changed.length;
  }

  private *allPages(): Iterable<number> {
    for (let page = 0; page < this.pageCount; page++) yield page;
  }

  private regionsIn(page: number): number {
    return Math.min(REGIONS_PER_PAGE, this.regionCount - page * REGIONS_PER_PAGE);
  }

  private pageRange(page: number): [number, number] {
    const start = page * REGIONS_PER_PAGE * this.regionBytes;
    const end = Math.min(this.sizeBytes, (page + 1) * REGIONS_PER_PAGE * this.regionBytes);
    return [start, end - start];
  }

  private encodePage(page: number, source: DirtyRunSource): Buffer {
    const bytes = Buffer.alloc(BITMAP_PAGE_BYTES);
    bytes.writeUInt32LE(MAGIC, 4);
    bytes.writeUInt32LE(FORMAT_VERSION, 8);
    bytes.writeUInt32LE(page, 12);
    bytes.writeBigUInt64LE(BigInt(this.sizeBytes), 16);
    bytes.writeUInt32LE(this.regionBytes, 24);
    const [start, length] = this.pageRange(page);
    const firstRegion = page * REGIONS_PER_PAGE;
    const bits = bytes.subarray(HEADER_BYTES);
    for (const run of source(start, start + length)) {
      const from = Math.max(Math.floor(run.offsetBytes / this.regionBytes), firstRegion) - firstRegion;
      const to = Math.min(Math.ceil((run.offsetBytes + run.lengthBytes) / this.regionBytes), firstRegion + this.regionsIn(page)) - firstRegion;
      if (to > from) setBits(bits, from, to);
    }
    bytes.writeUInt32LE(crc32c(bytes.subarray(4)), 0);
    return bytes;
  }

  private checkPage(bytes: Buffer, page: number): 'ok' | 'damaged' | 'mismatch' {
    if (bytes.length < BITMAP_PAGE_BYTES) return 'damaged';
    if (bytes.readUInt32LE(0) !== crc32c(bytes.subarray(4))) return 'damaged';
    if (bytes.readUInt32LE(4) !== MAGIC || bytes.readUInt32LE(8) !== FORMAT_VERSION) return 'mismatch';
    if (bytes.readUInt32LE(12) !== page) return 'damaged';
    if (bytes.readBigUInt64LE(16) !== BigInt(this.sizeBytes) || bytes.readUInt32LE(24) !== this.regionBytes) return 'mismatch';
    return 'ok';
  }
}

function setBits(bits: Buffer, from: number, to: number): void {
  let bit = from;
  while (bit < to && bit % 8 !== 0) {
    bits[bit >> 3] = (bits[bit >> 3] as number) | (1 << (bit & 7));
    bit++;
  }
  const fullBytesEnd = Math.floor(to / 8);
  if (bit < to && bit >> 3 < fullBytesEnd) {
    bits.fill(0xff, bit >> 3, fullBytesEnd);
    bit = fullBytesEnd * 8;
  }
  while (bit < to) {
    bits[bit >> 3] = (bits[bit >> 3] as number) | (1 << (bit & 7));
    bit++;
  }
}

/** Runs of set bits among the first `count` bits. */
function* bitRuns(bits: Buffer, count: number): Iterable<{ first: number; count: number }> {
  let runStart = -1;
  for (let bit = 0; bit < count; bit++) {
    const byte = bits[bit >> 3] as number;
    if (byte === 0 && bit % 8 === 0 && runStart === -1) {
      bit += 7;
      continue;
    }
    const set = (byte & (1 << (bit & 7))) !== 0;
    if (set && runStart === -1) runStart = bit;
    else if (!set && runStart !== -1) {
      yield { first: runStart, count: bit - runStart };
      runStart = -1;
    }
  }
  if (runStart !== -1) yield { first: runStart, count: count - runStart };
}

/** Appends the dirty runs of `bitmap` that overlap [startBytes, endBytes) to `out`. */
export function dirtyRunsBetween(bitmap: DirtyBitmap, startBytes: number, endBytes: number, out: DirtyRun[] = []): DirtyRun[] {
  let cursor = Math.min(startBytes, bitmap.sizeBytes);
  while (cursor < endBytes) {
    const batch = bitmap.runs(cursor, 256);
    for (const run of batch) {
      if (run.offsetBytes >= endBytes) return out;
      out.push(run);
    }
    if (batch.length < 256) return out;
    const last = batch[batch.length - 1] as DirtyRun;
    cursor = last.offsetBytes + last.lengthBytes;
    if (cursor >= bitmap.sizeBytes) return out;
  }
  return out;
}
