#!/usr/bin/env bash
# The main job (README): install, train the tiny Llama preset on the embedded corpus with 2 ranks
# through the deepspeed launcher, export the HF checkpoint and print a generated sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/harness-torch-extensions}"
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
harness train examples/tiny-cpu.yaml "$@"
harness generate runs/tiny-cpu/hf --prompt "def " --max-new-tokens 48
