#!/usr/bin/env bash
# Demo: blockmirrord serving a loop device (a sparse file when not root) over NBD.
# Starts a daemon on scratch paths, adds a volume, writes and reads through NBD with qemu-io,
# shows the allocation map with nbdinfo, proves the bytes reached the device, and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in qemu-io qemu-img nbdinfo; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (apt-get install qemu-utils libnbd-bin)"; exit 1; }
done
[ -f build/Release/blockmirror.node ] && [ -f dist/src/daemon/main.js ] || npm ci --no-audit --no-fund

work=$(mktemp -d /var/tmp/blockmirror-demo.XXXXXX)
daemon_pid=""
loop=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

truncate -s 256M "$work/disk.img"
if [ "$(id -u)" = 0 ]; then
  loop=$(losetup --direct-io=on -f --show "$work/disk.img")
  device=$loop
else
  device=$work/disk.img
fi
echo "== device: $device (256 MiB)"

bm() { node bin/blockmirror.js --socket "$work/control.sock" "$@"; }
bin/blockmirrord.js --control-socket "$work/control.sock" --nbd-socket "$work/nbd.sock" \
  --state-dir "$work/state" --log-level warn &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$work/control.sock" ] && break; sleep 0.1; done

bm volume add vol0 --device "$device"
bm volume info vol0
uri="nbd+unix:///vol0?socket=$work/nbd.sock"

echo "== write 1 MiB of 0xab at 0 and 4 MiB of 0x5c at 64 MiB through NBD, then flush"
qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0x5c 64M 4M' -c flush "$uri"
echo "== read them back through NBD"
qemu-io -f raw -c 'read -P 0xab 0 1M' -c 'read -P 0x5c 64M 4M' -c 'read -P 0 1M 1M' "$uri"
echo "== exports and allocation"
nbdinfo --list "nbd+unix:///?socket=$work/nbd.sock" | grep -E 'export=|export-size'
echo "== the device holds exactly what NBD serves"
qemu-img compare -f raw -F raw "$uri" "$device"
bm status
echo "== demo ok"
