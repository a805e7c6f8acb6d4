// Public surface of the wire layer (replication sits on this).
export * from './auth';
export * from './channel';
export * from './errors';
export * from './frame';
export * from './messages';
export { decodeHeader, encodeHeader, expectedPayloadBytes, schemaMessageKinds } from './schema';
