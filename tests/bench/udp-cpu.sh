#!/usr/bin/env bash
# UDP packets per second (1400-byte datagrams) and CPU seconds per GB moved
# through `meshd tunnel`, with the kernel's TUN offloads on and off, in one
# run (root). Two namespaces on a veth pair, one meshd tunnel in each; iperf3
# UDP (unlimited rate) and TCP for 5 s each; CPU is both meshd processes'
# user + system time from /proc/PID/stat over the transfer.
#   sudo bash tests/bench/udp-cpu.sh            # MESHD_BIN to use a built binary
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [[ -z ${MESHD_BIN:-} ]]; then
    bash "$root/tests/scripts/setup.sh"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/crank-mesh/target}
    cargo build --release --manifest-path "$root/Cargo.toml" --workspace --bins
    MESHD_BIN=$CARGO_TARGET_DIR/release/meshd
fi
seconds=${SECONDS_PER_TEST:-5}
tag=udpcpu$$
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$tag-a" 2>/dev/null || true
    ip netns del "$tag-b" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

ip netns add "$tag-a"
ip netns add "$tag-b"
ip link add "${tag}a" type veth peer name "${tag}b"
ip link set "${tag}a" netns "$tag-a"
ip link set "${tag}b" netns "$tag-b"
for s in a b; do
    ip -n "$tag-$s" link set lo up
    ip -n "$tag-$s" link set "${tag}$s" up
done
ip -n "$tag-a" addr add 10.77.0.1/24 dev "${tag}a"
ip -n "$tag-b" addr add 10.77.0.2/24 dev "${tag}b"
for s in a b; do
    wg genkey >"$dir/$s.key"
    chmod 600 "$dir/$s.key"
    wg pubkey <"$dir/$s.key" >"$dir/$s.pub"
done

# CPU ticks (user + system) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# Runs one tunnel pair with offloads $1; prints a table row.
measure() {
    local mode=$1 port_a=$((51900 + RANDOM % 50)) a b
    port_b=$((port_a + 100))
    ip netns exec "$tag-a" "$MESHD_BIN" tunnel --tun cm0 --private-key-file "$dir/a.key" \
        --port "$port_a" --address 100.70.0.1/24 --tun-offloads "$mode" \
        --peer "$(cat "$dir/b.pub"),10.77.0.2:$port_b,100.70.0.2" >"$dir/a-$mode.log" 2>&1 &
    a=$!
    ip netns exec "$tag-b" "$MESHD_BIN" tunnel --tun cm0 --private-key-file "$dir/b.key" \
        --port "$port_b" --address 100.70.0.2/24 --tun-offloads "$mode" \
        --peer "$(cat "$dir/a.pub"),10.77.0.1:$port_a,100.70.0.1" >"$dir/b-$mode.log" 2>&1 &
    b=$!
    pids+=("$a" "$b")
    for _ in $(seq 50); do
        ip netns exec "$tag-a" ping -c 1 -W 1 100.70.0.2 >/dev/null 2>&1 && break
        sleep 0.2
    done
    ip netns exec "$tag-b" iperf3 -s -D -1 -p 5301 >/dev/null
    sleep 0.3
    local c0 c1
    c0=$(( $(ticks "$a") + $(ticks "$b") ))
    ip netns exec "$tag-a" iperf3 -c 100.70.0.2 -p 5301 -u -l 1400 -b 0 -t "$seconds" --json >"$dir/udp.json"
    c1=$(( $(ticks "$a") + $(ticks "$b") ))
    local udp
    udp=$(python3 - "$dir/udp.json" "$((c1 - c0))" "$hz" "$seconds" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["end"]["sum"]
ticks, hz, secs = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
# iperf3's UDP summary: packets sent and lost (as the receiver counted).
got = r["packets"] - r["lost_packets"]
gb = got * 1400 / 1e9
print(f"{got / secs:,.0f} | {r['lost_percent']:.1f}% | {ticks / hz / gb:.1f}")
EOF
)
    ip netns exec "$tag-b" iperf3 -s -D -1 -p 5302 >/dev/null
    sleep 0.3
    c0=$(( $(ticks "$a") + $(ticks "$b") ))
    ip netns exec "$tag-a" iperf3 -c 100.70.0.2 -p 5302 -t "$seconds" --json >"$dir/tcp.json"
    c1=$(( $(ticks "$a") + $(ticks "$b") ))
    local tcp
    tcp=$(python3 - "$dir/tcp.json" "$((c1 - c0))" "$hz" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["end"]["sum_received"]
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
gb = r["bytes"] / 1e9
print(f"{r['bits_per_second'] / 1e6:,.0f} | {ticks / hz / gb:.1f}")
EOF
)
    echo "| $mode | $udp | $tcp |"
    kill "$a" "$b"
    wait "$a" "$b" 2>/dev/null || true
    sleep 0.5
}

echo "| offloads | UDP 1400 B received pkt/s | UDP loss | CPU s/GB (UDP) | TCP Mbit/s | CPU s/GB (TCP) |"
echo "|---|---:|---:|---:|---:|---:|"
for round in 1 2; do
    measure off
    measure on
done
