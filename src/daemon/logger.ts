// pino JSON to stdout, written synchronously: log volume is low (lifecycle, connections, errors,
// never per request), and a fatal line must reach the journal before process.exit().
import pino, { type Logger } from 'pino';
import type { LogLevel } from '../config/config';

export function createLogger(level: LogLevel): Logger {
  return pino(
    {
      name: 'blockmirrord',
      level,
      timestamp: pino.stdTimeFunctions.isoTime,
      serializers: { err: pino.stdSerializers.err },
    },
    pino.destination({ dest: 1, sync: true }),
  );
}
