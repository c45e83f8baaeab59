"""Preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM asks for a clean stop.

The handler only sets a flag; the loop checks it at step boundaries, agrees on it across ranks,
saves a complete checkpoint and exits with status "preempted".
"""

from __future__ import annotations

import signal

_requested: list[int] = []


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - signal API
    _requested.append(signum)


def install() -> None:
    """Route SIGUSR1 and SIGTERM to the stop flag (call once per rank, in the main thread)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def agree_to_stop(device) -> bool:
    """True on every rank if any rank was asked to stop (one tiny all-reduce)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _requested else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
