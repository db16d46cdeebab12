#!/usr/bin/env bash
# One relay on loopback holding many authenticated clients (default 1000):
# memory per client and forwarding throughput. Bounded in time.
#   tests/bench/relay-load.sh [CLIENTS] [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
clients=${1:-1000}
seconds=${2:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
cargo build --release --manifest-path "$root/Cargo.toml" -p derp-relay --bins
bin=$CARGO_TARGET_DIR/release
work=$(mktemp -d)
relay=""
trap '[ -n "$relay" ] && { kill "$relay" 2>/dev/null; wait "$relay" 2>/dev/null; }; rm -rf "$work"' EXIT
# Each client is one TCP connection on both ends: raise the soft limit.
ulimit -n "$(ulimit -Hn)"
"$bin/derp-relay" --open --listen 127.0.0.1:43340 --stun-listen 127.0.0.1:43478 --key-file "$work/key" >"$work/relay.log" 2>&1 &
relay=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/43340) 2>/dev/null && break; sleep 0.1; done
timeout $((seconds + 120)) "$bin/derp-load" --url http://127.0.0.1:43340/derp --clients "$clients" --seconds "$seconds" --relay-pid "$relay"
