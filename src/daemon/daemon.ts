// blockmirrord's lifecycle: start everything in order, stop it in reverse. Start order: state
// dir and lock, registry and volumes, mirrors (they connect in the background), NBD server,
// replication listener, control socket, then READY=1. Stop order: STOPPING=1, control socket,
// held strict-mirror writes failed, NBD server (in-flight requests answered), replication
// listener (applied writes finish), mirrors (links closed, dirty bitmaps saved), volumes
// (drained and flushed), sockets removed, lock released.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { DaemonConfig, HostPort } from '../config/config';
import { BmError, errorCode } from '../control/errors';
import type { StatusResult } from '../control/protocol';
import { ControlServer } from '../control/server';
import { claimSocketPath, removeSocketPath } from '../control/socket-path';
import { busyPollStats, ioEngine, lockFileExclusive, sdNotify, setBusyPoll } from '../native/index';
import { NbdServer } from '../nbd/server';
import { MirrorManager } from '../replication/mirror-manager';
import { loadMirrors } from '../replication/mirror-store';
import { ReplicationServer } from '../replication/target-server';
import { Volume } from '../volume/volume';
import { SystemdNotifier } from './notify';
import { loadPeers, PeerManager } from './peers';
import { loadRegistry } from './registry';
import { packageVersion } from './version';
import { FsMetadataStore } from '../write-intent/metadata-file';
import { VolumeManager, type VolumeUris } from './volume-manager';

/** Control and NBD sockets: owner and group (e.g. a "blockmirror" admin group) only. */
export const socketMode = 0o660;
export const stateDirMode = 0o750;
export const socketDirMode = 0o750;
/** How long NBD clients get to drain at shutdown or forced remove before being cut off. */
const nbdShutdownMsMax = 10_000;

interface Lock {
  release(): void;
}

export class Daemon {
  private readonly config: DaemonConfig;
  private readonly logger: Logger;
  private readonly notifier: SystemdNotifier;
  private readonly startedAtMs = Date.now();
  private lock: Lock | null = null;
  private volumes: VolumeManager | null = null;
  private peers: PeerManager | null = null;
  private mirrors: MirrorManager | null = null;
  private replication: ReplicationServer | null = null;
  private replicationPort: number | null = null;
  private nbd: NbdServer | null = null;
  private control: ControlServer | null = null;
  private nbdListening = false;
  private nbdTcpPort: number | null = null;
  private stopping: Promise<void> | null = null;
  private starting: Promise<void> | null = null;

  constructor(config: DaemonConfig, logger: Logger) {
    this.config = config;
    this.logger = logger;
    this.notifier = new SystemdNotifier(sdNotify, process.env, logger);
  }

  /** Runs once. stop() waits for it: start's steps (recovering mirrors' metadata, starting them)
   *  must not run alongside the teardown, which would close volumes under them. */
  start(): Promise<void> {
    this.starting ??= this.startOnce();
    return this.starting;
  }

