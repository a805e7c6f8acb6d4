import t from 'tap';

import {
  MIRROR_EVENT_TYPES,
  MIRROR_STATES,
  MIRROR_TRANSITIONS,
  MirrorStateMachine,
  checkTransitionTable,
  type MirrorEvent,
  type MirrorEventType,
  type MirrorStateName,
  type MirrorTransition,
  type TransitionTable,
} from '../../src/replication/mirror-state';

/** A clock that advances 1000 ms per read: no real time, distinct timestamps. */
function fakeClock(startMs = 1_700_000_000_000): () => number {
  let nowMs = startMs;
  return () => (nowMs += 1000);
}

function eventOf(type: MirrorEventType): MirrorEvent {
  switch (type) {
    case 'validationFailed':
    case 'severeFailure':
      return { type, code: 'BM_ERR_TARGET_TOO_SMALL' };
    case 'transientFailure':
      return { type, code: 'ECONNREFUSED' };
    default:
      return { type } as MirrorEvent;
  }
}

/** Event paths from INIT to every (state, link) pair the machine can be in. */
const SETUPS: Array<{ state: MirrorStateName; linkUp: boolean; path: MirrorEventType[] }> = [
  { state: 'INIT', linkUp: false, path: [] },
  { state: 'MAKEPARTS', linkUp: false, path: ['start'] },
  { state: 'MAKEPARTS', linkUp: true, path: ['start', 'connected'] },
  { state: 'RESET', linkUp: false, path: ['start', 'transientFailure'] },
  { state: 'ERROR', linkUp: false, path: ['start', 'connected', 'validationFailed'] },
  { state: 'READY', linkUp: true, path: ['start', 'connected', 'validated'] },
  { state: 'REPLICATE', linkUp: true, path: ['start', 'connected', 'validated', 'fullCopyNeeded'] },
  { state: 'OUTOFSYNC', linkUp: true, path: ['start', 'connected', 'validated', 'bitmapResyncNeeded'] },
  { state: 'OUTOFSYNC', linkUp: false, path: ['start', 'connected', 'validated', 'alreadyInSync', 'connectionLost'] },
  { state: 'INSYNC', linkUp: true, path: ['start', 'connected', 'validated', 'alreadyInSync'] },
];

function machineAt(setup: (typeof SETUPS)[number]): MirrorStateMachine {
  const machine = new MirrorStateMachine({ now: fakeClock() });
  for (const type of setup.path) machine.fire(eventOf(type));
  if (machine.state !== setup.state || machine.isLinkUp !== setup.linkUp) {
    throw new Error(`setup for ${setup.state} reached ${machine.state} link=${machine.isLinkUp}`);
  }
  return machine;
}

const LINK_UP_EVENTS = new Set<MirrorEventType>([
  'validated',
  'fullCopyNeeded',
  'bitmapResyncNeeded',
  'alreadyInSync',
  'copyComplete',
  'connectionLost',
]);
const LINK_DOWN_EVENTS = new Set<MirrorEventType>(['connected', 'reconnect']);

function linkAllows(type: MirrorEventType, linkUp: boolean): boolean {
  if (LINK_UP_EVENTS.has(type)) return linkUp;
  if (LINK_DOWN_EVENTS.has(type)) return !linkUp;
  return true;
}

t.test('the shipped table passes its own check', async (t) => {
  t.same(checkTransitionTable(MIRROR_TRANSITIONS), []);
});

t.test('every legal transition goes where the table says', async (t) => {
  let checked = 0;
  for (const state of MIRROR_STATES) {
    for (const type of MIRROR_EVENT_TYPES) {
      const next = MIRROR_TRANSITIONS[state][type];
      if (next === undefined) continue;
      const setup = SETUPS.find((s) => s.state === state && linkAllows(type, s.linkUp));
      t.ok(setup, `a setup exists for ${state} x ${type}`);
      if (setup === undefined) continue;
      const machine = machineAt(setup);
      const transition = machine.fire(eventOf(type));
      t.equal(machine.state, next, `${state} x ${type} -> ${next}`);
      t.equal(transition.from, state);
      t.equal(transition.to, next);
      t.equal(transition.cause.event, type);
      checked++;
    }
  }
  t.ok(checked >= 40, `${checked} legal transitions checked`);
});

