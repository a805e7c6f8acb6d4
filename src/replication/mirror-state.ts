// The per-mirror state machine (issue 3 part 3), named as the StorEdge documents name the states.
// Pure logic: the replication engine drives it with events, status and the CLI read it. It owns
// no sockets and no timers; time comes from an injected clock. See docs/MIRROR-STATES.md.
//
// The transition table below is data, checked once at load (checkTransitionTable) so an edit that
// makes a state unreachable, lets ERROR be left without the admin, or enters INSYNC from the wrong
// place fails the first import instead of a mirror in production.

import assert from 'node:assert';

export const MIRROR_STATES = [
  'INIT', // defined, no attempt under way (new, suspended, or waiting for the engine to start it)
  'MAKEPARTS', // connecting, authenticating, validating the target through Hello
  'RESET', // transient failure; a retry is scheduled with backoff
  'ERROR', // severe failure; waits for the admin (resume or reset), reason shown
  'READY', // target validated; deciding between a full copy, a bitmap resync or nothing
  'REPLICATE', // first full copy while the source stays live
  'OUTOFSYNC', // target behind: disconnected, or catching up from the dirty bitmap
  'INSYNC', // bitmap clean and every write forwarded live
] as const;
export type MirrorStateName = (typeof MIRROR_STATES)[number];

/** Reasons a mirror is in ERROR. Stable: status, logs and tests match on them. */
export const MIRROR_ERROR_CODES = [
  'BM_ERR_TARGET_TOO_SMALL',
  'BM_ERR_TARGET_NOT_FOUND',
  'BM_ERR_TARGET_NOT_MIRROR',
  'BM_ERR_TARGET_BOUND', // bound to another source
  'BM_ERR_SECTOR_MISMATCH',
  'BM_ERR_IDENTITY_MISMATCH', // volume UUID or name differs from the one the mirror was made with
  'BM_ERR_AUTH_FAILED',
  'BM_ERR_AUTH_UNKNOWN_PEER',
  'BM_ERR_PROTOCOL_VERSION', // no protocol version in common
  'BM_ERR_TARGET_IO', // the target reported a device error (EIO, ENOSPC) writing replicated data
  'BM_ERR_SOURCE_IO', // reading the source volume for a copy failed
  'BM_ERR_SPLIT_BRAIN', // both sides written independently (generation identifiers diverged)
  'BM_ERR_TARGET_UNSUPPORTED', // the target lacks a capability the mirror's mode needs (ordered writes for async)
] as const;
export type MirrorErrorCode = (typeof MIRROR_ERROR_CODES)[number];
const MIRROR_ERROR_CODE_SET: ReadonlySet<string> = new Set(MIRROR_ERROR_CODES);

/**
 * Events the engine (and, for admin*, the control server) fires. `reason` is the human part of
 * the cause shown in status and logs; each event type has a default.
 */
export type MirrorEvent =
  | { type: 'start'; reason?: string } // INIT -> MAKEPARTS: begin connecting
  | { type: 'connected'; reason?: string } // transport up and peer authenticated; Hello under way
  | { type: 'validated'; reason?: string } // Hello checks passed
  | { type: 'validationFailed'; code: MirrorErrorCode; reason?: string } // severe, during set-up
  | { type: 'transientFailure'; code: string; reason?: string } // ECONNREFUSED, ETIMEDOUT, ...
  | { type: 'fullCopyNeeded'; reason?: string } // READY decision: no common history
  | { type: 'bitmapResyncNeeded'; reason?: string } // READY decision: catch up the dirty regions
  | { type: 'alreadyInSync'; reason?: string } // READY decision: generations equal, bitmap clean
  | { type: 'copyComplete'; reason?: string } // bitmap clean and live forwarding on
  | { type: 'connectionLost'; code?: string; reason?: string } // the link dropped (code: why the engine cut it, e.g. BM_ERR_SYNC_TIMEOUT)
  | { type: 'severeFailure'; code: MirrorErrorCode; reason?: string } // severe, while replicating
  | { type: 'reconnect'; reason?: string } // OUTOFSYNC, link down: try the target again
  | { type: 'retryDue'; reason?: string } // RESET backoff expired
  | { type: 'adminResume'; reason?: string } // admin: retry now, keep what is known
  | { type: 'adminReset'; reason?: string } // admin: clear ERROR, next sync is a full copy
  | { type: 'stop'; reason?: string } // suspend or daemon shutdown
  | { type: 'remove'; reason?: string }; // mirror deleted: the machine accepts nothing afterwards