  private async startOnce(): Promise<void> {
    const { config, logger } = this;
    fs.mkdirSync(config.stateDir, { recursive: true, mode: stateDirMode });
    fs.mkdirSync(path.dirname(config.controlSocket), { recursive: true, mode: socketDirMode });
    fs.mkdirSync(path.dirname(config.nbdSocket), { recursive: true, mode: socketDirMode });

    const lockPath = path.join(config.stateDir, 'lock');
    try {
      this.lock = lockFileExclusive(lockPath);
    } catch (error) {
      if (errorCode(error) === 'BM_ERR_LOCKED') {
        throw new BmError('BM_ERR_LOCKED', `state dir ${config.stateDir} is in use by another blockmirrord (${lockPath} is locked)`, { cause: error });
      }
      throw error;
    }

    // Only the io_uring engine polls; with the thread pool the setting has no effect (status says so).
    setBusyPoll(config.busyPollMicros);

    const records = loadRegistry(config.stateDir);
    const mirrorRecords = loadMirrors(config.stateDir);
    const peers = new PeerManager({
      stateDir: config.stateDir,
      logger: logger.child({ component: 'peers' }),
      inUse: (name) => (this.mirrors?.usesPeer(name) === true ? 'a mirror replicates to it; remove the mirror first' : null),
    });
    peers.load(loadPeers(config.stateDir));
    this.peers = peers;
    const volumes = new VolumeManager({
      stateDir: config.stateDir,
      logger: logger.child({ component: 'volumes' }),
      openVolume: (spec, volumeLogger) => Volume.open(spec, volumeLogger),
      connections: () => this.requireNbd(),
      uris: (name) => this.uris(name),
      inUse: (name) => {
        if (this.mirrors?.usesVolume(name) === true) return 'it has a mirror; remove the mirror first';
        const writer = this.replication?.sessionPeer(name);
        return writer === undefined ? null : `peer ${writer} is replicating into it; remove the mirror on ${writer} first`;
      },
      replicationSession: (name) => {
        const replication = this.replication;
        const peer = replication?.sessionPeer(name);
        return replication == null || peer === undefined ? undefined : { peer, end: (reason) => replication.endSession(name, reason) };
      },
    });
    this.volumes = volumes;
    this.nbd = new NbdServer({
      lookupExport: (name: string) => volumes.lookupExport(name),
      listExports: () => volumes.listExports(),
      logger: logger.child({ component: 'nbd' }),
      // Well inside the daemon's own shutdown bound, so a stuck client cannot use it all up.
      shutdownTimeoutMs: nbdShutdownMsMax,
    });
    volumes.openRegistered(records);
    await volumes.loadDivergence();
    const mirrors = new MirrorManager({
      stateDir: config.stateDir,
      nodeName: config.nodeName,
      logger: logger.child({ component: 'mirrors' }),
      timing: config.replication,
      metadataStore: new FsMetadataStore(),
      activityLogExtents: config.writeIntent.activityLogExtents,
      lookupVolume: (name) => {
        const found = volumes.lookup(name);
        if (found === undefined) return undefined;
        return {
          role: found.record.role,
          readOnly: found.record.readOnly,
          fastResync: found.record.fastResync,
          volume: found.volume,
          failed: found.volume?.failure() !== undefined,
        };
      },
      hasPeer: (name) => peers.has(name),
      peerEndpoint: (name) => peers.endpoint(name),
    });
    this.mirrors = mirrors;
    await mirrors.load(mirrorRecords);
    await faultStartDelay(logger);

    await claimSocketPath(config.nbdSocket);
    this.checkNotStopping();
    await this.nbd.listenUnix(config.nbdSocket);
    this.nbdListening = true;
    fs.chmodSync(config.nbdSocket, socketMode);
    if (config.nbdListen !== null) {
      this.nbdTcpPort = await this.nbd.listenTcp(config.nbdListen.host, config.nbdListen.port);
    }
    this.checkNotStopping();

    if (config.replicationListen !== null) {
      this.replication = new ReplicationServer({
        nodeName: config.nodeName,
        secretForPeer: (name) => peers.secretFor(name),
        lookupVolume: (name) => volumes.lookup(name),
        bindSource: (name, binding) => volumes.bindMirrorSource(name, binding),
        divergence: (name) => volumes.divergence(name),
        resolveDivergence: (name, binding) => volumes.resolveDivergence(name, binding),
        logger: logger.child({ component: 'replication' }),
        faultApplyDelayMaxMs: faultApplyDelayFromEnv(logger),
        epochFlush: config.epochFlush,
      });
      this.replicationPort = await this.replication.listen(config.replicationListen.host, config.replicationListen.port);
    }
    this.checkNotStopping();

    this.control = new ControlServer({
      logger: logger.child({ component: 'control' }),
      socketMode,
      handlers: {
        'volume.add': (params) => volumes.add(params),
        'volume.list': async () => ({ volumes: volumes.list() }),
        'volume.info': async (params) => volumes.info(params.name),
        'volume.remove': (params) => volumes.remove(params),
        'volume.set': (params) => volumes.set(params),
        'volume.promote': (params) => volumes.promote(params),
        'volume.demote': (params) => volumes.demote(params),
        'peer.add': (params) => peers.add(params),
        'peer.list': async () => ({ peers: peers.list() }),
        'peer.info': async (params) => peers.info(params.name),
        'peer.remove': (params) => peers.remove(params),
        'mirror.add': (params) => mirrors.add(params),
        'mirror.list': async () => ({ mirrors: mirrors.list() }),
        'mirror.status': async (params) => ({ mirrors: mirrors.status(params) }),
        'mirror.remove': (params) => mirrors.remove(params),
        'mirror.suspend': (params) => mirrors.command(params, 'suspend'),
        'mirror.resume': (params) => mirrors.command(params, 'resume'),
        'mirror.reset': (params) => mirrors.command(params, 'reset'),
        'mirror.set': (params) => mirrors.set(params),
        'mirror.resolve': (params) => mirrors.resolve(params),
        status: async () => this.status(),
      },
    });
    await this.control.listen(config.controlSocket);
    this.checkNotStopping();

    const status = `serving ${volumes.size} volume(s), ${volumes.errorCount} in error`;
    this.notifier.ready(status);
    this.notifier.startWatchdog();
    logger.info(
      {
        version: packageVersion(),
        controlSocket: config.controlSocket,
        nbdSocket: config.nbdSocket,
        nbdTcpPort: this.nbdTcpPort,
        stateDir: config.stateDir,
        volumes: volumes.size,
        volumesInError: volumes.errorCount,
        peers: peers.size,
        mirrors: mirrors.size,
        nodeName: config.nodeName,
        replicationPort: this.replicationPort,
        ioEngine,
        busyPollMicros: config.busyPollMicros,
      },
      'ready',
    );
  }

