// sd_notify(3) for Type=notify units: READY/STATUS/STOPPING, and WATCHDOG=1 pings while the event
// loop is alive. Without NOTIFY_SOCKET every call is a no-op (the send function returns false).
import type { Logger } from 'pino';

export type NotifySend = (state: string) => boolean;

/** Shortest watchdog ping period we accept; a smaller WATCHDOG_USEC is a misconfiguration. */
const watchdogPeriodMsMin = 50;

export class SystemdNotifier {
  private watchdogTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly send: NotifySend,
    private readonly env: NodeJS.ProcessEnv,
    private readonly logger: Logger,
  ) {}

  ready(status: string): void {
    this.notify(`READY=1\nSTATUS=${status}`);
  }

  stopping(status: string): void {
    this.notify(`STOPPING=1\nSTATUS=${status}`);
  }

  /** Start WATCHDOG=1 pings every WATCHDOG_USEC/2, as sd_watchdog_enabled(3) describes. */
  startWatchdog(): void {
    const periodMs = watchdogPeriodMs(this.env, process.pid);
    if (periodMs === null) return;
    if (periodMs < watchdogPeriodMsMin) {
      this.logger.warn({ periodMs }, 'WATCHDOG_USEC too small; watchdog pings disabled');
      return;
    }
    this.watchdogTimer = setInterval(() => this.notify('WATCHDOG=1'), periodMs);
    this.watchdogTimer.unref();
    this.notify('WATCHDOG=1');
    this.logger.info({ periodMs }, 'systemd watchdog pings enabled');
  }

  stopWatchdog(): void {
    if (this.watchdogTimer !== null) clearInterval(this.watchdogTimer);
    this.watchdogTimer = null;
  }

  private notify(state: string): void {
    try {
      this.send(state);
    } catch (error) {
      // A full or vanished notify socket must not take the daemon down; systemd will notice.
      this.logger.warn({ err: error, state }, 'sd_notify failed');
    }
  }
}

/** Half of WATCHDOG_USEC in ms, or null when the watchdog is off or meant for another process. */
export function watchdogPeriodMs(env: NodeJS.ProcessEnv, pid: number): number | null {
  const usecText = env.WATCHDOG_USEC;
  if (usecText === undefined || !/^\d+$/.test(usecText)) return null;
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && pidText !== String(pid)) return null;
  const usec = Number(usecText);
  if (usec === 0) return null;
  return Math.floor(usec / 2 / 1000);
}
