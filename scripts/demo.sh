#!/usr/bin/env bash
# Demo: two blockmirrord daemons on this host replicate a volume in synchronous mode.
# hostA serves vol0 (a loop device; a sparse file when not root) over NBD and mirrors it to
# hostB over authenticated TCP on 127.0.0.1. The demo writes through NBD while the full copy
# runs, waits for INSYNC, writes again (forwarded live), shows that the target refuses NBD
# writes, proves both devices hash equal, then stops hostB, writes 8 MiB, restarts hostB and
# shows that only the dirty regions are resent. Everything lives in a temp dir and is cleaned up.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in node qemu-io qemu-img sha256sum; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (the demo needs Node 20 and qemu-utils)"; exit 1; }
done
if ! [ -f build/Release/blockmirror.node ] || ! [ -f dist/src/daemon/main.js ]; then
  npm ci --no-audit --no-fund
elif [ -n "$(find src -name '*.ts' -newer dist/src/daemon/main.js -print -quit)" ]; then
  npm run --silent build:ts # sources changed since the last build
fi

mib=$((1024 * 1024))
size_mib=256
deadline_s=60

work=$(mktemp -d /var/tmp/blockmirror-demo.XXXXXX)
pid_a=""
pid_b=""
loop_a=""
loop_b=""
stop_daemon() { # pid: SIGTERM, then SIGKILL if it has not exited within 10 s
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local status=$?
  set +e
  if [ "$status" != 0 ]; then
    for host in A B; do
      [ -s "$work/$host/daemon.log" ] && { echo "== host$host daemon log (last lines)"; tail -n 20 "$work/$host/daemon.log"; }
    done
  fi
  stop_daemon "$pid_a"
  stop_daemon "$pid_b"
  [ -n "$loop_a" ] && losetup -d "$loop_a" 2>/dev/null
  [ -n "$loop_b" ] && losetup -d "$loop_b" 2>/dev/null
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "demo: FAILED: $*" >&2; exit 1; }

# --- devices ------------------------------------------------------------------------------------
truncate -s "${size_mib}M" "$work/a.img" "$work/b.img"
# Real data for the full copy to move; the rest of the device stays zero (sent as zero runs).
dd if=/dev/urandom of="$work/a.img" bs=1M count=64 seek=16 conv=notrunc,fsync status=none
if [ "$(id -u)" = 0 ]; then
  loop_a=$(losetup --direct-io=on -f --show "$work/a.img")
  loop_b=$(losetup --direct-io=on -f --show "$work/b.img")
  dev_a=$loop_a
  dev_b=$loop_b
else
  dev_a=$work/a.img
  dev_b=$work/b.img
fi
echo "== devices: hostA $dev_a (64 MiB of random data at 16 MiB), hostB $dev_b (empty), $size_mib MiB each"

# --- shared secret and config ----------------------------------------------------------------
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/key")
cat >"$work/config.json" <<'EOF'
{ "replication": { "connectTimeoutMs": 2000, "ackTimeoutMs": 5000, "backoffBaseMs": 200, "backoffMaxMs": 2000 } }
EOF
echo "== shared secret $work/key (mode $(stat -c %a "$work/key")), config: $(tr -d '\n' <"$work/config.json")"

# --- helpers ------------------------------------------------------------------------------------
bm_a() { node bin/blockmirror.js --socket "$work/A/control.sock" "$@"; }
bm_b() { node bin/blockmirror.js --socket "$work/B/control.sock" "$@"; }
# json EXPR: evaluate a JavaScript expression over the JSON on stdin (bound to v).
json() { node -e 'let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => console.log(new Function("v", "return " + process.argv[1])(JSON.parse(s))));' "$1"; }
mirror_json() { bm_a --json mirror status vol0 | json "$1"; }
qio() { qemu-io "$@" | grep -v ' ops; ' | sed 's/^/   /'; }
mib_of() { node -e 'console.log((Number(process.argv[1]) / 1048576).toFixed(1) + " MiB")' "$1"; }

start_daemon() { # host extra-args...: starts it in the background, its pid in $started_pid
  local host=$1
  shift
  node bin/blockmirrord.js --control-socket "$work/$host/control.sock" --nbd-socket "$work/$host/nbd.sock" \
    --state-dir "$work/$host/state" --config "$work/config.json" --node-name "host$host" --log-level warn \
    "$@" >>"$work/$host/daemon.log" 2>&1 &
  started_pid=$!
}
wait_ready() { # host pid
  for _ in $(seq 150); do
    kill -0 "$2" 2>/dev/null || fail "host$1 daemon exited during start"
    node bin/blockmirror.js --socket "$work/$1/control.sock" status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "host$1 daemon not ready after 15 s"
}
start_b() { # extra args
  start_daemon B "$@"
  pid_b=$started_pid
  wait_ready B "$pid_b"
}

