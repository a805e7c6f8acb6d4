// The peer commands as a user runs them: human and --json output, errors and exit statuses.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { runCli, startDaemon } from '../helpers/daemon';

const secretText = 'a-shared-secret-of-enough-bytes';

t.test('peer add/list/info/remove, human and --json; the secret is never printed', async (t) => {
  // Port 0: the listener binds a free port, and status reports the one it got.
  const daemon = await startDaemon(t, { args: ['--listen', '127.0.0.1:0', '--node-name', 'hostA'] });
  const socket = ['--socket', daemon.paths.controlSocket];
  const secretFile = path.join(daemon.paths.dir, 'hostB.key');
  fs.writeFileSync(secretFile, secretText + '\n', { mode: 0o600 });

  t.equal((await runCli([...socket, 'peer', 'list'])).stdout, 'no peers\n');
  // A relative --secret-file is resolved by the CLI, like --device.
  const relative = path.relative(process.cwd(), secretFile);
  const add = await runCli([...socket, 'peer', 'add', 'hostB', '--address', '127.0.0.1:7802', '--secret-file', relative]);
  t.equal(add.code, 0, add.stderr);
  t.match(add.stdout, /^name:\s+hostB$/m);
  t.match(add.stdout, /^address:\s+127\.0\.0\.1:7802$/m);
  t.match(add.stdout, new RegExp(`^secret file:\\s+${secretFile}$`, 'm'));
  t.match(add.stdout, /^secret:\s+ok$/m);

  const info = JSON.parse((await runCli([...socket, 'peer', 'info', 'hostB', '--json'])).stdout);
  t.match(info, { name: 'hostB', address: '127.0.0.1:7802', host: '127.0.0.1', port: 7802, secretFile });
  const listJson = JSON.parse((await runCli([...socket, '--json', 'peer', 'list'])).stdout);
  t.same(listJson.peers, [info]);
  const list = await runCli([...socket, 'peer', 'list']);
  const [header, row] = list.stdout.trimEnd().split('\n');
  t.match(header, /^NAME\s+ADDRESS\s+SECRET\s+SECRET FILE$/);
  t.match(row, new RegExp(`^hostB\\s+127\\.0\\.0\\.1:7802\\s+ok\\s+${secretFile}$`));

  const status = await runCli([...socket, 'status']);
  t.match(status.stdout, /^replication:\s+127\.0\.0\.1:[1-9]\d* \(0 session\(s\)\)$/m);
  t.match(status.stdout, /^node name:\s+hostA$/m);
  t.match(status.stdout, /^peers:\s+1$/m);
  t.match(JSON.parse((await runCli([...socket, '--json', 'status'])).stdout).replicationListen, /^127\.0\.0\.1:[1-9]\d*$/);

  const duplicate = await runCli([...socket, 'peer', 'add', 'hostB', '--address', '127.0.0.1:7802', '--secret-file', secretFile]);
  t.equal(duplicate.code, 1);
  t.equal(duplicate.stderr, 'blockmirror: BM_ERR_PEER_EXISTS: peer hostB already exists\n');

  const remove = await runCli([...socket, 'peer', 'remove', 'hostB']);
  t.equal(remove.code, 0, remove.stderr);
  t.equal(remove.stdout, 'removed peer hostB\n');
  const missing = await runCli([...socket, 'peer', 'info', 'hostB']);
  t.equal(missing.code, 1);
  t.equal(missing.stderr, 'blockmirror: BM_ERR_PEER_NOT_FOUND: peer hostB does not exist\n');

  for (const result of [add, status, list, remove]) t.notMatch(result.stdout + result.stderr, secretText);
});

t.test('peer add errors: bad address, bad secret file, usage', async (t) => {
  const daemon = await startDaemon(t);
  const socket = ['--socket', daemon.paths.controlSocket];
  const loose = path.join(daemon.paths.dir, 'loose.key');
  fs.writeFileSync(loose, secretText);
  fs.chmodSync(loose, 0o644);
  const short = path.join(daemon.paths.dir, 'short.key');
  fs.writeFileSync(short, 'short', { mode: 0o600 });

  const badAddress = await runCli([...socket, 'peer', 'add', 'p', '--address', '127.0.0.1:99999', '--secret-file', short]);
  t.equal(badAddress.code, 1);
  t.match(badAddress.stderr, /^blockmirror: BM_ERR_INVALID_ARGUMENT: address: expected HOST:PORT/);
  const tooOpen = await runCli([...socket, '--json', 'peer', 'add', 'p', '--address', '127.0.0.1:7802', '--secret-file', loose]);
  t.equal(tooOpen.code, 1);
  t.equal(tooOpen.stdout, '');
  t.match(tooOpen.stderr, /^blockmirror: BM_ERR_SECRET_FILE: peer p not added: .*loose\.key is accessible by group or others/);
  t.notMatch(tooOpen.stderr, secretText);
  const tooShort = await runCli([...socket, 'peer', 'add', 'p', '--address', '127.0.0.1:7802', '--secret-file', short]);
  t.match(tooShort.stderr, /^blockmirror: BM_ERR_SECRET_FILE: .*holds 5 bytes/);
  const absent = await runCli([...socket, 'peer', 'add', 'p', '--address', '127.0.0.1:7802', '--secret-file', path.join(daemon.paths.dir, 'none')]);
  t.match(absent.stderr, /^blockmirror: BM_ERR_SECRET_FILE: .*ENOENT/);

  for (const args of [['peer'], ['peer', 'add', 'p'], ['peer', 'add', 'p', '--address', '127.0.0.1:1'], ['peer', 'info'], ['peer', 'remove']]) {
    const result = await runCli([...socket, ...args]);
    t.equal(result.code, 2, `blockmirror ${args.join(' ')}: ${result.stderr}`);
  }
  t.equal((await runCli([...socket, 'peer', 'list'])).stdout, 'no peers\n');
});
