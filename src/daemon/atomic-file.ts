// Replace a small file so that after a crash it holds either the old or the new content, never
// a mix: write a temp file, fsync it, rename over the target, fsync the directory (the rename
// itself is only durable once the directory is). libuv opens every fd with O_CLOEXEC.
import fs from 'node:fs';
import path from 'node:path';

/** Throws when the new content may not be durable; the file then holds the old content again
 *  (callers roll back their change in memory, so the file must agree with them). */
export function writeFileAtomicSync(targetPath: string, data: string | Uint8Array, mode: number): void {
  const directory = path.dirname(targetPath);
  const tempPath = path.join(directory, `.${path.basename(targetPath)}.tmp-${process.pid}`);
  const fd = fs.openSync(tempPath, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, mode);
  try {
    fs.writeFileSync(fd, data);
    fs.fsyncSync(fd);
  } catch (error) {
    fs.closeSync(fd);
    fs.rmSync(tempPath, { force: true });
    throw error;
  }
  fs.closeSync(fd);
  // A second name for the old content, so a failed directory fsync can put it back. No pid in
  // it (one daemon per state dir): one left by a crash is replaced by the next write.
  const oldPath = path.join(directory, `.${path.basename(targetPath)}.old`);
  // 'none': there is no old file; 'unkept': a filesystem without hard links, or the old name
  // already put back (nothing to remove).
  let old: 'kept' | 'none' | 'unkept' = 'unkept';
  try {
    fs.rmSync(oldPath, { force: true });
    fs.linkSync(targetPath, oldPath);
    old = 'kept';
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') old = 'none';
  }
  try {
    fs.renameSync(tempPath, targetPath);
  } catch (error) {
    fs.rmSync(tempPath, { force: true });
    if (old === 'kept') fs.rmSync(oldPath, { force: true });
    throw error;
  }
  try {
    syncDirectory(directory);
  } catch (error) {
    // The new content is visible but not durable, and the caller will act as if it was never
    // written: put the old content back (or no file, if there was none).
    try {
      if (old === 'kept') fs.renameSync(oldPath, targetPath);
      else if (old === 'none') fs.rmSync(targetPath, { force: true });
      old = 'unkept';
    } catch {
      // Left as it is: the error below still reaches the admin.
    }
    throw error;
  } finally {
    // Best effort: the new content is in place (or the old one is back), whatever this does. A
    // name left behind by a crash here is removed by the next write of the same file.
    if (old === 'kept') {
      try {
        fs.rmSync(oldPath, { force: true });
      } catch {
        // left for the next write
      }
    }
  }
}

function syncDirectory(directory: string): void {
  const directoryFd = fs.openSync(directory, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(directoryFd);
  } finally {
    fs.closeSync(directoryFd);
  }
}
