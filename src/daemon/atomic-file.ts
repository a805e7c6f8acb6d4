// Replace a small file so that after a crash it holds either the old or the new content, never
// a mix: write a temp file, fsync it, rename over the target, fsync the directory (the rename
// itself is only durable once the directory is). libuv opens every fd with O_CLOEXEC.
import fs from 'node:fs';
import path from 'node:path';

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
  try {
    fs.renameSync(tempPath, targetPath);
  } catch (error) {
    fs.rmSync(tempPath, { force: true });
    throw error;
  }
  const directoryFd = fs.openSync(directory, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(directoryFd);
  } finally {
    fs.closeSync(directoryFd);
  }
}
