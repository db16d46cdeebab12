#!/usr/bin/env bash
# A handshake-initiation flood against a device carrying an iperf3 transfer
# (root). Builds the workspace's binaries and meshd's `handshake-flood`
# example, then runs crank-flood-bench. PROFILE=release for release builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/tests/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
profile=${PROFILE:-release}
flag=$([ "$profile" = release ] && echo --release || true)
# The same selection as the test command's build (so nothing is rebuilt
# with other features), plus meshd's `handshake-flood` example.
cargo build $flag --manifest-path "$root/Cargo.toml" --workspace --bins --tests --examples
dir=$([ "$profile" = release ] && echo release || echo debug)
exec "$CARGO_TARGET_DIR/$dir/crank-flood-bench"