export type MirrorEventType = MirrorEvent['type'];

export const MIRROR_EVENT_TYPES: readonly MirrorEventType[] = [
  'start',
  'connected',
  'validated',
  'validationFailed',
  'transientFailure',
  'fullCopyNeeded',
  'bitmapResyncNeeded',
  'alreadyInSync',
  'copyComplete',
  'connectionLost',
  'severeFailure',
  'reconnect',
  'retryDue',
  'adminResume',
  'adminReset',
  'stop',
  'remove',
];

const DEFAULT_REASON: Record<MirrorEventType, string> = {
  start: 'mirror started',
  connected: 'connected and authenticated; validating the target',
  validated: 'target validated',
  validationFailed: 'target validation failed',
  transientFailure: 'transient failure; will retry',
  fullCopyNeeded: 'no common history with the target: full copy',
  bitmapResyncNeeded: 'target behind: resync from the dirty bitmap',
  alreadyInSync: 'target already in sync',
  copyComplete: 'bitmap clean and live replication on',
  connectionLost: 'connection lost',
  severeFailure: 'severe failure while replicating',
  reconnect: 'reconnecting to the target',
  retryDue: 'retry delay expired',
  adminResume: 'resumed by the admin',
  adminReset: 'reset by the admin',
  stop: 'mirror stopped',
  remove: 'mirror removed',
};

/** Events only an admin command may fire: the only ways out of ERROR. */
export const ADMIN_EVENTS: ReadonlySet<MirrorEventType> = new Set(['adminResume', 'adminReset']);
/** Events carrying a MirrorErrorCode: they, and only they, lead to ERROR. */
export const ERROR_EVENTS: ReadonlySet<MirrorEventType> = new Set(['validationFailed', 'severeFailure']);
/** States INSYNC may be entered from (issue 3: only after a decision or a completed copy). */
export const INSYNC_ENTRY_STATES: ReadonlySet<MirrorStateName> = new Set(['READY', 'REPLICATE', 'OUTOFSYNC']);

/** Events that need the link up (they report on a live connection) or down (reconnect). */
const LINK_UP_EVENTS: ReadonlySet<MirrorEventType> = new Set([
  'validated',
  'fullCopyNeeded',
  'bitmapResyncNeeded',
  'alreadyInSync',
  'copyComplete',
  'connectionLost',
]);
const LINK_DOWN_EVENTS: ReadonlySet<MirrorEventType> = new Set(['connected', 'reconnect']);
/** Events after which no connection is left (the engine closes it, or it is already gone). */
const LINK_DROP_EVENTS: ReadonlySet<MirrorEventType> = new Set([
  'validationFailed',
  'transientFailure',
  'connectionLost',
  'severeFailure',
  'retryDue',
  'adminResume',
  'adminReset',
  'stop',
]);
const LINK_STATES: ReadonlySet<MirrorStateName> = new Set(['MAKEPARTS', 'READY', 'REPLICATE', 'OUTOFSYNC', 'INSYNC']);

export type TransitionTable = Readonly<
  Record<MirrorStateName, Readonly<Partial<Record<MirrorEventType, MirrorStateName>>>>
>;

/** state x event -> next state. A missing entry is an illegal transition. */
export const MIRROR_TRANSITIONS: TransitionTable = {
  INIT: { start: 'MAKEPARTS', stop: 'INIT', remove: 'INIT' },
  MAKEPARTS: {
    connected: 'MAKEPARTS',
    validated: 'READY',
    validationFailed: 'ERROR',
    transientFailure: 'RESET',
    connectionLost: 'RESET',
    stop: 'INIT',
    remove: 'MAKEPARTS',
  },
  RESET: { retryDue: 'INIT', adminResume: 'INIT', stop: 'INIT', remove: 'RESET' },
  // Sticky: only the admin leaves ERROR. stop keeps it (a restart must not forget the reason).
  ERROR: { adminResume: 'INIT', adminReset: 'INIT', stop: 'ERROR', remove: 'ERROR' },
  READY: {
    fullCopyNeeded: 'REPLICATE',
    bitmapResyncNeeded: 'OUTOFSYNC',
    alreadyInSync: 'INSYNC',
    validationFailed: 'ERROR', // e.g. split brain found comparing generations
    transientFailure: 'RESET',
    connectionLost: 'RESET',
    stop: 'INIT',
    remove: 'READY',
  },
  // A crack during the full copy goes to OUTOFSYNC, not back to REPLICATE: the copy runs over a
  // bitmap that starts all dirty, so the regions not yet copied are exactly the dirty ones.
  REPLICATE: {
    copyComplete: 'INSYNC',
    connectionLost: 'OUTOFSYNC',
    severeFailure: 'ERROR',
    stop: 'INIT',
    remove: 'REPLICATE',
  },
  OUTOFSYNC: {
    copyComplete: 'INSYNC',
    connectionLost: 'OUTOFSYNC', // resync was running; now disconnected, still behind
    reconnect: 'MAKEPARTS',
    severeFailure: 'ERROR',
    stop: 'INIT',
    remove: 'OUTOFSYNC',
  },
  INSYNC: { connectionLost: 'OUTOFSYNC', severeFailure: 'ERROR', stop: 'INIT', remove: 'INSYNC' },
};

