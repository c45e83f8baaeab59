#!/usr/bin/env bash
# Install the Debian packages the test cluster needs: Slurm 22.05, munge, pdsh, OpenSSH (a private sshd),
# and libaio-dev (DeepSpeed's async_io op, used by NVMe offload). openmpi-bin (deepspeed --launcher
# openmpi) only with --with-openmpi: it pulls 19 more packages, about 9 s even from a warm apt cache.
#
#   scripts/test-cluster/install.sh [--with-openmpi]
#
# Idempotent: when every package is already installed it only asks dpkg (about 0.1 s). Otherwise it
# installs with --no-install-recommends (20 packages instead of 55 for Slurm; about 16 s from a warm
# cache) and runs `apt-get update` only when the cached package lists cannot satisfy the request.
# Debian's postinst scripts start no daemon here (no init system, policy-rc.d); up.sh starts them.
set -euo pipefail

base_packages=(slurm-wlm munge pdsh openssh-server openssh-client libaio-dev)
optional_packages=(openmpi-bin)

with_openmpi=0
for arg in "$@"; do
  case "$arg" in
    --with-openmpi) with_openmpi=1 ;;
    -h | --help)
      sed -n '2,11p' "$0"
      exit 0
      ;;
    *)
      echo "install.sh: unknown argument '$arg' (known: --with-openmpi)" >&2
      exit 2
      ;;
  esac
done

if [[ "$(id -u)" -ne 0 ]]; then
  echo "install.sh: must run as root (apt-get install); run it with sudo" >&2
  exit 2
fi

wanted=("${base_packages[@]}")
if [[ "$with_openmpi" -eq 1 ]]; then
  wanted+=("${optional_packages[@]}")
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
start_ns="$(date +%s%N)"

missing=()
for pkg in "${wanted[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ "${#missing[@]}" -eq 0 ]]; then
  echo "install: all ${#wanted[@]} packages already installed (${wanted[*]}) in $(seconds_since "$start_ns") s"
  exit 0
fi

echo "install: missing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}
# The cached package lists usually suffice; refresh them only when they do not (a fresh image, or a
# version that left the mirror).
if ! apt_install; then
  echo "install: apt-get install failed with the cached package lists; running apt-get update and retrying"
  apt-get update -q
  apt_install
fi

for pkg in "${missing[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "installed" ]]; then
    echo "install: $pkg is still not installed (dpkg status: '${status:-none}')" >&2
    exit 1
  fi
done
echo "install: installed ${missing[*]} in $(seconds_since "$start_ns") s"
echo "install: $(slurmd -V), $(munged -V 2>&1 | head -n 1), $(pdsh -V 2>&1 | head -n 1)"
