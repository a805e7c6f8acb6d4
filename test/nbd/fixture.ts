// Shared setup for NBD tests: an in-process server on a temp Unix socket over memory backends,
// logging into an in-memory sink, torn down (server closed, temp dir removed) by tap.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { NbdServer, type NbdExport, type NbdServerOptions } from '../../src/nbd/server';
import { MemoryBackend, type MemoryBackendOptions } from '../helpers/memory-backend';

export interface LogEntry {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export interface Fixture {
  server: NbdServer;
  socketPath: string;
  dir: string;
  exports: Map<string, NbdExport>;
  backends: Map<string, MemoryBackend>;
  logs: LogEntry[];
}

interface Teardown {
  teardown(fn: () => unknown): void;
}

export type ExportSpec = { name: string; description?: string } & MemoryBackendOptions;

export async function startServer(
  t: Teardown,
  specs: ExportSpec[],
  serverOptions: Partial<Omit<NbdServerOptions, 'lookupExport' | 'listExports' | 'logger'>> = {},
): Promise<Fixture> {
  const dir = mkdtempSync(path.join(tmpdir(), 'bm-nbd-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const logs: LogEntry[] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line) as LogEntry) });
  const exports = new Map<string, NbdExport>();
  const backends = new Map<string, MemoryBackend>();
  for (const spec of specs) {
    const backend = new MemoryBackend(spec);
    backends.set(spec.name, backend);
    exports.set(spec.name, { name: spec.name, description: spec.description ?? '', backend });
  }
  const server = new NbdServer({
    lookupExport: (name) => exports.get(name),
    listExports: () => [...exports.values()],
    logger,
    ...serverOptions,
  });
  await server.listenUnix(socketPath);
  t.teardown(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { server, socketPath, dir, exports, backends, logs };
}

/** Polls `condition` every few ms until true or the timeout (then throws). */
export async function waitFor(condition: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** A promise with its resolve function, for gating backend operations. */
export function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

export const MiB = 1024 * 1024;
