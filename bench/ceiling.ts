// The machine's ceiling for a mirror: how fast a job's source side can run while the target's
// device takes the same writes, with nothing else a mirror costs (no network, no target daemon,
// no copies, no frames). fio runs both in one process: the source job unbounded, a write job on
// another device rate-limited to the source's rate. That rate is not known ahead, so it is found
// by fixed-point iteration: start at the bar's rate, then give the target the rate the source
// reached, a few times. The figure is an upper bound for any replicator on this machine: a real
// one also sends and receives every byte. If even this stays below a bar, the bar needs other
// hardware (more cores, or the target on another host), not a better daemon.
import { type FioJob, type FioSide, runFioJobs } from './lib';

export type RateUnit = 'IOPS' | 'MB/s';

export interface CeilingStep {
  /** The target job's rate limit, and what each job reached. */
  targetLimit: number;
  source: number;
  target: number;
}

export interface Ceiling {
  what: string;
  unit: RateUnit;
  /** The ratio's divisor: the source job alone, or the raw copy limit. */
  reference: number;
  steps: CeilingStep[];
  /** The best step's min(source, target): a rate both sides sustained at once. */
  value: number;
  ratio: number;
}

export interface CeilingOptions {
  what: string;
  unit: RateUnit;
  /** fio options of the source job (after its --name), and which side it measures. */
  sourceJob: string[];
  sourceSide: 'read' | 'write';
  /** fio options of the target's write job, without a rate. */
  targetJob: string[];
  reference: number;
  /** The first rate limit of the target job (the bar's rate). */
  startRate: number;
  iterations: number;
  seconds: number;
  output: string;
}

const rateOf = (unit: RateUnit, side: FioSide): number => (unit === 'IOPS' ? side.iops : side.bw_bytes / 1e6);

function rateLimit(unit: RateUnit, value: number): string {
  const limit = Math.max(1, Math.round(unit === 'IOPS' ? value : value * 1e6));
  return unit === 'IOPS' ? `--rate_iops=${limit}` : `--rate=${limit}`;
}

function job(jobs: FioJob[], name: string): FioJob {
  const found = jobs.find((entry) => entry.jobname === name);
  if (found === undefined) throw new Error(`fio report without job ${name}`);
  return found;
}

export async function machineCeiling(options: CeilingOptions): Promise<Ceiling> {
  const steps: CeilingStep[] = [];
  let limit = options.startRate;
  for (let step = 0; step < options.iterations; step++) {
    const jobs = await runFioJobs(
      [
        '--time_based', `--runtime=${options.seconds}`, '--ramp_time=1',
        '--name=source', ...options.sourceJob,
        '--name=target', ...options.targetJob, rateLimit(options.unit, limit),
      ],
      options.output,
    );
    const source = rateOf(options.unit, job(jobs, 'source')[options.sourceSide]);
    const target = rateOf(options.unit, job(jobs, 'target').write);
    steps.push({ targetLimit: limit, source, target });
    limit = source;
  }
  // The best step, not the last: a noisy step can move the limit away from the fixed point, and
  // a ceiling estimated too low would excuse a slow daemon.
  const value = Math.max(...steps.map((step) => Math.min(step.source, step.target)));
  return { what: options.what, unit: options.unit, reference: options.reference, steps, value, ratio: value / options.reference };
}
