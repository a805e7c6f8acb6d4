// FLUSH and FUA must reach the device: counted by the block layer, not inferred from reading
// data back (which the page cache under a loop device would satisfy either way).
import t from 'tap';
import pino from 'pino';
import { Volume } from '../../src/volume/volume';
import { deviceFlushCount } from '../helpers/block-stat';
import { isRoot, scratchDevice } from '../helpers/loop';

const logger = pino({ level: 'silent' });

t.test('flush and FUA writes issue device flushes; plain writes do not', { skip: !isRoot && 'needs a loop device (root)' }, async (t) => {
  const device = scratchDevice(t, 16 * 1024 * 1024);
  const volume = Volume.open({ name: 'd', uuid: 'u', devicePath: device.path, readOnly: false }, logger);
  t.teardown(() => volume.close());
  const start = deviceFlushCount(device.path);
  await volume.write(0, Buffer.alloc(65536, 1), false);
  await volume.write(100, Buffer.alloc(1000, 2), false); // read-modify-write
  t.equal(deviceFlushCount(device.path), start, 'plain writes issue no flush');
  await volume.flush();
  t.equal(deviceFlushCount(device.path), start + 1, 'flush reaches the device');
  await volume.write(65536, Buffer.alloc(4096, 3), true);
  t.ok(deviceFlushCount(device.path) >= start + 2, 'FUA write reaches stable storage');
  const beforeUnaligned = deviceFlushCount(device.path);
  await volume.write(70000, Buffer.alloc(100, 4), true);
  t.ok(deviceFlushCount(device.path) > beforeUnaligned, 'FUA on a read-modify-write too');
  const beforeZeroes = deviceFlushCount(device.path);
  await volume.writeZeroes(0, 8192, { fua: true, noHole: false, fastZero: false });
  t.ok(deviceFlushCount(device.path) > beforeZeroes, 'FUA write-zeroes flushes');
  const beforeClose = deviceFlushCount(device.path);
  await volume.close();
  t.ok(deviceFlushCount(device.path) > beforeClose, 'close flushes');
});
