#!/usr/bin/env bash
# Crash-and-verify, many times: runs tests/crash.rs with CYCLES kill -9 cycles per run, RUNS
# runs (each run is a fresh directory; cycles within a run share and grow one audit log).
# Each cycle: the real gateway binary under a stream of commands to 8 devices is killed
# with SIGKILL; then every device log must verify and every command a device received must
# have its record. CI runs 3 cycles; this is the long run.
#
#   device-sim/bench/audit-crash.sh                 # RUNS=10 CYCLES=30 (300 crashes)
#   RUNS=20 CYCLES=50 device-sim/bench/audit-crash.sh
set -euo pipefail
RUNS=${RUNS:-10}
CYCLES=${CYCLES:-30}
cd "$(dirname "$0")/../.."
cargo test --release --test crash --no-run -q
for run in $(seq 1 "$RUNS"); do
  if ! out=$(GATEHOUSE_CRASH_CYCLES=$CYCLES cargo test --release -q --test crash 2>&1); then
    echo "$out" | grep -E "panicked|cycle|delivered but|FAILED" | head -20
    echo "run $run of $RUNS FAILED"
    exit 1
  fi
  echo "run $run of $RUNS: $CYCLES crash cycles verified"
done
echo "all $((RUNS * CYCLES)) crash cycles verified"
