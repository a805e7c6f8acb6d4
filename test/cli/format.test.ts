// Human output of the CLI (sizes, `blockmirror status` fields a daemon may lack or switch off) and
// the size and rate arguments it parses.
import t from 'tap';

import { formatSize, formatStatus, parseRate, parseSize } from '../../src/cli/format';
import type { StatusResult } from '../../src/control/protocol';

const base: StatusResult = {
  version: '0.1.0', pid: 1, uptimeSeconds: 5, controlSocket: '/run/c.sock', nbdSocket: '/run/n.sock', nbdListen: null,
  replicationListen: null, nodeName: 'n', mirrors: 0, replicationSessions: 0, stateDir: '/s', peers: 0, volumes: 0,
  volumesInError: 0, connections: 0, ioEngine: 'io_uring',
  busyPoll: { maxMicros: 32, eventPolls: 10, eventPollHits: 9, completionPolls: 4, completionPollHits: 3 },
};

t.test('busy poll: counters, off, the thread pool, and a daemon older than the CLI', async (tt) => {
  tt.match(formatStatus(base), /^busy poll:\s+up to 32 us \(caught 9\/10 events, 3\/4 completions\)$/m);
  tt.match(formatStatus({ ...base, busyPoll: { ...base.busyPoll, maxMicros: 0 } }), /^busy poll:\s+off$/m);
  tt.match(formatStatus({ ...base, ioEngine: 'threadpool' }), /^busy poll:\s+off \(32 us asked; the threadpool engine does not poll\)$/m);
  // A CLI upgraded while the old daemon still runs: the field is missing, status must still print.
  const { busyPoll: _dropped, ...older } = base;
  tt.match(formatStatus(older as StatusResult), /^busy poll:\s+- \(daemon older than this CLI\)$/m);
});

t.test('sizes never show 1024 of a unit', async (tt) => {
  const cases: Array<[number, string]> = [
    [0, '0 B'], [1023, '1023 B'], [1024, '1.0 KiB'], [1536, '1.5 KiB'], [102400, '100 KiB'],
    [1048575, '1.0 MiB'], [1048576, '1.0 MiB'], [1073741823, '1.0 GiB'], [64 * 1024 ** 3, '64.0 GiB'],
  ];
  for (const [bytes, shown] of cases) tt.equal(formatSize(bytes), shown, String(bytes));
});

t.test('sizes take no "/s"; rates may', async (tt) => {
  tt.equal(parseSize('64M'), 64 * 1024 * 1024);
  tt.equal(parseSize('1.5GiB'), 1.5 * 1024 ** 3);
  tt.equal(parseSize('64M/s'), null);
  tt.equal(parseSize('0'), null);
  tt.equal(parseRate('64M/s'), 64 * 1024 * 1024);
});
