#!/usr/bin/env bash
# Regenerates crank_mesh.h from src/lib.rs with the cbindgen command-line
# tool (installed under ~/.cache/crank-mesh/tools once; idempotent).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools=${CRANK_TOOLS_DIR:-$HOME/.cache/crank-mesh/tools}
if [[ ! -x $tools/bin/cbindgen ]]; then
    cargo install --locked --root "$tools" cbindgen --version "^0.29"
fi
"$tools/bin/cbindgen" --config "$here/cbindgen.toml" --crate meshd-ffi --output "$here/crank_mesh.h" "$here"
echo "wrote $here/crank_mesh.h"
