import t from 'tap';
import * as P from '../../src/nbd/protocol';
import { errnoError } from '../helpers/memory-backend';
import { NbdTestClient } from '../helpers/nbd-client';
import { MiB, startServer } from './fixture';

const SIZE = MiB;
const EXPORTS = [
  { name: 'vol0', sizeBytes: SIZE },
  { name: 'ro', sizeBytes: SIZE, readOnly: true },
  { name: 'slowzero', sizeBytes: SIZE, fastZero: false },
];

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) data[i] = (i * 31 + seed) & 0xff;
  return data;
}

for (const structured of [false, true]) {
  const mode = structured ? 'structured' : 'simple';

  t.test(`${mode}: every command works in bounds`, async (t) => {
    const fx = await startServer(t, EXPORTS);
    const backend = fx.backends.get('vol0')!;
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured, allocation: structured });

    const data = pattern(8192, 1);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 4096, payload: data })).error, 0);
    t.ok(backend.data.subarray(4096, 4096 + 8192).equals(data), 'write reached the backend');
    const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 4096, lengthBytes: 8192 });
    t.equal(read.error, 0);
    t.equal(read.structured, structured);
    t.ok(read.data?.equals(data), 'read returns the written bytes');
    if (structured) {
      t.equal(read.chunks.length, 1, 'one OFFSET_DATA chunk');
      t.equal(read.chunks[0]!.type, P.NBD_REPLY_TYPE_OFFSET_DATA);
      t.equal(read.chunks[0]!.flags, P.NBD_REPLY_FLAG_DONE);
      const df = await client.request({ type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_DF, offsetBytes: 0, lengthBytes: 512 });
      t.equal(df.error, 0, 'DF is accepted with structured replies');
    }

    // Unaligned byte ranges pass straight through.
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 3, payload: Buffer.from('hello') })).error, 0);
    const unaligned = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 3, lengthBytes: 5 });
    t.equal(unaligned.data?.toString(), 'hello');

    const fua = await client.request({ type: P.NBD_CMD_WRITE, flags: P.NBD_CMD_FLAG_FUA, offsetBytes: 0, payload: Buffer.alloc(512, 1) });
    t.equal(fua.error, 0);
    t.equal(backend.calls.at(-1)?.fua, true, 'FUA reaches the backend');

    const flushesBefore = backend.flushCount;
    t.equal((await client.request({ type: P.NBD_CMD_FLUSH })).error, 0);
    t.equal(backend.flushCount, flushesBefore + 1);

    t.equal((await client.request({ type: P.NBD_CMD_TRIM, offsetBytes: 65536, lengthBytes: 65536 })).error, 0);
    t.equal(backend.calls.at(-1)?.op, 'trim');

    const zero = await client.request({
      type: P.NBD_CMD_WRITE_ZEROES,
      flags: P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_FUA,
      offsetBytes: 4096,
      lengthBytes: 4096,
    });
    t.equal(zero.error, 0);
    t.same(backend.calls.at(-1)?.options, { fua: true, noHole: true, fastZero: true });
    t.ok(backend.data.subarray(4096, 8192).equals(Buffer.alloc(4096)));

    t.equal((await client.request({ type: P.NBD_CMD_CACHE, offsetBytes: 0, lengthBytes: SIZE })).error, 0);
    t.equal(backend.calls.at(-1)?.op, 'cache');

    const status = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 0, lengthBytes: SIZE });
    if (structured) {
      t.equal(status.error, 0);
      const descriptors = status.blockStatus!.descriptors;
      t.ok(descriptors.length >= 2);
      t.same(descriptors[0], [12288, 0], 'written blocks are allocated');
      t.same(descriptors[1], [SIZE - 12288, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO], 'the rest is a hole');
      const one = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, flags: P.NBD_CMD_FLAG_REQ_ONE, offsetBytes: 0, lengthBytes: SIZE });
      t.equal(one.blockStatus!.descriptors.length, 1, 'REQ_ONE gives one descriptor');
      const clipped = await client.request({ type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 100, lengthBytes: 1000 });
      t.same(clipped.blockStatus!.descriptors, [[1000, 0]], 'descriptors never exceed the request');
    } else {
      t.equal(status.error, P.NBD_EINVAL, 'BLOCK_STATUS needs a negotiated context');
    }

    // Many requests in one socket write, answered as each completes.
    const cookies = new Set<bigint>();
    const batch: Buffer[] = [];
    for (let i = 0; i < 64; i++) {
      const cookie = BigInt(1000 + i);
      cookies.add(cookie);
      batch.push(NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: i * 512, lengthBytes: 512 }, cookie), Buffer.alloc(512, i));
    }
    client.write(Buffer.concat(batch));
    for (let i = 0; i < 64; i++) {
      const reply = await client.readReply();
      t.equal(reply.error, 0);
      cookies.delete(reply.cookie);
    }
    t.equal(cookies.size, 0, 'every pipelined request answered once');
    t.ok(backend.data.subarray(63 * 512, 64 * 512).equals(Buffer.alloc(512, 63)));
    await client.disconnect();
  });

  t.test(`${mode}: out of bounds, bad flags and bad lengths`, async (t) => {
    const fx = await startServer(t, EXPORTS);
    const backend = fx.backends.get('vol0')!;
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured, allocation: structured });
    const callsBefore = backend.calls.length;
    const expect = async (name: string, spec: Parameters<NbdTestClient['request']>[0], error: number): Promise<void> => {
      const reply = await client.request(spec);
      t.equal(reply.error, error, name);
      if (structured) t.ok(reply.errorMessage && reply.errorMessage.length > 0, `${name} carries a message`);
    };
    await expect('write past the end', { type: P.NBD_CMD_WRITE, offsetBytes: SIZE - 512, payload: Buffer.alloc(1024) }, P.NBD_ENOSPC);
    await expect('write at the end', { type: P.NBD_CMD_WRITE, offsetBytes: SIZE, payload: Buffer.alloc(1) }, P.NBD_ENOSPC);
    // The spec: EINVAL for a read or trim including sectors beyond the size; ENOSPC only for
    // WRITE and WRITE_ZEROES.
    await expect('trim past the end', { type: P.NBD_CMD_TRIM, offsetBytes: SIZE - 512, lengthBytes: 1024 }, P.NBD_EINVAL);
    await expect('trim at the end', { type: P.NBD_CMD_TRIM, offsetBytes: SIZE, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('write zeroes past the end', { type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: SIZE, lengthBytes: 1 }, P.NBD_ENOSPC);
    await expect('write zeroes across the end', { type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: SIZE - 512, lengthBytes: 1024 }, P.NBD_ENOSPC);
    await expect('read past the end', { type: P.NBD_CMD_READ, offsetBytes: SIZE - 1, lengthBytes: 2 }, P.NBD_EINVAL);
    await expect('read at 2^63', { type: P.NBD_CMD_READ, offsetBytes: 2 ** 63, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('cache past the end', { type: P.NBD_CMD_CACHE, offsetBytes: SIZE, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('zero-length read', { type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 0 }, P.NBD_EINVAL);
    await expect('read with NO_HOLE', { type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_NO_HOLE, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('trim with FAST_ZERO', { type: P.NBD_CMD_TRIM, flags: P.NBD_CMD_FLAG_FAST_ZERO, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('write with REQ_ONE', { type: P.NBD_CMD_WRITE, flags: P.NBD_CMD_FLAG_REQ_ONE, offsetBytes: 0, payload: Buffer.alloc(4096, 9) }, P.NBD_EINVAL);
    await expect('unknown flag bit', { type: P.NBD_CMD_FLUSH, flags: 0x8000 }, P.NBD_EINVAL);
    await expect('flush with a length', { type: P.NBD_CMD_FLUSH, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('unknown command', { type: 42, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    await expect('payload-length flag (extended headers only)', { type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_PAYLOAD_LEN, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    if (structured) {
      await expect('block status past the end', { type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: SIZE - 512, lengthBytes: 1024 }, P.NBD_EINVAL);
      await expect('block status with length 0', { type: P.NBD_CMD_BLOCK_STATUS, offsetBytes: 0, lengthBytes: 0 }, P.NBD_EINVAL);
    } else {
      await expect('DF without structured replies', { type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_DF, offsetBytes: 0, lengthBytes: 512 }, P.NBD_EINVAL);
    }
    t.equal(backend.calls.length, callsBefore, 'nothing invalid reached the backend');
    t.ok(backend.data.equals(Buffer.alloc(SIZE)), 'refused write payloads were skipped, not written');
    // The stream is still in sync after the skipped payloads.
    const ok = await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(512, 5) });
    t.equal(ok.error, 0);
    await client.disconnect();
  });

  t.test(`${mode}: read-only export refuses writes with EPERM`, async (t) => {
    const fx = await startServer(t, EXPORTS);
    const { client, transmissionFlags } = await NbdTestClient.open(fx.socketPath, 'ro', { structured });
    t.ok(transmissionFlags & P.NBD_FLAG_READ_ONLY);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(4096, 1) })).error, P.NBD_EPERM);
    t.equal((await client.request({ type: P.NBD_CMD_TRIM, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EPERM);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EPERM);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: SIZE, payload: Buffer.alloc(16) })).error, P.NBD_EPERM);
    const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 4096 });
    t.equal(read.error, 0);
    t.ok(read.data?.equals(Buffer.alloc(4096)));
    t.equal((await client.request({ type: P.NBD_CMD_FLUSH })).error, 0);
    t.equal(fx.backends.get('ro')!.calls.filter((c) => c.op === 'write' || c.op === 'trim' || c.op === 'writeZeroes').length, 0);
    await client.disconnect();
  });

  t.test(`${mode}: oversize requests`, async (t) => {
    const maxPayloadBytes = 64 * 1024;
    const fx = await startServer(t, EXPORTS, { maxPayloadBytes });
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured });
    // Over the advertised maximum: EINVAL in both modes (EOVERFLOW is only for a DF read whose
    // reply would need fragmenting, which ours never does).
    const bigRead = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: maxPayloadBytes + 1 });
    t.equal(bigRead.error, P.NBD_EINVAL);
    if (structured) t.match(bigRead.errorMessage, /exceeds the maximum block size/);
    t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(maxPayloadBytes + 4096, 1) })).error, P.NBD_EINVAL);
    if (structured) {
      const bigDf = await client.request({ type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_DF, offsetBytes: 0, lengthBytes: maxPayloadBytes + 1 });
      t.equal(bigDf.error, P.NBD_EINVAL, 'an oversize DF read is EINVAL too');
    }
    t.equal((await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: maxPayloadBytes })).error, 0, 'max itself is fine');
    // Trim and zero carry no payload: the block size limit does not apply.
    t.equal((await client.request({ type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: 0, lengthBytes: SIZE })).error, 0);
    t.ok(fx.backends.get('vol0')!.data.equals(Buffer.alloc(SIZE)), 'the oversize payload was discarded');
    // Beyond twice the maximum the stream is not trusted: hard disconnect.
    client.write(NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: 3 * maxPayloadBytes }, 99n));
    await client.closed;
    t.ok(fx.logs.some((l) => l.msg.includes('protocol violation') && String(l.reason).includes('WRITE payload')));
  });

  t.test(`${mode}: backend errors map to NBD errors`, async (t) => {
    const fx = await startServer(t, EXPORTS);
    const backend = fx.backends.get('vol0')!;
    const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured });
    const cases: Array<[string, number]> = [
      ['EIO', P.NBD_EIO],
      ['ENOSPC', P.NBD_ENOSPC],
      ['EDQUOT', P.NBD_ENOSPC],
      ['EROFS', P.NBD_EPERM],
      ['ENOMEM', P.NBD_ENOMEM],
      ['BM_ERR_SOMETHING_ODD', P.NBD_EIO],
      // ENOTSUP is only for WRITE_ZEROES with FAST_ZERO; EOVERFLOW never comes from a backend.
      ['ENOTSUP', P.NBD_EIO],
      ['EOPNOTSUPP', P.NBD_EIO],
      ['BM_ERR_NOT_FAST', P.NBD_EIO],
      ['EOVERFLOW', P.NBD_EIO],
    ];
    for (const [code, expected] of cases) {
      backend.hook = () => {
        throw errnoError(code, 'injected');
      };
      t.equal((await client.request({ type: P.NBD_CMD_WRITE, offsetBytes: 0, payload: Buffer.alloc(512) })).error, expected, `write ${code}`);
      const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: 512 });
      t.equal(read.error, expected, `read ${code}`);
      t.equal(read.data, undefined, 'no data with an error');
      if (structured) t.match(read.errorMessage, /injected/);
    }
    backend.hook = null;
    t.equal(backend.unreleasedReads, 0);
    t.ok(fx.logs.some((l) => l.msg === 'nbd backend request failed' && l.code === 'EIO'));
    await client.disconnect();
  });
}