t.test('every illegal transition is rejected with a stable code and changes nothing', async (t) => {
  for (const setup of SETUPS) {
    for (const type of MIRROR_EVENT_TYPES) {
      if (MIRROR_TRANSITIONS[setup.state][type] !== undefined && linkAllows(type, setup.linkUp)) continue;
      const machine = machineAt(setup);
      const before = machine.toStatus();
      t.throws(
        () => machine.fire(eventOf(type)),
        { code: 'BM_ERR_MIRROR_ILLEGAL_TRANSITION', state: setup.state, event: type, message: new RegExp(`${type} in state ${setup.state}`) },
        `${setup.state}${setup.linkUp ? '(link up)' : ''} x ${type}`,
      );
      t.equal(machine.canFire(type), false);
      t.same(machine.toStatus(), before, 'status unchanged');
    }
  }
});

t.test('the table checker detects broken tables', async (t) => {
  const edit = (change: (table: Record<string, Record<string, string>>) => void): string[] => {
    const table = JSON.parse(JSON.stringify(MIRROR_TRANSITIONS)) as Record<string, Record<string, string>>;
    change(table);
    return checkTransitionTable(table as unknown as TransitionTable);
  };
  const cases: Array<[string, (table: Record<string, Record<string, string>>) => void, RegExp]> = [
    ['missing row', (x) => delete x.READY, /state READY has no row/],
    ['unknown state row', (x) => (x.PAUSED = { stop: 'INIT', remove: 'PAUSED' }), /unknown state row PAUSED/],
    ['unknown next state', (x) => (x.INIT.start = 'CONNECTING'), /unknown next state CONNECTING/],
    ['unknown event', (x) => (x.INIT.poke = 'INIT'), /unknown event poke/],
    ['ERROR left without admin', (x) => (x.ERROR.retryDue = 'INIT'), /ERROR may only be left by an admin event/],
    ['ERROR entered without a code', (x) => (x.RESET.retryDue = 'ERROR'), /ERROR may only be entered/],
    ['error event not to ERROR', (x) => (x.MAKEPARTS.validationFailed = 'RESET'), /validationFailed must lead to ERROR/],
    ['INSYNC from RESET', (x) => (x.RESET.retryDue = 'INSYNC'), /INSYNC may only be entered from READY/],
    ['remove moves the state', (x) => (x.INSYNC.remove = 'INIT'), /remove must be a self-transition/],
    ['stop missing', (x) => delete x.REPLICATE.stop, /REPLICATE: stop must be legal/],
    ['event never legal', (x) => delete x.OUTOFSYNC.reconnect, /event reconnect is legal in no state/],
    [
      'unreachable state',
      (x) => {
        x.READY.fullCopyNeeded = 'OUTOFSYNC'; // nothing else enters REPLICATE
      },
      /state REPLICATE is unreachable from INIT/,
    ],
    [
      'INSYNC unreachable (no way out of ERROR)',
      (x) => {
        x.ERROR = { stop: 'ERROR', remove: 'ERROR' };
        x.RESET.adminReset = 'INIT';
      },
      /INSYNC is unreachable from ERROR/,
    ],
  ];
  for (const [name, change, expected] of cases) {
    const problems = edit(change);
    t.match(problems.join('\n'), expected, name);
  }
});

t.test('listeners: once per transition, with the cause; unsubscribe; errors contained', async (t) => {
  const listenerErrors: unknown[] = [];
  const machine = new MirrorStateMachine({ now: fakeClock(), onListenerError: (error) => listenerErrors.push(error) });
  const seen: MirrorTransition[] = [];
  const unsubscribe = machine.onTransition((transition) => seen.push(transition));
  machine.onTransition(() => {
    throw new Error('logger broke');
  });
  const afterThrower: string[] = [];
  machine.onTransition((transition) => afterThrower.push(transition.to));

  machine.fire({ type: 'start' });
  machine.fire({ type: 'transientFailure', code: 'ETIMEDOUT', reason: 'connect to 127.0.0.1:7802 timed out' });
  t.equal(seen.length, 2);
  t.same(
    seen.map((x) => [x.from, x.to, x.cause.event]),
    [
      ['INIT', 'MAKEPARTS', 'start'],
      ['MAKEPARTS', 'RESET', 'transientFailure'],
    ],
  );
  t.same(seen[1]!.cause, { event: 'transientFailure', reason: 'connect to 127.0.0.1:7802 timed out', code: 'ETIMEDOUT' });
  t.equal(seen[0]!.cause.reason, 'mirror started', 'default reason');
  t.equal(listenerErrors.length, 2, 'the throwing listener reported each time');
  t.same(afterThrower, ['MAKEPARTS', 'RESET'], 'later listeners still run');
  t.equal(machine.state, 'RESET', 'state committed despite the throwing listener');

  unsubscribe();
  machine.fire({ type: 'retryDue' });
  t.equal(seen.length, 2, 'unsubscribed listener not called');
  t.equal(machine.state, 'INIT');
});