/**
 * Checks a transition table's completeness and the invariants issue 3 asks for. Returns the
 * problems found (empty when the table is sound). Exported so tests can feed it broken tables.
 */
export function checkTransitionTable(table: TransitionTable): string[] {
  const problems: string[] = [];
  const states: ReadonlySet<string> = new Set(MIRROR_STATES);
  const events: ReadonlySet<string> = new Set(MIRROR_EVENT_TYPES);
  const usedEvents = new Set<string>();

  for (const key of Object.keys(table)) {
    if (!states.has(key)) problems.push(`unknown state row ${key}`);
  }
  for (const state of MIRROR_STATES) {
    const row = table[state];
    if (row === undefined || row === null || typeof row !== 'object') {
      problems.push(`state ${state} has no row`);
      continue;
    }
    for (const [event, next] of Object.entries(row)) {
      usedEvents.add(event);
      if (!events.has(event)) problems.push(`${state}: unknown event ${event}`);
      if (next === undefined || !states.has(next)) problems.push(`${state} x ${event}: unknown next state ${String(next)}`);
    }
    // remove is legal everywhere and never moves the state: it only retires the machine.
    if (row.remove !== state) problems.push(`${state}: remove must be a self-transition`);
    if (row.stop === undefined) problems.push(`${state}: stop must be legal`);
    for (const [event, next] of Object.entries(row) as Array<[MirrorEventType, MirrorStateName]>) {
      if (ERROR_EVENTS.has(event) && next !== 'ERROR') problems.push(`${state} x ${event} must lead to ERROR`);
      if (next === 'ERROR' && state !== 'ERROR' && !ERROR_EVENTS.has(event)) {
        problems.push(`${state} x ${event}: ERROR may only be entered by an event with an error code`);
      }
      if (state === 'ERROR' && next !== 'ERROR' && !ADMIN_EVENTS.has(event)) {
        problems.push(`ERROR x ${event}: ERROR may only be left by an admin event`);
      }
      if (next === 'INSYNC' && state !== 'INSYNC' && !INSYNC_ENTRY_STATES.has(state)) {
        problems.push(`${state} x ${event}: INSYNC may only be entered from READY, REPLICATE or OUTOFSYNC`);
      }
    }
  }
  for (const event of MIRROR_EVENT_TYPES) {
    if (!usedEvents.has(event)) problems.push(`event ${event} is legal in no state`);
  }
  if (problems.length > 0) return problems; // graph checks below assume a well-formed table

  const successors = (state: MirrorStateName): MirrorStateName[] =>
    Object.values(table[state]).filter((next): next is MirrorStateName => next !== undefined);
  const reachable = (from: MirrorStateName): Set<MirrorStateName> => {
    const seen = new Set<MirrorStateName>([from]);
    const queue: MirrorStateName[] = [from];
    while (queue.length > 0) {
      for (const next of successors(queue.shift() as MirrorStateName)) {
        if (!seen.has(next)) {
          seen.add(next);
          queue.push(next);
        }
      }
    }
    return seen;
  };
  const fromInit = reachable('INIT');
  for (const state of MIRROR_STATES) {
    if (!fromInit.has(state)) problems.push(`state ${state} is unreachable from INIT`);
    // Liveness: whatever happened, some sequence of events (admin ones included) reaches INSYNC.
    if (!reachable(state).has('INSYNC')) problems.push(`INSYNC is unreachable from ${state}`);
  }
  return problems;
}

{
  const problems = checkTransitionTable(MIRROR_TRANSITIONS);
  assert(problems.length === 0, `MIRROR_TRANSITIONS is inconsistent: ${problems.join('; ')}`);
}

