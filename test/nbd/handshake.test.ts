import t from 'tap';
import * as P from '../../src/nbd/protocol';
import { NbdTestClient } from '../helpers/nbd-client';
import { MiB, startServer, waitFor } from './fixture';

const EXPECTED_FLAGS =
  P.NBD_FLAG_HAS_FLAGS |
  P.NBD_FLAG_SEND_FLUSH |
  P.NBD_FLAG_SEND_FUA |
  P.NBD_FLAG_SEND_TRIM |
  P.NBD_FLAG_SEND_WRITE_ZEROES |
  P.NBD_FLAG_SEND_FAST_ZERO |
  P.NBD_FLAG_SEND_CACHE |
  P.NBD_FLAG_CAN_MULTI_CONN;

const EXPORTS = [
  { name: 'vol0', description: 'first volume', sizeBytes: MiB },
  { name: 'ro', description: 'read-only volume', sizeBytes: MiB, readOnly: true },
];

t.test('greeting advertises fixed newstyle and no zeroes', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  t.equal(await client.readGreeting(), P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  client.destroy();
});

t.test('client without NBD_FLAG_C_FIXED_NEWSTYLE is refused', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.readGreeting();
  client.sendClientFlags(P.NBD_FLAG_C_NO_ZEROES);
  await client.closed;
  t.ok(fx.logs.some((l) => l.msg.includes('protocol violation') && String(l.reason).includes('FIXED_NEWSTYLE')));
});

t.test('unknown client flag bits are refused', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.readGreeting();
  client.sendClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
  await client.closed;
  t.ok(client.isClosed);
});

t.test('option with bad magic drops the connection', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  client.write(Buffer.alloc(16, 0x55));
  await client.closed;
  t.ok(fx.logs.some((l) => String(l.reason).includes('IHAVEOPT')));
});

t.test('unknown option gets ERR_UNSUP and haggling continues to OPT_GO', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const unsup = await client.option(999, Buffer.from('ignored payload'));
  t.equal(unsup.type, P.NBD_REP_ERR_UNSUP);
  t.equal(unsup.option, 999);
  const starttls = await client.option(P.NBD_OPT_STARTTLS);
  t.equal(starttls.type, P.NBD_REP_ERR_UNSUP);
  const go = await client.go('vol0');
  t.equal(go.sizeBytes, MiB);
  t.equal(go.transmissionFlags, EXPECTED_FLAGS);
  const reply = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
  t.equal(reply.error, 0);
  t.equal(reply.data?.length, 512);
  await client.disconnect();
});

t.test('OPT_LIST lists every export with its description', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  client.sendOption(P.NBD_OPT_LIST);
  const replies = await client.readOptionReplies();
  t.same(
    replies.map((r) => r.type),
    [P.NBD_REP_SERVER, P.NBD_REP_SERVER, P.NBD_REP_ACK],
  );
  const entries = replies.slice(0, 2).map((r) => {
    const nameBytes = r.data.readUInt32BE(0);
    return [r.data.toString('utf8', 4, 4 + nameBytes), r.data.toString('utf8', 4 + nameBytes)];
  });
  t.same(entries, [
    ['vol0', 'first volume'],
    ['ro', 'read-only volume'],
  ]);
  const invalid = await client.option(P.NBD_OPT_LIST, Buffer.from('x'));
  t.equal(invalid.type, P.NBD_REP_ERR_INVALID);
  client.destroy();
});

t.test('OPT_INFO reports export, name, description and block sizes', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const info = await client.go('ro', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE], P.NBD_OPT_INFO);
  t.equal(info.sizeBytes, MiB);
  t.equal(info.transmissionFlags, EXPECTED_FLAGS | P.NBD_FLAG_READ_ONLY);
  t.equal(info.name, 'ro');
  t.equal(info.description, 'read-only volume');
  t.same(info.blockSize, { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * MiB });
  // Block size is sent even when not asked for; INFO does not leave negotiation.
  const plain = await client.go('vol0', [], P.NBD_OPT_INFO);
  t.ok(plain.blockSize);
  t.notOk(plain.name);
  const go = await client.go('vol0');
  t.equal(go.sizeBytes, MiB);
  await client.disconnect();
});

