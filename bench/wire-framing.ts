// Wire framing benchmark: a Write with its data as the frame's raw payload (what src/wire does)
// against the same Write with the data inside a protobuf `bytes` field, for 4 KiB, 64 KiB and
// 1 MiB blocks. Each design encodes frames (buffers for writev) and decodes them from 64 KiB
// chunks as a socket delivers them. Prints MB/s of each and the ratio raw / bytes.
//   node dist/bench/wire-framing.js [--seconds 1]
import protobuf from 'protobufjs';

import { encodeFrame, FrameDecoder } from '../src/wire/frame';
import { wireMessage } from '../src/wire/messages';

const CHUNK_BYTES = 64 * 1024;
const BLOCK_SIZES = [4096, 65536, 1 << 20];

// The alternative design: the block inside the protobuf message, one length prefix in front.
const BytesWrite = protobuf.Root.fromJSON({
  nested: {
    BytesWrite: {
      fields: {
        sequence: { type: 'uint64', id: 1 },
        offsetBytes: { type: 'uint64', id: 2 },
        lengthBytes: { type: 'uint64', id: 3 },
        flags: { type: 'uint32', id: 4 },
        data: { type: 'bytes', id: 5 },
      },
    },
  },
}).lookupType('BytesWrite');

function chunked(frame: Buffer): Buffer[] {
  const chunks: Buffer[] = [];
  for (let offset = 0; offset < frame.length; offset += CHUNK_BYTES) {
    chunks.push(frame.subarray(offset, offset + CHUNK_BYTES));
  }
  return chunks;
}

interface Design {
  /** Builds the frame's buffers as they would be handed to writev. */
  encode(data: Buffer, sequence: number): (Buffer | Uint8Array)[];
  /** Decodes one frame from socket-sized chunks; returns the data bytes it recovered. */
  decode(chunks: Buffer[]): number;
}

function writeOf(data: Buffer, sequence: number) {
  return { sequence, offsetBytes: sequence * data.length, lengthBytes: data.length, flags: 0 };
}

// Both receivers assemble into one reused buffer, as a buffer pool would give them, so the
// comparison is about the designs and not about allocation and GC of fresh 1 MiB buffers.
function rawPayloadDesign(blockBytes: number): Design {
  const receiveBuffer = Buffer.allocUnsafe(blockBytes);
  const decoder = new FrameDecoder({ allocatePayload: (bytes) => receiveBuffer.subarray(0, bytes) });
  return {
    encode: (data, sequence) => encodeFrame(wireMessage('write', writeOf(data, sequence)), data),
    decode: (chunks) => {
      let received = 0;
      for (const chunk of chunks) {
        for (const frame of decoder.push(chunk)) received += frame.payload?.length ?? 0;
      }
      return received;
    },
  };
}

/** Length-prefixed protobuf with a bytes field: the receiver assembles the whole message
 *  before it can decode it (the decoded bytes field is then a view, no further copy). */
function bytesFieldDesign(blockBytes: number): Design {
  const receiveBuffer = Buffer.allocUnsafe(blockBytes + 64);
  return {
    encode: (data, sequence) => {
      const body = BytesWrite.encode(BytesWrite.fromObject({ ...writeOf(data, sequence), data })).finish();
      const prefix = Buffer.allocUnsafe(4);
      prefix.writeUInt32BE(body.length, 0);
      return [prefix, body];
    },
    decode: (chunks) => {
      let assembly: Buffer | undefined;
      let filled = 0;
      let received = 0;
      for (const chunk of chunks) {
        let offset = 0;
        if (assembly === undefined) {
          const length = chunk.readUInt32BE(0);
          offset = 4;
          if (chunk.length - 4 >= length) {
            received += (BytesWrite.decode(chunk.subarray(4, 4 + length)) as unknown as { data: Uint8Array }).data.length;
            continue;
          }
          assembly = receiveBuffer.subarray(0, length);
          filled = 0;
        }
        chunk.copy(assembly, filled, offset);
        filled += chunk.length - offset;
        if (filled === assembly.length) {
          received += (BytesWrite.decode(assembly) as unknown as { data: Uint8Array }).data.length;
          assembly = undefined;
        }
      }
      return received;
    },
  };
}

function secondsSince(started: bigint): number {
  return Number(process.hrtime.bigint() - started) / 1e9;
}

/** MB/s of data through encode + decode, median of rounds (GC pauses make single rounds
 *  noisy). The transport copy between them (the kernel's, in production) is the same for both
 *  designs and left out: the chunks are built once. */
function measure(design: Design, data: Buffer, seconds: number): number {
  const chunks = chunked(Buffer.concat(design.encode(data, 1)));
  const opsPerRound = Math.max(1, Math.floor((16 << 20) / data.length));
  const roundRates: number[] = [];
  let totalSeconds = 0;
  let sink = 0;
  for (let round = 0; totalSeconds < seconds || roundRates.length < 5; round++) {
    const started = process.hrtime.bigint();
    for (let i = 0; i < opsPerRound; i++) sink += design.encode(data, i).length;
    for (let i = 0; i < opsPerRound; i++) {
      const received = design.decode(chunks);
      if (received !== data.length) throw new Error(`decoded ${received} bytes, wanted ${data.length}`);
    }
    const roundSeconds = secondsSince(started);
    if (round === 0) continue; // warm-up
    totalSeconds += roundSeconds;
    roundRates.push((opsPerRound * data.length) / roundSeconds / 1e6);
  }
  if (sink === 0) throw new Error('unreachable');
  roundRates.sort((a, b) => a - b);
  return roundRates[Math.floor(roundRates.length / 2)]!;
}

function main(): void {
  const secondsIndex = process.argv.indexOf('--seconds');
  const seconds = secondsIndex > 0 ? Number(process.argv[secondsIndex + 1]) : 1;
  if (!(seconds > 0)) throw new Error('--seconds must be positive');
  console.log('block      raw payload MB/s   protobuf bytes MB/s   ratio');
  for (const blockBytes of BLOCK_SIZES) {
    const data = Buffer.alloc(blockBytes, 0x5a);
    const raw = measure(rawPayloadDesign(blockBytes), data, seconds);
    const bytesField = measure(bytesFieldDesign(blockBytes), data, seconds);
    const label = blockBytes >= 1 << 20 ? `${blockBytes >> 20} MiB` : `${blockBytes >> 10} KiB`;
    console.log(`${label.padEnd(10)} ${raw.toFixed(0).padStart(16)} ${bytesField.toFixed(0).padStart(21)} ${(raw / bytesField).toFixed(2).padStart(7)}x`);
  }
}

main();
