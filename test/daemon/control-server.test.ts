// The control protocol's framing and validation, against an in-process ControlServer with
// handlers that record their calls. Raw sockets, so malformed input can be sent.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import pino from 'pino';
import t, { type Test } from 'tap';
import { ControlClient } from '../../src/control/client';
import { BmError } from '../../src/control/errors';
import { controlConnectionsMax, controlLineBytesMax, type VolumeInfo } from '../../src/control/protocol';
import { ControlServer, type ControlHandlers } from '../../src/control/server';
import { scratchDir } from '../helpers/loop';

const logger = pino({ level: 'silent' });

function fakeVolume(name: string): VolumeInfo {
  return {
    name,
    uuid: '00000000-0000-4000-8000-000000000000',
    fastResync: true,
    device: '/dev/null',
    readOnly: false,
    role: 'primary',
    state: 'online',
    sizeBytes: 1024,
    logicalSectorBytes: 512,
    physicalSectorBytes: 4096,
    nbdUri: `nbd+unix:///${name}?socket=/x`,
    connections: 0,
    promoted: false,
    divergence: null,
  };
}

/** peer.list waits for `promise`; `entered` counts the calls that reached the handler. */
interface Gate {
  promise: Promise<void>;
  open: () => void;
  entered: number;
}

function gate(): Gate {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open, entered: 0 };
}

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

async function startServer(t: Test, options: { peerListGate?: Gate } = {}) {
  const dir = scratchDir(t, 'bm-ctl-');
  const socketPath = path.join(dir, 'control.sock');
  const calls: Array<{ method: string; params: unknown }> = [];
  const handlers: ControlHandlers = {
    'volume.add': async (params) => {
      calls.push({ method: 'volume.add', params });
      return fakeVolume(params.name);
    },
    'volume.list': async (params) => {
      calls.push({ method: 'volume.list', params });
      return { volumes: [] };
    },
    'volume.info': async (params) => {
      calls.push({ method: 'volume.info', params });
      throw new BmError('BM_ERR_VOLUME_NOT_FOUND', `volume ${params.name} does not exist`);
    },
    'volume.remove': async (params) => {
      calls.push({ method: 'volume.remove', params });
      throw new Error('boom: a bug in a handler');
    },
    'volume.set': async (params) => {
      throw new BmError('BM_ERR_VOLUME_NOT_FOUND', `volume ${params.name} does not exist`);
    },
    'volume.promote': async (params) => {
      throw new BmError('BM_ERR_VOLUME_ROLE', `volume ${params.name} is a primary volume`);
    },
    'volume.demote': async (params) => {
      throw new BmError('BM_ERR_VOLUME_ROLE', `volume ${params.name} is not promoted`);
    },
    'peer.add': async (params) => {
      calls.push({ method: 'peer.add', params });
      return { name: params.name, address: params.address, host: '', port: 1, secretFile: params.secretFile, createdAt: '' };
    },
    'peer.list': async () => {
      if (options.peerListGate !== undefined) {
        options.peerListGate.entered++;
        await options.peerListGate.promise;
      }
      return { peers: [] };
    },
    'peer.info': async (params) => {
      throw new BmError('BM_ERR_PEER_NOT_FOUND', `peer ${params.name} does not exist`);
    },
    'peer.remove': async (params) => ({ name: params.name }),
    'mirror.add': noMirror,
    'mirror.list': async () => ({ mirrors: [] }),
    'mirror.status': noMirror,
    'mirror.remove': noMirror,
    'mirror.set': noMirror,
    'mirror.suspend': noMirror,
    'mirror.resume': noMirror,
    'mirror.reset': noMirror,
    'mirror.resolve': noMirror,
    status: async () => {
      calls.push({ method: 'status', params: {} });
      await new Promise((resolve) => setTimeout(resolve, 20));
      return { version: 'x', pid: 1, uptimeSeconds: 0, controlSocket: '', nbdSocket: '', nbdListen: null, replicationListen: null, nodeName: 'n', mirrors: 0, replicationSessions: 0, stateDir: '', peers: 0, volumes: 0, volumesInError: 0, connections: 0, ioEngine: 'x', busyPoll: { maxMicros: 0, eventPolls: 0, eventPollHits: 0, completionPolls: 0, completionPollHits: 0 } };
    },
  };
  const server = new ControlServer({ handlers, logger, socketMode: 0o660 });
  await server.listen(socketPath);
  t.teardown(() => server.close());
  return { server, socketPath, calls };
}