export type MirrorStateErrorCode =
  | 'BM_ERR_MIRROR_ILLEGAL_TRANSITION' // event not legal in the current state
  | 'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED' // admin command not legal in the current state
  | 'BM_ERR_MIRROR_REMOVED' // the mirror was removed; its machine accepts nothing
  | 'BM_ERR_MIRROR_REENTRANT' // fire() called from a transition listener
  | 'BM_ERR_MIRROR_BAD_EVENT'; // malformed event (unknown type or error code)

export class MirrorStateError extends Error {
  readonly code: MirrorStateErrorCode;
  readonly state: MirrorStateName;
  /** The event or admin command refused, when there is one. */
  readonly event: string | undefined;
  constructor(code: MirrorStateErrorCode, state: MirrorStateName, event: string | undefined, message: string) {
    super(message);
    this.name = 'MirrorStateError';
    this.code = code;
    this.state = state;
    this.event = event;
  }
}

/** Why the machine is in its current state. */
export interface MirrorCause {
  event: MirrorEventType;
  reason: string;
  /** Error code carried by the event (MirrorErrorCode for ERROR, errno name for transient ones). */
  code: string | null;
}

export interface MirrorTransition {
  from: MirrorStateName;
  to: MirrorStateName;
  cause: MirrorCause;
  atMs: number;
}

export type TransitionListener = (transition: MirrorTransition) => void;

export const HISTORY_LENGTH_DEFAULT = 32;
export const HISTORY_LENGTH_MAX = 1024;

export interface MirrorStateMachineOptions {
  /** Wall clock in ms since the epoch (Date.now in production, a counter in tests). */
  now: () => number;
  /** Transitions kept for status, 1..HISTORY_LENGTH_MAX. */
  historyLength?: number;
  /** Called when a listener throws; default: process.emitWarning. State is already committed. */
  onListenerError?: (error: unknown, transition: MirrorTransition) => void;
}

export interface MirrorStatus {
  state: MirrorStateName;
  sinceMs: number;
  since: string;
  cause: MirrorCause;
  /** Set only in ERROR. */
  errorCode: MirrorErrorCode | null;
  errorReason: string | null;
  linkUp: boolean;
  removed: boolean;
  transitionCount: number;
  history: MirrorTransition[];
}

export type MirrorCommand = 'resume' | 'reset' | 'suspend' | 'remove' | 'set-mode' | 'resolve';

/** States in which each admin command is legal (remove: everywhere, but see `force`). */
const COMMAND_STATES: Readonly<Record<MirrorCommand, ReadonlySet<MirrorStateName>>> = {
  resume: new Set(['INIT', 'RESET', 'ERROR']),
  reset: new Set(['ERROR']),
  suspend: new Set(['MAKEPARTS', 'RESET', 'READY', 'REPLICATE', 'OUTOFSYNC', 'INSYNC']),
  remove: new Set(MIRROR_STATES),
  // The mode is announced in Hello: changing it while the handshake runs would race it.
  'set-mode': new Set(['INIT', 'RESET', 'ERROR', 'REPLICATE', 'OUTOFSYNC', 'INSYNC']),
  // Only a split brain (the mirror checks the ERROR's code too).
  resolve: new Set(['ERROR']),
};
const COMMAND_HINT: Readonly<Record<MirrorCommand, string>> = {
  resume: 'resume applies in ERROR, RESET or a suspended (INIT) mirror',
  reset: 'reset only clears an ERROR',
  suspend: 'the mirror is not running',
  remove: '',
  'set-mode': 'the mode is being negotiated; retry once the mirror left MAKEPARTS/READY',
  resolve: 'resolve applies to a mirror in ERROR with code BM_ERR_SPLIT_BRAIN',
};
/** States where the target is not a consistent image: remove needs force there. */
const INCONSISTENT_TARGET_STATES: ReadonlySet<MirrorStateName> = new Set(['REPLICATE', 'OUTOFSYNC']);

export class MirrorStateMachine {
  private readonly now: () => number;
  private readonly historyLength: number;
  private readonly onListenerError: (error: unknown, transition: MirrorTransition) => void;
  private readonly listeners = new Set<TransitionListener>();
  private currentState: MirrorStateName = 'INIT';
  private enteredAtMs: number;
  private lastCause: MirrorCause;
  private errorCode: MirrorErrorCode | null = null;
  private errorReason: string | null = null;
  private linkUp = false;
  private removed = false;
  private dispatching = false;
  private transitionCount = 0;
  /** Oldest first; never longer than historyLength. */
  private readonly history: MirrorTransition[] = [];

