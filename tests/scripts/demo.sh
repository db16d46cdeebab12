#!/usr/bin/env bash
# Sets up what is missing and runs the main job: a coordinator and three
# meshd devices in network namespaces on this machine (root).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
# The same selection as the test command (`--tests` too): other selections
# resolve features differently and build llama.cpp a second time.
cargo build --manifest-path "$root/Cargo.toml" --workspace --bins --tests
export CRANK_MODELS_DIR=${CRANK_MODELS_DIR:-$HOME/.cache/crank-mesh/models}
"$CARGO_TARGET_DIR/debug/meshd" models fetch --dir "$CRANK_MODELS_DIR"
exec "$CARGO_TARGET_DIR/debug/crank-demo"