async function noMirror(params: { volume: string }): Promise<never> {
  throw new BmError('BM_ERR_MIRROR_NOT_FOUND', `volume ${params.volume} has no mirror`);
}

/** Send raw bytes, collect reply lines until `count` arrived or the server hung up. */
function exchange(socketPath: string, payload: string | Buffer, count: number): Promise<{ replies: any[]; closedByServer: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const replies: any[] = [];
    let buffered = '';
    let done = false;
    const finish = (closedByServer: boolean): void => {
      if (done) return;
      done = true;
      socket.destroy();
      resolve({ replies, closedByServer });
    };
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      buffered += text;
      let end: number;
      while ((end = buffered.indexOf('\n')) !== -1) {
        replies.push(JSON.parse(buffered.slice(0, end)));
        buffered = buffered.slice(end + 1);
      }
      if (replies.length >= count) setTimeout(() => finish(false), 30);
    });
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.on('error', (error) => (done ? undefined : reject(error)));
    socket.write(payload);
  });
}

t.test('socket is created with mode 0660', async (t) => {
  const { socketPath } = await startServer(t);
  const stat = fs.statSync(socketPath);
  t.ok(stat.isSocket());
  t.equal(stat.mode & 0o777, 0o660);
});

t.test('a valid request is answered with ok and the same id', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const { replies } = await exchange(socketPath, JSON.stringify({ id: 'a1', method: 'volume.add', params: { name: 'vol0', device: '/dev/loop0' } }) + '\n', 1);
  t.same(replies[0], { id: 'a1', ok: true, result: fakeVolume('vol0') });
  t.same(calls, [{ method: 'volume.add', params: { name: 'vol0', device: '/dev/loop0' } }]);
});

t.test('bad JSON gets BM_ERR_BAD_REQUEST with id null and the connection stays usable', async (t) => {
  const { socketPath } = await startServer(t);
  const { replies, closedByServer } = await exchange(socketPath, '{not json\n' + JSON.stringify({ id: 2, method: 'volume.list' }) + '\n', 2);
  t.equal(replies.length, 2);
  t.equal(replies[0].id, null);
  t.equal(replies[0].ok, false);
  t.equal(replies[0].error.code, 'BM_ERR_BAD_REQUEST');
  t.same(replies[1], { id: 2, ok: true, result: { volumes: [] } });
  t.notOk(closedByServer);
});

t.test('envelope errors: not an object, missing method, bad id type, extra field', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const lines = ['[1,2]', '{"id":3}', '{"id":{"x":1},"method":"status"}', '{"id":4,"method":"status","extra":true}'];
  const { replies } = await exchange(socketPath, lines.join('\n') + '\n', 4);
  t.equal(replies.length, 4);
  for (const reply of replies) t.equal(reply.error.code, 'BM_ERR_BAD_REQUEST', JSON.stringify(reply));
  t.equal(replies[1].id, 3, 'a readable id is echoed even when the request is bad');
  t.match(replies[1].error.message, /method/);
  t.match(replies[3].error.message, /extra/);
  t.equal(calls.length, 0);
});

t.test('unknown method', async (t) => {
  const { socketPath } = await startServer(t);
  const { replies } = await exchange(socketPath, '{"id":5,"method":"volume.frobnicate","params":{}}\n', 1);
  t.same(replies[0].error.code, 'BM_ERR_UNKNOWN_METHOD');
  t.match(replies[0].error.message, /volume\.frobnicate/);
  t.equal(replies[0].id, 5);
});

