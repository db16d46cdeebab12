#!/usr/bin/env bash
# The coordinator with 1,000 to 10,000 simulated devices (real registration,
# map streams and heartbeats; no TUN), on the embedded SQLite: registration
# rate, time to the first full netmap, fan-out of one change to every
# stream, bytes per full map and per delta, coordinator peak RSS and CPU.
# One Markdown row per size.
#   bash tests/bench/coord-load.sh                # 1000 2000 5000 10000
#   SIZES="1000 2000" DEADLINE=600 bash tests/bench/coord-load.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
if [[ -z ${BIN_DIR:-} ]]; then
    bash "$root/tests/scripts/setup.sh"
    cargo build --release --manifest-path "$root/Cargo.toml" --workspace --bins
    BIN_DIR=$CARGO_TARGET_DIR/release
fi
sizes=${SIZES:-"1000 2000 5000 10000"}
deadline=${DEADLINE:-900}
# One socket per device in each process: as many descriptors as allowed.
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
pid=
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
echo "| devices | registrations/s | open → full netmap p50 / p99 ms | full netmap bytes | one change → all streams p50 / p99 | delta bytes | coordinator peak RSS MiB | coordinator CPU s |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in $sizes; do
    state=$dir/state-$n
    c=$BIN_DIR/coordinator
    "$c" init --state-dir "$state" >/dev/null 2>&1
    "$c" network create load --state-dir "$state" >/dev/null
    key=$("$c" preauth-key create --network load --reusable --state-dir "$state")
    port=$((18000 + RANDOM % 1000))
    "$c" serve --state-dir "$state" --listen "127.0.0.1:$port" --insecure-http >"$dir/coordinator-$n.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    "$BIN_DIR/crank-coord-load" --coordinator "http://127.0.0.1:$port" --auth-key "$key" \
        --devices "$n" --pid "$pid" --deadline "$deadline" \
        || echo "| $n | (failed or over the ${deadline} s deadline; see the log) |"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
done
