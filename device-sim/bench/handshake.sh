#!/usr/bin/env bash
# Handshake benchmark: gateway CPU per full mTLS session (TLS 1.3 handshake with a fresh
# client certificate, registry lookup, backend connection, upgrade, and the close), with the
# embedded registry and with the cluster registry on a three-node NATS JetStream cluster.
#
#   device-sim/bench/handshake.sh              # N=2000 devices per run, ROUNDS=3, REPLICAS=3
#   STORE=embedded device-sim/bench/handshake.sh   # one store only (embedded or cluster)
#   NODES=1 REPLICAS=1 STORE=cluster device-sim/bench/handshake.sh
#
# Separate processes on loopback: the release gateway, the sample ingest backend, a NATS
# cluster (`gatehouse-sim nats`) for the cluster store, and the fleet. CPU is the gateway's
# utime+stime from /proc across a fleet run in which every device connects once (no TLS
# resumption: each device is its own client), stays a second and closes; divided by the
# devices that connected. Each round restarts nothing: the gateway is warm after round 1.
set -euo pipefail
N=${N:-2000}
ROUNDS=${ROUNDS:-3}
REPLICAS=${REPLICAS:-3}
NODES=${NODES:-3}
STORES=${STORE:-"embedded cluster"}
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
B=$PWD/target/release
W=$(mktemp -d /tmp/gatehouse-handshake-XXXX)
trap 'kill -INT $(jobs -p) 2>/dev/null || true; sleep 0.5' EXIT
. device-sim/bench/common.sh
INGEST_PORT=$(free_port)

$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki fleet --dir "$W/pki" --type env-sensor --count "$N" --prefix s >/dev/null
$B/gatehouse-sim ingest --listen 127.0.0.1:$INGEST_PORT > "$W/ingest.log" &
TCK=$(getconf CLK_TCK)

for STORE in $STORES; do
  GW_PORT=$(free_port)
  CFG="$W/$STORE.toml"
  $B/gatehouse-sim config --listen 127.0.0.1:$GW_PORT --max-connections 9500 \
    --schemas "$PWD/schemas" --backend "ws://127.0.0.1:$INGEST_PORT/ingest" \
    --registry "$W/registry-$STORE" \
    --server "source_handshakes_per_second = 0" --server "max_handshakes = 4000" > "$CFG"
  if [ "$STORE" = cluster ]; then
    $B/gatehouse-sim nats --nodes "$NODES" > "$W/nats.out" 2> "$W/nats.log" &
    NATS=$!
    until grep -q '^servers = ' "$W/nats.out" 2>/dev/null; do
      kill -0 $NATS || { cat "$W/nats.log"; exit 1; }
      sleep 0.2
    done
    python3 - "$CFG" "$W/nats.out" "$REPLICAS" <<'PY'
import re, sys
cfg, nats, replicas = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(cfg).read()
servers = [l for l in open(nats) if l.startswith("servers = ")][0].strip()
text = re.sub(r'\[registry\]\npath = [^\n]*\n', f'[cluster]\n{servers}\nname = "bench"\nreplicas = {replicas}\n', text)
open(cfg, "w").write(text)
PY
  fi
  $B/gatehouse devices --config "$CFG" enroll --manifest "$W/pki/fleet-s.json" >/dev/null
  RUST_LOG=warn $B/gatehouse serve --config "$CFG" 2> "$W/gateway-$STORE.log" &
  GW=$!
  wait_port $GW_PORT
  # Warm-up: a few sessions, not counted.
  $B/gatehouse-sim fleet --url wss://localhost:$GW_PORT/ --dir "$W/pki" --count 50 --rate 0 --seconds 1 > /dev/null
  for r in $(seq 1 "$ROUNDS"); do
    C0=$(awk '{print $14+$15}' /proc/$GW/stat)
    $B/gatehouse-sim fleet --url wss://localhost:$GW_PORT/ --dir "$W/pki" --rate 0 --seconds 1 \
      --connect-rate 1000 > "$W/fleet-$STORE-$r.log"
    sleep 1   # the closes finish on the gateway
    C1=$(awk '{print $14+$15}' /proc/$GW/stat)
    CONNECTED=$(awk '$1 == "connected" {print $2}' "$W/fleet-$STORE-$r.log")
    P=$(grep 'connect time' "$W/fleet-$STORE-$r.log" | sed 's/^ *connect time *//')
    python3 -c "
c=${CONNECTED:-0}; cpu=($C1-$C0)/$TCK
print(f'$STORE round $r: {c} of $N sessions, gateway CPU {cpu:.2f} s -> {cpu/max(c,1)*1e6:.0f} us per session; connect time $P')"
  done
  kill -INT $GW; wait $GW || true
  if [ "$STORE" = cluster ]; then kill -INT $NATS; wait $NATS || true; fi
done