  /** Idempotent; safe after a partial start(). */
  stop(): Promise<void> {
    if (this.stopping === null) this.stopping = this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    const { logger } = this;
    this.notifier.stopWatchdog();
    this.notifier.stopping('shutting down');
    // A signal during start: the step running finishes (bounded by the shutdown deadline), then
    // start gives up at its next check and the teardown sees a consistent daemon.
    if (this.starting !== null) {
      logger.info('stop requested during start; waiting for the current start step');
      await this.starting.catch(() => undefined);
    }
    logger.info('stopping');
    let failed = false;
    const step = async (what: string, action: () => unknown): Promise<void> => {
      try {
        await action();
      } catch (error) {
        failed = true;
        logger.error({ err: error }, `${what} failed during shutdown`);
      }
    };
    if (this.control !== null) await step('closing the control socket', () => this.control?.close());
    if (this.peers !== null) await step('finishing peer changes', () => this.peers?.close());
    this.mirrors?.releaseHeldForShutdown();
    if (this.nbd !== null) await step('closing the NBD server', () => this.nbd?.close());
    if (this.replication !== null) await step('closing the replication listener', () => this.replication?.close());
    if (this.mirrors !== null) await step('stopping mirrors', () => this.mirrors?.stopAll());
    if (this.volumes !== null) await step('closing volumes', () => this.volumes?.closeAll());
    // Only a socket we listened on: after BM_ERR_SOCKET_IN_USE the file belongs to someone else.
    if (this.nbdListening) await step('removing the NBD socket', () => removeSocketPath(this.config.nbdSocket));
    // The lock goes last: until every volume is flushed and closed, a second daemon must not
    // open the same devices.
    if (this.lock !== null) await step('releasing the state lock', () => this.lock?.release());
    if (failed) throw new BmError('BM_ERR_SHUTDOWN', 'shutdown finished with errors (see log)');
    logger.info('stopped');
  }