t.test('unknown export: INFO/GO get ERR_UNKNOWN, the default export too', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const info = await client.go('nope', [], P.NBD_OPT_INFO);
  t.equal(info.replies.at(-1)?.type, P.NBD_REP_ERR_UNKNOWN);
  t.match(info.replies.at(-1)?.data.toString(), /nope/);
  const go = await client.go('');
  t.equal(go.replies.at(-1)?.type, P.NBD_REP_ERR_UNKNOWN);
  const ok = await client.go('vol0');
  t.equal(ok.sizeBytes, MiB);
  await client.disconnect();
});

t.test('malformed OPT_GO data gets ERR_INVALID', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const short = await client.option(P.NBD_OPT_GO, Buffer.alloc(3));
  t.equal(short.type, P.NBD_REP_ERR_INVALID);
  const data = NbdTestClient.goData('vol0', [P.NBD_INFO_NAME]);
  const truncated = await client.option(P.NBD_OPT_GO, data.subarray(0, data.length - 1));
  t.equal(truncated.type, P.NBD_REP_ERR_INVALID);
  const badName = Buffer.alloc(10);
  badName.writeUInt32BE(1000, 0);
  t.equal((await client.option(P.NBD_OPT_GO, badName)).type, P.NBD_REP_ERR_INVALID);
  client.destroy();
});

for (const noZeroes of [true, false]) {
  t.test(`OPT_EXPORT_NAME enters transmission (NO_ZEROES ${noZeroes})`, async (t) => {
    const fx = await startServer(t, EXPORTS);
    const client = await NbdTestClient.connect(fx.socketPath);
    await client.startFixedNewstyle(noZeroes);
    client.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('vol0'));
    const reply = await client.read(noZeroes ? 10 : 134);
    t.equal(Number(reply.readBigUInt64BE(0)), MiB);
    t.equal(reply.readUInt16BE(8), EXPECTED_FLAGS);
    if (!noZeroes) t.ok(reply.subarray(10).equals(Buffer.alloc(124)));
    fx.backends.get('vol0')!.data.fill(7, 0, 4096);
    const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 });
    t.ok(read.data?.equals(Buffer.alloc(4096, 7)));
    t.equal(fx.server.connectionCount('vol0'), 1);
    await client.disconnect();
    await waitFor(() => fx.server.connectionCount() === 0);
  });
}

t.test('OPT_EXPORT_NAME of an unknown export terminates the session', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  client.sendOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('missing'));
  await client.closed;
  t.equal(client.unreadBytes, 0);
  t.ok(fx.logs.some((l) => String(l.reason).includes('missing')));
});

t.test('OPT_ABORT is acknowledged and the connection closes', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const reply = await client.option(P.NBD_OPT_ABORT);
  t.equal(reply.type, P.NBD_REP_ACK);
  client.socket.end();
  await client.closed;
});

t.test('a client haggling while the server closes gets NBD_REP_ERR_SHUTDOWN to its options, may abort, and is cut off after a grace', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const polite = await NbdTestClient.connect(fx.socketPath);
  await polite.startFixedNewstyle();
  const silent = await NbdTestClient.connect(fx.socketPath);
  await silent.startFixedNewstyle();
  const started = Date.now();
  const closed = fx.server.close();
  const list = await polite.option(P.NBD_OPT_LIST);
  t.equal(list.type, P.NBD_REP_ERR_SHUTDOWN, 'NBD_OPT_LIST: ERR_SHUTDOWN');
  const go = await polite.option(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 4, 0x76, 0x6f, 0x6c, 0x30, 0, 0]));
  t.equal(go.type, P.NBD_REP_ERR_SHUTDOWN, 'NBD_OPT_GO: ERR_SHUTDOWN, no transmission');
  const abort = await polite.option(P.NBD_OPT_ABORT);
  t.equal(abort.type, P.NBD_REP_ACK, 'NBD_OPT_ABORT is still acknowledged');
  polite.socket.end();
  await polite.closed;
  await silent.closed; // sends nothing: closed by the grace
  await closed;
  const tookMs = Date.now() - started;
  t.ok(tookMs >= 1500 && tookMs < 5000, `close() waited for the silent client's grace, bounded (${tookMs} ms)`);
});

