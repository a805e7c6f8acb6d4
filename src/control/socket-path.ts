// Unix socket paths survive a crash. Before listening, a leftover socket nobody answers on is
// removed; a live one (another daemon) or a non-socket file is never touched.
import fs from 'node:fs';
import net from 'node:net';
import { BmError, errorCode } from './errors';

const probeTimeoutMs = 1000;

function probeSocket(socketPath: string): Promise<'live' | 'stale'> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      // Something holds the socket open but does not accept in time: treat as live, do not steal.
      resolve('live');
    }, probeTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (error) => {
      clearTimeout(timer);
      const code = errorCode(error);
      if (code === 'ECONNREFUSED' || code === 'ENOENT') resolve('stale');
      else reject(error);
    });
  });
}

/** Make `socketPath` free to listen on, or throw BM_ERR_SOCKET_IN_USE / BM_ERR_SOCKET_PATH. */
export async function claimSocketPath(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch (error) {
    if (errorCode(error) === 'ENOENT') return;
    throw error;
  }
  if (!stat.isSocket()) {
    throw new BmError('BM_ERR_SOCKET_PATH', `${socketPath} exists and is not a socket; refusing to replace it`);
  }
  if ((await probeSocket(socketPath)) === 'live') {
    throw new BmError('BM_ERR_SOCKET_IN_USE', `${socketPath} is in use by another process`);
  }
  fs.unlinkSync(socketPath);
}

/** Remove a socket file we created; a missing file is fine (already gone). */
export function removeSocketPath(socketPath: string): void {
  try {
    fs.unlinkSync(socketPath);
  } catch (error) {
    if (errorCode(error) !== 'ENOENT') throw error;
  }
}