# Prints one progress line per poll until the mirror is INSYNC (or fails after the deadline).
wait_insync() {
  local end=$((SECONDS + deadline_s)) line last=""
  while :; do
    line=$(mirror_json '(({state: s, progressPercent: p, copiedBytes: c, dirtyBytes: d, rateBytesPerSec: r, etaSeconds: e}) =>
      `${s.padEnd(9)} ${p.toFixed(1).padStart(5)}%  copied ${(c / 1048576).toFixed(1)} MiB, ${(d / 1048576).toFixed(1)} MiB to go, ` +
      `${(r / 1048576).toFixed(1)} MiB/s, eta ${e === null ? "-" : e + " s"}`)(v.mirrors[0])')
    [ "$line" != "$last" ] && echo "   $line"
    last=$line
    case $line in INSYNC*) return 0 ;; ERROR*) bm_a mirror status vol0; fail "mirror in ERROR" ;; esac
    [ "$SECONDS" -lt "$end" ] || { bm_a mirror status vol0; fail "mirror not INSYNC after $deadline_s s"; }
    sleep 0.4
  done
}

hash_compare() {
  echo "== sha256 of both whole devices"
  local hash_a hash_b
  hash_a=$(sha256sum "$dev_a" | cut -d' ' -f1)
  hash_b=$(sha256sum "$dev_b" | cut -d' ' -f1)
  echo "   hostA $dev_a: $hash_a"
  echo "   hostB $dev_b: $hash_b"
  [ "$hash_a" = "$hash_b" ] || fail "the devices differ"
  echo "== qemu-img compare of the two NBD exports"
  qemu-img compare -f raw -F raw "$uri_a" "$uri_b" || fail "the NBD exports differ"
}

