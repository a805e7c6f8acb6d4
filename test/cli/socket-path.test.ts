// Which control socket the CLI connects to: --socket, the config file's controlSocket, the default.
import path from 'node:path';

import t from 'tap';

import { controlSocketPath } from '../../src/cli/main';
import { defaultConfigPath, defaults, type ConfigFile } from '../../src/config/config';
import { BmError } from '../../src/control/errors';

function unreadable(code: string) {
  return (configPath: string): ConfigFile | null => {
    const cause = Object.assign(new Error(code), { code });
    throw new BmError('BM_ERR_CONFIG', `config ${configPath}: cannot read: ${code}`, { cause });
  };
}

t.test('--socket wins and the file is not read', async (tt) => {
  tt.equal(controlSocketPath({ socket: 'rel.sock' }, unreadable('EIO')), path.resolve('rel.sock'));
});

t.test('the file named by --config, or the default file, gives the socket', async (tt) => {
  const seen: Array<[string, boolean]> = [];
  const load = (configPath: string, missingOk: boolean): ConfigFile | null => {
    seen.push([configPath, missingOk]);
    return { controlSocket: '/srv/bm/control.sock' };
  };
  tt.equal(controlSocketPath({ config: '/etc/other.json' }, load), '/srv/bm/control.sock');
  tt.equal(controlSocketPath({}, load), '/srv/bm/control.sock');
  tt.same(seen, [['/etc/other.json', false], [defaultConfigPath, true]], 'a named file must exist; the default may be missing');
  tt.equal(controlSocketPath({}, () => null), defaults.controlSocket, 'no default file: the built-in default');
  tt.equal(controlSocketPath({}, () => ({})), defaults.controlSocket, 'a file without controlSocket: the built-in default');
});

t.test('a default file this user may not read is skipped; anything else is an error', async (tt) => {
  tt.equal(controlSocketPath({}, unreadable('EACCES')), defaults.controlSocket);
  tt.throws(() => controlSocketPath({}, unreadable('EISDIR')), { code: 'BM_ERR_CONFIG' });
  tt.throws(() => controlSocketPath({ config: '/etc/other.json' }, unreadable('EACCES')), { code: 'BM_ERR_CONFIG' }, 'a file the user named must be readable');
});
