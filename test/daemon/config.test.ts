// Config file validation and flag precedence (in-process), plus the daemon's exit on a bad file.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { defaults, loadConfigFile, parseHostPort, replicationTimingDefaults, resolveConfig } from '../../src/config/config';
import { spawnDaemon } from '../helpers/daemon';
import { scratchDir } from '../helpers/loop';

t.test('parseHostPort', async (t) => {
  t.same(parseHostPort('127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
  t.same(parseHostPort('[::1]:0'), { host: '::1', port: 0 });
  t.same(parseHostPort('localhost:65535'), { host: 'localhost', port: 65535 });
  for (const bad of ['127.0.0.1', ':10809', '127.0.0.1:65536', 'host:port', '::1:10809', 'a b:1', '']) {
    t.equal(parseHostPort(bad), null, bad);
  }
});

function writeConfig(t: Parameters<typeof scratchDir>[0], content: string): string {
  const file = path.join(scratchDir(t, 'bm-cfg-'), 'blockmirror.json');
  fs.writeFileSync(file, content);
  return file;
}

t.test('errors name the file and the field', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['{"nbdListen": "nope"}', /^config \/.*blockmirror\.json: nbdListen: expected HOST:PORT$/],
    ['{"listen": "nope"}', /: listen: expected HOST:PORT$/],
    ['{"stateDir": "relative"}', /: stateDir: expected an absolute path$/],
    ['{"logLevel": "loud"}', /: logLevel: /],
    ['{"controlSocket": 5}', /: controlSocket: /],
    [`{"nbdSocket": "/${'x'.repeat(120)}"}`, /: nbdSocket: expected at most 107 bytes/],
    ['{"stateDri": "/x"}', /: stateDri: unknown field$/],
    ['{"busyPollMicros": 1001}', /: busyPollMicros: /],
    ['{"busyPollMicros": 2.5}', /: busyPollMicros: /],
    ['{"nbdListen": ', /: not valid JSON: /],
    ['[]', /: \(root\): /],
  ];
  for (const [content, expected] of cases) {
    const file = writeConfig(t, content);
    t.throws(() => loadConfigFile(file, false), { code: 'BM_ERR_CONFIG', message: expected }, content);
  }
});

t.test('a missing file is fine only at the default path', async (t) => {
  const missing = path.join(scratchDir(t, 'bm-cfg-'), 'absent.json');
  t.equal(loadConfigFile(missing, true), null);
  t.throws(() => loadConfigFile(missing, false), { code: 'BM_ERR_CONFIG', message: /cannot read: ENOENT/ });
});

