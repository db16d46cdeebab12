#!/usr/bin/env bash
# Plugs `meshd tunnel` into ../../../shared/bench/wg_baseline.sh's custom hook.
# Called once per side inside that side's namespace with:
#   ns privkey port overlay-cidr peer-pubkey peer-endpoint peer-overlay-ip
# and NB_IFACE, NB_MTU, NB_PRIVKEY_FILE in the environment.
set -euo pipefail
if [[ $# -ne 7 ]]; then
    echo "usage: $0 ns privkey port overlay-cidr peer-pub peer-endpoint peer-overlay-ip" >&2
    exit 2
fi
port=$3 ovl=$4 ppub=$5 pep=$6 povl=$7
meshd=${MESHD_BIN:?MESHD_BIN must point at the meshd binary}
exec "$meshd" tunnel --tun "${NB_IFACE:?}" --private-key-file "${NB_PRIVKEY_FILE:?}" \
    --port "$port" --address "$ovl" --mtu "${NB_MTU:-1420}" --peer "$ppub,$pep,$povl"
