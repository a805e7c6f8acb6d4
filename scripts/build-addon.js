#!/usr/bin/env node
// npm "install" script: builds the native addon with npm's bundled node-gyp.
// npm runs install scripts twice in this checkout (the root, and the self-link that puts the
// `blockmirror`/`blockmirrord` bins in node_modules/.bin so `npx` finds them), one after the
// other; the second run sees an up-to-date addon and skips the rebuild.
'use strict';
const { spawnSync } = require('node:child_process');
const { existsSync, readdirSync, statSync } = require('node:fs');
const { join } = require('node:path');

const root = join(__dirname, '..');
const output = join(root, 'build', 'Release', 'blockmirror.node');

function newestSourceMtimeMs() {
  let newest = statSync(join(root, 'binding.gyp')).mtimeMs;
  for (const name of readdirSync(join(root, 'native'))) {
    newest = Math.max(newest, statSync(join(root, 'native', name)).mtimeMs);
  }
  return newest;
}

if (existsSync(output) && statSync(output).mtimeMs >= newestSourceMtimeMs() && !process.env.BLOCKMIRROR_REBUILD) {
  console.log('blockmirror: native addon up to date');
  process.exit(0);
}
process.env.npm_config_nodedir ??= '/usr';  // Debian's nodejs ships its headers there
const result = spawnSync('node-gyp', ['rebuild'], { cwd: root, stdio: 'inherit' });
if (result.error) {
  console.error(`blockmirror: could not run node-gyp: ${result.error.message}`);
  process.exit(1);
}
process.exit(result.status ?? 1);
