"""Stop requests: a signal to the rank, or the stop file ``harness train`` writes, asks for a clean stop.

Signals: SIGUSR1 (Slurm's warning before the time limit, forwarded by the batch script), SIGTERM
(preemption, a launcher ending its ranks) and SIGINT. The stop file: ``harness train`` does not signal
its launcher (the deepspeed runner dies of SIGTERM/SIGINT at once, and its launch process answers them
by killing the ranks 30 s later, checkpoint or not); it writes ``<run>/launch/stop``, which reaches
ranks on every host of a shared run directory and through every launcher alike.

The handler only sets a flag; the loop checks it at step boundaries (:func:`agree_to_stop`), agrees on
it across ranks, saves a complete checkpoint and exits with status "preempted". No handler raises, so
an interrupt never ends a rank with a traceback.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
"""The signals a rank treats as a stop request."""
STOP_FILE_CHECK_S = 1.0
"""At most one look at the stop file per second (a stat on a shared filesystem is not free)."""

_requested: list[int] = []
_stop_file: Path | None = None
_last_check = 0.0


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - signal API
    _requested.append(signum)


def install(stop_file: Path | None = None) -> None:
    """Route :data:`STOP_SIGNALS` (and, when given, the appearance of ``stop_file``) to the stop flag.

    Call once per rank, in the main thread, as early as possible: before it, SIGINT raises
    KeyboardInterrupt.
    """
    global _stop_file
    _stop_file = stop_file
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def stop_requested() -> bool:
    """Whether this rank was asked to stop (a signal, or the stop file, looked at once a second)."""
    global _last_check
    if _requested:
        return True
    if _stop_file is not None and time.monotonic() - _last_check >= STOP_FILE_CHECK_S:
        _last_check = time.monotonic()
        if os.path.exists(_stop_file):
            _requested.append(0)
    return bool(_requested)


def agree_to_stop(device) -> bool:
    """True on every rank if any rank was asked to stop (one tiny all-reduce)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop_requested() else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
