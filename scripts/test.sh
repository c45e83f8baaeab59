#!/usr/bin/env bash
# The test command (README): install, warm DeepSpeed's JIT ops, bring up the loopback test cluster
# when this machine can run it (root with scripts/test-cluster/install.sh done), run pytest, and
# bring the cluster down again. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/harness-torch-extensions}"
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
python3 scripts/warm_ds_ops.py
cluster_dir="${HARNESS_TEST_CLUSTER:-/tmp/harness-test-cluster}"
if [ "$(id -u)" = 0 ] && command -v slurmctld >/dev/null && command -v sshd >/dev/null; then
  bash scripts/test-cluster/up.sh "$cluster_dir"
  trap 'bash scripts/test-cluster/down.sh "$cluster_dir"' EXIT
  export HARNESS_TEST_CLUSTER="$cluster_dir"
fi
# Leftover buffers of DeepSpeed's CPU shared-memory all-reduce from earlier runs hold RAM.
rm -f /dev/shm/deepspeed_allreduce_buffer_*
status=0
python3 -m pytest -q "$@" || status=$?
exit "$status"
