#!/usr/bin/env bash
# Peer benchmark: the same fleet and backends through Gatehouse, nginx and HAProxy (each an
# mTLS wss proxy: client certificate verified against the same CA and CRL, the client's DN
# passed on as a header), and straight to the backend, in one run, a fresh process per system.
#
#   device-sim/bench/peers.sh                          # every system, default sizes
#   SYSTEMS="gatehouse nginx" IDLE=4000 device-sim/bench/peers.sh
#
# Figures per system (CPU is the proxy's utime+stime from /proc, summed over its processes;
# the load generator, the backends and the proxy share the machine's cores):
#   rss/dev     RSS per connected idle device (both legs), IDLE devices held, fresh process
#   full hs     CPU per full mTLS handshake + upgrade + backend connection + close, HS devices
#               each connecting once (one certificate each: no resumption possible)
#   resumed hs  CPU per resumed one: RESUME devices x 5 sessions each with one TLS client
#               (first full, the others resumed), minus the full ones, per resumed session
#   json/cbor   CPU per forwarded 200-byte telemetry frame (validated by Gatehouse), FRAMES
#               devices at RATE frames/s each, over a window with every device connected,
#               frames counted at the ingest backend
#   max fps     frames/s the ingest backend receives when SAT devices offer SAT_RATE each
#   echo p50/99 round trip of a 200-byte frame through an echo backend at LAT_LOW and
#               LAT_HIGH frames/s offered (20 per device); "added" is that minus the direct path's (ws:// to the
#               same echo backend, no proxy)
set -euo pipefail
SYSTEMS=${SYSTEMS:-"gatehouse nginx haproxy direct"}
IDLE=${IDLE:-8000}
HS=${HS:-2000}
RESUME=${RESUME:-500}
FRAMES=${FRAMES:-1000}
RATE=${RATE:-10}
SAT=${SAT:-500}
SAT_RATE=${SAT_RATE:-100}
LAT_LOW=${LAT_LOW:-5000}
LAT_HIGH=${LAT_HIGH:-20000}
WINDOW=${WINDOW:-10}
cd "$(dirname "$0")/../.."
cargo build --release --workspace -q
B=$PWD/target/release
W=$(mktemp -d /tmp/gatehouse-peers-XXXX)
PIDS=""
stop_system() {
  if [ -f "$W/nginx.pid" ]; then nginx -c "$W/nginx.conf" -s stop 2>/dev/null || true; sleep 0.5; rm -f "$W/nginx.pid"; fi
  # gatehouse drains on SIGINT; HAProxy only stops at once on SIGTERM.
  for p in $PIDS; do kill -INT "$p" 2>/dev/null || true; [ "$SYS" = haproxy ] && kill -TERM "$p" 2>/dev/null || true; done
  for p in $PIDS; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  PIDS=""
}
trap 'stop_system; kill $(jobs -p) 2>/dev/null || true' EXIT
. device-sim/bench/common.sh
cpu() { local t=0; for p in $PIDS; do t=$(( t + $(awk '{print $14+$15}' /proc/$p/stat) )); done; echo $t; }    # clock ticks
rss() { local t=0; for p in $PIDS; do t=$(( t + $(awk '/VmRSS/ {print $2}' /proc/$p/status) )); done; echo $t; } # KiB
frames() { $B/gatehouse-sim stats --url "ws://127.0.0.1:$INGEST_PORT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["frames"])'; }
TCK=$(getconf CLK_TCK)
N=$(( IDLE > HS ? IDLE : HS ))
INGEST_PORT=$(free_port); ECHO_PORT=$(free_port)

echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "versions: $(nginx -v 2>&1 | cut -d/ -f2), HAProxy $(haproxy -v | head -1 | awk '{print $3}'), gatehouse $(git rev-parse --short HEAD)"
$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki fleet --dir "$W/pki" --type env-sensor --count "$N" --prefix s >/dev/null
cat "$W/pki/server.pem" "$W/pki/server.key" > "$W/haproxy.pem"
$B/gatehouse-sim ingest --listen 127.0.0.1:$INGEST_PORT > "$W/ingest.log" &
$B/gatehouse-sim echo --listen 127.0.0.1:$ECHO_PORT > "$W/echo.log" &
wait_port $INGEST_PORT; wait_port $ECHO_PORT

start_system() {  # $1 system; sets PIDS and PORT
  local sys=$1
  PORT=$(free_port)
  case $sys in
  gatehouse)
    $B/gatehouse-sim config --listen 127.0.0.1:$PORT --max-connections 9500 \
      --pki "$W/pki" --registry "$W/registry-$RANDOM" \
      --schemas "$PWD/schemas" --backend "ws://127.0.0.1:$INGEST_PORT/ingest" \
      --limit "frames_per_second = 5000" --limit "frames_burst = 5000" \
      --server "source_handshakes_per_second = 0" --server "source_connections = 0" \
      --server "max_handshakes = 4000" > "$W/gatehouse.toml"
    cat >> "$W/gatehouse.toml" <<TOML

[[route]]
subprotocol = "echo.v1"
kind = "telemetry"
device_types = ["env-sensor"]
backends = ["ws://127.0.0.1:$ECHO_PORT/echo"]
TOML
    $B/gatehouse devices --config "$W/gatehouse.toml" enroll --manifest "$W/pki/fleet-s.json" >/dev/null
    RUST_LOG=warn $B/gatehouse serve --config "$W/gatehouse.toml" 2> "$W/gateway.log" &
    PIDS=$!
    wait_port $PORT $PIDS
    ;;
  nginx)
    nginx_conf "$W" "$PORT" "$INGEST_PORT" "$ECHO_PORT" > "$W/nginx.conf"
    nginx -c "$W/nginx.conf"
    until [ -s "$W/nginx.pid" ]; do sleep 0.1; done
    wait_port $PORT
    PIDS="$(cat "$W/nginx.pid") $(pgrep -P "$(cat "$W/nginx.pid")" | tr '\n' ' ')"
    ;;
  haproxy)
    cat > "$W/haproxy.cfg" <<HAP
