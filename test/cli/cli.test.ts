// The blockmirror CLI as a user runs it: output formats and exit statuses.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { daemonPaths, runCli, startDaemon } from '../helpers/daemon';
import { scratchDevice } from '../helpers/loop';

const deviceBytes = 8 * 1024 * 1024;

t.test('volume add/list/info/remove and status, human and --json', async (t) => {
  const daemon = await startDaemon(t);
  const socket = ['--socket', daemon.paths.controlSocket];
  const device = scratchDevice(t, deviceBytes);

  const add = await runCli([...socket, 'volume', 'add', 'vol0', '--device', device.path]);
  t.equal(add.code, 0, add.stderr);
  t.match(add.stdout, /^name:\s+vol0$/m);
  t.match(add.stdout, /^state:\s+online$/m);
  t.match(add.stdout, /^size:\s+8\.0 MiB \(8388608 bytes\)$/m);
  t.match(add.stdout, new RegExp(`^nbd uri:\\s+nbd\\+unix:///vol0\\?socket=${daemon.paths.nbdSocket}$`, 'm'));
  t.equal(add.stderr, '');

  // --json after the command, as in the README.
  const info = await runCli([...socket, 'volume', 'info', 'vol0', '--json']);
  t.equal(info.code, 0, info.stderr);
  const infoJson = JSON.parse(info.stdout);
  t.equal(infoJson.name, 'vol0');
  t.equal(infoJson.sizeBytes, deviceBytes);
  t.equal(infoJson.nbdUri, `nbd+unix:///vol0?socket=${daemon.paths.nbdSocket}`);
  t.equal(infoJson.readOnly, false);

  const listJson = await runCli(['--json', ...socket, 'volume', 'list']);
  t.same(JSON.parse(listJson.stdout).volumes.map((volume: { uuid: string }) => volume.uuid), [infoJson.uuid]);
  const list = await runCli([...socket, 'volume', 'list']);
  t.equal(list.code, 0);
  const [header, row] = list.stdout.trimEnd().split('\n');
  t.match(header, /^NAME\s+STATE\s+SIZE\s+MODE\s+CONNECTIONS\s+DEVICE$/);
  t.match(row, new RegExp(`^vol0\\s+online\\s+8\\.0 MiB\\s+rw\\s+0\\s+${device.path}$`));

  const status = await runCli([...socket, 'status']);
  t.equal(status.code, 0);
  t.match(status.stdout, new RegExp(`^pid:\\s+${daemon.pid}$`, 'm'));
  t.match(status.stdout, /^volumes:\s+1 \(0 in error\)$/m);
  t.match(status.stdout, /^busy poll:\s+(up to 32 us \(caught \d+\/\d+ events, \d+\/\d+ completions\)|off \(32 us asked; the threadpool engine does not poll\))$/m);
  const statusJson = JSON.parse((await runCli([...socket, '--json', 'status'])).stdout);
  t.equal(statusJson.pid, daemon.pid);

  const remove = await runCli([...socket, 'volume', 'remove', 'vol0']);
  t.equal(remove.code, 0, remove.stderr);
  t.match(remove.stdout, new RegExp(`^removed volume vol0 ${infoJson.uuid}\\n$`));
  const empty = await runCli([...socket, 'volume', 'list']);
  t.equal(empty.stdout, 'no volumes\n');
});

t.test('relative --device paths are resolved by the CLI; --read-only is passed on', async (t) => {
  const daemon = await startDaemon(t);
  const device = scratchDevice(t, deviceBytes);
  const relative = path.relative(process.cwd(), device.path);
  const add = await runCli(['--socket', daemon.paths.controlSocket, '--json', 'volume', 'add', 'ro', '--device', relative, '--read-only']);
  t.equal(add.code, 0, add.stderr);
  const result = JSON.parse(add.stdout);
  t.equal(result.device, device.path);
  t.equal(result.readOnly, true);
});

t.test('daemon errors: exit 1 and "blockmirror: CODE: message" on stderr', async (t) => {
  const daemon = await startDaemon(t);
  const socket = ['--socket', daemon.paths.controlSocket];
  const missing = await runCli([...socket, 'volume', 'info', 'nope']);
  t.equal(missing.code, 1);
  t.equal(missing.stdout, '');
  t.equal(missing.stderr, 'blockmirror: BM_ERR_VOLUME_NOT_FOUND: volume nope does not exist\n');
  const badName = await runCli([...socket, 'volume', 'add', 'bad/name', '--device', '/dev/null']);
  t.equal(badName.code, 1);
  t.match(badName.stderr, /^blockmirror: BM_ERR_INVALID_ARGUMENT: name: /);
  const noDevice = await runCli([...socket, '--json', 'volume', 'add', 'v', '--device', path.join(daemon.paths.dir, 'absent')]);
  t.equal(noDevice.code, 1);
  t.equal(noDevice.stdout, '', '--json prints nothing on stdout for an error');
  t.match(noDevice.stderr, /^blockmirror: BM_ERR_DEVICE_NOT_FOUND: /);
});

