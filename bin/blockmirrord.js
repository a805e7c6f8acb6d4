#!/usr/bin/env -S node --initial-old-space-size=128 --max-semi-space-size=4
'use strict';
// V8 heap flags (kept here, in the one line every launcher runs: npx, PATH, systemd's ExecStart):
// with the default sizing, a daemon heap of ~8 MiB leaves less old-space slack than one young
// generation, so V8 starts a full mark-compact every ~35 ms under NBD load (measured: 90 in 5 s,
// and a third of the I/O rate lost). A larger initial old space removes that; a smaller young
// generation keeps scavenges short. bench/nbd-fio.ts reads the flags from this line.
require('../dist/src/daemon/main.js').main(process.argv);