t.test('invalid params name the field and never reach the handler', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const requests = [
    { id: 1, method: 'volume.add', params: { name: 'bad name!', device: '/dev/loop0' } },
    { id: 2, method: 'volume.add', params: { name: 'v', device: 'relative/path' } },
    { id: 3, method: 'volume.add', params: { name: 'v', device: '/dev/loop0', readOnly: 'yes' } },
    { id: 4, method: 'volume.remove', params: { name: 'v', force: 1 } },
    { id: 5, method: 'volume.info', params: {} },
    { id: 6, method: 'volume.info', params: { name: 'v', bogus: 1 } },
    { id: 7, method: 'volume.add', params: { name: 'x'.repeat(65), device: '/dev/loop0' } },
  ];
  const { replies } = await exchange(socketPath, requests.map((r) => JSON.stringify(r)).join('\n') + '\n', requests.length);
  t.equal(replies.length, requests.length);
  const expectedField = ['name', 'device', 'readOnly', 'force', 'name', 'bogus', 'name'];
  replies.forEach((reply, index) => {
    t.equal(reply.id, index + 1);
    t.equal(reply.error.code, 'BM_ERR_INVALID_ARGUMENT');
    t.match(reply.error.message, new RegExp(`^${expectedField[index]}: `), reply.error.message);
  });
  t.equal(calls.length, 0);
});

t.test('handler errors: BmError keeps its code, anything else is BM_ERR_INTERNAL', async (t) => {
  const { socketPath } = await startServer(t);
  const { replies } = await exchange(socketPath, '{"id":1,"method":"volume.info","params":{"name":"nope"}}\n{"id":2,"method":"volume.remove","params":{"name":"v"}}\n', 2);
  t.same(replies[0], { id: 1, ok: false, error: { code: 'BM_ERR_VOLUME_NOT_FOUND', message: 'volume nope does not exist' } });
  t.equal(replies[1].error.code, 'BM_ERR_INTERNAL');
});

t.test('pipelined requests are answered in order', async (t) => {
  const { socketPath } = await startServer(t);
  const lines = Array.from({ length: 200 }, (_, index) => JSON.stringify({ id: index, method: index % 20 === 0 ? 'status' : 'volume.list' }));
  const { replies } = await exchange(socketPath, lines.join('\n') + '\n', 200);
  t.same(replies.map((reply) => reply.id), lines.map((_, index) => index));
  t.ok(replies.every((reply) => reply.ok));
});

t.test('a line over the limit gets BM_ERR_LINE_TOO_LONG and the connection is closed', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const before = JSON.stringify({ id: 1, method: 'volume.list' }) + '\n';
  const oversize = Buffer.alloc(controlLineBytesMax + 10, 'a');
  const { replies, closedByServer } = await exchange(socketPath, Buffer.concat([Buffer.from(before), oversize]), 2);
  t.equal(replies.length, 2);
  t.same(replies[0], { id: 1, ok: true, result: { volumes: [] } }, 'the complete line before it is still answered');
  t.equal(replies[1].id, null);
  t.equal(replies[1].error.code, 'BM_ERR_LINE_TOO_LONG');
  t.ok(closedByServer);
  t.equal(calls.length, 1);
});

t.test('a line of exactly the limit is accepted (and rejected as JSON, not as too long)', async (t) => {
  const { socketPath } = await startServer(t);
  const { replies } = await exchange(socketPath, Buffer.concat([Buffer.alloc(controlLineBytesMax, 'a'), Buffer.from('\n')]), 1);
  t.equal(replies[0].error.code, 'BM_ERR_BAD_REQUEST');
});

t.test('ControlClient maps replies and errors', async (t) => {
  const { socketPath } = await startServer(t);
  const client = await ControlClient.connect({ socketPath, timeoutMs: 5000 });
  t.teardown(() => client.close());
  t.same(await client.request('volume.list', {}), { volumes: [] });
  await t.rejects(client.request('volume.info', { name: 'nope' }), { code: 'BM_ERR_VOLUME_NOT_FOUND' });
  await t.rejects(client.request('nope.method', {}), { code: 'BM_ERR_UNKNOWN_METHOD' });
});

t.test('ControlClient: unreachable socket is BM_ERR_DAEMON_UNREACHABLE', async (t) => {
  const dir = scratchDir(t, 'bm-ctl-');
  await t.rejects(ControlClient.connect({ socketPath: path.join(dir, 'absent.sock'), timeoutMs: 1000 }), { code: 'BM_ERR_DAEMON_UNREACHABLE' });
});

