import type { BlockBackend } from '../volume/backend';

/** One export the server offers, looked up by name during the handshake. */
export interface NbdExport {
  name: string;
  description: string;
  backend: BlockBackend;
}