  get isStopping(): boolean {
    return this.stopping !== null;
  }

  /** A signal during start(): stop starting things; stop() cleans up what exists. */
  private checkNotStopping(): void {
    if (this.stopping !== null) throw new BmError('BM_ERR_SHUTTING_DOWN', 'stopped during start');
  }

  private requireNbd(): NbdServer {
    if (this.nbd === null) throw new BmError('BM_ERR_INTERNAL', 'NBD server not started');
    return this.nbd;
  }

  private uris(name: string): VolumeUris {
    const uris: VolumeUris = { nbdUri: `nbd+unix:///${name}?socket=${this.config.nbdSocket}` };
    const listen = this.config.nbdListen;
    if (listen !== null && this.nbdTcpPort !== null) {
      const host = listen.host.includes(':') ? `[${listen.host}]` : listen.host;
      uris.nbdTcpUri = `nbd://${host}:${this.nbdTcpPort}/${name}`;
    }
    return uris;
  }

  private status(): StatusResult {
    const volumes = this.volumes;
    const nbd = this.nbd;
    return {
      version: packageVersion(),
      pid: process.pid,
      uptimeSeconds: Math.floor((Date.now() - this.startedAtMs) / 1000),
      controlSocket: this.config.controlSocket,
      nbdSocket: this.config.nbdSocket,
      nbdListen: this.config.nbdListen === null || this.nbdTcpPort === null ? null : `${this.config.nbdListen.host}:${this.nbdTcpPort}`,
      replicationListen:
        this.config.replicationListen === null || this.replicationPort === null ? null : formatHostPort({ host: this.config.replicationListen.host, port: this.replicationPort }),
      nodeName: this.config.nodeName,
      mirrors: this.mirrors?.size ?? 0,
      replicationSessions: this.replication?.sessionCount ?? 0,
      stateDir: this.config.stateDir,
      peers: this.peers?.size ?? 0,
      volumes: volumes?.size ?? 0,
      volumesInError: volumes?.errorCount ?? 0,
      connections: nbd?.connectionCount() ?? 0,
      ioEngine,
      busyPoll: busyPollStats(),
    };
  }
}

function formatHostPort(address: HostPort): string {
  return `${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
}

/** Test-only fault layer: BLOCKMIRROR_FAULT_TARGET_DELAY_MS=N delays each replicated write on
 *  this target by a random 0..N ms (it never changes what is written). Unset in production. */
function faultApplyDelayFromEnv(logger: Logger): number {
  const text = process.env.BLOCKMIRROR_FAULT_TARGET_DELAY_MS;
  if (text === undefined || text === '') return 0;
  const ms = Number(text);
  if (!Number.isFinite(ms) || ms < 0 || ms > 1000) throw new Error(`BLOCKMIRROR_FAULT_TARGET_DELAY_MS must be 0..1000, got ${text}`);
  if (ms > 0) logger.warn({ maxDelayMs: ms }, 'FAULT INJECTION: replicated writes on this target are delayed at random (testing only)');
  return ms;
}

/** Test-only fault layer: BLOCKMIRROR_FAULT_START_DELAY_MS=N makes start pause N ms after the
 *  mirrors were recovered and started, so a test can stop the daemon mid-start. Unset in production. */
async function faultStartDelay(logger: Logger): Promise<void> {
  const text = process.env.BLOCKMIRROR_FAULT_START_DELAY_MS;
  if (text === undefined || text === '') return;
  const ms = Number(text);
  if (!Number.isFinite(ms) || ms < 0 || ms > 60_000) throw new Error(`BLOCKMIRROR_FAULT_START_DELAY_MS must be 0..60000, got ${text}`);
  logger.warn({ delayMs: ms }, 'FAULT INJECTION: start pauses after loading mirrors (testing only)');
  await new Promise((resolve) => setTimeout(resolve, ms));
  logger.warn('FAULT INJECTION: start resumes');
}