global
    # Two sockets per device under the 20,000 open-file limit.
    maxconn 9500
    nbthread 2
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend devices
    bind 127.0.0.1:$PORT ssl crt $W/haproxy.pem ca-file $W/pki/ca.pem crl-file $W/pki/crl.pem verify required ssl-min-ver TLSv1.3 alpn http/1.1
    http-request set-header x-gatehouse-device-id %[ssl_c_s_dn]
    use_backend echo if { path_beg /echo }
    default_backend ingest
backend ingest
    server ingest 127.0.0.1:$INGEST_PORT
backend echo
    server echo 127.0.0.1:$ECHO_PORT
HAP
    haproxy -f "$W/haproxy.cfg" 2> "$W/haproxy.log" &
    PIDS=$!
    wait_port $PORT $PIDS
    ;;
  direct) PIDS=""; PORT=$ECHO_PORT ;;
  esac
}

url_for() { if [ "$1" = direct ]; then echo "ws://127.0.0.1:$ECHO_PORT$2"; else echo "wss://localhost:$PORT$2"; fi; }
fleet() {  # $1 log name, rest: fleet arguments; waits until it ends; report JSON in $W/$1.json
  local name=$1; shift
  $B/gatehouse-sim fleet --dir "$W/pki" --json "$@" > "$W/$name.json" 2> "$W/$name.progress"
}
fleet_bg() { local name=$1; shift; $B/gatehouse-sim fleet --dir "$W/pki" --json "$@" > "$W/$name.json" 2> "$W/$name.progress" & FLEET=$!; }
wait_connected() {  # $1 progress file, $2 count
  until grep -q "connected $2/$2" "$1" 2>/dev/null; do
    kill -0 $FLEET 2>/dev/null || { echo "fleet ended before $2 devices connected:"; tail -3 "$1"; return 1; }
    sleep 0.2
  done
}
field() { python3 -c "import json,sys; r=json.load(open('$1')); print($2)"; }

