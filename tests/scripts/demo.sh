#!/usr/bin/env bash
# Sets up what is missing and runs the main job: a coordinator and three
# meshd devices in network namespaces on this machine (root).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cargo build --manifest-path "$root/Cargo.toml" --workspace --bins
export CRANK_MODELS_DIR=${CRANK_MODELS_DIR:-$HOME/.cache/crank-mesh/models}
"$CARGO_TARGET_DIR/debug/meshd" models fetch --dir "$CRANK_MODELS_DIR"
exec "$CARGO_TARGET_DIR/debug/crank-demo"
