import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import t, { type Test } from 'tap';

import {
  authenticate,
  computeAuthMac,
  readSecretFile,
  verifyAuthMac,
  type AuthOptions,
  type AuthTranscript,
} from '../../src/wire/auth';
import { FrameChannel } from '../../src/wire/channel';
import { encodeFrame } from '../../src/wire/frame';
import { wireMessage } from '../../src/wire/messages';

const SECRET = Buffer.from('correct horse battery staple 42');
const OTHER = Buffer.from('a different secret of 32 bytes!!');

/** A connected TCP pair on 127.0.0.1 (port 0); both ends are destroyed at teardown. */
async function socketPair(t: Test): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect(port, '127.0.0.1');
  const serverSide = await accepted;
  server.close(); // stops listening; its callback would wait for these sockets to end
  t.teardown(() => {
    client.destroy();
    serverSide.destroy();
  });
  return [client, serverSide];
}

function options(role: AuthOptions['role'], nodeName: string, secrets: Record<string, Buffer>): AuthOptions {
  return { role, nodeName, secretForPeer: (peer) => secrets[peer], timeoutMs: 2000 };
}

t.test('both sides authenticate with the same secret', async (t) => {
  const [a, b] = await socketPair(t);
  const [initiator, responder] = await Promise.all([
    authenticate(new FrameChannel(a), options('initiator', 'hostA', { hostB: SECRET })),
    authenticate(new FrameChannel(b), options('responder', 'hostB', { hostA: SECRET })),
  ]);
  t.equal(initiator.peerName, 'hostB');
  t.equal(responder.peerName, 'hostA');
});

t.test('a frame sent right after authentication stays on the channel', async (t) => {
  const [a, b] = await socketPair(t);
  const initiatorChannel = new FrameChannel(a);
  const responderChannel = new FrameChannel(b);
  const responding = authenticate(responderChannel, options('responder', 'hostB', { hostA: SECRET }));
  await authenticate(initiatorChannel, options('initiator', 'hostA', { hostB: SECRET }));
  initiatorChannel.send(wireMessage('flush', { sequence: 1 }));
  await responding;
  const frame = await responderChannel.receive();
  t.same(frame.message, { kind: 'flush', body: { sequence: 1 } });
});

for (const wrongSide of ['initiator', 'responder'] as const) {
  t.test(`wrong secret on the ${wrongSide} fails on both sides`, async (t) => {
    const [a, b] = await socketPair(t);
    const results = await Promise.allSettled([
      authenticate(new FrameChannel(a), options('initiator', 'hostA', { hostB: wrongSide === 'initiator' ? OTHER : SECRET })),
      authenticate(new FrameChannel(b), options('responder', 'hostB', { hostA: wrongSide === 'responder' ? OTHER : SECRET })),
    ]);
    for (const result of results) {
      t.equal(result.status, 'rejected');
      if (result.status === 'rejected') t.equal((result.reason as { code: string }).code, 'BM_ERR_AUTH_FAILED');
    }
  });
}

t.test('an unknown peer is refused on both sides', async (t) => {
  const [a, b] = await socketPair(t);
  const [initiator, responder] = await Promise.allSettled([
    authenticate(new FrameChannel(a), options('initiator', 'intruder', { hostB: SECRET })),
    authenticate(new FrameChannel(b), options('responder', 'hostB', { hostA: SECRET })),
  ]);
  t.match(responder, { status: 'rejected', reason: { code: 'BM_ERR_AUTH_UNKNOWN_PEER', peerName: 'intruder' } });
  t.match(initiator, { status: 'rejected', reason: { code: 'BM_ERR_AUTH_UNKNOWN_PEER' } });
});

t.test('reflection: a fake responder that echoes our challenge and MAC fails', async (t) => {
  // Echoing the nonce is refused outright.
  {
    const [a, b] = await socketPair(t);
    const fake = new FrameChannel(b);
    const initiating = authenticate(new FrameChannel(a), options('initiator', 'hostA', { hostA: SECRET }));
    const challenge = await fake.receive();
    fake.send(challenge.message);
    await t.rejects(initiating, { code: 'BM_ERR_AUTH_FAILED' });
  }
  // With a fresh nonce, sending back the initiator's own MAC fails: the role differs.
  {
    const [a, b] = await socketPair(t);
    const fake = new FrameChannel(b);
    const initiating = authenticate(new FrameChannel(a), options('initiator', 'hostA', { hostA: SECRET }));
    const challenge = await fake.receive();
    t.equal(challenge.message.kind, 'authChallenge');
    fake.send(wireMessage('authChallenge', { nodeName: 'hostA', nonce: crypto.randomBytes(32) }));
    const response = await fake.receive();
    t.equal(response.message.kind, 'authResponse');
    fake.send(response.message);
    await t.rejects(initiating, { code: 'BM_ERR_AUTH_FAILED' });
    const told = await fake.receive();
    t.match(told.message, { kind: 'error', body: { code: 'ERROR_CODE_AUTH_FAILED' } }, 'the peer is told why');
  }
});