  constructor(options: MirrorStateMachineOptions) {
    const historyLength = options.historyLength ?? HISTORY_LENGTH_DEFAULT;
    if (!Number.isSafeInteger(historyLength) || historyLength < 1 || historyLength > HISTORY_LENGTH_MAX) {
      throw new RangeError(`historyLength must be an integer in [1, ${HISTORY_LENGTH_MAX}], got ${historyLength}`);
    }
    this.now = options.now;
    this.historyLength = historyLength;
    this.onListenerError =
      options.onListenerError ??
      ((error) => process.emitWarning(`mirror transition listener threw: ${String(error)}`, 'BlockmirrorWarning'));
    this.enteredAtMs = this.readClock();
    this.lastCause = { event: 'start', reason: 'mirror defined', code: null };
  }

  get state(): MirrorStateName {
    return this.currentState;
  }

  get isRemoved(): boolean {
    return this.removed;
  }

  /** True when the engine holds a live, authenticated connection (as far as events told). */
  get isLinkUp(): boolean {
    return this.linkUp;
  }

  /** Whether `event` would be accepted now, without firing it. */
  canFire(type: MirrorEventType): boolean {
    return this.refusal(type) === undefined;
  }

  /**
   * Applies one event. Throws MirrorStateError (BM_ERR_MIRROR_ILLEGAL_TRANSITION) without changing
   * anything when the event is not legal in the current state.
   */
  fire(event: MirrorEvent): MirrorTransition {
    if (this.dispatching) {
      throw new MirrorStateError(
        'BM_ERR_MIRROR_REENTRANT',
        this.currentState,
        event.type,
        'transition listeners observe; they must not fire events',
      );
    }
    const code = validateEvent(event, this.currentState);
    const refusal = this.refusal(event.type);
    if (refusal !== undefined) throw refusal;
    const next = MIRROR_TRANSITIONS[this.currentState][event.type];
    assert(next !== undefined);

    const transition: MirrorTransition = {
      from: this.currentState,
      to: next,
      cause: { event: event.type, reason: event.reason ?? DEFAULT_REASON[event.type], code },
      atMs: this.readClock(),
    };
    this.commit(transition);
    this.dispatch(transition);
    return transition;
  }

  /**
   * Whether an admin command is legal now. Returns undefined when it is, or the error to show
   * (code BM_ERR_MIRROR_COMMAND_NOT_ALLOWED) when it is not. `force` allows removing a mirror
   * whose target is mid-copy.
   */
  commandAllowed(command: MirrorCommand, options: { force?: boolean } = {}): MirrorStateError | undefined {
    const state = this.currentState;
    if (this.removed) {
      return new MirrorStateError('BM_ERR_MIRROR_REMOVED', state, command, `mirror was removed; ${command} refused`);
    }
    const allowed = COMMAND_STATES[command];
    if (allowed === undefined) {
      return new MirrorStateError('BM_ERR_MIRROR_COMMAND_NOT_ALLOWED', state, String(command), `unknown command ${String(command)}`);
    }
    if (!allowed.has(state)) {
      return new MirrorStateError(
        'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED',
        state,
        command,
        `${command} is not allowed while the mirror is ${state}: ${COMMAND_HINT[command]}`,
      );
    }
    if (command === 'remove' && INCONSISTENT_TARGET_STATES.has(state) && options.force !== true) {
      return new MirrorStateError(
        'BM_ERR_MIRROR_COMMAND_NOT_ALLOWED',
        state,
        command,
        `remove refused while the mirror is ${state}: the target is not a consistent copy (use --force)`,
      );
    }
    return undefined;
  }

  /** Registers a synchronous listener, called once per transition; returns its unsubscribe. */
  onTransition(listener: TransitionListener): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /** A plain JSON-able snapshot for `mirror status`. */
  toStatus(): MirrorStatus {
    return {
      state: this.currentState,
      sinceMs: this.enteredAtMs,
      since: new Date(this.enteredAtMs).toISOString(),
      cause: { ...this.lastCause },
      errorCode: this.errorCode,
      errorReason: this.errorReason,
      linkUp: this.linkUp,
      removed: this.removed,
      transitionCount: this.transitionCount,
      history: this.history.map((entry) => ({ ...entry, cause: { ...entry.cause } })),
    };
  }

