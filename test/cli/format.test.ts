// Human output of `blockmirror status` for fields a daemon may lack or switch off.
import t from 'tap';

import { formatStatus } from '../../src/cli/format';
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
