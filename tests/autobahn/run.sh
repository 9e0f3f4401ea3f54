#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient, sections 1-10, through an opaque route of the gateway and,
# for comparison, against the same echo server directly.
#
#   tests/autobahn/run.sh                 # run, compare with the rules below and with expected.json
#   KEEP=1 tests/autobahn/run.sh          # keep the work directory (HTML report in WORK/reports)
#   UPDATE=1 tests/autobahn/run.sh        # also rewrite expected.json from this run
#
# Path: wstest (ws://) -> gatehouse-sim tunnel (adds TLS and a device certificate) -> gateway
# (route `raw.v1`, validate = false) -> gatehouse-sim echo. The suite offers `raw.v1` as its
# subprotocol. The direct agent is the echo server itself, so a case where the gateway's result
# differs from the direct one is the gateway's doing.
#
# Pass rule, per case: the gateway's result is OK, or it is the NON-STRICT/INFORMATIONAL
# result the direct server also gets, or the case sends a message larger than the configured
# websocket.max_message_bytes (1 MiB here) and the gateway closed it with 1009. Then every case
# must have the behaviour recorded in expected.json.
#
# The suite needs Python 2.7. Found in this order: $PYTHON2, `python2.7` on PATH, pyenv's 2.7;
# otherwise (or with AUTOBAHN_USE_CHROOT=1) a Debian bullseye chroot (debootstrap, as root) in
# $AUTOBAHN_CHROOT (default ~/.cache/gatehouse-autobahn/chroot) is made once.
# Its Python dependencies come from PyPI. Not part of CI (it takes a few minutes).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${AUTOBAHN_CACHE:-$HOME/.cache/gatehouse-autobahn}
CHROOT=${AUTOBAHN_CHROOT:-$CACHE/chroot}
MAX_MESSAGE=1048576
mkdir -p "$CACHE"

# --- Python 2.7 with autobahntestsuite -------------------------------------------------------
find_python2() {
  if [ -n "${PYTHON2:-}" ]; then echo "$PYTHON2"; return; fi
  if command -v python2.7 >/dev/null 2>&1 && python2.7 -c 'import sys' 2>/dev/null; then
    command -v python2.7; return
  fi
  local p
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
}
WSTEST=()
PY2=
[ -n "${AUTOBAHN_USE_CHROOT:-}" ] || PY2=$(find_python2 || true)
if [ -n "$PY2" ]; then
  VENV=$CACHE/venv
  if [ ! -x "$VENV/bin/wstest" ]; then
    echo "autobahn: installing autobahntestsuite for $PY2 into $VENV"
    "$PY2" -m pip install -q --target "$CACHE/virtualenv-tool" 'virtualenv<20.22'
    PYTHONPATH=$CACHE/virtualenv-tool "$PY2" -m virtualenv -q "$VENV"
    "$VENV/bin/pip" install -q 'autobahntestsuite==25.10.1'
  fi
  WSTEST=("$VENV/bin/wstest")
  SHARE=$(mktemp -d /tmp/gatehouse-autobahn-XXXX)
  INSIDE=$SHARE