  private refusal(type: MirrorEventType): MirrorStateError | undefined {
    const state = this.currentState;
    if (this.removed) {
      return new MirrorStateError('BM_ERR_MIRROR_REMOVED', state, type, `mirror was removed; event ${type} refused`);
    }
    if (MIRROR_TRANSITIONS[state][type] === undefined) {
      return new MirrorStateError(
        'BM_ERR_MIRROR_ILLEGAL_TRANSITION',
        state,
        type,
        `illegal mirror transition: event ${type} in state ${state}`,
      );
    }
    if (LINK_UP_EVENTS.has(type) && !this.linkUp) {
      return new MirrorStateError(
        'BM_ERR_MIRROR_ILLEGAL_TRANSITION',
        state,
        type,
        `illegal mirror transition: event ${type} in state ${state} needs a connected link`,
      );
    }
    if (LINK_DOWN_EVENTS.has(type) && this.linkUp) {
      return new MirrorStateError(
        'BM_ERR_MIRROR_ILLEGAL_TRANSITION',
        state,
        type,
        `illegal mirror transition: event ${type} in state ${state} while the link is up`,
      );
    }
    return undefined;
  }

  private commit(transition: MirrorTransition): void {
    const { to, cause } = transition;
    if (cause.event === 'connected') this.linkUp = true;
    if (LINK_DROP_EVENTS.has(cause.event)) this.linkUp = false;
    if (cause.event === 'remove') this.removed = true;
    if (to === 'ERROR' && transition.from !== 'ERROR') {
      assert(cause.code !== null && MIRROR_ERROR_CODE_SET.has(cause.code));
      this.errorCode = cause.code as MirrorErrorCode;
      this.errorReason = cause.reason;
    }
    if (to !== 'ERROR') {
      this.errorCode = null;
      this.errorReason = null;
    }
    // Self-transitions (connected, a second crack, stop in INIT/ERROR) keep the entered-at time:
    // "since" means since the mirror entered this state.
    if (to !== transition.from) this.enteredAtMs = transition.atMs;
    this.currentState = to;
    this.lastCause = cause;
    this.transitionCount++;
    this.history.push(transition);
    if (this.history.length > this.historyLength) this.history.shift();

    assert(this.history.length <= this.historyLength);
    assert(!this.linkUp || LINK_STATES.has(to), `link up in state ${to}`);
    if (to === 'READY' || to === 'REPLICATE' || to === 'INSYNC') assert(this.linkUp, `link down in state ${to}`);
    assert((to === 'ERROR') === (this.errorCode !== null));
  }

  private dispatch(transition: MirrorTransition): void {
    this.dispatching = true;
    try {
      // A copy: a listener that unsubscribes itself must not skip the next one.
      for (const listener of [...this.listeners]) {
        try {
          listener(transition);
        } catch (error) {
          this.onListenerError(error, transition);
        }
      }
    } finally {
      this.dispatching = false;
    }
  }

  private readClock(): number {
    const nowMs = this.now();
    assert(Number.isFinite(nowMs), 'clock returned a non-finite time');
    return nowMs;
  }
}

/** Runtime check of what the type system cannot promise (events may come from the wire or JSON). */
function validateEvent(event: MirrorEvent, state: MirrorStateName): string | null {
  const type = (event as { type?: unknown }).type;
  if (typeof type !== 'string' || !(type in DEFAULT_REASON)) {
    throw new MirrorStateError('BM_ERR_MIRROR_BAD_EVENT', state, String(type), `unknown mirror event ${String(type)}`);
  }
  if (event.reason !== undefined && typeof event.reason !== 'string') {
    throw new MirrorStateError('BM_ERR_MIRROR_BAD_EVENT', state, type, `event ${type}: reason must be a string`);
  }
  if (event.type === 'validationFailed' || event.type === 'severeFailure') {
    if (!MIRROR_ERROR_CODE_SET.has(event.code)) {
      throw new MirrorStateError('BM_ERR_MIRROR_BAD_EVENT', state, type, `event ${type}: unknown error code ${String(event.code)}`);
    }
    return event.code;
  }
  if (event.type === 'connectionLost' && event.code !== undefined) {
    if (typeof event.code !== 'string' || event.code.length === 0) {
      throw new MirrorStateError('BM_ERR_MIRROR_BAD_EVENT', state, type, 'event connectionLost: code must be a non-empty string when given');
    }
    return event.code;
  }
  if (event.type === 'transientFailure') {
    if (typeof event.code !== 'string' || event.code.length === 0) {
      throw new MirrorStateError('BM_ERR_MIRROR_BAD_EVENT', state, type, 'event transientFailure: code must be a non-empty string');
    }
    return event.code;
  }
  return null;
}
