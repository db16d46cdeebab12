#!/usr/bin/env bash
# Compute through the overlay vs in-process on the same models, one run
# (root; release build; fetches the models if missing).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cargo build --release --manifest-path "$root/Cargo.toml" --workspace --bins
export CRANK_MODELS_DIR=${CRANK_MODELS_DIR:-$HOME/.cache/crank-mesh/models}
"$CARGO_TARGET_DIR/release/meshd" models fetch --dir "$CRANK_MODELS_DIR"
exec "$CARGO_TARGET_DIR/release/crank-compute-bench"
