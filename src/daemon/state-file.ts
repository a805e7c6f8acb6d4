// Versioned JSON documents in the state dir (volumes.json, peers.json): bounded in size,
// validated on load so a damaged file stops the daemon instead of silently forgetting state, and
// written atomically after validating with the same schema, so a bug cannot produce a file the
// next start refuses.
import fs from 'node:fs';
import type { z } from 'zod';
import { formatFirstIssue } from '../config/zod-issues';
import { BmError, errorCode, errorMessage } from '../control/errors';
import { writeFileAtomicSync } from './atomic-file';

export interface StateFile<Document> {
  /** What the file is, for error messages: "volume registry", "peer registry". */
  what: string;
  version: number;
  bytesMax: number;
  schema: z.ZodType<Document>;
}

export function stateFileCorrupt(what: string, filePath: string, detail: string): BmError {
  return new BmError('BM_ERR_STATE_CORRUPT', `${what} ${filePath}: ${detail}`);
}

/** The validated document, or undefined when the file does not exist (first start). */
export function loadStateFile<Document>(filePath: string, file: StateFile<Document>): Document | undefined {
  let text: string;
  try {
    const stat = fs.statSync(filePath);
    if (stat.size > file.bytesMax) throw stateFileCorrupt(file.what, filePath, `larger than ${file.bytesMax} bytes`);
    text = fs.readFileSync(filePath, 'utf8');
  } catch (error) {
    if (errorCode(error) === 'ENOENT') return undefined;
    throw error;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw stateFileCorrupt(file.what, filePath, `not valid JSON: ${errorMessage(error)}`);
  }
  if (typeof raw === 'object' && raw !== null && 'version' in raw && raw.version !== file.version) {
    throw stateFileCorrupt(file.what, filePath, `version ${JSON.stringify(raw.version)} is not supported (expected ${file.version})`);
  }
  const parsed = file.schema.safeParse(raw);
  if (!parsed.success) throw stateFileCorrupt(file.what, filePath, formatFirstIssue(parsed.error));
  return parsed.data;
}

export function saveStateFile<Document>(filePath: string, file: StateFile<Document>, document: Document): void {
  file.schema.parse(document);
  writeFileAtomicSync(filePath, JSON.stringify(document, null, 2) + '\n', 0o640);
}