t.test('a listener may not fire events (re-entrancy refused, state intact)', async (t) => {
  const listenerErrors: unknown[] = [];
  const machine = new MirrorStateMachine({ now: fakeClock(), onListenerError: (error) => listenerErrors.push(error) });
  machine.onTransition(() => machine.fire({ type: 'stop' }));
  machine.fire({ type: 'start' });
  t.equal(machine.state, 'MAKEPARTS');
  t.match(listenerErrors[0], { code: 'BM_ERR_MIRROR_REENTRANT' });
});

t.test('ERROR is sticky until the admin, and keeps its reason', async (t) => {
  const machine = new MirrorStateMachine({ now: fakeClock() });
  machine.fire({ type: 'start' });
  machine.fire({ type: 'connected' });
  machine.fire({ type: 'validationFailed', code: 'BM_ERR_TARGET_TOO_SMALL', reason: 'target 1 GiB < source 2 GiB' });
  t.equal(machine.state, 'ERROR');
  const sinceMs = machine.toStatus().sinceMs;
  for (const type of MIRROR_EVENT_TYPES) {
    if (type === 'adminResume' || type === 'adminReset' || type === 'remove') continue;
    if (type === 'stop') {
      machine.fire({ type: 'stop', reason: 'daemon shutting down' });
    } else {
      t.throws(() => machine.fire(eventOf(type)), { code: 'BM_ERR_MIRROR_ILLEGAL_TRANSITION' }, type);
    }
    t.equal(machine.state, 'ERROR', `still ERROR after ${type}`);
  }
  const status = machine.toStatus();
  t.equal(status.errorCode, 'BM_ERR_TARGET_TOO_SMALL');
  t.equal(status.errorReason, 'target 1 GiB < source 2 GiB');
  t.equal(status.sinceMs, sinceMs, 'a self-transition keeps the entered-at time');
  t.equal(status.cause.event, 'stop');

  machine.fire({ type: 'adminResume', reason: 'target grown' });
  t.equal(machine.state, 'INIT');
  t.equal(machine.toStatus().errorCode, null);
  t.equal(machine.toStatus().errorReason, null);
});

t.test('events are validated at run time', async (t) => {
  const machine = new MirrorStateMachine({ now: fakeClock() });
  t.throws(() => machine.fire({ type: 'bogus' } as unknown as MirrorEvent), { code: 'BM_ERR_MIRROR_BAD_EVENT' });
  machine.fire({ type: 'start' });
  t.throws(
    () => machine.fire({ type: 'validationFailed', code: 'BM_ERR_NOPE' } as unknown as MirrorEvent),
    { code: 'BM_ERR_MIRROR_BAD_EVENT' },
  );
  t.throws(() => machine.fire({ type: 'transientFailure', code: '' }), { code: 'BM_ERR_MIRROR_BAD_EVENT' });
  t.equal(machine.state, 'MAKEPARTS');
});

t.test('history is bounded and keeps the newest entries', async (t) => {
  const machine = new MirrorStateMachine({ now: fakeClock(), historyLength: 4 });
  for (let i = 0; i < 10; i++) {
    machine.fire({ type: 'start' });
    machine.fire({ type: 'transientFailure', code: 'ECONNREFUSED', reason: `attempt ${i}` });
    machine.fire({ type: 'retryDue' });
  }
  const status = machine.toStatus();
  t.equal(status.transitionCount, 30);
  t.equal(status.history.length, 4);
  t.same(
    status.history.map((x) => x.cause.event),
    ['retryDue', 'start', 'transientFailure', 'retryDue'],
  );
  t.equal(status.history[2]!.cause.reason, 'attempt 9');

  const defaults = new MirrorStateMachine({ now: fakeClock() });
  for (let i = 0; i < 100; i++) defaults.fire({ type: 'stop' });
  t.equal(defaults.toStatus().history.length, 32);
  t.throws(() => new MirrorStateMachine({ now: fakeClock(), historyLength: 0 }), RangeError);
  t.throws(() => new MirrorStateMachine({ now: fakeClock(), historyLength: 100_000 }), RangeError);
});

