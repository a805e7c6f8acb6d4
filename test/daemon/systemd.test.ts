// systemd/blockmirrord.service must pass `systemd-analyze verify` without a single warning, and
// keep the settings the daemon relies on.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { defaults } from '../../src/config/config';
import { haveTool, repoRoot } from '../helpers/daemon';
import { scratchDir } from '../helpers/loop';

const unitPath = path.join(repoRoot, 'systemd', 'blockmirrord.service');
const unitText = fs.readFileSync(unitPath, 'utf8');

function settings(key: string): string[] {
  const values: string[] = [];
  const joined = unitText.replace(/\\\n\s*/g, ' ');
  for (const line of joined.split('\n')) {
    const match = new RegExp(`^${key}=(.*)$`).exec(line.trim());
    if (match?.[1] !== undefined) values.push(match[1].trim());
  }
  return values;
}

t.test('unit declares what the daemon relies on', async (t) => {
  t.same(settings('Type'), ['notify']);
  t.same(settings('NotifyAccess'), ['main']);
  t.same(settings('Restart'), ['on-failure']);
  t.same(settings('WatchdogSec'), ['30s']);
  t.same(settings('KillSignal'), ['SIGTERM']);
  t.same(settings('RuntimeDirectory'), ['blockmirror']);
  t.same(settings('RuntimeDirectoryMode'), ['0750']);
  t.same(settings('StateDirectory'), ['blockmirror']);
  t.same(settings('ConfigurationDirectory'), ['blockmirror']);
  t.same(settings('ProtectSystem'), ['strict']);
  t.same(settings('PrivateDevices'), ['no'], 'raw block devices must stay visible');
  t.ok(settings('DeviceAllow').includes('block-* rw'), 'all block device groups readable and writable');
  t.same(settings('RestrictAddressFamilies'), ['AF_UNIX AF_INET AF_INET6']);
  // No path flags: they would override the config file's. The daemon's defaults must be the
  // directories the unit creates and leaves writable.
  t.same(settings('ExecStart'), ['/usr/bin/env blockmirrord']);
  t.equal(path.dirname(defaults.controlSocket), '/run/blockmirror');
  t.equal(path.dirname(defaults.nbdSocket), '/run/blockmirror');
  t.equal(defaults.stateDir, '/var/lib/blockmirror');
  // A crash loop must end in a failed unit: more restarts than the burst fit in the interval.
  const seconds = (key: string): number => Number(/^(\d+)s$/.exec(settings(key)[0] ?? '')?.[1]);
  const burst = Number(settings('StartLimitBurst')[0]);
  t.ok(burst * seconds('RestartSec') < seconds('StartLimitIntervalSec'), `${burst} restarts ${seconds('RestartSec')} s apart fit in StartLimitIntervalSec=${seconds('StartLimitIntervalSec')}s`);
  // The daemon's own shutdown bound (25 s) must fit inside TimeoutStopSec.
  const stopSeconds = Number(/^(\d+)s$/.exec(settings('TimeoutStopSec')[0] ?? '')?.[1]);
  t.ok(stopSeconds > 25, `TimeoutStopSec=${stopSeconds}s leaves room for the 25 s drain`);
});

const haveAnalyze = haveTool('systemd-analyze');

function verify(file: string): { status: number | null; output: string } {
  const result = spawnSync('systemd-analyze', ['verify', '--man=no', file], { encoding: 'utf8', timeout: 60_000 });
  return { status: result.status, output: `${result.stdout}${result.stderr}`.trim() };
}

t.test('systemd-analyze verify is clean', { skip: haveAnalyze ? false : 'systemd-analyze not installed' }, async (t) => {
  // ExecStart goes through /usr/bin/env, which exists; verify checks that path. The daemon
  // itself need not be installed for the unit to verify.
  const dir = scratchDir(t, 'bm-unit-');
  const copy = path.join(dir, 'blockmirrord.service');
  fs.copyFileSync(unitPath, copy);
  const result = verify(copy);
  t.equal(result.output, '', 'no warnings');
  t.equal(result.status, 0);
});

t.test('the verify check can fail: a broken copy is reported', { skip: haveAnalyze ? false : 'systemd-analyze not installed' }, async (t) => {
  const dir = scratchDir(t, 'bm-unit-');
  const copy = path.join(dir, 'blockmirrord.service');
  fs.writeFileSync(copy, unitText.replace('DeviceAllow=block-* rw', 'DeviceAllow=block-* rwq'));
  t.match(verify(copy).output, /Invalid device rights/);
});