t.test('the MAC binds role, nonces and names', async (t) => {
  const transcript: AuthTranscript = {
    initiatorName: 'hostA',
    responderName: 'hostB',
    initiatorNonce: crypto.randomBytes(32),
    responderNonce: crypto.randomBytes(32),
  };
  const mac = computeAuthMac(SECRET, 'initiator', transcript);
  t.ok(verifyAuthMac(SECRET, 'initiator', transcript, mac));
  t.notOk(verifyAuthMac(SECRET, 'responder', transcript, mac), 'role');
  t.notOk(verifyAuthMac(OTHER, 'initiator', transcript, mac), 'secret');
  t.notOk(verifyAuthMac(SECRET, 'initiator', { ...transcript, responderName: 'hostC' }, mac), 'name');
  const swapped = { ...transcript, initiatorNonce: transcript.responderNonce, responderNonce: transcript.initiatorNonce };
  t.notOk(verifyAuthMac(SECRET, 'initiator', swapped, mac), 'nonce order');
  t.notOk(verifyAuthMac(SECRET, 'initiator', transcript, mac.subarray(0, 16)), 'short MAC');
});

t.test('a silent peer times out', async (t) => {
  const [a] = await socketPair(t);
  const started = Date.now();
  await t.rejects(
    authenticate(new FrameChannel(a), { ...options('initiator', 'hostA', { hostB: SECRET }), timeoutMs: 100 }),
    { code: 'BM_ERR_AUTH_TIMEOUT' },
  );
  t.ok(Date.now() - started < 1500);
});

t.test('a peer that hangs up mid-exchange is a closed stream', async (t) => {
  const [a, b] = await socketPair(t);
  const initiating = authenticate(new FrameChannel(a), options('initiator', 'hostA', { hostB: SECRET }));
  b.destroy();
  await t.rejects(initiating, { code: 'BM_ERR_WIRE_CLOSED' });
});

t.test('readSecretFile', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-secret-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const write = (name: string, content: string, mode: number): string => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, content, { mode });
    fs.chmodSync(file, mode);
    return file;
  };
  t.same(readSecretFile(write('ok', 'sixteen-bytes-ok\n', 0o600)), Buffer.from('sixteen-bytes-ok'));
  t.same(readSecretFile(write('crlf', 'sixteen-bytes-ok\r\n', 0o400)), Buffer.from('sixteen-bytes-ok'));
  t.throws(() => readSecretFile(write('short', 'too-short\n', 0o600)), { code: 'BM_ERR_AUTH_SECRET_FILE' });
  t.throws(() => readSecretFile(write('empty', '', 0o600)), { code: 'BM_ERR_AUTH_SECRET_FILE' });
  t.throws(() => readSecretFile(write('open', 'sixteen-bytes-ok', 0o644)), { code: 'BM_ERR_AUTH_SECRET_FILE' });
  t.throws(() => readSecretFile(write('big', 'x'.repeat(5000), 0o600)), { code: 'BM_ERR_AUTH_SECRET_FILE' });
  t.throws(() => readSecretFile(path.join(dir, 'missing')), { code: 'ENOENT' });
});

t.test('an initiator refuses a different registered peer answering at the address it dialled', async (t) => {
  const [a, b] = await socketPair(t);
  // hostA knows both hostB and hostC, dials hostB, but hostC (which also shares a secret with
  // hostA) answers: refused before any MAC is computed.
  const results = await Promise.allSettled([
    authenticate(new FrameChannel(a), { ...options('initiator', 'hostA', { hostB: SECRET, hostC: OTHER }), expectedPeerName: 'hostB' }),
    authenticate(new FrameChannel(b), options('responder', 'hostC', { hostA: OTHER })),
  ]);
  t.equal(results[0].status, 'rejected');
  if (results[0].status === 'rejected') t.equal((results[0].reason as { code: string }).code, 'BM_ERR_AUTH_UNKNOWN_PEER');
  t.equal(results[1].status, 'rejected', 'the responder does not get through either');
});

t.test('a peer cannot send payload data before it has authenticated', async (t) => {
  const [a, b] = await socketPair(t);
  const responding = authenticate(new FrameChannel(b), options('responder', 'hostB', { hostA: SECRET }));
  // Instead of a challenge, the "initiator" sends a 1 MiB write frame.
  const payload = Buffer.alloc(1024 * 1024, 1);
  for (const buffer of encodeFrame(wireMessage('write', { sequence: 1, offsetBytes: 0, lengthBytes: payload.length, flags: 0 }), payload)) {
    a.write(buffer);
  }
  await t.rejects(responding, { code: 'BM_ERR_WIRE_PAYLOAD_TOO_LARGE' });
});
