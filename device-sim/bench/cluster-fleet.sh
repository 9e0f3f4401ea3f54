#!/usr/bin/env bash
# A fleet larger than one process can hold, on several gateway processes sharing their state
# through NATS JetStream (issue #12): N devices (default 100,000), each with its own
# certificate, enrolled once into the cluster registry; GATEWAYS processes on one port with
# SO_REUSEPORT (the kernel spreads the connections, as an L4 balancer would); INGESTS sample
# ingest backends (each gateway's route round-robins over all of them); the fleet from
# SOURCES loopback addresses (127.0.0.2, ...) in worker processes of at most 8,000 devices.
# Prints the time to connect everyone, the gateways' memory per session (RSS after minus RSS
# before the fleet, the registry index already loaded), and the fleet's report.
#
#   device-sim/bench/cluster-fleet.sh
#   N=20000 GATEWAYS=3 INGESTS=2 device-sim/bench/cluster-fleet.sh
#
# Open files are capped at 20,000 per process here: a gateway holds two sockets per session
# (<= 9,000 sessions each), an ingest backend one per session, a source address ~28,000
# ephemeral ports.
set -euo pipefail
N=${N:-100000}
GATEWAYS=${GATEWAYS:-12}
INGESTS=${INGESTS:-6}
SOURCES=${SOURCES:-5}
RAMP=${RAMP:-400}
RATE=${RATE:-0.05}
HOLD=${HOLD:-60}
NODES=${NODES:-3}
REPLICAS=${REPLICAS:-3}
TTL=${TTL:-120000}
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
B=$PWD/target/release
W=$(mktemp -d /tmp/gatehouse-cluster-fleet-XXXX)
trap 'kill -TERM $(jobs -p) 2>/dev/null || true; sleep 2' EXIT
. device-sim/bench/common.sh
$B/gatehouse-sim nats --nodes "$NODES" > "$W/nats.out" 2> "$W/nats.err" &
until grep -q '^servers' "$W/nats.out"; do kill -0 $! ; sleep 0.2; done
SERVERS=$(grep '^servers' "$W/nats.out")
echo "NATS: $NODES nodes, $SERVERS, replicas $REPLICAS"
T=$(date +%s.%N)
$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki fleet --dir "$W/pki" --type env-sensor --count "$N" --prefix c >/dev/null
python3 -c "import time; print(f'{$N} device certificates issued in {time.time()-$T:.1f} s')"
GW_PORT=$(free_port)
BACKENDS=()
for i in $(seq 1 "$INGESTS"); do
  p=$(free_port)
  $B/gatehouse-sim ingest --listen 127.0.0.1:$p > "$W/ingest-$i.log" &
  BACKENDS+=(--backend "ws://127.0.0.1:$p/ingest")
  INGEST_URLS+=("ws://127.0.0.1:$p")
done
PER_GW=$(( N / GATEWAYS + N / GATEWAYS / 10 + 100 ))
for i in $(seq 1 "$GATEWAYS"); do
  $B/gatehouse-sim config --listen 127.0.0.1:$GW_PORT --max-connections "$PER_GW" --pki "$W/pki" \
    --schemas "$PWD/schemas" "${BACKENDS[@]}" \
    --server "reuse_port = true" --server "source_handshakes_per_second = 0" --server "source_connections = 0" \
    --cluster "$SERVERS" --cluster "name = \"gw-$i\"" --cluster "replicas = $REPLICAS" \
    --cluster "ownership_ttl_ms = $TTL" > "$W/gw-$i.toml"
done
T=$(date +%s.%N)
$B/gatehouse devices --config "$W/gw-1.toml" enroll --manifest "$W/pki/fleet-c.json" >/dev/null
python3 -c "import time; print(f'{$N} devices enrolled into the cluster registry in {time.time()-$T:.1f} s')"
PIDS=()
for i in $(seq 1 "$GATEWAYS"); do
  RUST_LOG=warn $B/gatehouse serve --config "$W/gw-$i.toml" 2> "$W/gw-$i.log" &
  PIDS+=($!)
done
# A gateway listens once its registry index is loaded.
until [ "$(ss -ltn "( sport = :$GW_PORT )" | tail -n +2 | wc -l)" -ge "$GATEWAYS" ]; do
  for pid in "${PIDS[@]}"; do kill -0 "$pid"; done; sleep 0.2
done
rss() { local t=0; for pid in "${PIDS[@]}"; do t=$(( t + $(awk '/VmRSS/ {print $2}' /proc/$pid/status) )); done; echo $t; }
RSS0=$(rss)
echo "$GATEWAYS gateways listening on 127.0.0.1:$GW_PORT (SO_REUSEPORT), each with the $N-device index: $(( RSS0 / 1024 )) MiB RSS in all"
SRC=(); for s in $(seq 2 $(( SOURCES + 1 ))); do SRC+=(--source 127.0.0.$s); done
SECS=$(python3 -c "print(int($N/$RAMP + $HOLD + 30))")
T0=$(date +%s.%N)
$B/gatehouse-sim fleet --url wss://localhost:$GW_PORT/ --dir "$W/pki" --rate "$RATE" --seconds "$SECS" \
  --connect-rate "$RAMP" --reconnect --schemas "$PWD/schemas" --format mix "${SRC[@]}" \
  --json > "$W/fleet.json" 2> "$W/fleet.progress" &
FLEET=$!
until grep -q "connected $N/$N" "$W/fleet.progress"; do kill -0 $FLEET; sleep 0.5; done
T1=$(date +%s.%N)
python3 -c "print(f'all {$N} devices connected {$T1-$T0:.1f} s after the fleet started (ramp {$RAMP}/s)')"
sleep 10
RSS1=$(rss)
echo "gateways: $(( RSS1 / 1024 )) MiB RSS with $N sessions; $(python3 -c "print(f'{($RSS1-$RSS0)/$N:.1f}')") KiB per session"
for i in $(seq 1 "$GATEWAYS"); do
  printf 'gw-%s: %s KiB RSS, %s CPU ticks\n' "$i" "$(awk '/VmRSS/ {print $2}' /proc/${PIDS[$((i-1))]}/status)" \
    "$(awk '{print $14+$15}' /proc/${PIDS[$((i-1))]}/stat)"
done
echo "sessions per gateway (ESTABLISHED on the device port, by process):"
ss -tnp state established "( sport = :$GW_PORT )" 2>/dev/null | grep -o 'pid=[0-9]*' | sort | uniq -c | awk '{printf "  %s %s\n", $2, $1}'
wait $FLEET || true
tail -n 3 "$W/fleet.progress"
python3 - "$W/fleet.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keep = {k: r[k] for k in ("devices", "connected", "sessions", "reconnects", "gave_up", "refused", "frames_sent", "frames_received", "error_frames", "closes", "errors", "elapsed_ms", "processes") if k in r}
print(json.dumps(keep, indent=1))
h = r.get("handshake", {})
print("handshake:", {k: v for k, v in h.items() if k != "buckets"})
PY
for u in "${INGEST_URLS[@]}"; do $B/gatehouse-sim stats --url "$u" | python3 -c "import json,sys; s=json.load(sys.stdin); print('ingest', {k: v for k, v in s.items() if not isinstance(v, dict)})"; done
echo "logs in $W"
