#!/usr/bin/env bash
# Throughput and RTT over the direct path and over the relay between the same
# two namespaces, in one run (root; release build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cargo build --release --manifest-path "$root/Cargo.toml" --workspace --bins
exec "$CARGO_TARGET_DIR/release/crank-relay-bench"
