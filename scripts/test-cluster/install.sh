#!/usr/bin/env bash
# Install the Debian packages the test cluster needs (Slurm 22.05, munge, pdsh, a private sshd) plus
# libaio-dev (DeepSpeed's async_io op for NVMe offload) and openmpi-bin (deepspeed --launcher openmpi).
#
#   scripts/test-cluster/install.sh [--no-openmpi]
#
# Idempotent: when every package is already installed it only asks dpkg and returns in well under a
# second. Otherwise it installs with --no-install-recommends (20 packages instead of 55 for Slurm) and
# runs `apt-get update` only when the local package lists cannot satisfy the request.
# Debian's postinst scripts do not start any daemon here (no init system); up.sh starts them.
set -euo pipefail

base_packages=(slurm-wlm munge pdsh openssh-server openssh-client libaio-dev)
# openmpi-bin pulls 19 libraries (libfabric, ucx, pmix, hwloc...), about 3 s to unpack from a warm apt
# cache; --no-openmpi skips it on machines where that matters.
optional_packages=(openmpi-bin)

with_openmpi=1
for arg in "$@"; do
  case "$arg" in
    --no-openmpi) with_openmpi=0 ;;
    -h | --help)
      sed -n '2,10p' "$0"
      exit 0
      ;;
    *)
      echo "install.sh: unknown argument '$arg' (known: --no-openmpi)" >&2
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

start_ns="$(date +%s%N)"
elapsed_s() { printf '%d.%02d' $((($(date +%s%N) - start_ns) / 1000000000)) $((($(date +%s%N) - start_ns) / 10000000 % 100)); }

missing=()
for pkg in "${wanted[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ "${#missing[@]}" -eq 0 ]]; then
  echo "install: all ${#wanted[@]} packages already installed (${wanted[*]}) in $(elapsed_s) s"
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
echo "install: installed ${missing[*]} in $(elapsed_s) s"
echo "install: $(slurmd -V), $(munged -V 2>&1 | head -n 1), $(pdsh -V 2>&1 | head -n 1)"