RESULTS="$W/results.tsv"
printf 'system\trss_kib\tfull_us\tresumed_us\tresumed_share\tjson_us\tcbor_us\tmax_fps\tlow_p50_us\tlow_p99_us\thigh_p50_us\thigh_p99_us\n' > "$RESULTS"
for SYS in $SYSTEMS; do
  echo "== $SYS"
  start_system "$SYS"
  R_RSS=-; R_FULL=-; R_RES=-; R_SHARE=-; R_JSON=-; R_CBOR=-
  if [ "$SYS" != direct ]; then
    # Memory first, on the fresh process.
    RSS0=$(rss)
    # 500 new connections per second (under every system's handshake capacity here), and
    # devices whose attempt timed out come back, so the whole fleet ends up connected.
    fleet_bg idle-$SYS --url "$(url_for $SYS /)" --count "$IDLE" --rate 0 --seconds $(( IDLE / 500 + 90 )) --connect-rate 500 \
      --reconnect --backoff-initial-ms 1000
    wait_connected "$W/idle-$SYS.progress" "$IDLE"
    sleep 3
    RSS1=$(rss)
    kill -INT $FLEET; wait $FLEET || true
    R_RSS=$(python3 -c "print(f'{($RSS1-$RSS0)/$IDLE:.1f}')")
    echo "   idle: $IDLE devices, RSS $(( RSS0 / 1024 )) -> $(( RSS1 / 1024 )) MiB: $R_RSS KiB per device"
    sleep 2
    # Full handshakes.
    C0=$(cpu)
    fleet hs-$SYS --url "$(url_for $SYS /)" --count "$HS" --rate 0 --seconds 5 --hold-ms 200 --connect-rate 1000
    sleep 1; C1=$(cpu)
    OK=$(field "$W/hs-$SYS.json" 'r["sessions"]')
    R_FULL=$(python3 -c "print(f'{($C1-$C0)/$TCK/max($OK,1)*1e6:.0f}')")
    echo "   full handshakes: $OK sessions, $R_FULL us each; connect $(field "$W/hs-$SYS.json" '"p50 %.1f ms, p99 %.1f ms" % (r["handshake"]["p50_us"]/1e3, r["handshake"]["p99_us"]/1e3)')"
    # Resumed: 5 sessions per device with one TLS client.
    C0=$(cpu)
    fleet res-$SYS --url "$(url_for $SYS /)" --count "$RESUME" --rate 0 --seconds 30 --hold-ms 500 --sessions-per-device 5 --connect-rate 1000
    sleep 1; C1=$(cpu)
    read -r S RS <<<"$(field "$W/res-$SYS.json" '"%d %d" % (r["sessions"], r["resumed"])')"
    R_RES=$(python3 -c "full=$R_FULL; s=$S; rs=$RS; cpu=($C1-$C0)/$TCK*1e6; print(f'{(cpu-(s-rs)*full)/max(rs,1):.0f}')")
    R_SHARE="$RS/$S"
    echo "   resumed: $S sessions, $RS resumed: $R_RES us per resumed session"
    # Frames, JSON then CBOR.
    for FMT in json cbor; do
      fleet_bg fr-$FMT-$SYS --url "$(url_for $SYS /)" --count "$FRAMES" --rate "$RATE" --seconds $(( FRAMES / 1000 + WINDOW + 12 )) \
        --connect-rate 1000 --schemas "$PWD/schemas" --format $FMT --frame-bytes 200
      wait_connected "$W/fr-$FMT-$SYS.progress" "$FRAMES"
      sleep 2
      F1=$(frames); C1=$(cpu)
      sleep "$WINDOW"
      F2=$(frames); C2=$(cpu)
      kill -INT $FLEET; wait $FLEET || true
      V=$(python3 -c "print(f'{($C2-$C1)/$TCK/max($F2-$F1,1)*1e6:.2f}')")
      echo "   $FMT frames: $(( F2 - F1 )) in ${WINDOW}s, $V us each"
      if [ $FMT = json ]; then R_JSON=$V; else R_CBOR=$V; fi
      sleep 1
    done
  fi
  # Sustained frames per second (not for direct: the ingest path has no direct leg).
  R_FPS=-
  if [ "$SYS" != direct ]; then
    fleet_bg sat-$SYS --url "$(url_for $SYS /)" --count "$SAT" --rate "$SAT_RATE" --seconds $(( WINDOW + 12 )) \
      --connect-rate 1000 --schemas "$PWD/schemas" --format json --frame-bytes 200
    wait_connected "$W/sat-$SYS.progress" "$SAT"
    sleep 2
    F1=$(frames); T1=$(date +%s.%N)
    sleep "$WINDOW"
    F2=$(frames); T2=$(date +%s.%N)
    kill -INT $FLEET; wait $FLEET || true
    R_FPS=$(python3 -c "print(f'{($F2-$F1)/($T2-$T1):.0f}')")
    echo "   offered $(( SAT * SAT_RATE )) frames/s: $R_FPS received per second"
    sleep 1
  fi
  # Echo round trip at two fixed offered loads (20 frames/s per device).
  ECHO=""
  for LOAD in $LAT_LOW $LAT_HIGH; do
    fleet lat-$LOAD-$SYS --url "$(url_for $SYS /echo)" --subprotocol echo.v1 --count $(( LOAD / 20 )) --rate 20 \
      --seconds $(( LOAD / 20000 + WINDOW + 3 )) --connect-rate 1000 --schemas "$PWD/schemas" --format json --frame-bytes 200
    read -r P50 P99 N_ECHO <<<"$(field "$W/lat-$LOAD-$SYS.json" '"%d %d %d" % (r["echo"]["p50_us"], r["echo"]["p99_us"], r["echo"]["count"])')"
    echo "   echo at $LOAD frames/s offered: $N_ECHO round trips, p50 $P50 us, p99 $P99 us"
    ECHO="$ECHO\t$P50\t$P99"
  done
  stop_system
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s$ECHO\n" "$SYS" "$R_RSS" "$R_FULL" "$R_RES" "$R_SHARE" "$R_JSON" "$R_CBOR" "$R_FPS" >> "$RESULTS"
  sleep 2
