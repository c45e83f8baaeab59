#!/usr/bin/env bash
# Install harness and its test extras into the current Python, torch first.
#
# torch comes first so pip never resolves a CUDA build by itself (several GB): set HARNESS_TORCH
# to the requirement you want (default torch==2.13.0, a CPU build on the project's machines; on a
# GPU machine install your CUDA torch before running this and it is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# pip's warning about running as root (containers, CI) is noise here; older pips ignore the variable.
export PIP_ROOT_USER_ACTION=ignore
if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install --quiet "${HARNESS_TORCH:-torch==2.13.0}"
fi
"$python" -m pip install --quiet -e '.[dev]'
# Versions from package metadata: importing deepspeed would print its accelerator warning.
"$python" -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in ('torch', 'deepspeed', 'transformers', 'datasets')))"
