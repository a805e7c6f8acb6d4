// The package version, found by walking up to package.json: the same code runs from src/ (tests,
// via the TS loader) and from dist/src/ (installed), which sit at different depths.
import fs from 'node:fs';
import path from 'node:path';

let cached: string | null = null;

export function packageVersion(): string {
  if (cached !== null) return cached;
  let directory = __dirname;
  for (let depth = 0; depth < 6; depth++) {
    const candidate = path.join(directory, 'package.json');
    if (fs.existsSync(candidate)) {
      const parsed = JSON.parse(fs.readFileSync(candidate, 'utf8')) as { name?: unknown; version?: unknown };
      if (parsed.name === 'blockmirror' && typeof parsed.version === 'string') {
        cached = parsed.version;
        return cached;
      }
    }
    directory = path.dirname(directory);
  }
  cached = 'unknown';
  return cached;
}