t.test('a full life: copy, crack, reconnect, resync; status is plain JSON', async (t) => {
  const machine = new MirrorStateMachine({ now: fakeClock(0) });
  const path: Array<[MirrorEvent, MirrorStateName]> = [
    [{ type: 'start' }, 'MAKEPARTS'],
    [{ type: 'connected' }, 'MAKEPARTS'],
    [{ type: 'validated' }, 'READY'],
    [{ type: 'fullCopyNeeded' }, 'REPLICATE'],
    [{ type: 'connectionLost', reason: 'peer reset' }, 'OUTOFSYNC'],
    [{ type: 'reconnect' }, 'MAKEPARTS'],
    [{ type: 'transientFailure', code: 'ECONNREFUSED' }, 'RESET'],
    [{ type: 'retryDue' }, 'INIT'],
    [{ type: 'start' }, 'MAKEPARTS'],
    [{ type: 'connected' }, 'MAKEPARTS'],
    [{ type: 'validated' }, 'READY'],
    [{ type: 'bitmapResyncNeeded' }, 'OUTOFSYNC'],
    [{ type: 'copyComplete' }, 'INSYNC'],
  ];
  for (const [event, expected] of path) {
    machine.fire(event);
    t.equal(machine.state, expected, `${event.type} -> ${expected}`);
  }
  t.equal(machine.isLinkUp, true);
  const status = machine.toStatus();
  t.same(JSON.parse(JSON.stringify(status)), status, 'JSON round trip is lossless');
  t.equal(status.since, new Date(status.sinceMs).toISOString());
  t.equal(status.sinceMs, 14_000, 'entered INSYNC at the 14th clock read');
  t.same(status.cause, { event: 'copyComplete', reason: 'bitmap clean and live replication on', code: null });
  t.equal(status.history.length, path.length);
});

t.test('remove retires the machine', async (t) => {
  const machine = machineAt(SETUPS.find((s) => s.state === 'INSYNC')!);
  machine.fire({ type: 'remove' });
  t.equal(machine.state, 'INSYNC');
  t.equal(machine.isRemoved, true);
  t.equal(machine.toStatus().removed, true);
  t.throws(() => machine.fire({ type: 'stop' }), { code: 'BM_ERR_MIRROR_REMOVED' });
  t.throws(() => machine.fire({ type: 'remove' }), { code: 'BM_ERR_MIRROR_REMOVED' });
  t.match(machine.commandAllowed('resume'), { code: 'BM_ERR_MIRROR_REMOVED' });
});

t.test('admin commands: allowed states and clear errors', async (t) => {
  const expectations: Record<string, Record<MirrorStateName, boolean>> = {
    resume: { INIT: true, MAKEPARTS: false, RESET: true, ERROR: true, READY: false, REPLICATE: false, OUTOFSYNC: false, INSYNC: false },
    reset: { INIT: false, MAKEPARTS: false, RESET: false, ERROR: true, READY: false, REPLICATE: false, OUTOFSYNC: false, INSYNC: false },
    suspend: { INIT: false, MAKEPARTS: true, RESET: true, ERROR: false, READY: true, REPLICATE: true, OUTOFSYNC: true, INSYNC: true },
    remove: { INIT: true, MAKEPARTS: true, RESET: true, ERROR: true, READY: true, REPLICATE: false, OUTOFSYNC: false, INSYNC: true },
    'set-mode': { INIT: true, MAKEPARTS: false, RESET: true, ERROR: true, READY: false, REPLICATE: true, OUTOFSYNC: true, INSYNC: true },
  };
  for (const setup of SETUPS) {
    const machine = machineAt(setup);
    for (const [command, byState] of Object.entries(expectations)) {
      const error = machine.commandAllowed(command as 'resume');
      if (byState[setup.state]) {
        t.equal(error, undefined, `${command} allowed in ${setup.state}`);
      } else {
        t.match(
          error,
          { code: 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED', state: setup.state, event: command, message: new RegExp(setup.state) },
          `${command} refused in ${setup.state}`,
        );
      }
    }
    t.equal(machine.commandAllowed('remove', { force: true }), undefined, `remove --force in ${setup.state}`);
  }
  const machine = new MirrorStateMachine({ now: fakeClock() });
  t.match(machine.commandAllowed('frobnicate' as 'resume'), { code: 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED' });
});
