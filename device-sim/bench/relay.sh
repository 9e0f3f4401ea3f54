#!/usr/bin/env bash
# Relay benchmark: proxy CPU per forwarded frame and memory per connected device.
#
#   device-sim/bench/relay.sh            # N=1000 devices, RATE=10 frames/s each, SECS=30
#   N=5000 RATE=2 SECS=40 device-sim/bench/relay.sh
#   TARGET=nginx device-sim/bench/relay.sh   # the same fleet through nginx (mTLS, CRL, proxy)
#
# Starts the release gateway, the sample ingest backend and a simulated fleet as separate
# processes on loopback. CPU is the gateway's utime+stime (/proc) over a window in which every
# device is connected and sending; frames in that window are CONNECTED*RATE*window (the fleet paces
# itself; the ingest total printed at the end confirms it; only devices that connected
# count, and a warning says when some did not). Memory is the gateway's RSS with
# all devices connected minus its RSS before any connected, divided by the devices connected.
set -euo pipefail
TARGET=${TARGET:-gatehouse}
N=${N:-1000}
RATE=${RATE:-10}
SECS=${SECS:-30}
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
B=$PWD/target/release
W=$(mktemp -d /tmp/gatehouse-bench-XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
. device-sim/bench/common.sh
GW_PORT=$(free_port); INGEST_PORT=$(free_port)

$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki fleet --dir "$W/pki" --type env-sensor --count "$N" --prefix s
$B/gatehouse-sim config --listen 127.0.0.1:$GW_PORT --max-connections 9500 \
  --schemas "$PWD/schemas" --backend "ws://127.0.0.1:$INGEST_PORT/ingest" \
  --limit "frames_per_second = 1000" --limit "frames_burst = 2000" \
  --server "source_handshakes_per_second = 0" --server "max_handshakes = 4000" > "$W/gatehouse.toml"
$B/gatehouse devices --config "$W/gatehouse.toml" enroll --manifest "$W/pki/fleet-s.json"

$B/gatehouse-sim ingest --listen 127.0.0.1:$INGEST_PORT > "$W/ingest.log" &
if [ "$TARGET" = nginx ]; then
  nginx_conf "$W" "$GW_PORT" "$INGEST_PORT" > "$W/nginx.conf"
  nginx -c "$W/nginx.conf"
  until [ -s "$W/nginx.pid" ]; do sleep 0.1; done
  sleep 0.5
  PIDS=$(pgrep -P "$(cat "$W/nginx.pid")" | tr '\n' ' ')
  trap 'nginx -c "$W/nginx.conf" -s stop 2>/dev/null; kill $(jobs -p) 2>/dev/null || true' EXIT
else
  RUST_LOG=warn $B/gatehouse serve --config "$W/gatehouse.toml" 2> "$W/gateway.log" &
  PIDS=$!
fi
until python3 -c "import socket; socket.create_connection(('127.0.0.1',$GW_PORT))" 2>/dev/null; do sleep 0.1; done

cpu() { local t=0; for p in $PIDS; do t=$(( t + $(awk '{print $14+$15}' /proc/$p/stat) )); done; echo $t; }   # clock ticks
rss() { local t=0; for p in $PIDS; do t=$(( t + $(awk '/VmRSS/ {print $2}' /proc/$p/status) )); done; echo $t; } # KiB
TCK=$(getconf CLK_TCK)
RSS0=$(rss)

$B/gatehouse-sim fleet --url wss://localhost:$GW_PORT/ --dir "$W/pki" --rate "$RATE" --seconds "$SECS" --connect-rate 2000 > "$W/fleet.log" &
FLEET=$!
RAMP=$(( N / 2000 + 4 ))
sleep "$RAMP"
C1=$(cpu); RSS1=$(rss); T1=$(date +%s.%N)
WINDOW=$(( SECS - RAMP - 3 ))
sleep "$WINDOW"
C2=$(cpu); T2=$(date +%s.%N)
wait $FLEET
cat "$W/fleet.log"
CONNECTED=$(awk '$1 == "connected" {print $2}' "$W/fleet.log")
python3 - <<PY
n, rate, connected = $N, $RATE, ${CONNECTED:-0}
window = $T2 - $T1
if connected < n:
    print(f"WARNING: only {connected} of {n} devices connected; figures below count those")
frames = connected * rate * window
cpu_s = ($C2 - $C1) / $TCK
print("target $TARGET")
print(f"window {window:.1f} s, ~{frames:.0f} frames forwarded")
print(f"proxy CPU {cpu_s:.2f} s -> {cpu_s / frames * 1e6:.2f} us per frame ({cpu_s / window * 100:.0f}% of one core)")
per = max(connected, 1)
print(f"proxy RSS {$RSS0/1024:.1f} MiB idle, {$RSS1/1024:.1f} MiB with {connected} devices -> {($RSS1-$RSS0)/per:.1f} KiB per device")
PY
if [ "$TARGET" = nginx ]; then nginx -c "$W/nginx.conf" -s stop; else kill -INT $PIDS; wait $PIDS || true; fi
kill -INT %1 2>/dev/null || true
sleep 0.5
tail -1 "$W/ingest.log"
