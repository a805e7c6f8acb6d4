// The volume registry file: round trip, atomic replacement, and refusal of damaged files.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { writeFileAtomicSync } from '../../src/daemon/atomic-file';
import { loadRegistry, registryPath, saveRegistry, type VolumeRecord } from '../../src/daemon/registry';
import { scratchDir } from '../helpers/loop';

const record: VolumeRecord = {
  name: 'vol0',
  uuid: '3f2b8a5e-9c1d-4e7f-8a6b-1c2d3e4f5a6b',
  device: '/dev/loop0',
  readOnly: false,
  role: 'primary',
  fastResync: true,
  promoted: false,
  createdAt: '2026-01-01T00:00:00.000Z',
};

t.test('missing registry is empty; save then load round-trips', async (t) => {
  const dir = scratchDir(t, 'bm-reg-');
  t.same(loadRegistry(dir), []);
  saveRegistry(dir, [record, { ...record, name: 'vol1', uuid: '4f2b8a5e-9c1d-4e7f-8a6b-1c2d3e4f5a6b', readOnly: true }]);
  const loaded = loadRegistry(dir);
  t.equal(loaded.length, 2);
  t.same(loaded[0], record);
  const onDisk = JSON.parse(fs.readFileSync(registryPath(dir), 'utf8'));
  t.equal(onDisk.version, 1);
  t.equal(fs.statSync(registryPath(dir)).mode & 0o777, 0o640);
  t.same(fs.readdirSync(dir), ['volumes.json'], 'no temp file left behind');
});

t.test('damaged registries are refused with BM_ERR_STATE_CORRUPT naming the problem', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['{', /not valid JSON/],
    ['{"version": 2, "volumes": []}', /version 2 is not supported/],
    ['{"version": 1}', /volumes: /],
    [JSON.stringify({ version: 1, volumes: [{ ...record, uuid: 'nope' }] }), /volumes\[0\]\.uuid: /],
    [JSON.stringify({ version: 1, volumes: [record, record] }), /appears twice/],
    [JSON.stringify({ version: 1, volumes: [{ ...record, name: 'a/b' }] }), /volumes\[0\]\.name/],
  ];
  for (const [content, expected] of cases) {
    const dir = scratchDir(t, 'bm-reg-');
    fs.writeFileSync(registryPath(dir), content);
    t.throws(() => loadRegistry(dir), { code: 'BM_ERR_STATE_CORRUPT', message: expected }, content);
  }
});

t.test('saveRegistry refuses to write what loadRegistry would refuse', async (t) => {
  const dir = scratchDir(t, 'bm-reg-');
  t.throws(() => saveRegistry(dir, [{ ...record, device: 'relative' }]));
  t.notOk(fs.existsSync(registryPath(dir)));
});

t.test('writeFileAtomicSync replaces the whole file and cleans up on failure', async (t) => {
  const dir = scratchDir(t, 'bm-reg-');
  const target = path.join(dir, 'f.json');
  writeFileAtomicSync(target, 'old', 0o600);
  writeFileAtomicSync(target, 'new content', 0o600);
  t.equal(fs.readFileSync(target, 'utf8'), 'new content');
  // Renaming over a directory fails: the temp file must not be left behind.
  const blocked = path.join(dir, 'dir-target');
  fs.mkdirSync(path.join(blocked, 'child'), { recursive: true });
  t.throws(() => writeFileAtomicSync(blocked, 'x', 0o600));
  t.same(fs.readdirSync(dir).sort(), ['dir-target', 'f.json']);
});

t.test('writeFileAtomicSync: a failing directory fsync leaves the old content (or no file), as the caller rolls back', async (t) => {
  const dir = scratchDir(t, 'bm-reg-');
  const target = path.join(dir, 'f.json');
  writeFileAtomicSync(target, 'old', 0o600);
  const realFsync = fs.fsyncSync;
  const directoryFds = new Set<number>();
  const realOpen = fs.openSync;
  (fs as { openSync: typeof fs.openSync }).openSync = ((file: fs.PathLike, flags: fs.OpenMode = 'r', mode?: fs.Mode | null) => {
    const fd = realOpen(file, flags, mode);
    if (typeof flags === 'number' && (flags & fs.constants.O_DIRECTORY) !== 0) directoryFds.add(fd);
    return fd;
  }) as typeof fs.openSync;
  (fs as { fsyncSync: typeof fs.fsyncSync }).fsyncSync = (fd: number) => {
    if (directoryFds.has(fd)) throw Object.assign(new Error('EIO: i/o error, fsync (test)'), { code: 'EIO' });
    realFsync(fd);
  };
  t.teardown(() => {
    (fs as { openSync: typeof fs.openSync }).openSync = realOpen;
    (fs as { fsyncSync: typeof fs.fsyncSync }).fsyncSync = realFsync;
  });
  t.throws(() => writeFileAtomicSync(target, 'new', 0o600), { code: 'EIO' });
  t.equal(fs.readFileSync(target, 'utf8'), 'old', 'the old content is back');
  const fresh = path.join(dir, 'fresh.json');
  t.throws(() => writeFileAtomicSync(fresh, 'new', 0o600), { code: 'EIO' });
  t.notOk(fs.existsSync(fresh), 'a file that did not exist does not appear');
  t.same(fs.readdirSync(dir), ['f.json'], 'no temp or backup file is left');
});

t.test('records from before roles load as primaries (FastResync on); mirror records round-trip', async (t) => {
  const dir = scratchDir(t, 'bm-reg-');
  const { role: _role, fastResync: _fastResync, ...legacy } = record;
  writeFileAtomicSync(registryPath(dir), JSON.stringify({ version: 1, volumes: [legacy] }), 0o640);
  t.same(loadRegistry(dir), [record]);
  const mirror: VolumeRecord = { ...record, name: 'm', uuid: '5f2b8a5e-9c1d-4e7f-8a6b-1c2d3e4f5a6b', role: 'mirror' };
  saveRegistry(dir, [record, mirror]);
  t.same(loadRegistry(dir), [record, mirror]);
  writeFileAtomicSync(registryPath(dir), JSON.stringify({ version: 1, volumes: [{ ...mirror, readOnly: true }] }), 0o640);
  t.throws(() => loadRegistry(dir), { code: 'BM_ERR_STATE_CORRUPT', message: /mirror volume cannot be readOnly/ });
  writeFileAtomicSync(registryPath(dir), JSON.stringify({ version: 1, volumes: [{ ...mirror, role: 'secondary' }] }), 0o640);
  t.throws(() => loadRegistry(dir), { code: 'BM_ERR_STATE_CORRUPT', message: /role/ });
});