t.test('usage errors exit 2', async (t) => {
  for (const args of [[], ['bogus'], ['volume'], ['volume', 'add', 'x'], ['volume', 'info'], ['status', 'extra'], ['--no-such-flag', 'status'], ['--timeout', 'soon', 'status']]) {
    const result = await runCli(['--socket', '/nonexistent/control.sock', ...args]);
    t.equal(result.code, 2, `blockmirror ${args.join(' ')}: ${result.stderr}`);
  }
  // Past Node's 2^31-1 ms timer limit a timeout would fire at once; hex and empty paths are refused.
  for (const args of [['--timeout', '3000000000', 'status'], ['--timeout', '0x10', 'status'], ['--timeout', '1e3', 'status'], ['volume', 'add', 'x', '--device', ''], ['peer', 'add', 'p', '--address', 'h:1', '--secret-file', '']]) {
    const result = await runCli(['--socket', '/nonexistent/control.sock', ...args]);
    t.equal(result.code, 2, `blockmirror ${args.join(' ')}: ${result.stderr}`);
  }
  // commander's own usage errors carry the code too, in the form every other error has.
  const unknownFlag = await runCli(['--no-such-flag', 'status']);
  t.equal(unknownFlag.stderr, "blockmirror: BM_ERR_USAGE: unknown option '--no-such-flag'\n");
  const noDevice = await runCli(['volume', 'add', 'x']);
  t.equal(noDevice.stderr, "blockmirror: BM_ERR_USAGE: required option '--device <path>' not specified\n");
  const emptySocket = await runCli(['--socket', '', 'status']);
  t.match(emptySocket.stderr, /BM_ERR_USAGE: --socket: expected a path/);
  // Whole milliseconds in decimal units are valid: 4.1m is 246000 ms (floating point said 245999.99...).
  for (const value of ['4.1m', '0.07h', '1.005s', '10ms']) {
    const result = await runCli(['--socket', '/nonexistent/control.sock', 'mirror', 'set', 'v', '--sync-timeout', value]);
    t.equal(result.code, 3, `--sync-timeout ${value} passes the CLI and fails only at connecting: ${result.stderr}`);
  }
  // --async-buffer: a size (no "/s") from 1 MiB to 1 GiB, checked before connecting.
  for (const [value, code] of [['512K', 2], ['2G', 2], ['64M/s', 2], ['64M', 3], ['1G', 3]] as const) {
    const result = await runCli(['--socket', '/nonexistent/control.sock', 'mirror', 'add', 'v', '--peer', 'p', '--target', 't', '--async-buffer', value]);
    t.equal(result.code, code, `--async-buffer ${value}: ${result.stderr}`);
  }
  const fraction = await runCli(['--socket', '/nonexistent/control.sock', 'mirror', 'set', 'v', '--sync-timeout', '1.0005s']);
  t.equal(fraction.code, 2, 'a fraction of a millisecond is refused');
  const help = await runCli(['--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /volume/);
});

t.test('unreachable daemon exits 3 with BM_ERR_DAEMON_UNREACHABLE', async (t) => {
  const paths = daemonPaths(t);
  const result = await runCli(['--socket', paths.controlSocket, 'status']);
  t.equal(result.code, 3);
  t.match(result.stderr, /^blockmirror: BM_ERR_DAEMON_UNREACHABLE: cannot connect to .*control\.sock: ENOENT/);
  const jsonResult = await runCli(['--socket', paths.controlSocket, '--json', 'volume', 'list']);
  t.equal(jsonResult.code, 3);
  t.equal(jsonResult.stdout, '');
});

t.test('without --socket the CLI finds the control socket where the daemon\'s config file puts it', async (t) => {
  const daemon = await startDaemon(t);
  const dir = daemon.paths.dir;
  const config = path.join(dir, 'blockmirror.json');
  fs.writeFileSync(config, JSON.stringify({ controlSocket: daemon.paths.controlSocket }));
  const viaConfig = await runCli(['--config', config, '--json', 'status']);
  t.equal(viaConfig.code, 0, viaConfig.stderr);
  t.equal(JSON.parse(viaConfig.stdout).pid, daemon.pid, 'reached the daemon through the file\'s controlSocket');

  const elsewhere = path.join(dir, 'elsewhere.json');
  fs.writeFileSync(elsewhere, JSON.stringify({ controlSocket: path.join(dir, 'absent.sock') }));
  const socketWins = await runCli(['--config', elsewhere, '--socket', daemon.paths.controlSocket, 'status']);
  t.equal(socketWins.code, 0, '--socket overrides the file');
  t.equal((await runCli(['--config', elsewhere, 'status'])).code, 3, 'the file\'s socket is used: nothing listens there');

  const broken = path.join(dir, 'broken.json');
  fs.writeFileSync(broken, '{"controlSocket": ');
  const bad = await runCli(['--config', broken, 'status']);
  t.equal(bad.code, 1);
  t.match(bad.stderr, /^blockmirror: BM_ERR_CONFIG: config .*broken\.json: not valid JSON/);
  const missing = await runCli(['--config', path.join(dir, 'none.json'), 'status']);
  t.equal(missing.code, 1, 'a file named with --config must exist');
  t.match(missing.stderr, /BM_ERR_CONFIG: .*cannot read: ENOENT/);
  t.equal((await runCli(['--config', '', 'status'])).code, 2);
});
