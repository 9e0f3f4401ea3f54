#!/usr/bin/env bash
# Fleet run and reconnect storm on one gateway process: N devices (default 9,000) connect at
# RAMP per second and send telemetry at RATE; once all are connected the gateway is restarted
# (SIGINT: every session closes with 1001, then a fresh process on the same port), and the
# fleet, reconnecting with exponential backoff and jitter (honouring Retry-After), comes back.
# Prints the time from the restart until every device is connected again, what was refused
# meanwhile (the admission budgets at work), and the fleet's report.
#
#   device-sim/bench/storm.sh
#   N=4000 RATE=2 device-sim/bench/storm.sh
#
# The fleet runs as worker processes above 8,000 devices (one socket per device each); the
# gateway holds two sockets per device under the 20,000 open-file limit, so N stays <= 9,000.
set -euo pipefail
N=${N:-9000}
RATE=${RATE:-1}
RAMP=${RAMP:-500}
SECS=${SECS:-120}
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
B=$PWD/target/release
W=$(mktemp -d /tmp/gatehouse-storm-XXXX)
trap 'kill -INT $(jobs -p) 2>/dev/null || true; sleep 1' EXIT
. device-sim/bench/common.sh
GW_PORT=$(free_port); INGEST_PORT=$(free_port)
$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki fleet --dir "$W/pki" --type env-sensor --count "$N" --prefix s >/dev/null
# The admission budgets as shipped, except the per-source ones: the whole fleet comes from
# 127.0.0.1 here.
$B/gatehouse-sim config --listen 127.0.0.1:$GW_PORT --max-connections 9500 --pki "$W/pki" \
  --registry "$W/registry" --schemas "$PWD/schemas" --backend "ws://127.0.0.1:$INGEST_PORT/ingest" \
  --server "source_handshakes_per_second = 0" --server "source_connections = 0" > "$W/gatehouse.toml"
$B/gatehouse devices --config "$W/gatehouse.toml" enroll --manifest "$W/pki/fleet-s.json" >/dev/null
$B/gatehouse-sim ingest --listen 127.0.0.1:$INGEST_PORT > "$W/ingest.log" &
RUST_LOG=warn $B/gatehouse serve --config "$W/gatehouse.toml" 2> "$W/gateway-1.log" &
GW=$!
wait_port $GW_PORT
$B/gatehouse-sim fleet --url wss://localhost:$GW_PORT/ --dir "$W/pki" --rate "$RATE" --seconds "$SECS" \
  --connect-rate "$RAMP" --reconnect --schemas "$PWD/schemas" --format mix \
  --backend-stats ws://127.0.0.1:$INGEST_PORT > "$W/fleet.out" 2> "$W/fleet.progress" &
FLEET=$!
until grep -q "connected $N/$N" "$W/fleet.progress"; do kill -0 $FLEET; sleep 0.2; done
echo "all $N devices connected: $(grep -m1 "connected $N/$N" "$W/fleet.progress")"
echo "gateway RSS with $N sessions: $(( $(awk '/VmRSS/ {print $2}' /proc/$GW/status) / 1024 )) MiB"
sleep 5
T0=$(date +%s.%N)
kill -INT $GW; wait $GW || true
RUST_LOG=warn $B/gatehouse serve --config "$W/gatehouse.toml" 2> "$W/gateway-2.log" &
GW=$!
wait_port $GW_PORT
T1=$(date +%s.%N)
LINES=$(wc -l < "$W/fleet.progress")
until tail -n +"$LINES" "$W/fleet.progress" | grep -q "connected $N/$N"; do kill -0 $FLEET; sleep 0.2; done
T2=$(date +%s.%N)
python3 -c "print(f'restart: old gateway stopped and new one listening in {$T1-$T0:.1f} s; every device back {$T2-$T0:.1f} s after the restart began')"
tail -n +"$LINES" "$W/fleet.progress" | grep -m1 "connected $N/$N"
wait $FLEET || true
cat "$W/fleet.out"
echo "logs in $W"
