#!/usr/bin/env bash
# Throughput and RTT of meshd against wireguard-go and boringtun-cli, in one
# interleaved run of the shared baseline script (as root).
#   tests/bench/run.sh            # NB_* settings pass through (see --help of the baseline)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
baseline=${NB_BASELINE:-$root/../shared/bench/wg_baseline.sh}
[[ -x $baseline || -f $baseline ]] || { echo "baseline script not found at $baseline (set NB_BASELINE)" >&2; exit 1; }

bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cargo build --release --manifest-path "$root/Cargo.toml" -p meshd
export MESHD_BIN=$CARGO_TARGET_DIR/release/meshd
export NB_CUSTOM_UP_CMD="$here/meshd-hook.sh"
export NB_CUSTOM_NAME=meshd
build=()
command -v boringtun-cli >/dev/null || [[ -x ${NB_WORKDIR:-/tmp/netbench}/boringtun-root/bin/boringtun-cli ]] || build=(--build-boringtun)
exec bash "$baseline" "${build[@]}"
