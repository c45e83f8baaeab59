"""One rank's watchdog thread: writes its heartbeat, watches the others', and ends a stalled run.

The decisions are pure and live in :mod:`harness.train.watchdog`; this module does the I/O and the
ending (see that module's docstring for the whole design). Files, under ``RunDir.heartbeat_dir``:
``rank-N.json`` (heartbeat), ``rank-N.stacks`` (Python stacks dumped at a stall), ``stalled.json``
(the report; its appearance tells every rank to dump its stacks and exit).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from harness.errors import EXIT_STALLED
from harness.rundir import RunDir, write_atomic, write_status
from harness.train.watchdog import (
    FINISHED,
    PROGRESS,
    Progress,
    RankView,
    Stall,
    allowance_s,
    collective_timeout_s,
    describe,
    find_stall,
    heartbeat_interval_s,
    heartbeat_record,
    observe,
    silent_after_s,
)

if TYPE_CHECKING:
    from harness.console import RankConsole

MARKER_NAME = "stalled.json"
_ending = threading.Event()


def ending() -> bool:
    """True once this process's watchdog is ending the run (it then exits with EXIT_STALLED itself)."""
    return _ending.is_set()


def wait_if_ending(max_s: float = 120.0) -> None:
    """In the training thread after an error: if the watchdog is ending the run (a peer's exit broke a
    collective), leave the exit, its status and its report to it instead of reporting a failure."""
    deadline = time.monotonic() + max_s
    while _ending.is_set() and time.monotonic() < deadline:
        time.sleep(0.5)


def init_kwargs(stall_timeout: int | str) -> dict[str, Any]:
    """``deepspeed.init_distributed`` arguments: the collective timeout derived from the stall timeout."""
    timeout = collective_timeout_s(stall_timeout)
    return {} if timeout is None else {"timeout": timedelta(seconds=timeout)}


