"""The planner: predict per-rank memory and step time of DeepSpeed layouts, and pick the fastest that fits.

Pure Python (no torch, no deepspeed at import): ``harness plan`` runs on a login node. The training loop
imports :func:`flops_per_token` and :func:`peak_flops` from here for its MFU numbers.
"""

from __future__ import annotations

from harness.planner.devices import peak_flops
from harness.planner.speed import flops_per_token

__all__ = ["flops_per_token", "peak_flops"]