t.test('FAST_ZERO the backend cannot do fast gets ENOTSUP', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const { client } = await NbdTestClient.open(fx.socketPath, 'slowzero', { structured: true });
  const fast = await client.request({ type: P.NBD_CMD_WRITE_ZEROES, flags: P.NBD_CMD_FLAG_FAST_ZERO, offsetBytes: 0, lengthBytes: 4096 });
  t.equal(fast.error, P.NBD_ENOTSUP);
  const slow = await client.request({ type: P.NBD_CMD_WRITE_ZEROES, offsetBytes: 0, lengthBytes: 4096 });
  t.equal(slow.error, 0);
  await client.disconnect();
});

t.test('backend ENOTSUP reaches the client only for WRITE_ZEROES with FAST_ZERO', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('vol0')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured: true });
  for (const code of ['ENOTSUP', 'EOPNOTSUPP']) {
    backend.hook = () => {
      throw errnoError(code, 'injected');
    };
    const zero = (flags: number) => client.request({ type: P.NBD_CMD_WRITE_ZEROES, flags, offsetBytes: 0, lengthBytes: 4096 });
    t.equal((await zero(P.NBD_CMD_FLAG_FAST_ZERO)).error, P.NBD_ENOTSUP, `${code}: FAST_ZERO gets ENOTSUP`);
    t.equal((await zero(P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE)).error, P.NBD_ENOTSUP, `${code}: FAST_ZERO|NO_HOLE gets ENOTSUP`);
    t.equal((await zero(0)).error, P.NBD_EIO, `${code}: WRITE_ZEROES without FAST_ZERO gets EIO`);
    t.equal((await zero(P.NBD_CMD_FLAG_NO_HOLE)).error, P.NBD_EIO, `${code}: NO_HOLE alone gets EIO`);
    t.equal((await client.request({ type: P.NBD_CMD_TRIM, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EIO, `${code}: TRIM gets EIO`);
    t.equal((await client.request({ type: P.NBD_CMD_FLUSH })).error, P.NBD_EIO, `${code}: FLUSH gets EIO`);
    t.equal((await client.request({ type: P.NBD_CMD_CACHE, offsetBytes: 0, lengthBytes: 4096 })).error, P.NBD_EIO, `${code}: CACHE gets EIO`);
  }
  backend.hook = () => {
    throw errnoError('EOVERFLOW', 'injected');
  };
  const read = await client.request({ type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_DF, offsetBytes: 0, lengthBytes: 4096 });
  t.equal(read.error, P.NBD_EIO, 'a backend EOVERFLOW on a DF read is EIO');
  backend.hook = null;
  await client.disconnect();
});

t.test('write payloads split across many socket chunks, and large reads', async (t) => {
  const fx = await startServer(t, EXPORTS);
  const backend = fx.backends.get('vol0')!;
  const { client } = await NbdTestClient.open(fx.socketPath, 'vol0', { structured: false });
  const data = pattern(SIZE, 7);
  const header = NbdTestClient.requestHeader({ type: P.NBD_CMD_WRITE, offsetBytes: 0, lengthBytes: SIZE }, 5n);
  // Header split in two, then the payload in uneven pieces with pauses between them.
  client.write(header.subarray(0, 11));
  await new Promise((r) => setTimeout(r, 10));
  client.write(header.subarray(11));
  for (let at = 0; at < SIZE; at += 300_000) {
    client.write(data.subarray(at, Math.min(SIZE, at + 300_000)));
    await new Promise((r) => setTimeout(r, 5));
  }
  const reply = await client.readReply();
  t.equal(reply.cookie, 5n);
  t.equal(reply.error, 0);
  t.ok(backend.data.equals(data));
  const read = await client.request({ type: P.NBD_CMD_READ, offsetBytes: 0, lengthBytes: SIZE });
  t.ok(read.data?.equals(data), '1 MiB read (zero-copy segment path)');
  t.equal(backend.unreleasedReads, 0, 'large read released after the socket write');
  await client.disconnect();
});