# --- daemons -------------------------------------------------------------------------------------
mkdir -p "$work/A" "$work/B"
echo "== start hostB (replication target, listening on 127.0.0.1, port picked by the kernel)"
start_b --listen 127.0.0.1:0
listen_b=$(bm_b --json status | json 'v.replicationListen')
port_b=${listen_b##*:}
echo "   hostB pid $pid_b, replication address $listen_b"
echo "== start hostA (replication source)"
start_daemon A
pid_a=$started_pid
wait_ready A "$pid_a"
echo "   hostA pid $pid_a"
uri_a="nbd+unix:///vol0?socket=$work/A/nbd.sock"
uri_b="nbd+unix:///vol0?socket=$work/B/nbd.sock"

echo "== hostB: peer hostA (it only dials in) and the mirror volume vol0"
bm_b peer add hostA --address 127.0.0.1:1 --secret-file "$work/key" >/dev/null
bm_b volume add vol0 --device "$dev_b" --mirror >/dev/null
bm_b volume list
echo "== hostA: peer hostB at $listen_b and the volume vol0"
bm_a peer add hostB --address "$listen_b" --secret-file "$work/key" >/dev/null
bm_a peer list
bm_a volume add vol0 --device "$dev_a" >/dev/null
bm_a volume list

# --- full copy -----------------------------------------------------------------------------------
echo "== hostA: mirror add vol0 --peer hostB --target vol0 --mode sync --max-rate 64M"
bm_a mirror add vol0 --peer hostB --target vol0 --mode sync --max-rate 64M >/dev/null
end=$((SECONDS + 10))
until [ "$(mirror_json 'v.mirrors[0].state === "REPLICATE" && v.mirrors[0].copiedBytes > 0')" = true ]; do
  [ "$SECONDS" -lt "$end" ] || { bm_a mirror status vol0; fail "the full copy did not start"; }
  sleep 0.1
done
bm_a mirror status vol0
echo "== write through hostA's NBD export while the copy runs (state $(mirror_json 'v.mirrors[0].state'))"
qio -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 100M 2M' -c 'write -P 0x33 200M 4M' \
  -c 'write -P 0x44 255M 1M' -c flush "$uri_a"
echo "== full copy: progress until INSYNC"
wait_insync
bm_a mirror status vol0
echo "   states: $(mirror_json '[v.mirrors[0].history[0].from, ...v.mirrors[0].history.map((h) => h.to)].filter((s, i, a) => s !== a[i - 1]).join(" -> ")')"

# --- live writes in sync mode ------------------------------------------------------------------
live_before=$(mirror_json 'v.mirrors[0].sent.liveWrites')
echo "== INSYNC: write through NBD again; each write is acknowledged once both devices hold it"
qio -f raw -c 'write -P 0x55 8M 512k' -c 'write -P 0x66 150M 2M' -c flush "$uri_a"
echo "   live writes forwarded: $(( $(mirror_json 'v.mirrors[0].sent.liveWrites') - live_before )), state $(mirror_json 'v.mirrors[0].state')"

# --- the target is read-only to NBD clients ----------------------------------------------------
echo "== hostB serves the mirror read-only: reads see the source's writes"
qio -r -f raw -c 'read -P 0x22 100M 2M' -c 'read -P 0x66 150M 2M' "$uri_b"
echo "== hostB refuses NBD writes"
# The export is flagged read-only, so qemu-io refuses to open it for writing ...
refused=$(qemu-io -f raw -c 'write -P 0xee 0 64k' "$uri_b" 2>&1) && fail "qemu-io opened the mirror volume read-write"
echo "   $refused"
grep -q 'Permission denied' <<<"$refused" || fail "expected qemu-io to be denied write access"
# ... and a client that ignores the flag (libnbd without its client-side checks) gets EPERM.
nbdsh=""
for candidate in nbdsh "env PATH=/usr/bin:/bin:$PATH nbdsh"; do # the libnbd bindings live in the system python3
  $candidate -c pass >/dev/null 2>&1 && { nbdsh=$candidate; break; }
done
if [ -n "$nbdsh" ]; then
  refused=$($nbdsh -u "$uri_b" -c 'h.set_strict_mode(0)' -c 'h.pwrite(b"\xee" * 65536, 0)' 2>&1) && fail "the mirror volume accepted an NBD write"
  echo "   $refused"
  grep -q 'Operation not permitted' <<<"$refused" || fail "expected the write to be refused with EPERM"
else
  echo "   (nbdsh with the libnbd python bindings not found: skipping the raw NBD write)"
fi
echo "== mirror list (hostA)"
bm_a mirror list

hash_compare

# --- target down, writes go on, FastResync --------------------------------------------------
echo "== stop hostB (SIGTERM), then write 8 MiB through hostA's NBD export"
stop_daemon "$pid_b"
pid_b=""
qio -f raw -c 'write -P 0x77 32M 8M' -c flush "$uri_a"
end=$((SECONDS + 10))
until [ "$(mirror_json 'v.mirrors[0].state !== "INSYNC" && v.mirrors[0].dirtyBytes >= 8 * 1048576')" = true ]; do
  [ "$SECONDS" -lt "$end" ] || { bm_a mirror status vol0; fail "the mirror did not record the writes as dirty"; }
  sleep 0.1
done
bm_a mirror status vol0 | grep -E '^(state|cause|next retry):'
echo "   dirty (the target lacks them): $(mib_of "$(mirror_json 'v.mirrors[0].dirtyBytes')")"
sent_before=$(mirror_json 'v.mirrors[0].sent.copyBytes + v.mirrors[0].sent.zeroBytes')
echo "== restart hostB on the same port ($port_b), same state dir"
start_b --listen "127.0.0.1:$port_b"
echo "   hostB pid $pid_b"
wait_insync
resent=$(( $(mirror_json 'v.mirrors[0].sent.copyBytes + v.mirrors[0].sent.zeroBytes') - sent_before ))
bm_a mirror status vol0 | grep -E '^(state|cause|sent):'
echo "   resent after the restart: $(mib_of "$resent") of $size_mib MiB (8 MiB were written while hostB was down)"
[ "$resent" -ge $((8 * mib)) ] && [ "$resent" -le $((9 * mib)) ] || fail "expected about 8 MiB resent, got $resent bytes"

hash_compare

# --- source crash: the write-intent log says what to resync ------------------------------------
echo "== write 4 MiB through hostA, then SIGKILL hostA (a crash: no clean stop, no bitmap saved)"
qio -f raw -c 'write -P 0x88 64M 4M' "$uri_a"
kill -KILL "$pid_a"
wait "$pid_a" 2>/dev/null || true
pid_a=""
echo "== restart hostA on the same state dir"
start_daemon A
pid_a=$started_pid
wait_ready A "$pid_a"
echo "   hostA pid $pid_a"
echo "   recovery: $(mirror_json '`${v.mirrors[0].recovery.kind}: ${v.mirrors[0].recovery.detail}`')"
[ "$(mirror_json 'v.mirrors[0].recovery.kind')" = activity-log ] || fail "expected the restart to recover from the activity log"
at_start=$(mirror_json 'v.mirrors[0].recovery.dirtyBytesAtStart')
echo "   to resync: $(mib_of "$at_start") of $size_mib MiB (the extents hostA had written since it started)"
[ "$at_start" -lt $((size_mib * mib / 2)) ] || fail "expected far less than the volume to be resynced, got $at_start bytes"
wait_insync
hash_compare
echo "== demo ok"
