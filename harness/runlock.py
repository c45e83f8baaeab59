"""One run per directory: a lock file held for a launch's lifetime.

Two ``harness train`` on one run directory used to both run, interleave ``metrics.jsonl`` and write the
same checkpoints. The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
on NFS v3+, so it holds across the nodes of a shared filesystem, where ``flock`` may not) holding the
holder's host, pid and start time. A heartbeat thread refreshes its mtime; a lock is stale, and taken
over, when its holder is a dead process on this host, or when its heartbeat is older than
:data:`STALE_AFTER_S` (a holder on another host that died without releasing it).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import SpecError

HEARTBEAT_S = 15.0
"""How often the holder refreshes the lock's mtime."""
STALE_AFTER_S = 120.0
"""A lock whose heartbeat is older than this is abandoned (its holder died on another host)."""


class RunLock:
    """The lock of one run directory; use as a context manager around the launch."""

    def __init__(
        self,
        path: Path,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        extra: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.extra = dict(extra or {})
        """More facts for the lock file (e.g. the Slurm job id, so a requeued job can take its own lock over)."""
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: str | None = None

    def acquire(self) -> None:
        """Take the lock, or raise SpecError naming the live holder (host, pid, start time)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us may be re-taken by a racer: try again, briefly
            holder = self._try_create()
            if holder is None:
                self._start_heartbeat()
                return
            if not self._is_stale(holder):
                raise held_error(self.path, holder)
            self.path.unlink(missing_ok=True)
        raise held_error(self.path, read_holder(self.path) or {})

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _try_create(self) -> dict[str, Any] | None:
        """Create the lock file; None on success, else what the existing one says."""
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": self._token,
            **self.extra,
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return read_holder(self.path) or {}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return None

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not pid_alive(holder["pid"])
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="harness-run-lock", daemon=True)
        self._thread.start()


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's record, or None when there is none (an unreadable one reads as {})."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def held_error(path: Path, holder: dict[str, Any]) -> SpecError:
    """The refusal a second launch gets: who holds the run directory, and what to do."""
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
    return SpecError(
        "run.name",
        Path(path).parent.parent.name,
        f"wait for that run to end, choose another run.name or run.output_dir, or delete {path} if that "
        "process is gone",
        reason=f"another launch holds this run directory ({who})",
    )
