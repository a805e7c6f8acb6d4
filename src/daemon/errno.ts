// errno names to the text strerror(3) gives, for messages like "EBUSY (Device or resource busy)".
import util from 'node:util';

let textByCode: Map<string, string> | null = null;

export function errnoText(code: string): string | undefined {
  if (textByCode === null) {
    textByCode = new Map();
    for (const [name, message] of util.getSystemErrorMap().values()) textByCode.set(name, message);
  }
  return textByCode.get(code);
}

/** "EBUSY (Device or resource busy)", or just the code when it is not an errno name. */
export function describeErrno(code: string): string {
  const text = errnoText(code);
  return text === undefined ? code : `${code} (${text})`;
}
