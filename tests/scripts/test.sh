#!/usr/bin/env bash
# Sets up what is missing and runs every test: the fast suite (no root), then
# the network-namespace end-to-end tests (root, one at a time).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cd "$root"
# One build of the whole workspace serves both suites, the e2e binaries and
# the C library (`libcrank_mesh`) the FFI test links against.
cargo build --workspace --lib --bins --tests
# The real small models the compute tests run on (idempotent, sha256-checked).
export CRANK_MODELS_DIR=${CRANK_MODELS_DIR:-$HOME/.cache/crank-mesh/models}
"$CARGO_TARGET_DIR/debug/meshd" models fetch --dir "$CRANK_MODELS_DIR"
# The official OpenAI Python client, for the compute end-to-end test.
export CRANK_OPENAI_PYTHON=${CRANK_OPENAI_PYTHON:-$HOME/.cache/crank-mesh/openai-venv/bin/python}
if ! "$CRANK_OPENAI_PYTHON" -c "import openai" 2>/dev/null; then
  venv_dir=$(dirname "$(dirname "$CRANK_OPENAI_PYTHON")")
  python3 -m venv "$venv_dir"
  "$venv_dir/bin/pip" install -q "openai>=1.40,<3"
fi
cargo test --workspace --exclude crank-e2e
# Selected from the whole workspace so features resolve as in the build above
# (no second build of the dependencies); one test at a time.
cargo test --workspace --test mesh --test interop --test relay --test nat --test compute --test mesh_jobs --test keys --test people --test control_tls --test overlay_reach --test first_contact --test policy_dns --test ffi -- --test-threads=1