done
echo
python3 - "$RESULTS" <<'PY'
import csv, sys
rows = {r["system"]: r for r in csv.DictReader(open(sys.argv[1]), delimiter="\t")}
ref = rows.get("nginx"); direct = rows.get("direct")
def num(v):
    try: return float(v)
    except (TypeError, ValueError): return None
def ratio(r, k):
    a, b = num(r.get(k)), num(ref.get(k)) if ref else None
    return f" ({a/b:.2f}x)" if a is not None and b else ""
cols = [("rss_kib", "RSS/device KiB"), ("full_us", "full hs us"), ("resumed_us", "resumed hs us"),
        ("json_us", "JSON frame us"), ("cbor_us", "CBOR frame us"), ("max_fps", "max fps")]
def added(r, load):
    if not direct or r is direct or num(r[f"{load}_p50_us"]) is None:
        return "-"
    return (f"{num(r[f'{load}_p50_us']) - num(direct[f'{load}_p50_us']):.0f} / "
            f"{num(r[f'{load}_p99_us']) - num(direct[f'{load}_p99_us']):.0f}")
print("| system | " + " | ".join(c[1] for c in cols) + " | echo p50 / p99 us, low load | added | echo p50 / p99 us, high load | added |")
print("|---" * (len(cols) + 5) + "|")
for name, r in rows.items():
    cells = [f"{r[k]}{ratio(r, k) if name != 'nginx' else ''}" for k, _ in cols]
    cells += [f"{r['low_p50_us']} / {r['low_p99_us']}", added(r, "low"),
              f"{r['high_p50_us']} / {r['high_p99_us']}", added(r, "high")]
    print(f"| {name} | " + " | ".join(cells) + " |")
print("\nratios in parentheses are against nginx in this run; resumed share:",
      ", ".join(f"{n} {r['resumed_share']}" for n, r in rows.items() if r["resumed_share"] != "-"))
PY
echo "raw results: $RESULTS"
