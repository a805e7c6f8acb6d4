// Reads into buffers the caller picks. A socket from net.Server reads every chunk into a fresh,
// zero-filled 64 KiB buffer and pushes it through the Readable machinery; Node's `onread` option
// (a client-socket option, not offered for accepted ones) lets each read land where the caller
// says: a reused staging buffer for headers, or straight into the aligned buffer a large payload
// goes to the device from. To get it for an accepted socket, its descriptor is duplicated and
// wrapped in a new net.Socket with `onread`; the original is closed.

import { closeSync } from 'node:fs';
import net from 'node:net';

import { dupFd } from '../native/index';

export interface ReadSink {
  /** Where the next read lands (it fills at most this buffer's length). Called once when the
   *  socket is adopted and again after every read. */
  nextReadBuffer(): Buffer;
  /** `nread` bytes landed at the start of `buffer` (the one nextReadBuffer returned last).
   *  Return false to stop reading; `socket.resume()` starts again. */
  onRead(buffer: Buffer, nread: number): boolean;
}

interface OnRead {
  buffer: () => Uint8Array;
  callback: (nread: number, buffer: Uint8Array) => boolean;
}

export interface AdoptedSocket {
  socket: net.Socket;
  /** Bytes the original socket had read but not delivered yet: they come before anything the
   *  sink sees, so the caller must consume them first. */
  pending: Buffer;
}

/** The descriptor of a connected socket, when Node exposes it (Linux, a libuv stream handle). */
function socketFd(socket: net.Socket): number | undefined {
  // `_handle.fd` is not public API but is what Node itself uses; anything else means "cannot adopt".
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && Number.isSafeInteger(fd) && fd >= 0 ? fd : undefined;
}

/** Takes over `socket` (no 'data' listener yet) so its reads go through `sink`, which must be
 *  ready to answer nextReadBuffer() at once. Returns null when that is not possible; the caller
 *  then keeps reading `socket` as a stream. */
export function adoptSocket(socket: net.Socket, sink: ReadSink): AdoptedSocket | null {
  // Replies still queued on the original would die with it (destroy drops unsent writes).
  if (socket.destroyed || socket.listenerCount('data') > 0 || socket.writableLength > 0) return null;
  const fd = socketFd(socket);
  if (fd === undefined) return null;
  let copy: number;
  try {
    copy = dupFd(fd);
  } catch {
    return null; // out of descriptors: the stream still works
  }
  // Whatever libuv has read sits in the Readable's buffer: hand it back in order. (Not paused
  // first: a failed adoption must leave the socket in the state it came in.)
  const chunks: Buffer[] = [];
  for (let chunk = socket.read() as Buffer | null; chunk !== null; chunk = socket.read() as Buffer | null) chunks.push(chunk);
  let adopted: net.Socket;
  try {
    // `onread` is a constructor option in Node's docs (nodejs/node#54194), not yet in the
    // @types/node 20 typings.
    const options: net.SocketConstructorOpts & { onread: OnRead } = {
      fd: copy,
      readable: true,
      writable: true,
      allowHalfOpen: socket.allowHalfOpen,
      onread: { buffer: () => sink.nextReadBuffer(), callback: (nread, buffer) => sink.onRead(buffer as Buffer, nread) },
    };
    adopted = new net.Socket(options);
  } catch {
    // Not a socket Node can wrap: give the bytes back and keep the original.
    if (chunks.length > 0) socket.unshift(Buffer.concat(chunks));
    closeQuietly(copy);
    return null;
  }
  // The original only closes its own descriptor; the connection lives on in the copy.
  socket.destroy();
  return { socket: adopted, pending: chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks) };
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already gone
  }
}
