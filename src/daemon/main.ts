// Entry point of blockmirrord (bin/blockmirrord.js calls main(process.argv)).
import { Command, CommanderError } from 'commander';
import type { Logger } from 'pino';
import { defaultConfigPath, defaults, logLevels, resolveConfig, type CliConfig, type DaemonConfig } from '../config/config';
import { errorCode, errorMessage } from '../control/errors';
import { Daemon } from './daemon';
import { createLogger } from './logger';
import { packageVersion } from './version';

/** Exit codes: 0 clean stop, 1 runtime failure (including "already running"), 2 bad usage. */
const exitFailure = 1;
const exitUsage = 2;
/** Bound on shutdown; the unit's TimeoutStopSec is larger so systemd does not SIGKILL first. */
const shutdownMsMax = 25_000;

function parseArgs(argv: readonly string[]): CliConfig {
  const program = new Command('blockmirrord')
    .description('Serve Linux block devices over NBD; managed through a control socket.')
    .version(packageVersion())
    .option('--control-socket <path>', `control socket (default ${defaults.controlSocket})`)
    .option('--nbd-socket <path>', `NBD Unix socket (default ${defaults.nbdSocket})`)
    .option('--nbd-listen <host:port>', 'also serve NBD on TCP (default: off)')
    .option('--listen <host:port>', 'replication address: peers connect here to write this daemon\'s mirror volumes (default: off)')
    .option('--node-name <name>', 'this daemon\'s name towards its peers (default: the short host name)')
    .option('--state-dir <path>', `state directory (default ${defaults.stateDir})`)
    .option('--config <path>', `JSON config file (default ${defaultConfigPath}, optional)`)
    .option('--log-level <level>', `${logLevels.join('|')} (default ${defaults.logLevel})`)
    .option('--busy-poll-us <n>', `spin up to N microseconds instead of sleeping at queue depth 1, adaptive; 0 off (default ${defaults.busyPollMicros})`)
    .allowExcessArguments(false)
    .exitOverride()
    .configureOutput({ writeErr: (text) => process.stderr.write(text) });
  program.parse([...argv]);
  return program.opts<CliConfig>();
}

function die(code: string | undefined, message: string, exitCode: number): never {
  process.stderr.write(`blockmirrord: ${code === undefined ? '' : `${code}: `}${message}\n`);
  process.exit(exitCode);
}

export function main(argv: readonly string[]): void {
  let cli: CliConfig;
  try {
    cli = parseArgs(argv);
  } catch (error) {
    if (error instanceof CommanderError) {
      // --help and --version are successful exits; everything else is a usage error.
      process.exit(error.exitCode === 0 ? 0 : exitUsage);
    }
    throw error;
  }

  let config: DaemonConfig;
  try {
    config = resolveConfig(cli);
  } catch (error) {
    const code = errorCode(error);
    die(code, errorMessage(error), code === 'BM_ERR_INVALID_ARGUMENT' ? exitUsage : exitFailure);
  }

  const logger = createLogger(config.logLevel);
  installFatalHandlers(logger);
  const daemon = new Daemon(config, logger);
  installSignalHandlers(daemon, logger);

  daemon.start().catch(async (error: unknown) => {
    // A signal arrived while starting: the signal handler owns the exit.
    if (daemon.isStopping && errorCode(error) === 'BM_ERR_SHUTTING_DOWN') return;
    logger.fatal({ err: error, code: errorCode(error) }, 'start failed');
    await daemon.stop().catch(() => undefined);
    die(errorCode(error), errorMessage(error), exitFailure);
  });
}

function installFatalHandlers(logger: Logger): void {
  const fatal = (error: unknown, what: string): void => {
    logger.fatal({ err: error }, what);
    process.exit(exitFailure);
  };
  process.on('uncaughtException', (error) => fatal(error, 'uncaught exception'));
  process.on('unhandledRejection', (error) => fatal(error, 'unhandled promise rejection'));
}

function installSignalHandlers(daemon: Daemon, logger: Logger): void {
  let signalled = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (signalled) {
      logger.warn({ signal }, 'already stopping');
      return;
    }
    signalled = true;
    logger.info({ signal }, 'signal received');
    const deadline = setTimeout(() => {
      logger.fatal({ shutdownMsMax }, 'shutdown did not finish in time');
      process.exit(exitFailure);
    }, shutdownMsMax);
    deadline.unref();
    daemon.stop().then(
      () => process.exit(0),
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        process.exit(exitFailure);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}
