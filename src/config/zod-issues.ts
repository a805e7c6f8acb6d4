// One place that turns zod issues into "field: what is wrong" text, so config errors and
// control-socket errors name the field the same way.
import type { z } from 'zod';

function pathText(path: ReadonlyArray<PropertyKey>): string {
  return path.map((part) => (typeof part === 'number' ? `[${part}]` : String(part))).join('.').replace(/\.\[/g, '[');
}

/** "nbdListen: expected HOST:PORT" for the first issue (the one a human should fix first). */
export function formatFirstIssue(error: z.ZodError): string {
  const issue = error.issues[0];
  if (issue === undefined) return 'invalid value';
  const where = pathText(issue.path);
  if (issue.code === 'unrecognized_keys') {
    const keys = issue.keys.map((key) => (where === '' ? key : `${where}.${key}`));
    return `${keys.join(', ')}: unknown field`;
  }
  return `${where === '' ? '(root)' : where}: ${issue.message}`;
}
