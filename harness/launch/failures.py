"""Which rank failed first, and how: the rank records and the one summary ``harness train`` prints.

Every rank leaves ``<run>/launch/rank-N.json`` (:meth:`RunDir.rank_record`): its host and pid at
start, then how it ended. The rank itself writes ``state`` (complete, preempted, failed, user_error)
and, for an exception, its last line and whether it was a collective's error (a peer went away); the
rank's watcher process (:mod:`harness.train.watch`) adds the exit code or the signal that ended it,
which the rank cannot record when it is SIGKILLed or crashes in native code.

When one rank dies, its peers then fail in their next collective ("Connection closed by peer"): those
are consequences. :func:`first_failure` names the cause: a rank that raised something else, was
killed, or crashed, before one that failed in a collective; the earliest first. Pure: no torch.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.rundir import RunDir, write_atomic

# Words of the errors torch.distributed raises when a peer is gone (gloo, NCCL, the TCP store).
_COLLECTIVE_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "socket timeout",
)
_COLLECTIVE_TYPES = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")


def new_record(path: Path, **fields: Any) -> None:
    """Start a rank's record for this launch (replacing an earlier launch's)."""
    write_atomic(path, json.dumps(fields) + "\n")


def update_record(path: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into a rank record (written atomically); returns the new record."""
    record = read_record(path) or {}
    record.update(fields)
    write_atomic(path, json.dumps(record) + "\n")
    return record


def read_record(path: Path) -> dict[str, Any] | None:
    """One rank record, or None when missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_records(run_dir: RunDir) -> dict[int, dict[str, Any]]:
    """Every rank record of the run directory, by rank."""
    found = {}
    for rank, path in run_dir.rank_records().items():
        record = read_record(path)
        if record is not None:
            found[rank] = record
    return found


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a consequence of a lost peer rather than a cause."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(_COLLECTIVE_TYPES):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _COLLECTIVE_WORDS)


def last_line(exc: BaseException) -> str:
    """The last line of ``exc``'s traceback: ``Type: first line of the message``."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9 (``signal 99`` for an unknown one)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class Failure:
    """The first failing rank and what is known about its end."""

    rank: int
    host: str
    log: Path
    exit_code: int | None
    """The process's exit code (None: killed by a signal, or not known)."""
    signal: str | None
    """``SIGKILL`` etc. when a signal ended it."""
    error: str | None
    """The exception's last line, when it raised."""
    user_error: bool
    """A SpecError (a fix in the spec, not a crash): the CLI prints it as ``harness: error:`` and exits 2."""
    num_others: int
    """How many other ranks failed after it (in collectives, or killed when the launcher ended them)."""
    explained: bool = False
    """Its error line is the whole story (a failed checkpoint save): no log tail is shown."""

    def headline(self) -> str:
        """One line: which rank, where, and how it ended."""
        where = f"rank {self.rank} on host {self.host}"
        if self.error:  # it raised first; a signal after that is the launcher ending it
            code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
            how = f"failed{code}: {self.error}"
        elif self.signal:
            how = f"was killed by {self.signal}"
        elif self.exit_code is not None:
            how = f"exited with code {self.exit_code} without a report (it crashed outside Python)"
        else:
            how = "ended without a report (killed or crashed; its watcher was killed too)"
        return f"{where} {how}"

    def facts(self) -> dict[str, Any]:
        """What status.json records of the failure."""
        return {"rank": self.rank, "host": self.host, "exit_code": self.exit_code, "signal": self.signal,
                "error": self.error, "log": str(self.log)}  # fmt: skip


def first_failure(run_dir: RunDir, world_size: int, since: float = 0.0) -> Failure | None:
    """The rank that failed first in the launch that started at ``since`` (epoch seconds), or None when
    no record says a rank failed. Ranks that never wrote a record are not guessed at."""
    failed = []
    for rank, record in read_records(run_dir).items():
        if rank >= world_size or record.get("started_at", 0.0) < since - 60:
            continue  # a record of an earlier launch (a wider world, or before this launch began)
        bad_state = record.get("state") in ("failed", "user_error") or (
            "state" not in record and "exit_code" in record
        )
        if bad_state or record.get("signal") or record.get("exit_code") not in (None, 0):
            failed.append((rank, record))
    if not failed:
        return None

    def order(item: tuple[int, dict[str, Any]]) -> tuple[int, float, int]:
        rank, record = item
        ended = record.get("failed_at") or record.get("ended_at") or time.time()
        return (1 if record.get("collective") else 0, ended, rank)

    failed.sort(key=order)
    rank, record = failed[0]
    return Failure(
        rank=rank,
        host=str(record.get("host", "?")),
        log=run_dir.rank_log(rank),
        exit_code=record.get("exit_code"),
        signal=record.get("signal"),
        error=record.get("error"),
        user_error=record.get("state") == "user_error",
        num_others=len(failed) - 1,
        explained=bool(record.get("explained")),
    )