def barrier(stall_timeout: int | str) -> None:
    """A barrier that, on gloo, names the ranks that never arrived (``monitored_barrier``) instead of
    waiting in silence; other backends get a plain barrier."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        timeout = collective_timeout_s(stall_timeout) or 1800.0
        dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    else:
        dist.barrier()


def _read_json(path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _identity(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process on this host (``T``: stopped, ``D``: in I/O), or
    None if there is no such process of the harness (gone, or the pid was reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"harness" not in f.read():
                return None
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Watchdog:
    """Heartbeats of this rank every few seconds; on rank 0 (all ranks) and on the last rank (rank 0
    only) also the watching. ``stall_timeout`` 0: nothing runs."""

    def __init__(
        self,
        run_dir: RunDir,
        rank: int,
        world_size: int,
        stall_timeout: int | str,
        console: RankConsole | None = None,
        progress: Progress = PROGRESS,
        before_exit: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.stall_timeout, self.console, self.progress = stall_timeout, console, progress
        self.before_exit = before_exit
        self.dir = run_dir.heartbeat_dir
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.interval_s = heartbeat_interval_s(stall_timeout)
        self.silent_after_s = silent_after_s(self.interval_s)
        self.views: dict[int, RankView] = {}
        self._beat = 0
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-watchdog", daemon=True)
        self._stacks = None
        self._marker_at_start: tuple[int, int] | None = None
        self._started = time.monotonic()

    @property
    def enabled(self) -> bool:
        """Detection is on (``train.stall_timeout`` is not 0)."""
        return self.stall_timeout != 0

    def path(self, rank: int) -> Any:
        """Rank ``rank``'s heartbeat file."""
        return self.dir / f"rank-{rank}.json"

    def start(self) -> Watchdog:
        """Arm faulthandler on SIGUSR2 (stacks on request), write the first heartbeat, start the thread."""
        if not self.enabled:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = self.dir / MARKER_NAME
        if self.rank == 0:
            marker.unlink(missing_ok=True)  # an earlier launch's report; this launch's comes later
        self._marker_at_start = _identity(marker)
        self._stacks = open(self.dir / f"rank-{self.rank}.stacks", "a", encoding="utf-8")  # noqa: SIM115 - kept for the process's life
        # A peer on this host sends SIGUSR2 when it finds a stall; faulthandler answers from C, so even a
        # rank whose Python threads are stuck dumps its stacks (a stopped process cannot: the dump says so).
        faulthandler.register(signal.SIGUSR2, file=self._stacks, all_threads=True, chain=False)
        self._write_heartbeat()
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self, phase: str = "done") -> None:
        """This rank leaves training (``done`` or ``failed``): a last heartbeat, then the thread ends."""
        if not self.enabled or not self._thread.is_alive():
            return
        self.progress.mark(phase)
        self._stop.set()
        self._thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            self._write_heartbeat()
        faulthandler.unregister(signal.SIGUSR2)

    def join_launch(self) -> None:
        """After the rendezvous (every rank, once): agree on a token naming this launch (rank 0's, sent
        over a gloo group, which works whatever the training backend) and write a heartbeat carrying it,
        so the watchers tell this launch's heartbeats from an earlier launch's at once."""
        import uuid

        import torch.distributed as dist

        if not self.enabled or not dist.is_initialized():
            return
        group = dist.new_group(backend="gloo")
        box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        self.progress.launch = box[0]
        self._write_heartbeat()

    # ------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception as exc:  # a watchdog must never take the rank down; say why it is blind
                print(f"harness watchdog: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if self._stop.wait(self.interval_s):
                return

    def _tick(self) -> None:
        self._write_heartbeat()
        marker = self.dir / MARKER_NAME
        seen = _identity(marker)
        if seen is not None and seen != self._marker_at_start:
            self._follow(_read_json(marker) or {})
        now = time.monotonic()
        stall = None
        if self.rank == 0:
            stall = self._watch(now)
        elif self.rank == self.world_size - 1 and self._rank0_frozen(now):
            # Ranks this one never watched are taken as they are (they cannot be told from leftovers of an
            # earlier launch by a change); no "missing" verdicts then.
            stall = self._watch(now, trusted=True)
        if stall is not None and _identity(marker) in (None, self._marker_at_start):
            self._end_run(stall)

    def _write_heartbeat(self) -> None:
        with self._write_lock:  # the thread and join_launch (training thread) share one temp file
            self._beat += 1
            record = heartbeat_record(self.progress, rank=self.rank, host=self.host, pid=self.pid,
                                      beat=self._beat, stall_timeout=self.stall_timeout,
                                      now_mono=time.monotonic(), now_wall=time.time())  # fmt: skip
            write_atomic(self.path(self.rank), json.dumps(record) + "\n")

    def _watch(self, now: float, *, trusted: bool = False) -> Stall | None:
        for r in range(self.world_size):
            observe(
                self.views, r, _read_json(self.path(r)), now, trusted=trusted, launch=self.progress.launch
            )
        return find_stall(self.views, 0 if trusted else self.world_size, now, watched_since=self._started,
                          silent_after=self.silent_after_s, startup_allowance=self._startup_allowance())  # fmt: skip

    def _rank0_frozen(self, now: float) -> bool:
        """The last rank's check: rank 0's heartbeat went silent past its allowance (so rank 0 cannot
        report), or never came."""
        observe(self.views, 0, _read_json(self.path(0)), now, launch=self.progress.launch)
        view = self.views.get(0)
        if view is None or not view.confirmed:
            return now - self._started > self._startup_allowance()
        if view.record.get("phase") in FINISHED:
            return False
        allowed = float(view.record.get("allowance_s", 0.0))
        return view.silent_s(now) > self.silent_after_s and view.idle_s(now) > allowed

    def _startup_allowance(self) -> float:
        return allowance_s("startup", self.stall_timeout, ())

    # ------------------------------------------------------------------------------- ending the run

    def _end_run(self, stall: Stall) -> None:
        """This rank found the stall: status, console, report, stacks, then end every rank it can."""
        _ending.set()
        message = describe(stall)
        notes = self._peer_notes(stall)
        first = stall.culprits[0]
        write_status(self.run_dir, "stalled", int(first.get("step", self.progress.step)), ranks=stall.ranks,
                     host=first.get("host"), phase=first.get("phase"), message=message, detected_by=self.rank,
                     stacks=str(self.dir), notes=notes)  # fmt: skip
        line = f"{message}. Every rank's Python stacks: {self.dir}/rank-N.stacks. Ending the run (exit {EXIT_STALLED})"
        if self.console is not None:
            self.console.line(line)
        else:
            print(line, flush=True)
        report = {"detected_by": self.rank, "message": message, "culprits": stall.culprits,
                  "waiting": stall.waiting, "notes": notes, "at": time.time()}  # fmt: skip
        write_atomic(self.dir / MARKER_NAME, json.dumps(report, indent=1) + "\n")
        self._dump_stacks(f"this rank's watchdog found the stall: {message}")
        same_host = [
            c for c in stall.culprits if c.get("host") == self.host and c.get("pid") not in (None, self.pid)
        ]
        for c in same_host:
            if process_state(int(c["pid"])) not in (None, "T", "t"):
                with contextlib.suppress(OSError):
                    os.kill(int(c["pid"]), signal.SIGUSR2)
        time.sleep(min(self.interval_s + 1.0, 10.0))  # every rank that still runs sees the report and dumps
        for c in same_host:  # what cannot end itself (stopped, stuck in the kernel) is ended here
            if process_state(int(c["pid"])) is not None:
                with contextlib.suppress(OSError):
                    os.kill(int(c["pid"]), signal.SIGKILL)
        self._exit()

    def _peer_notes(self, stall: Stall) -> list[str]:
        """What this host can tell about the blamed processes, for the report (a stopped one leaves no stacks)."""
        notes = []
        for c in stall.culprits:
            if "pid" not in c:
                notes.append(f"rank {c['rank']}: no heartbeat, no process known")
            elif c.get("host") != self.host:
                notes.append(
                    f"rank {c['rank']} runs on {c['host']}: its stacks appear only if its threads still run"
                )
            else:
                state = process_state(int(c["pid"]))
                if state is None:
                    notes.append(f"rank {c['rank']}: process {c['pid']} is gone")
                elif state in ("T", "t"):
                    notes.append(f"rank {c['rank']}: process {c['pid']} is stopped (SIGSTOP or a debugger): "
                                 "it cannot dump its stacks; it is killed")  # fmt: skip
                elif state == "D":
                    notes.append(f"rank {c['rank']}: process {c['pid']} is blocked in the kernel (I/O): "
                                 "stacks only if faulthandler gets to run")  # fmt: skip
                else:
                    notes.append(f"rank {c['rank']}: process {c['pid']} (state {state}) asked for its stacks")
        return notes

    def _follow(self, report: dict[str, Any]) -> None:
        """Another rank reported a stall: dump this rank's stacks and exit."""
        _ending.set()
        who = report.get("detected_by", "?")
        self._dump_stacks(f"rank {who}'s watchdog reported: {report.get('message', 'a stall')}")
        print(f"harness watchdog: rank {who} reported a stall; this rank's stacks are in "
              f"{self.dir}/rank-{self.rank}.stacks; exiting", flush=True)  # fmt: skip
        self._exit()

    def _dump_stacks(self, why: str) -> None:
        if self._stacks is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._stacks.write(f"===== rank {self.rank} (host {self.host}, pid {self.pid}) {stamp}: {why}\n")
        self._stacks.flush()
        faulthandler.dump_traceback(file=self._stacks, all_threads=True)
        self._stacks.flush()

    def _exit(self) -> None:
        if self.before_exit is not None:
            with contextlib.suppress(Exception):
                self.before_exit()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_STALLED)
