// Child process for engine.test.ts (not a test itself). Modes:
//   info          print the process engine and do nothing else: Node must exit by itself
//   write <path>  start a write without awaiting it and let the script end: Node must stay alive
//                 until it completes (the poll handle is ref'd while I/O is in flight)
//   lock <path>   take the lock, print "locked", hold it until stdin closes or 10 s pass
import { allocAligned, BlockFile, ioEngine, lockFileExclusive } from '../../src/native/index';

const [mode, target] = process.argv.slice(2);
if (mode === 'info') {
  console.log(JSON.stringify({ ioEngine }));
} else if (mode === 'write') {
  const file = BlockFile.open(target, { readOnly: false, exclusive: false });
  const buffer = allocAligned(1024 * 1024).fill(0xab);
  let done = false;
  void file.write(buffer, 0, true).then(() => {
    done = true;
    return file.close();
  });
  process.on('exit', () => console.log(JSON.stringify({ engine: file.engine, done })));
} else if (mode === 'lock') {
  try {
    const lock = lockFileExclusive(target);
    console.log('locked');
    setTimeout(() => lock.release(), 10_000).unref();
    process.stdin.resume();
    process.stdin.on('end', () => lock.release());
  } catch (error) {
    console.log(JSON.stringify({ code: (error as { code?: string }).code }));
  }
}
