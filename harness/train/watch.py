"""A rank's watcher: the process the launcher started forks the rank and records how it ended.

A rank killed by SIGKILL (the OOM killer, a user, a node agent) or crashing in native code cannot say
so itself, and the deepspeed launcher reports only one return code for all of its ranks, without
naming the rank. So the process the launcher starts forks before importing anything heavy: the child
is the rank, the parent waits for it, adds its exit code or signal to the rank's record
(:mod:`harness.launch.failures`), and ends the same way (the same code, or the same signal), so the
launcher sees what it saw before. Signals the launcher sends to the watcher are passed to the rank,
and the rank dies with its watcher (``PR_SET_PDEATHSIG``), so neither outlives the other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.launch.failures import new_record, read_record, signal_name, update_record

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals the watcher passes on to its rank."""


def fork_rank(record: Path, rank: int, after_exit: Callable[[], None] | None = None) -> int | None:
    """Fork the rank. Returns None in the rank (go on and train); in the watcher, waits for the rank,
    records its end in ``record`` and returns the exit code to exit with (a signal is re-raised)."""
    watcher, started_at = os.getpid(), time.time()
    pid = os.fork()
    if pid == 0:
        _die_with(watcher)
        return None
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: _send(pid, signum))
    _, status = os.waitpid(pid, 0)  # interrupted by a forwarded signal: retried (PEP 475)
    code = os.waitstatus_to_exitcode(status)
    fields = {"ended_at": time.time(), "exit_code": code if code >= 0 else None}
    if code < 0:
        fields["signal"] = signal_name(-code)
    try:
        seen = read_record(record)
        if seen is None:  # the rank died before writing its own record
            new_record(record, rank=rank, host=socket.gethostname(), pid=pid, started_at=started_at, **fields)
        elif seen.get("pid") == pid:  # else it is another launch's (this rank never started its own)
            update_record(record, **fields)
    except OSError:
        pass  # the run directory went away: the exit status still tells the launcher
    if after_exit is not None:
        after_exit()
    if code < 0:  # end the same way, so the launcher's view is what it was without a watcher
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _die_with(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when ``parent`` dies (Linux); elsewhere do nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the watcher died before prctl took effect
        os._exit(1)
