"""What a run shows in the terminal, and how everything else stays out of it but is kept.

Every rank points its file descriptors 1 and 2 at its own log, ``<run>/launch/rank-N.log``
(:func:`capture_rank_output`), so DeepSpeed's messages, library warnings and tracebacks land there,
appended launch after launch. The harness's own lines (progress, metrics, a failed rank's last log
lines) go to the stream the rank was started with, each behind :data:`MARKER`: whatever carries the
ranks' output (the deepspeed runner, pdsh, mpirun, srun) carries them too, and ``harness train``
keeps only those from the launcher's output (:func:`harness_text`), unless ``--verbose``. The
launcher's own output goes to ``<run>/launch/launcher.log``. No torch here: the CLI imports it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

MARKER = "[harness] "
"""Starts every console line a rank writes; ``harness train`` shows the text after it."""
FAILURE_TAIL_LINES = 20
"""How many of its last log lines a failed rank shows."""
_FAILURE_RE = re.compile(r"rank \d+ failed: ")


def harness_text(line: str) -> str | None:
    """The harness's text in one line of launcher output, or None for anything else.

    The marker may follow a prefix a launcher adds (pdsh writes ``host: `` before every line).
    """
    at = line.find(MARKER)
    return None if at < 0 else line[at + len(MARKER) :].rstrip("\r\n")


def is_failure_report(text: str) -> bool:
    """True for the first line of a failed rank's report (:meth:`RankConsole.report_failure`)."""
    return _FAILURE_RE.match(text) is not None


def tail_lines(path: Path, num_lines: int, start: int = 0, max_bytes: int = 256 * 1024) -> list[str]:
    """The last ``num_lines`` lines of ``path`` from byte ``start`` on ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-num_lines:]


class RankConsole:
    """In a rank whose output goes to its log: writes the harness's lines to the log and the console."""

    def __init__(self, stream: TextIO | None, log_path: Path | None = None, log_start: int = 0) -> None:
        self.stream = stream
        """The stream the rank was started with (None: only the log, e.g. stdout when not captured)."""
        self.log_path = log_path
        self.log_start = log_start
        """Where this launch's part of the (appended) log begins."""

    def line(self, text: str) -> None:
        """One harness line: into this rank's log (stdout) and, marked, to the console."""
        print(text, flush=True)
        self._to_console([text])

    def report_failure(self, rank: int, exc: BaseException) -> None:
        """Say on the console that this rank failed, with its last log lines and the log's path."""
        head = f"rank {rank} failed: {type(exc).__name__}: {exc}".splitlines()[0]  # see is_failure_report
        if self.log_path is None:
            self._to_console([head])
            return
        lines = tail_lines(self.log_path, FAILURE_TAIL_LINES, self.log_start)
        self._to_console([head, f"last {len(lines)} lines of {self.log_path}:", *(f"  {x}" for x in lines)])

    def _to_console(self, lines: list[str]) -> None:
        if self.stream is None:
            return
        # One write per line: lines of different ranks sharing a pipe stay whole (PIPE_BUF).
        for text in lines:
            self.stream.write(f"{MARKER}{text}\n")
        self.stream.flush()


def capture_rank_output(log_path: Path, rank: int) -> RankConsole:
    """Send this process's fds 1 and 2 (and so every library's output) into ``log_path``, appended.

    Returns the console, which writes to the original stdout. File descriptors, not only
    ``sys.stdout``: C++ extensions, subprocesses and faulthandler write to fd 2 directly.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    log_start = os.fstat(log_fd).st_size
    console_fd = os.dup(1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"===== harness rank {rank}, pid {os.getpid()}, {stamp} =====", flush=True)
    console = os.fdopen(console_fd, "w", buffering=1, encoding="utf-8", errors="replace")
    return RankConsole(console, log_path, log_start)


def print_exception(exc: BaseException) -> None:
    """The traceback of ``exc`` to stderr (the rank's log), flushed before anything reads the log."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()


class LauncherRelay:
    """``harness train``'s reader of the launcher's merged stdout and stderr (a thread).

    Every line goes to ``launcher.log``; to ``out`` go the harness's lines (marker removed) or, with
    ``verbose``, the launcher's own lines (the ranks' lines, harness lines included, then come from
    their logs, see :class:`RankLogFollower`).
    """

    def __init__(self, pipe: BinaryIO, log_path: Path, out: TextIO, verbose: bool) -> None:
        self.pipe, self.log_path, self.out, self.verbose = pipe, log_path, out, verbose
        self.failure_reported = False
        """A rank reported its failure (with its log's last lines) on the console."""
        self._thread = threading.Thread(target=self._relay, name="launcher-output", daemon=True)

    def start(self) -> LauncherRelay:
        """Start reading."""
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        """Wait for the end of the output; ranks that outlive the launcher may hold the pipe open."""
        self._thread.join(timeout_s)

    def _relay(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            for raw in iter(self.pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                text = harness_text(line)
                if text is not None and is_failure_report(text):
                    self.failure_reported = True
                if self.verbose:
                    if text is None:
                        self.out.write(line)
                elif text is not None:
                    self.out.write(text + "\n")
                self.out.flush()


class RankLogFollower:
    """Streams what ranks append to their logs to ``out`` while a run lasts (``harness train --verbose``).

    The run directory is on a filesystem every machine shares, so the logs of remote ranks show too.
    """

    def __init__(self, list_logs: Callable[[], list[Path]], out: TextIO, interval_s: float = 0.2) -> None:
        self.list_logs, self.out, self.interval_s = list_logs, out, interval_s
        # What the logs held before this launch was shown by an earlier one.
        self._offsets = {path: path.stat().st_size for path in list_logs()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="rank-logs", daemon=True)

    def start(self) -> RankLogFollower:
        """Start following."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Show what is left (unfinished last lines too) and stop."""
        self._stop.set()
        self._thread.join()
        self._show(final=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._show(final=False)

    def _show(self, final: bool) -> None:
        for path in self.list_logs():
            start = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            if not final:
                data = data[: data.rfind(b"\n") + 1]  # whole lines only, the rest next time
            if data:
                self._offsets[path] = start + len(data)
                self.out.write(data.decode("utf-8", errors="replace"))
                if not data.endswith(b"\n"):
                    self.out.write("\n")
                self.out.flush()
