// A fake replication source speaking the wire protocol by hand (src/wire), for tests that drive
// a target daemon's --listen port with well-formed and malformed traffic: authenticate as the
// initiator, send any message or raw bytes, and read what the target answers until it hangs up.
import net from 'node:net';
import {
  authenticate,
  FrameChannel,
  PAYLOAD_BYTES_MAX,
  PROTOCOL_VERSION,
  wireMessage,
  type Frame,
  type Hello,
  type HelloReply,
  type MessageBodies,
  type WireMessage,
} from '../../src/wire/index';

interface Teardown {
  teardown(fn: () => void | Promise<void>): void;
}

/** How a connection ended, as the fake peer saw it. */
export interface Closed {
  /** Frames received before the connection closed. */
  frames: Frame[];
  /** BM_ERR_WIRE_CLOSED for an orderly close, else the socket error code (ECONNRESET, ...). */
  code: string;
}

export class FakePeer {
  readonly channel: FrameChannel;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    this.channel = new FrameChannel(socket);
    this.localAddress = `${socket.localAddress ?? '?'}:${socket.localPort ?? '?'}`;
    socket.on('error', () => {}); // surfaced through channel.receive()
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  /** Connects to 127.0.0.1:port; destroyed in teardown if still open. */
  static async connect(t: Teardown, port: number): Promise<FakePeer> {
    const socket = net.connect({ host: '127.0.0.1', port, noDelay: true });
    t.teardown(() => {
      socket.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new FakePeer(socket);
  }

  /** "127.0.0.1:<our port>", as the target sees (and logs) us (kept after the close). */
  readonly localAddress: string;

  /** Runs the initiator side of the exchange; rejects as authenticate() does. Afterwards, even
   *  after a failure, the fake peer may send payloads again (to test that they go nowhere). */
  async authenticate(options: { nodeName: string; secret: Buffer; targetName: string; timeoutMs?: number }): Promise<void> {
    try {
      await authenticate(this.channel, {
        role: 'initiator',
        nodeName: options.nodeName,
        expectedPeerName: options.targetName,
        secretForPeer: (name) => (name === options.targetName ? options.secret : undefined),
        timeoutMs: options.timeoutMs ?? 5_000,
      });
    } finally {
      this.channel.limitPayloadBytes(PAYLOAD_BYTES_MAX);
    }
  }

  send(message: WireMessage, payload?: Uint8Array): void {
    this.channel.send(message, payload);
  }

  /** Bytes straight onto the socket, bypassing the encoder (garbage, forged preludes). */
  writeRaw(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** The next frame; rejects on close or after timeoutMs. */
  receive(timeoutMs = 5_000): Promise<Frame> {
    return this.channel.receive(AbortSignal.timeout(timeoutMs));
  }

  /** The next frame, which must be of `kind`. */
  async expect<K extends keyof MessageBodies>(kind: K, timeoutMs = 5_000): Promise<MessageBodies[K]> {
    const frame = await this.receive(timeoutMs);
    if (frame.message.kind !== kind) {
      throw new Error(`expected ${kind}, got ${frame.message.kind}: ${JSON.stringify(frame.message.body)}`);
    }
    return frame.message.body as MessageBodies[K];
  }

  /** The next frame (with its payload), which must be of `kind`. */
  async expectFrame(kind: keyof MessageBodies, timeoutMs = 5_000): Promise<Frame> {
    const frame = await this.receive(timeoutMs);
    if (frame.message.kind !== kind) {
      throw new Error(`expected ${kind}, got ${frame.message.kind}: ${JSON.stringify(frame.message.body)}`);
    }
    return frame;
  }

  /** The HelloReply of the last hello(). */
  reply: HelloReply | undefined;

  /** Sends Hello and returns the HelloReply. */
  async hello(hello: Hello, timeoutMs = 5_000): Promise<HelloReply> {
    this.send(wireMessage('hello', hello));
    this.reply = await this.expect('helloReply', timeoutMs);
    return this.reply;
  }

  /** Reads frames until the target closes the connection. Rejects when it is still open after
   *  timeoutMs: the target was supposed to drop it. */
  async untilClosed(timeoutMs = 5_000): Promise<Closed> {
    const frames: Frame[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`the target did not close the connection within ${timeoutMs} ms; got ${describe(frames)}`);
      try {
        frames.push(await this.channel.receive(AbortSignal.timeout(left)));
      } catch (error) {
        const code = (error as { code?: string; name?: string }).code;
        if ((error as Error).name === 'TimeoutError') {
          throw new Error(`the target did not close the connection within ${timeoutMs} ms; got ${describe(frames)}`);
        }
        // A decode failure would mean the target sent garbage: report it, do not treat it as a close.
        if (code !== undefined && code.startsWith('BM_ERR_WIRE_') && code !== 'BM_ERR_WIRE_CLOSED') throw error;
        await this.closed;
        return { frames, code: code ?? 'unknown' };
      }
    }
  }

  /** Orderly close from our side; resolves once the socket is closed. */
  async end(): Promise<void> {
    this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), 2_000);
    await this.closed;
    clearTimeout(timer);
  }
}

function describe(frames: Frame[]): string {
  return frames.length === 0 ? 'no frames' : frames.map((frame) => `${frame.message.kind} ${JSON.stringify(frame.message.body)}`).join(', ');
}

/** A Hello with the fields a real source sends; override what a case needs. */
export function makeHello(fields: Partial<Hello> & Pick<Hello, 'volumeUuid' | 'sizeBytes' | 'targetVolumeName'>): Hello {
  return {
    protocolVersion: PROTOCOL_VERSION,
    nodeName: 'hostA',
    volumeName: 'src',
    logicalSectorBytes: 512,
    generationIds: [1],
    capabilities: 0,
    ...fields,
  };
}
