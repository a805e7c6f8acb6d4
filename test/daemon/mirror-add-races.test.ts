// mirror.add against a concurrent volume.remove or peer.remove: the two requests run on separate
// change queues, and mirror.add waits on disk (the volume's write-intent log) between its checks
// and persisting the mirror. Exactly one may win: never a mirror of a removed volume, or one
// that replicates to a removed peer.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ControlClient } from '../../src/control/client';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';

const MiB = 1024 * 1024;
const ROUNDS = 8;

type Outcome = { ok: true } | { ok: false; code: string };

async function settle(request: Promise<unknown>): Promise<Outcome> {
  try {
    await request;
    return { ok: true };
  } catch (error) {
    return { ok: false, code: (error as { code?: string }).code ?? String(error) };
  }
}

/** Two connections, opened before the race so both requests leave in the same tick. */
async function clients(t: Test, daemon: RunningDaemon): Promise<[ControlClient, ControlClient]> {
  const open = () => ControlClient.connect({ socketPath: daemon.paths.controlSocket, timeoutMs: 10_000 });
  const pair = (await Promise.all([open(), open()])) as [ControlClient, ControlClient];
  t.teardown(() => pair.forEach((client) => client.close()));
  return pair;
}

function secretFile(daemon: RunningDaemon, name: string): string {
  const file = path.join(daemon.paths.dir, `${name}.key`);
  fs.writeFileSync(file, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  return file;
}

t.test('mirror.add racing volume.remove: one of them fails, and no mirror is left on a removed volume', async (t) => {
  const daemon = await startDaemon(t, { args: ['--node-name', 'hostA'] });
  await daemon.request('peer.add', { name: 'hostB', address: '127.0.0.1:9', secretFile: secretFile(daemon, 'hostB') });
  const [first, second] = await clients(t, daemon);
  for (let round = 0; round < ROUNDS; round++) {
    const name = `vol${round}`;
    await daemon.request('volume.add', { name, device: scratchDevice(t, MiB, { forceFile: true }).path });
    const [added, removed] = await Promise.all([
      settle(first.request('mirror.add', { volume: name, peer: 'hostB', target: name })),
      settle(second.request('volume.remove', { name })),
    ]);
    t.not(added.ok && removed.ok, true, `round ${round}: not both (mirror.add ${JSON.stringify(added)}, volume.remove ${JSON.stringify(removed)})`);
    if (!added.ok) t.equal(added.code, 'BM_ERR_VOLUME_NOT_FOUND', `round ${round}: a lost mirror.add says the volume is gone`);
    if (!removed.ok) t.equal(removed.code, 'BM_ERR_VOLUME_BUSY', `round ${round}: a lost volume.remove says the volume has a mirror`);
  }
  const volumes = new Set(((await daemon.request('volume.list')) as { volumes: Array<{ name: string }> }).volumes.map((volume) => volume.name));
  const mirrors = ((await daemon.request('mirror.list')) as { mirrors: Array<{ volume: string }> }).mirrors;
  t.same(mirrors.filter((mirror) => !volumes.has(mirror.volume)), [], 'every mirror belongs to a volume that exists');
  const saved = JSON.parse(fs.readFileSync(path.join(daemon.paths.stateDir, 'mirrors.json'), 'utf8')) as { mirrors: Array<{ volume: string }> };
  t.same(saved.mirrors.filter((mirror) => !volumes.has(mirror.volume)), [], 'and so does every mirror in mirrors.json');
});

t.test('mirror.add racing peer.remove: one of them fails, and no mirror replicates to a removed peer', async (t) => {
  const daemon = await startDaemon(t, { args: ['--node-name', 'hostA'] });
  const [first, second] = await clients(t, daemon);
  for (let round = 0; round < ROUNDS; round++) {
    const volume = `vol${round}`;
    const peer = `peer${round}`;
    // A new volume each round: the race needs mirror.add to open the volume's write-intent log.
    await daemon.request('volume.add', { name: volume, device: scratchDevice(t, MiB, { forceFile: true }).path });
    await daemon.request('peer.add', { name: peer, address: '127.0.0.1:9', secretFile: secretFile(daemon, peer) });
    const [added, removed] = await Promise.all([
      settle(first.request('mirror.add', { volume, peer, target: volume })),
      settle(second.request('peer.remove', { name: peer })),
    ]);
    t.not(added.ok && removed.ok, true, `round ${round}: not both (mirror.add ${JSON.stringify(added)}, peer.remove ${JSON.stringify(removed)})`);
    if (!added.ok) t.equal(added.code, 'BM_ERR_PEER_NOT_FOUND', `round ${round}: a lost mirror.add says the peer is gone`);
    if (!removed.ok) t.equal(removed.code, 'BM_ERR_PEER_BUSY', `round ${round}: a lost peer.remove says a mirror uses the peer`);
  }
  const peers = new Set(((await daemon.request('peer.list')) as { peers: Array<{ name: string }> }).peers.map((peer) => peer.name));
  const mirrors = ((await daemon.request('mirror.list')) as { mirrors: Array<{ peer: string }> }).mirrors;
  t.same(mirrors.filter((mirror) => !peers.has(mirror.peer)), [], 'every mirror replicates to a peer that exists');
});
