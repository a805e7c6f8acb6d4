// Fault layer for tests (never used by the daemon): an in-memory MetadataStore that keeps what
// was synced apart from what was only written, so a test can "lose power" at any moment. A
// crash keeps every synced byte; each unsynced write is dropped, kept, or torn sector by sector
// (any subset of its 512-byte sectors reaches the disk), in the order a seeded random source
// picks. Tests then recover from the crashed image with the production code. A kill (SIGKILL)
// loses nothing yet: the restart sees every write, but only synced ones are durable, so a power
// loss after the restart can still drop the rest.
import type { MetadataCounters, MetadataFile, MetadataStore } from './metadata-file';

export const CRASH_SECTOR_BYTES = 512;

export type CrashMode = 'drop' | 'keep' | 'tear' | 'mixed';

interface Image {
  durable: Buffer | undefined;
  /** The file as the daemon sees it (durable plus every write since). */
  current: Buffer | undefined;
  pending: Array<{ offsetBytes: number; data: Buffer }>;
  /** Created or removed since the last sync: whether the directory entry survives is random. */
  existencePending: boolean;
}

export class CrashLayerStore implements MetadataStore {
  readonly counters: MetadataCounters = { writes: 0, writeBytes: 0, syncs: 0 };
  private readonly images = new Map<string, Image>();
  /** Set by failNext: the next n writes or syncs fail with EIO (a failing state disk). */
  private failures = 0;
  /** Killed: the process that used this store is gone; its files write and sync nothing more. */
  private dead = false;
  /** Called after each write is recorded and before it returns: a test may crash() here, with
   *  that write (and any other unsynced one) still pending. */
  onWrite: (() => void) | undefined;

  open(filePath: string): MetadataFile {
    return new CrashLayerFile(filePath, this);
  }

  failNext(count: number): void {
    this.failures = count;
  }

  /** What a restart after a power loss now would find. `random` returns [0, 1). */
  crash(mode: CrashMode, random: () => number): CrashLayerStore {
    const after = new CrashLayerStore();
    for (const [filePath, image] of this.images) {
      const exists = image.existencePending ? random() < 0.5 : image.durable !== undefined;
      if (!exists) continue;
      let content: Buffer = image.durable === undefined ? Buffer.alloc(0) : Buffer.from(image.durable);
      for (const write of image.pending) {
        const choice = mode === 'mixed' ? (['drop', 'keep', 'tear'] as const)[Math.floor(random() * 3)] : mode;
        if (choice === 'drop') continue;
        content = applyWrite(content, write.offsetBytes, write.data, choice === 'tear' ? random : undefined);
      }
      after.images.set(filePath, { durable: content, current: Buffer.from(content), pending: [], existencePending: false });
    }
    return after;
  }

  /** What a restart after a SIGKILL now would find: every file as the killed process left it
   *  (its unsynced writes still pending, so a later crash() may drop them). */
  kill(): CrashLayerStore {
    const after = new CrashLayerStore();
    for (const [filePath, image] of this.images) after.images.set(filePath, image);
    this.dead = true;
    return after;
  }

  /** @internal */
  image(filePath: string): Image {
    let image = this.images.get(filePath);
    if (image === undefined) {
      image = { durable: undefined, current: undefined, pending: [], existencePending: false };
      this.images.set(filePath, image);
    }
    return image;
  }

  /** @internal */
  checkAlive(what: string): void {
    if (this.dead) throw Object.assign(new Error(`crash layer: ${what} after the process was killed`), { code: 'EIO' });
  }

  /** @internal */
  maybeFail(what: string): void {
    this.checkAlive(what);
    if (this.failures === 0) return;
    this.failures--;
    throw Object.assign(new Error(`crash layer: injected EIO on ${what}`), { code: 'EIO' });
  }
}

class CrashLayerFile implements MetadataFile {
  constructor(
    readonly path: string,
    private readonly store: CrashLayerStore,
  ) {}

  async read(): Promise<Buffer | undefined> {
    const current = this.store.image(this.path).current;
    return current === undefined ? undefined : Buffer.from(current);
  }

  async write(offsetBytes: number, data: Buffer): Promise<void> {
    this.store.maybeFail(`write of ${this.path}`);
    const image = this.store.image(this.path);
    if (image.current === undefined) {
      image.current = Buffer.alloc(0);
      image.existencePending = true;
    }
    this.store.counters.writes++;
    this.store.counters.writeBytes += data.length;
    image.current = applyWrite(image.current, offsetBytes, data, undefined);
    image.pending.push({ offsetBytes, data: Buffer.from(data) });
    this.store.onWrite?.();
  }

  async sync(): Promise<void> {
    this.store.maybeFail(`sync of ${this.path}`);
    // A flush takes time; a crash may come before it completes.
    await new Promise((resolve) => setImmediate(resolve));
    this.store.checkAlive(`sync of ${this.path}`);
    const image = this.store.image(this.path);
    this.store.counters.syncs++;
    image.durable = image.current === undefined ? undefined : Buffer.from(image.current);
    image.pending = [];
    image.existencePending = false;
  }

  async remove(): Promise<void> {
    this.store.maybeFail(`removal of ${this.path}`);
    const image = this.store.image(this.path);
    // Synchronous with the directory, like the production remove().
    image.current = undefined;
    image.durable = undefined;
    image.pending = [];
    image.existencePending = false;
  }

  async close(): Promise<void> {}
}

/** `content` with `data` written at `offsetBytes`; with `tear`, each sector lands or not. */
function applyWrite(content: Buffer, offsetBytes: number, data: Buffer, tear: (() => number) | undefined): Buffer {
  const end = offsetBytes + data.length;
  const grown = content.length >= end ? Buffer.from(content) : Buffer.concat([content, Buffer.alloc(end - content.length)]);
  if (tear === undefined) {
    data.copy(grown, offsetBytes);
    return grown;
  }
  for (let sector = 0; sector < data.length; sector += CRASH_SECTOR_BYTES) {
    if (tear() < 0.5) data.copy(grown, offsetBytes + sector, sector, Math.min(sector + CRASH_SECTOR_BYTES, data.length));
  }
  return grown;
}
