// volume promote against a source session that connects while the promote is writing its
// divergence record: that session must be ended, and the mirror service may not write the
// volume from the moment it is diverged until its source resolves the split brain (also after
// a demote).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import t from 'tap';
import { VolumeManager } from '../../src/daemon/volume-manager';
import { Volume } from '../../src/volume/volume';
import { FsMetadataStore, type MetadataFile, type MetadataStore } from '../../src/write-intent/metadata-file';
import { scratchDevice } from '../helpers/loop';

const logger = pino({ level: 'silent' });

/** The file system, except that the first sync of a divergence record waits for `release`. */
class GatedStore implements MetadataStore {
  private readonly inner = new FsMetadataStore();
  readonly counters = this.inner.counters;
  reached!: () => void;
  readonly syncReached = new Promise<void>((resolve) => (this.reached = resolve));
  release!: () => void;
  private readonly released = new Promise<void>((resolve) => (this.release = resolve));

  open(filePath: string): MetadataFile {
    const file = this.inner.open(filePath);
    return {
      path: file.path,
      read: () => file.read(),
      write: (offsetBytes, data) => file.write(offsetBytes, data),
      sync: async () => {
        this.reached();
        await this.released;
        await file.sync();
      },
      remove: () => file.remove(),
      close: () => file.close(),
    };
  }
}

t.test('a source session admitted while promote writes the divergence record is ended; the diverged volume refuses mirror writes until resolved', async (t) => {
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-promote-'));
  t.teardown(() => fs.rmSync(stateDir, { recursive: true, force: true }));
  const device = scratchDevice(t, 4 * 1024 * 1024);
  const store = new GatedStore();
  let session: { peer: string; end(reason: string): Promise<void> } | undefined;
  const ended: string[] = [];
  const volumes = new VolumeManager({
    stateDir,
    logger,
    openVolume: (spec, volumeLogger) => Volume.open(spec, volumeLogger),
    connections: () => ({ connectionCount: () => 0, disconnectExport: () => undefined }),
    uris: (name) => ({ nbdUri: `nbd+unix:///${name}` }),
    metadataStore: store,
    replicationSession: () => session,
  });
  t.teardown(() => volumes.closeAll());
  await volumes.add({ name: 'm0', device: device.path, role: 'mirror' });
  const volume = volumes.lookup('m0')?.volume as Volume;
  const block = Buffer.alloc(4096, 0x11);
  await volume.mirrorWrite(0, block, false);

  const promoting = volumes.promote({ name: 'm0' });
  await store.syncReached;
  // The source connects now: promote found no session when it looked before the record.
  session = {
    peer: 'hostA',
    end: async (reason) => {
      ended.push(reason);
      session = undefined;
    },
  };
  await volume.mirrorWrite(4096, block, false); // not promoted yet: the session may still write
  store.release();
  const info = await promoting;
  t.equal(info.promoted, true);
  t.equal(ended.length, 1, 'the session admitted during the promote was ended');
  t.match(ended[0], /promoted/);
  await t.rejects(volume.mirrorWrite(0, block, false), { code: 'EPERM' }, 'promoted: mirror writes refused');

  await volumes.demote({ name: 'm0' });
  await t.rejects(volume.mirrorWrite(0, block, false), { code: 'EPERM', message: /diverged/ }, 'demoted but unresolved: mirror writes still refused');
  await t.rejects(volume.mirrorWriteZeroes(0, 4096, false), { code: 'EPERM' });

  await volumes.resolveDivergence('m0', { peer: 'hostA', volumeUuid: '6f1c1d4e-8a57-4f5e-9a43-3f1f5a0d2c11', volumeName: 'vol0', generation: 7, boundAt: new Date().toISOString() });
  await volume.mirrorWrite(0, block, false);
  t.pass('resolved: the mirror service writes again');
});
