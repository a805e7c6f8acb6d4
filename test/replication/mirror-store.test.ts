// mirrors.json: versioned, validated on load, written atomically. (Bitmap files: test/write-intent/.)
import t from 'tap';
import { randomUUID } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import {
  loadMirrors,
  mirrorsPath,
  mirrorsVersion,
  saveMirrors,
  type MirrorRecord,
} from '../../src/replication/mirror-store';
import { scratchDir } from '../helpers/loop';

function record(overrides: Partial<MirrorRecord> = {}): MirrorRecord {
  return {
    id: randomUUID(),
    volume: 'vol0',
    peer: 'hostB',
    target: 'vol0',
    mode: 'sync',
    onDisconnect: 'continue',
    maxRateBytesPerSec: null,
    generation: 1,
    fullCopyDone: false,
    suspended: false,
    error: null,
    createdAt: new Date().toISOString(),
    ...overrides,
  };
}

function writeDocument(stateDir: string, document: unknown): void {
  writeFileSync(mirrorsPath(stateDir), JSON.stringify(document));
}

t.test('no mirrors.json: no mirrors', async (t) => {
  const dir = scratchDir(t);
  t.same(loadMirrors(dir), []);
});

t.test('save and load round-trip every field', async (t) => {
  const dir = scratchDir(t);
  const records = [
    record(),
    record({
      volume: 'data.1',
      peer: 'hostC',
      target: 'data-copy',
      onDisconnect: 'block',
      maxRateBytesPerSec: 50 * 1024 * 1024,
      generation: 7,
      fullCopyDone: true,
      suspended: true,
      error: { code: 'BM_ERR_TARGET_TOO_SMALL', reason: 'target vol is 1 MiB, source 8 MiB' },
    }),
    // Same volume to another peer, and another volume to the same peer: both allowed.
    record({ peer: 'hostC' }),
    record({ volume: 'vol1' }),
  ];
  saveMirrors(dir, records);
  const filePath = mirrorsPath(dir);
  t.ok(filePath.endsWith('/mirrors.json'));
  const onDisk = JSON.parse(readFileSync(filePath, 'utf8')) as { version: number; mirrors: unknown[] };
  t.equal(onDisk.version, mirrorsVersion);
  t.equal(onDisk.mirrors.length, 4);
  t.equal(statSync(filePath).mode & 0o777, 0o640, 'not world-readable');
  t.same(loadMirrors(dir), records);

  // Saving replaces the whole document.
  saveMirrors(dir, [records[1] as MirrorRecord]);
  t.same(loadMirrors(dir), [records[1]]);
  saveMirrors(dir, []);
  t.same(loadMirrors(dir), []);
});

t.test('a duplicate (volume, peer) is refused as BM_ERR_STATE_CORRUPT', async (t) => {
  const dir = scratchDir(t);
  const first = record();
  const second = record({ target: 'other' }); // same volume and peer, another id and target
  writeDocument(dir, { version: mirrorsVersion, mirrors: [first, second] });
  t.throws(() => loadMirrors(dir), { code: 'BM_ERR_STATE_CORRUPT', message: /mirror of vol0 to hostB appears twice/ });
});

t.test('unknown or invalid content is refused as BM_ERR_STATE_CORRUPT', async (t) => {
  const dir = scratchDir(t);
  const good = record();
  const cases: Array<[string, unknown]> = [
    ['unknown top-level field', { version: mirrorsVersion, mirrors: [good], extra: true }],
    ['unknown record field', { version: mirrorsVersion, mirrors: [{ ...good, compress: true }] }],
    ['unknown field in error', { version: mirrorsVersion, mirrors: [{ ...good, error: { code: 'BM_ERR_TARGET_IO', reason: 'x', at: 1 } }] }],
    ['missing field', { version: mirrorsVersion, mirrors: [{ ...good, generation: undefined }] }],
    ['unknown error code', { version: mirrorsVersion, mirrors: [{ ...good, error: { code: 'BM_ERR_NOPE', reason: 'x' } }] }],
    ['unknown mode', { version: mirrorsVersion, mirrors: [{ ...good, mode: 'semi-sync' }] }],
    ['bad volume name', { version: mirrorsVersion, mirrors: [{ ...good, volume: '../etc' }] }],
    ['bad id', { version: mirrorsVersion, mirrors: [{ ...good, id: 'not-a-uuid' }] }],
    ['zero rate', { version: mirrorsVersion, mirrors: [{ ...good, maxRateBytesPerSec: 0 }] }],
    ['other version', { version: mirrorsVersion + 1, mirrors: [] }],
    ['no version', { mirrors: [] }],
  ];
  for (const [what, document] of cases) {
    writeDocument(dir, document);
    t.throws(() => loadMirrors(dir), { code: 'BM_ERR_STATE_CORRUPT' }, what);
  }
  writeFileSync(mirrorsPath(dir), '{"version": 1, "mirrors": [');
  t.throws(() => loadMirrors(dir), { code: 'BM_ERR_STATE_CORRUPT', message: /not valid JSON/ }, 'truncated JSON');
});

t.test('save refuses an invalid record and leaves the previous file in place', async (t) => {
  const dir = scratchDir(t);
  const good = record();
  saveMirrors(dir, [good]);
  const before = readFileSync(mirrorsPath(dir));
  const bad = { ...record(), unexpected: 1 } as unknown as MirrorRecord;
  t.throws(() => saveMirrors(dir, [good, bad]));
  t.same(readFileSync(mirrorsPath(dir)), before, 'file unchanged');
  t.same(loadMirrors(dir), [good]);
});