t.test('flags override the file, the file overrides defaults', async (t) => {
  const file = writeConfig(t, JSON.stringify({ stateDir: '/srv/bm', nbdListen: '127.0.0.1:10809', listen: '0.0.0.0:7800', logLevel: 'debug', controlSocket: '/run/x/c.sock', nodeName: 'hostA', replication: { ackTimeoutMs: 5000 } }));
  const fromFile = resolveConfig({ config: file });
  t.same(fromFile, {
    nodeName: 'hostA',
    replication: { ...replicationTimingDefaults, ackTimeoutMs: 5000 },
    epochFlush: false,
    writeIntent: { activityLogExtents: 512 },
    controlSocket: '/run/x/c.sock',
    nbdSocket: defaults.nbdSocket,
    nbdListen: { host: '127.0.0.1', port: 10809 },
    replicationListen: { host: '0.0.0.0', port: 7800 },
    stateDir: '/srv/bm',
    logLevel: 'debug',
    busyPollMicros: 32,
    configPath: file,
  });
  const flagged = resolveConfig({ config: file, stateDir: 'rel/state', nbdListen: '[::1]:1', logLevel: 'warn' });
  t.equal(flagged.stateDir, path.resolve('rel/state'));
  t.same(flagged.nbdListen, { host: '::1', port: 1 });
  t.same(resolveConfig({ config: file, listen: '127.0.0.1:7801' }).replicationListen, { host: '127.0.0.1', port: 7801 });
  t.throws(() => resolveConfig({ config: file, listen: 'x' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: '--listen: expected HOST:PORT' });
  t.equal(flagged.logLevel, 'warn');
  t.throws(() => resolveConfig({ config: file, nbdListen: 'x' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: '--nbd-listen: expected HOST:PORT' });
  t.throws(() => resolveConfig({ config: file, logLevel: 'x' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^--log-level: / });
  // path.resolve('') would be the working directory: / under systemd.
  t.throws(() => resolveConfig({ config: file, stateDir: '' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: '--state-dir: expected a path, got an empty string' });
  t.throws(() => resolveConfig({ config: file, controlSocket: ' ' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^--control-socket: / });
  t.throws(() => resolveConfig({ config: '' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^--config: / });
  t.equal(resolveConfig({ config: file, nodeName: 'hostB' }).nodeName, 'hostB');
  t.throws(() => resolveConfig({ config: file, nodeName: 'no spaces' }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^--node-name: / });
  const badTiming = writeConfig(t, JSON.stringify({ replication: { backoffBaseMs: 5000, backoffMaxMs: 10 } }));
  t.throws(() => resolveConfig({ config: badTiming }), { code: 'BM_ERR_CONFIG', message: /backoffBaseMs must not exceed backoffMaxMs/ });
  t.equal(resolveConfig({ config: file }).writeIntent.activityLogExtents, 512, 'write-intent log on by default');
  const pollFile = writeConfig(t, JSON.stringify({ busyPollMicros: 0 }));
  t.equal(resolveConfig({ config: pollFile }).busyPollMicros, 0, 'the file can switch busy polling off');
  t.equal(resolveConfig({ config: pollFile, busyPollUs: '1000' }).busyPollMicros, 1000, 'the flag wins');
  for (const bad of ['', '-1', '1001', '1.5', '32us', '0x20', '00001']) {
    t.throws(() => resolveConfig({ config: file, busyPollUs: bad }), { code: 'BM_ERR_INVALID_ARGUMENT', message: /^--busy-poll-us: expected an integer 0\.\.1000/ }, JSON.stringify(bad));
  }
  const epochFlush = writeConfig(t, JSON.stringify({ replication: { epochFlush: true, ackTimeoutMs: 5000 } }));
  const resolved = resolveConfig({ config: epochFlush });
  t.equal(resolved.epochFlush, true, 'the file can switch epoch flushes on');
  t.same(resolved.replication, { ...replicationTimingDefaults, ackTimeoutMs: 5000 }, 'and the timing holds only timing');
  const badFlush = writeConfig(t, JSON.stringify({ replication: { epochFlush: 'no' } }));
  t.throws(() => resolveConfig({ config: badFlush }), { code: 'BM_ERR_CONFIG', message: /replication\.epochFlush/ });
  const off = writeConfig(t, JSON.stringify({ writeIntent: { activityLogExtents: 0 } }));
  t.equal(resolveConfig({ config: off }).writeIntent.activityLogExtents, 0, '0 switches it off');
  const tooSmall = writeConfig(t, JSON.stringify({ writeIntent: { activityLogExtents: 10 } }));
  t.throws(() => resolveConfig({ config: tooSmall }), { code: 'BM_ERR_CONFIG', message: /writeIntent\.activityLogExtents.*34\.\.1014/ });
});

t.test('blockmirrord exits 1 naming the field of a bad config file', async (t) => {
  const file = writeConfig(t, '{"nbdListen": "no-port"}');
  const daemon = spawnDaemon(t, { args: ['--config', file] });
  const exit = await daemon.exited;
  t.equal(exit.code, 1);
  t.equal(daemon.stderr, `blockmirrord: BM_ERR_CONFIG: config ${file}: nbdListen: expected HOST:PORT\n`);
  t.notOk(fs.existsSync(daemon.paths.controlSocket), 'nothing was started');
});

t.test('blockmirrord exits 2 on a bad flag value and on an unknown flag', async (t) => {
  const bad = spawnDaemon(t, { args: ['--nbd-listen', 'nonsense'] });
  t.equal((await bad.exited).code, 2);
  t.match(bad.stderr, /BM_ERR_INVALID_ARGUMENT: --nbd-listen: expected HOST:PORT/);
  const unknown = spawnDaemon(t, { args: ['--no-such-flag'] });
  t.equal((await unknown.exited).code, 2);
  t.match(unknown.stderr, /unknown option/);
});