t.test('a second server refuses a live socket path; a stale one is replaced', async (t) => {
  const { socketPath } = await startServer(t);
  const second = new ControlServer({ handlers: {} as ControlHandlers, logger, socketMode: 0o660 });
  await t.rejects(second.listen(socketPath), { code: 'BM_ERR_SOCKET_IN_USE' });

  const dir = scratchDir(t, 'bm-ctl-');
  const stalePath = path.join(dir, 'stale.sock');
  // A socket file whose listener is gone (what a SIGKILLed daemon leaves behind).
  execFileSync('python3', ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()', stalePath]);
  t.ok(fs.lstatSync(stalePath).isSocket());
  const third = new ControlServer({ handlers: {} as ControlHandlers, logger, socketMode: 0o660 });
  await third.listen(stalePath);
  t.teardown(() => third.close());
  t.ok(fs.lstatSync(stalePath).isSocket());

  const regular = path.join(dir, 'regular-file');
  fs.writeFileSync(regular, 'keep me');
  const fourth = new ControlServer({ handlers: {} as ControlHandlers, logger, socketMode: 0o660 });
  await t.rejects(fourth.listen(regular), { code: 'BM_ERR_SOCKET_PATH' });
  t.equal(fs.readFileSync(regular, 'utf8'), 'keep me');
});

t.test('close() removes the socket file and answers nothing more', async (t) => {
  const dir = scratchDir(t, 'bm-ctl-');
  const socketPath = path.join(dir, 'c.sock');
  const server = new ControlServer({ handlers: {} as ControlHandlers, logger, socketMode: 0o660 });
  await server.listen(socketPath);
  await server.close();
  t.notOk(fs.existsSync(socketPath));
});

/** `count` connections to the server, each answered once (so the server has accepted it). */
async function openConnections(t: Test, socketPath: string, count: number): Promise<Array<{ client: ControlClient; closed: boolean }>> {
  const open: Array<{ client: ControlClient; closed: boolean }> = [];
  for (let index = 0; index < count; index++) {
    const client = await ControlClient.connect({ socketPath, timeoutMs: 5000 });
    t.teardown(() => client.close());
    const entry = { client, closed: false };
    (client as unknown as { socket: net.Socket }).socket.once('close', () => (entry.closed = true));
    await client.request('volume.list', {});
    open.push(entry);
  }
  return open;
}

t.test(`at ${controlConnectionsMax} idle connections a new one is served and the one idle longest is closed`, async (t) => {
  const { socketPath } = await startServer(t);
  const idle = await openConnections(t, socketPath, controlConnectionsMax);
  // Activity on the first makes the second the one idle longest.
  await idle[0]!.client.request('volume.list', {});
  const admin = await ControlClient.connect({ socketPath, timeoutMs: 5000 });
  t.teardown(() => admin.close());
  t.same(await admin.request('volume.list', {}), { volumes: [] }, 'the admin gets an answer');
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.same(
    idle.flatMap((entry, index) => (entry.closed ? [index] : [])),
    [1],
    'exactly the connection idle longest was closed',
  );
  t.same(await idle[0]!.client.request('volume.list', {}), { volumes: [] }, 'the others still work');
});

/** A raw connection that sends `line` only after `delayMs` (as a slow CLI would), and collects
 *  what the server answers until it hangs up. */
function slowRequest(socketPath: string, line: string, delayMs: number): Promise<{ text: string; writeError: string | null }> {
  return new Promise((resolve) => {
    // allowHalfOpen: like a client busy elsewhere, it does not react to the server's FIN before
    // it writes; it hangs up after writing.
    const socket = net.connect({ path: socketPath, allowHalfOpen: true });
    let text = '';
    let writeError: string | null = null;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => (text += chunk));
    socket.on('error', (error: NodeJS.ErrnoException) => (writeError = error.code ?? error.message));
    socket.on('close', () => resolve({ text, writeError }));
    socket.once('connect', () => setTimeout(() => socket.end(line), delayMs));
  });
}

