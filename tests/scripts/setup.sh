#!/usr/bin/env bash
# Installs what Crank Mesh needs on a Debian machine and builds the workspace.
# Idempotent: packages already present are skipped, cargo builds incrementally.
set -euo pipefail

DEBIAN_PACKAGES=(
  iproute2 iputils-ping nftables iperf3 curl bind9-dnsutils
  python3 python3-venv python3-pip
  wireguard-tools wireguard-go
  build-essential pkg-config cmake clang libclang-dev
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
