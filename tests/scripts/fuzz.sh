#!/usr/bin/env bash
# Runs every fuzz target for a fixed number of executions (default 10 M)
# with cargo-fuzz on the nightly toolchain, one at a time, and prints one
# line per target: executions, seconds, executions per second, and whether
# it found anything. Each target starts from its seed corpus (replayed by
# `cargo test` on stable); what the fuzzer adds goes to a scratch directory,
# and a crash is left under the target's `fuzz/artifacts/`.
#
#   bash tests/scripts/fuzz.sh                 # every target, 10 M runs each
#   RUNS=1000000 bash tests/scripts/fuzz.sh platform/signed_frame
#   MAX_LEN=65536 bash tests/scripts/fuzz.sh derp-relay/frame_decode  # inputs up to 64 KiB (default 4 KiB)
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain (rustup).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${RUNS:-10000000}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for dir in platform coordinator compute meshd derp-relay; do
    for t in "$root/$dir"/fuzz/fuzz_targets/*.rs; do
      targets+=("$dir/$(basename "$t" .rs)")
    done
  done
fi
logs=${FUZZ_LOGS:-$root/target-fuzz-logs}
mkdir -p "$logs"
printf '%-32s %12s %9s %10s %s\n' target executions seconds exec/s result
for spec in "${targets[@]}"; do
  dir=${spec%%/*}
  target=${spec#*/}
  log="$logs/${dir}_$target.log"
  seeds="$root/$dir/fuzz/corpus/$target"
  scratch="$logs/corpus/${dir}_$target"
  mkdir -p "$seeds" "$scratch"
  start=$(date +%s)
  result=clean
  (cd "$root/$dir" && cargo +nightly fuzz run --release "$target" "$scratch" "$seeds" -- \
     -runs="$runs" -max_len="${MAX_LEN:-4096}" -print_final_stats=1) >"$log" 2>&1 || result="FAILED (see $log)"
  secs=$(( $(date +%s) - start ))
  done_runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo 0)
  per=$(grep -o 'exec/s: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo 0)
  printf '%-32s %12s %9s %10s %s\n' "$spec" "$done_runs" "$secs" "$per" "$result"
done
