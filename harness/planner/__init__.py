"""The planner: predict per-rank memory and step time of DeepSpeed layouts, and pick the fastest that fits.

Pure Python (no torch, no deepspeed at import): ``harness plan`` runs on a login node. The training
loop's MFU uses :func:`harness.planner.speed.flops_per_token` and :func:`harness.planner.devices.peak_flops`,
so there is one FLOPs formula in the codebase.
"""
