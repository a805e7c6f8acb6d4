// The one door write-intent metadata (activity log, persistent bitmaps) goes through to stable
// storage. Production uses FsMetadataFile; the tests put the crash layer (crash-layer.ts) in its
// place to drop or tear what was written but not yet synced, as a power loss would.
import fs from 'node:fs';
import path from 'node:path';

export interface MetadataFile {
  readonly path: string;
  /** The whole file, or undefined when it does not exist. */
  read(): Promise<Buffer | undefined>;
  /** Not durable until sync() resolves; may be torn by a crash before that. */
  write(offsetBytes: number, data: Buffer): Promise<void>;
  /** Makes every earlier write durable (fdatasync; the first sync also makes a new file's
   *  directory entry durable). */
  sync(): Promise<void>;
  /** Removes the file durably; a missing file is not an error. */
  remove(): Promise<void>;
  close(): Promise<void>;
}

export interface MetadataCounters {
  writes: number;
  writeBytes: number;
  syncs: number;
}

/** Opens metadata files by path: the daemon's stable storage, or the tests' crash layer. */
export interface MetadataStore {
  open(filePath: string): MetadataFile;
  readonly counters: MetadataCounters;
}

export class FsMetadataStore implements MetadataStore {
  readonly counters: MetadataCounters = { writes: 0, writeBytes: 0, syncs: 0 };
  open(filePath: string): MetadataFile {
    return new FsMetadataFile(filePath, this.counters);
  }
}

class FsMetadataFile implements MetadataFile {
  private handle: Promise<fs.promises.FileHandle> | undefined;
  /** The directory entry of a file this object created is made durable by its first sync. */
  private created = false;

  constructor(
    readonly path: string,
    private readonly counters: MetadataCounters,
  ) {}

  async read(): Promise<Buffer | undefined> {
    try {
      return await fs.promises.readFile(this.path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  }

  async write(offsetBytes: number, data: Buffer): Promise<void> {
    const handle = await this.opened();
    this.counters.writes++;
    this.counters.writeBytes += data.length;
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await handle.write(data, done, data.length - done, offsetBytes + done);
      done += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    const handle = await this.opened();
    this.counters.syncs++;
    await handle.datasync();
    if (this.created) {
      await syncDirectory(path.dirname(this.path));
      this.created = false;
    }
  }

  async remove(): Promise<void> {
    await this.close();
    try {
      await fs.promises.unlink(this.path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw error;
    }
    await syncDirectory(path.dirname(this.path));
  }

  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    if (handle !== undefined) await (await handle).close();
  }

  private opened(): Promise<fs.promises.FileHandle> {
    this.handle ??= this.open();
    const handle = this.handle;
    // A failed open is not cached: the next write tries again (the admin may fix the disk).
    handle.catch(() => {
      if (this.handle === handle) this.handle = undefined;
    });
    return handle;
  }

  private async open(): Promise<fs.promises.FileHandle> {
    await fs.promises.mkdir(path.dirname(this.path), { recursive: true, mode: 0o700 });
    try {
      return await fs.promises.open(this.path, fs.constants.O_RDWR);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      const handle = await fs.promises.open(this.path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      this.created = true;
      return handle;
    }
  }
}

async function syncDirectory(directory: string): Promise<void> {
  const handle = await fs.promises.open(directory, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
