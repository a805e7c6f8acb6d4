// How a connection ends: every request the server received is answered before it closes
// (proto.md, NBD_CMD_DISC: "The server MUST handle all outstanding requests ... and close"),
// whether the client half-closes right after DISC (libnbd does) or reads its replies slowly.
import t from 'tap';
import * as P from '../../src/nbd/protocol';
import { NbdTestClient } from '../helpers/nbd-client';
import { deferred, MiB, startServer } from './fixture';

const SIZE = 8 * MiB;

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) data[i] = (i * 13 + seed) & 0xff;
  return data;
}

for (const halfClose of [false, true]) {
  const how = halfClose ? 'then half-closes (FIN)' : 'and keeps its side open';
  t.test(`DISC with requests in flight ${how}: every request is answered, then the server closes`, async (t) => {
    const fx = await startServer(t, [{ name: 'vol0', sizeBytes: SIZE }]);
    const backend = fx.backends.get('vol0')!;
    backend.data.set(pattern(SIZE, 3));
    const gate = deferred();
    backend.hook = () => gate.promise;
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
    const payload = pattern(4096, 9);
    const cookies = [
      client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 }),
      client.send({ type: P.NBD_CMD_READ, offsetBytes: 65536, lengthBytes: 8192 }),
      client.send({ type: P.NBD_CMD_WRITE, offsetBytes: MiB, payload }),
      client.send({ type: P.NBD_CMD_FLUSH }),
    ];
    client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_DISC }, 99n));
    if (halfClose) client.socket.end();
    await new Promise((resolve) => setTimeout(resolve, 50));
    gate.resolve();
    const replies = [];
    for (let i = 0; i < cookies.length; i++) replies.push(await client.readReply());
    t.same(
      replies.map((reply) => reply.cookie).sort(),
      [...cookies].sort(),
      'a reply for every request sent before DISC',
    );
    t.ok(replies.every((reply) => reply.error === 0), 'all of them succeeded');
    t.ok(replies.find((reply) => reply.cookie === cookies[0])?.data?.equals(pattern(SIZE, 3).subarray(0, 4096)), 'the read carries its data');
    t.ok(backend.data.subarray(MiB, MiB + 4096).equals(payload), 'the write reached the backend');
    await client.closed;
    t.equal(client.unreadBytes, 0, 'nothing after the replies');
  });
}

t.test('a client that half-closes in the middle of a WRITE payload: the partial write is dropped, earlier requests answered', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: SIZE }]);
  const backend = fx.backends.get('vol0')!;
  const gate = deferred();
  backend.hook = () => gate.promise;
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
  const read = client.send({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 });
  const header = NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: 65536 }, 7n);
  client.write(Buffer.concat([header, Buffer.alloc(1000, 0xee)]));
  client.socket.end();
  await new Promise((resolve) => setTimeout(resolve, 50));
  gate.resolve();
  const reply = await client.readReply();
  t.equal(reply.cookie, read, 'the read is answered');
  t.equal(reply.error, 0);
  await client.closed;
  t.equal(client.unreadBytes, 0, 'the incomplete write gets no reply');
  t.notOk(backend.calls.some((call) => call.op === 'write'), 'the incomplete write never reached the backend');
});

t.test('replies still queued when the client stops reading survive a pause longer than the close linger', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: SIZE }]);
  const backend = fx.backends.get('vol0')!;
  backend.data.set(pattern(SIZE, 5));
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0');
  // 8 MiB of replies: far more than the socket buffers hold, so most wait in the server.
  client.socket.pause();
  const cookies = [0, 1, 2, 3].map((i) => client.send({ type: P.NBD_CMD_READ, offsetBytes: i * 2 * MiB, lengthBytes: 2 * MiB }));
  client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_DISC }, 99n));
  // Longer than the 1 s linger the server allows after its last reply is written.
  await new Promise((resolve) => setTimeout(resolve, 1500));
  client.socket.resume();
  for (const cookie of cookies) {
    const reply = await client.readReply();
    t.equal(reply.cookie, cookie, `reply ${cookie} in order`);
    const i = Number(cookie) - 1;
    t.ok(reply.data?.equals(pattern(SIZE, 5).subarray(i * 2 * MiB, (i + 1) * 2 * MiB)), `reply ${cookie} carries all its data`);
  }
  await client.closed;
});

t.test('a failed NBD_OPT_SET_META_CONTEXT clears the earlier selection (proto.md: "including when this command fails")', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: SIZE }]);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  t.equal((await client.option(P.NBD_OPT_STRUCTURED_REPLY)).type, P.NBD_REP_ACK);
  const selected = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'vol0', [P.BASE_ALLOCATION]);
  t.equal(selected[0]?.type, P.NBD_REP_META_CONTEXT, 'base:allocation selected');
  const failed = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'nosuch', [P.BASE_ALLOCATION]);
  t.equal(failed.at(-1)?.type, P.NBD_REP_ERR_UNKNOWN, 'the second SET fails: no such export');
  const go = await client.go('vol0');
  t.equal(go.replies.at(-1)?.type, P.NBD_REP_ACK);
  const status = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 0, lengthBytes: 4096 });
  t.equal(status.error, P.NBD_EINVAL, 'BLOCK_STATUS finds no context selected');
  await client.disconnect();
});

t.test('an unknown option with more data than any known one takes is unsupported, not too big', async (t) => {
  const fx = await startServer(t, [{ name: 'vol0', sizeBytes: SIZE }]);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const unknown = await client.option(0x7ffe, Buffer.alloc(100 * 1024, 1));
  t.equal(unknown.type, P.NBD_REP_ERR_UNSUP, 'unknown option: ERR_UNSUP');
  const known = await client.option(P.NBD_OPT_LIST, Buffer.alloc(100 * 1024, 1));
  t.equal(known.type, P.NBD_REP_ERR_TOO_BIG, 'a served option with too much data: ERR_TOO_BIG');
  const go = await client.go('vol0');
  t.equal(go.replies.at(-1)?.type, P.NBD_REP_ACK, 'haggling goes on');
  await client.disconnect();
});