t.test('structured replies and meta contexts', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();

  const early = await client.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'vol0', []);
  t.equal(early.at(-1)?.type, P.NBD_REP_ERR_INVALID, 'meta contexts need structured replies first');
  const earlySet = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'vol0', [P.BASE_ALLOCATION]);
  t.equal(earlySet.at(-1)?.type, P.NBD_REP_ERR_INVALID);

  t.equal((await client.option(P.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x'))).type, P.NBD_REP_ERR_INVALID);
  t.equal((await client.option(P.NBD_OPT_STRUCTURED_REPLY)).type, P.NBD_REP_ACK);

  const listAll = await client.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'vol0', []);
  t.same(
    listAll.map((r) => r.type),
    [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK],
  );
  t.equal(listAll[0]!.data.readUInt32BE(0), 0, 'LIST replies carry context id 0');
  t.equal(listAll[0]!.data.toString('utf8', 4), P.BASE_ALLOCATION);
  const listNamespace = await client.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'vol0', ['base:']);
  t.equal(listNamespace[0]!.type, P.NBD_REP_META_CONTEXT);
  const listOther = await client.metaContext(P.NBD_OPT_LIST_META_CONTEXT, 'vol0', ['qemu:dirty-bitmap:x']);
  t.same(
    listOther.map((r) => r.type),
    [P.NBD_REP_ACK],
  );
  const unknownExport = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'nope', [P.BASE_ALLOCATION]);
  t.equal(unknownExport.at(-1)?.type, P.NBD_REP_ERR_UNKNOWN);
  const malformed = await client.option(P.NBD_OPT_SET_META_CONTEXT, Buffer.alloc(5));
  t.equal(malformed.type, P.NBD_REP_ERR_INVALID);

  const set = await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'vol0', ['x-other:thing', P.BASE_ALLOCATION]);
  t.same(
    set.map((r) => r.type),
    [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK],
  );
  const contextId = set[0]!.data.readUInt32BE(0);
  t.not(contextId, 0);

  const go = await client.go('vol0');
  t.equal(go.transmissionFlags, EXPECTED_FLAGS | P.NBD_FLAG_SEND_DF);
  const status = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 0, lengthBytes: MiB });
  t.equal(status.error, 0);
  t.equal(status.blockStatus?.contextId, contextId);
  await client.disconnect();
});

t.test('meta context set for another export does not carry over to OPT_GO', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  await client.option(P.NBD_OPT_STRUCTURED_REPLY);
  await client.metaContext(P.NBD_OPT_SET_META_CONTEXT, 'ro', [P.BASE_ALLOCATION]);
  await client.go('vol0');
  const status = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 0, lengthBytes: 4096 });
  t.equal(status.error, P.NBD_EINVAL);
  await client.disconnect();
});

t.test('oversized option data: ERR_TOO_BIG and skipped, absurd sizes drop the connection', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.startFixedNewstyle();
  const big = await client.option(P.NBD_OPT_INFO, Buffer.alloc(100 * 1024));
  t.equal(big.type, P.NBD_REP_ERR_TOO_BIG);
  const go = await client.go('vol0');
  t.equal(go.sizeBytes, MiB);
  await client.disconnect();

  const hostile = await NbdTestClient.connect(fx.socketPath);
  await hostile.startFixedNewstyle();
  hostile.sendOption(P.NBD_OPT_GO, Buffer.alloc(0), 0xffffff00);
  await hostile.closed;
  t.ok(hostile.isClosed);
});

t.test('a stalled handshake is dropped after the handshake timeout', async (t) => {
  const fx = await startServer(t, EXPORTS, { handshakeTimeoutMs: 150 });
  const client = await NbdTestClient.connect(fx.socketPath);
  await client.readGreeting();
  const started = Date.now();
  await client.closed;
  t.ok(Date.now() - started < 3000);
  t.ok(fx.logs.some((l) => l.code === 'BM_ERR_NBD_HANDSHAKE_TIMEOUT'));
});