t.test(`when all ${controlConnectionsMax} connections have a request running, a new one gets BM_ERR_TOO_MANY_CONNECTIONS`, async (t) => {
  const running = gate();
  const { socketPath } = await startServer(t, { peerListGate: running });
  const busy = await openConnections(t, socketPath, controlConnectionsMax);
  const requests = busy.map((entry) => entry.client.request('peer.list', {}));
  await until(() => running.entered === controlConnectionsMax, 'every request in its handler');
  // The client writes its request 100 ms after connecting, after the server already answered.
  const refused = await slowRequest(socketPath, JSON.stringify({ id: 1, method: 'volume.list' }) + '\n', 100);
  t.equal(refused.writeError, null, 'the late request could still be written');
  t.same(JSON.parse(refused.text), { id: null, ok: false, error: { code: 'BM_ERR_TOO_MANY_CONNECTIONS', message: `${controlConnectionsMax} control connections are busy; try again` } });
  const late = await ControlClient.connect({ socketPath, timeoutMs: 5000 });
  t.teardown(() => late.close());
  await t.rejects(late.request('volume.list', {}), { code: 'BM_ERR_TOO_MANY_CONNECTIONS' }, 'ControlClient reports the code');
  running.open();
  t.same(await Promise.all(requests), busy.map(() => ({ peers: [] })), 'the running requests all finish');
  t.notOk(busy.some((entry) => entry.closed), 'no busy connection was closed');
});

t.test('a connection that has not sent its first request yet is not closed for a newer one', async (t) => {
  const running = gate();
  const { socketPath } = await startServer(t, { peerListGate: running });
  const busy = await openConnections(t, socketPath, controlConnectionsMax - 1);
  const requests = busy.map((entry) => entry.client.request('peer.list', {}));
  await until(() => running.entered === controlConnectionsMax - 1, 'every request in its handler');
  const fresh = slowRequest(socketPath, JSON.stringify({ id: 'fresh', method: 'volume.list' }) + '\n', 300);
  await new Promise((resolve) => setTimeout(resolve, 50)); // connected, nothing sent yet
  const newer = await slowRequest(socketPath, JSON.stringify({ id: 'newer', method: 'volume.list' }) + '\n', 0);
  t.match(newer.text, /BM_ERR_TOO_MANY_CONNECTIONS/, 'the newer connection is refused');
  const served = await fresh;
  t.same(JSON.parse(served.text), { id: 'fresh', ok: true, result: { volumes: [] } }, 'the fresh connection kept its slot and was served');
  running.open();
  await Promise.all(requests);
});

t.test('pipelined requests still queued at shutdown are each answered with BM_ERR_SHUTTING_DOWN', async (t) => {
  const running = gate();
  const { server, socketPath } = await startServer(t, { peerListGate: running });
  const socket = net.connect(socketPath);
  t.teardown(() => socket.destroy());
  const replies: any[] = [];
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (text: string) => {
    buffered += text;
    for (let end = buffered.indexOf('\n'); end !== -1; end = buffered.indexOf('\n')) {
      replies.push(JSON.parse(buffered.slice(0, end)));
      buffered = buffered.slice(end + 1);
    }
  });
  const closedByServer = new Promise((resolve) => socket.once('close', resolve));
  socket.write(JSON.stringify({ id: 1, method: 'peer.list' }) + '\n');
  await until(() => running.entered === 1, 'the first request in its handler');
  // Sent while the first runs, in a write of its own.
  socket.write([{ id: 2, method: 'volume.list' }, { id: 3, method: 'status' }].map((request) => JSON.stringify(request) + '\n').join(''));
  await new Promise((resolve) => setTimeout(resolve, 50));
  const closed = server.close();
  running.open();
  await closed;
  await closedByServer;
  t.same(replies[0], { id: 1, ok: true, result: { peers: [] } }, 'the running request finishes');
  t.same(
    replies.slice(1).map((reply) => [reply.id, reply.error?.code]),
    [
      [2, 'BM_ERR_SHUTTING_DOWN'],
      [3, 'BM_ERR_SHUTTING_DOWN'],
    ],
    'the queued ones are refused, each by id',
  );
});

t.test('a client refused for a too-long line that never hangs up does not keep its slot', async (t) => {
  const { socketPath } = await startServer(t);
  const socket = net.connect({ path: socketPath, allowHalfOpen: true }); // does not end when the server does
  t.teardown(() => socket.destroy());
  socket.on('data', () => undefined);
  const failed = new Promise<string>((resolve) => socket.on('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message)));
  socket.write(Buffer.alloc(controlLineBytesMax + 10, 'a'));
  await new Promise((resolve) => setTimeout(resolve, 2500));
  // The server closed its end: a write now fails instead of filling a buffer nobody reads.
  socket.write('{"id":1,"method":"status"}\n');
  const code = await Promise.race([failed, new Promise<string>((resolve) => setTimeout(() => resolve('no error: the server still holds the connection'), 2000))]);
  t.equal(code, 'EPIPE');
});