else
  # Inside, only what is set here: the host's variables name host paths.
  IN_CHROOT=(chroot "$CHROOT" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1)
  if [ ! -x "$CHROOT/usr/local/bin/wstest" ]; then
    [ "$(id -u)" = 0 ] || { echo "autobahn: no Python 2.7 found and not root: set PYTHON2"; exit 2; }
    if [ ! -x "$CHROOT/usr/bin/python2.7" ]; then
      command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
      echo "autobahn: building a Debian bullseye chroot with Python 2.7 in $CHROOT"
      debootstrap --variant=minbase \
        --include=python2.7,python2.7-dev,python-pip-whl,gcc,libc6-dev,libffi-dev,ca-certificates \
        bullseye "$CHROOT" http://deb.debian.org/debian
    fi
    cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
    # The host's CA bundle, so pip inside reaches PyPI through the same proxies as outside.
    cp /etc/ssl/certs/ca-certificates.crt "$CHROOT/etc/ssl/certs/ca-certificates.crt"
    PIP_WHL=$(cd "$CHROOT" && ls usr/share/python-wheels/pip-*.whl | head -1)
    "${IN_CHROOT[@]}" python2.7 "/$PIP_WHL/pip" install -q 'pip<21' 'setuptools<45' wheel
    "${IN_CHROOT[@]}" python2.7 -m pip install -q 'autobahntestsuite==25.10.1'
  fi
  SHARE=$(mktemp -d "$CHROOT/tmp/gatehouse-autobahn-XXXX")
  INSIDE=${SHARE#"$CHROOT"}
  WSTEST=("${IN_CHROOT[@]}" /usr/local/bin/wstest)
fi

# --- gateway, echo server and tunnel ---------------------------------------------------------
cd "$ROOT"
cargo build --release --workspace -q
B=$ROOT/target/release
W=$SHARE
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "autobahn: work directory kept: $W" || rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { until python3 -c "import socket; socket.create_connection(('127.0.0.1',$1)).close()" 2>/dev/null; do sleep 0.1; done; }
GW=$(free_port); ECHO=$(free_port); TUNNEL=$(free_port)

$B/gatehouse-pki init --dir "$W/pki" >/dev/null
$B/gatehouse-pki server --dir "$W/pki" --dns localhost --ip 127.0.0.1 >/dev/null
$B/gatehouse-pki device --dir "$W/pki" --id autobahn-1 --type camera >/dev/null
cat > "$W/gatehouse.toml" <<TOML
[server]
listen = "127.0.0.1:$GW"

[tls]
cert = "$W/pki/server.pem"
key = "$W/pki/server.key"
client_ca = "$W/pki/ca.pem"
crl = ["$W/pki/crl.pem"]

[registry]
path = "$W/registry"

[schemas]
dir = "$ROOT/schemas"

[websocket]
max_message_bytes = $MAX_MESSAGE
max_frame_bytes = $MAX_MESSAGE

# The suite sends up to 1,000 frames in a burst and 1 MiB messages: rates off for this type.
[limits.camera]
frames_per_second = 0
bytes_per_second = 0

[[route]]
subprotocol = "raw.v1"
kind = "telemetry"
validate = false
device_types = ["camera"]
backends = ["ws://127.0.0.1:$ECHO/"]
TOML
$B/gatehouse devices --config "$W/gatehouse.toml" enroll --id autobahn-1 --type camera \
  --cert "$W/pki/devices/autobahn-1.pem" >/dev/null

$B/gatehouse-sim echo --listen 127.0.0.1:$ECHO > "$W/echo.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn $B/gatehouse serve --config "$W/gatehouse.toml" > "$W/gateway.log" 2>&1 & PIDS+=($!)
wait_port "$GW"; wait_port "$ECHO"
$B/gatehouse-sim tunnel --listen 127.0.0.1:$TUNNEL --url "wss://localhost:$GW/" \
  --cert "$W/pki/devices/autobahn-1.pem" --key "$W/pki/devices/autobahn-1.key" \
  --ca "$W/pki/ca.pem" > "$W/tunnel.log" 2>&1 & PIDS+=($!)
wait_port "$TUNNEL"

cat > "$W/fuzzingclient.json" <<JSON
{
  "outdir": "$INSIDE/reports",
  "servers": [
    {"agent": "gatehouse", "url": "ws://127.0.0.1:$TUNNEL/", "protocols": ["raw.v1"]},
    {"agent": "direct", "url": "ws://127.0.0.1:$ECHO/"}
  ],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
echo "autobahn: running sections 1-10 through the gateway (127.0.0.1:$GW) and directly"
(cd "$W" && "${WSTEST[@]}" -m fuzzingclient -s "$INSIDE/fuzzingclient.json") > "$W/wstest.log" 2>&1 || {
  tail -30 "$W/wstest.log"; echo "autobahn: wstest failed"; exit 1; }

python3 "$HERE/check.py" "$W/reports/index.json" "$HERE/expected.json" "$MAX_MESSAGE" \
  ${UPDATE:+--update}
