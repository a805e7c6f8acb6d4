#!/usr/bin/env node
'use strict';
require('../dist/src/daemon/main.js').main(process.argv);
