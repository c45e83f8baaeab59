"""Hang detection (``train.stall_timeout``): every rank reports progress; a rank that stops is named and the run ends.

The loop and the engine mark progress in memory (:data:`PROGRESS`: step, micro-batch, phase, monotonic
time; no I/O, well under a microsecond per mark). A daemon thread per rank (:class:`Watchdog`) writes
that state every few seconds to ``<run>/launch/heartbeat/rank-N.json`` on the run directory, which every
rank sees whatever the launcher (deepspeed runner, pdsh, mpirun, srun). Rank 0's thread reads every
heartbeat; the last rank's reads rank 0's, so a frozen rank 0 is caught too. A rank is stalled when it
has made no progress for longer than its phase's allowance (:func:`allowance_s`). Which rank is to
blame (:func:`find_stall`): a rank whose heartbeat stopped (SIGSTOP, a frozen interpreter, a dead
host) before any other; else the ranks furthest behind (by step, micro-batch and phase), since the
others wait for them in a collective. Clocks of different hosts are never compared: a heartbeat
carries its writer's own ``idle_s``, and the reader times how long a heartbeat has not changed.

The rank that detects it (:mod:`harness.train.stall` does the rest) records ``stalled`` in
status.json, says so on the console, writes ``heartbeat/stalled.json``, which makes every rank that
still runs dump its Python stacks to ``heartbeat/rank-N.stacks`` and exit, asks same-host peers for
theirs with SIGUSR2 (faulthandler), kills same-host culprits that cannot exit, and exits
:data:`~harness.errors.EXIT_STALLED`; the launchers end the remaining ranks.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from harness.spec import AUTO

PHASES = ("startup", "data", "forward", "backward", "optimizer", "pipeline")
PHASES += ("log", "eval", "sync", "save", "end")
"""A rank's phases in the order a step passes them (``pipeline``: DeepSpeed's pipeline schedule, which does
forward, backward and optimizer inside one call; ``sync``: the per-step stop-signal agreement)."""
FINISHED = ("done", "failed")
"""Phases of a rank that has left training: never stalled."""
_ORDER = {name: i for i, name in enumerate(PHASES)}

STARTUP_FLOOR_S = 1200.0
"""The least a rank gets before its first step is done: imports, DeepSpeed op builds, tokenizing on first
use, model build, checkpoint load and the first (warm-up) step."""
LONG_PHASE_FLOOR_S = {"save": 1800.0, "eval": 600.0, "end": 3600.0}
"""The least a save, an evaluation or the end of the run gets (at the end rank 0 exports the HF checkpoint
while the others wait at the last barrier): a slow filesystem stretches them far beyond a step."""
AUTO_STEP_FLOOR_S = 120.0
"""``auto``: the least a step phase gets once step times are measured."""
AUTO_STEP_FACTOR = 10.0
"""``auto``: a step phase gets this many median step times (of the last :data:`STEP_WINDOW` steps)."""
STEP_WINDOW = 50
AUTO_INTERVAL_S = 10.0
"""``auto``: seconds between heartbeats (and between the watchers' reads)."""


def heartbeat_interval_s(stall_timeout: int | str) -> float:
    """Seconds between heartbeats: a fifth of an explicit timeout, between 1 and 10 s (a stall is then
    seen within the timeout plus about two intervals)."""
    if stall_timeout == AUTO:
        return AUTO_INTERVAL_S
    return min(max(float(stall_timeout) / 5.0, 1.0), 10.0)


def silent_after_s(interval_s: float) -> float:
    """A heartbeat unchanged this long means its writer's threads no longer run (stopped, frozen, gone)."""
    return 3.0 * interval_s + 2.0


def allowance_s(phase: str, stall_timeout: int | str, step_times_s: list[float] | tuple[float, ...]) -> float:
    """Seconds a rank may stay in ``phase`` without progress before it counts as stalled.

    Until this process has timed a step (``step_times_s`` empty) every phase gets at least
    :data:`STARTUP_FLOOR_S`; saves, evaluations and the end get at least :data:`LONG_PHASE_FLOOR_S`.
    A step phase gets ``stall_timeout`` as given, or with ``auto`` :data:`AUTO_STEP_FACTOR` median step
    times, at least :data:`AUTO_STEP_FLOOR_S`.
    """
    if stall_timeout == AUTO:
        step = (
            max(AUTO_STEP_FLOOR_S, AUTO_STEP_FACTOR * statistics.median(step_times_s))
            if step_times_s
            else 0.0
        )
    else:
        step = float(stall_timeout)
    floor = LONG_PHASE_FLOOR_S.get(phase, 0.0)
    if not step_times_s or phase == "startup":
        floor = max(floor, STARTUP_FLOOR_S)
    return max(step, floor)


def collective_timeout_s(stall_timeout: int | str) -> float | None:
    """The process group's timeout, the second line of defence: twice the longest allowance, so the
    watchdog names the rank first. None (DeepSpeed's default) when detection is off."""
    if stall_timeout == 0:
        return None
    floors = max(STARTUP_FLOOR_S, *LONG_PHASE_FLOOR_S.values())
    return 2.0 * (floors if stall_timeout == AUTO else max(floors, float(stall_timeout)))


class Progress:
    """One rank's progress in memory; the training thread marks it, the heartbeat thread reads it."""

    __slots__ = ("step", "micro", "phase", "last", "_step_started", "step_times_s", "launch")

    def __init__(self) -> None:
        self.launch: str | None = None
        """A token every rank of this launch shares once the rendezvous is done (see ``stall.join_launch``)."""
        self.step = 0
        self.micro = 0
        self.phase = "startup"
        self.last = time.monotonic()
        self._step_started: float | None = None
        self.step_times_s: deque[float] = deque(maxlen=STEP_WINDOW)

    def mark(self, phase: str, micro: int | None = None) -> None:
        """Entering ``phase`` (of micro-batch ``micro``): progress."""
        if micro is not None:
            self.micro = micro
        self.phase = phase
        self.last = time.monotonic()

    def begin_step(self, step: int) -> None:
        """Starting optimizer step ``step``; times the step before it."""
        now = time.monotonic()
        if self._step_started is not None:
            self.step_times_s.append(now - self._step_started)
        self._step_started = now
        self.step, self.micro, self.phase, self.last = step, 0, "data", now

    def step_times(self) -> tuple[float, ...]:
        """The timed steps so far (copied; the training thread may append meanwhile)."""
        for _ in range(3):
            try:
                return tuple(self.step_times_s)
            except RuntimeError:  # deque mutated during iteration
                continue
        return ()


PROGRESS = Progress()
"""This process's progress (one rank per process)."""


def heartbeat_record(
    progress: Progress, *, rank: int, host: str, pid: int, beat: int, stall_timeout: int | str,
    now_mono: float, now_wall: float,
) -> dict[str, Any]:  # fmt: skip
    """What ``rank-N.json`` holds: who (rank, host, pid), where (step, micro, phase), how long since the
    last progress by the writer's own clock (``idle_s``) and the allowance of that phase; ``beat``
    counts writes, so a reader sees whether the writer still runs."""
    phase = progress.phase
    idle = max(0.0, now_mono - progress.last)
    return {
        "rank": rank,
        "host": host,
        "pid": pid,
        "beat": beat,
        "step": progress.step,
        "micro": progress.micro,
        "phase": phase,
        "idle_s": round(idle, 3),
        "allowance_s": allowance_s(phase, stall_timeout, progress.step_times()),
        "last_progress": round(now_wall - idle, 3),
        "written_at": round(now_wall, 3),
        "launch": progress.launch,
    }


@dataclass
class RankView:
    """A watcher's view of one rank: its last heartbeat and when (watcher's monotonic clock) it changed."""

    record: dict[str, Any]
    changed_at: float
    confirmed: bool = False
    """The heartbeat changed while watched: it is this launch's, not a leftover of an earlier one."""

    def idle_s(self, now: float) -> float:
        """Seconds without progress: what the writer last said plus the time since it said it."""
        return float(self.record.get("idle_s", 0.0)) + (now - self.changed_at)

    def silent_s(self, now: float) -> float:
        """Seconds the heartbeat has not changed."""
        return now - self.changed_at

    def position(self) -> tuple[int, int, int]:
        """How far the rank got: (step, micro-batch, phase order)."""
        r = self.record
        return int(r.get("step", 0)), int(r.get("micro", 0)), _ORDER.get(str(r.get("phase")), -1)


def observe(
    views: dict[int, RankView], rank: int, record: dict[str, Any] | None, now: float, trusted: bool = False,
    launch: str | None = None,
) -> None:  # fmt: skip
    """Update ``views`` with ``rank``'s heartbeat as read at ``now`` (None: no file). A heartbeat counts as
    this launch's when it carries this launch's token (``launch``), once it changes, or at once when
    ``trusted``: a rank stopped right after the rendezvous has beaten once with the token, not twice."""
    if record is None:
        return
    ours = trusted or (launch is not None and record.get("launch") == launch)
    old = views.get(rank)
    if old is None:
        views[rank] = RankView(record, now, confirmed=ours)
    elif record.get("beat") != old.record.get("beat") or record.get("pid") != old.record.get("pid"):
        views[rank] = RankView(record, now, confirmed=True)
    elif ours and not old.confirmed:
        old.confirmed = True


@dataclass
class Stall:
    """A stall: the ranks to blame and the ranks that were waiting for them."""

    culprits: list[dict[str, Any]]
    """Per blamed rank: its heartbeat fields plus ``idle_s`` and ``why``."""
    waiting: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        """The blamed ranks."""
        return [int(c["rank"]) for c in self.culprits]


def find_stall(
    views: dict[int, RankView], world_size: int, now: float, *, watched_since: float, silent_after: float,
    startup_allowance: float,
) -> Stall | None:  # fmt: skip
    """The stall the heartbeats show at ``now``, or None: pure, from the views and times alone.

    ``world_size``: the ranks expected (0: none, so none is reported missing).
    A stall starts when a rank has gone longer than its allowance without progress, or when a rank has
    shown no heartbeat of this launch for ``startup_allowance`` since ``watched_since``. Blamed: ranks
    with no heartbeat, or whose heartbeat went silent, or that failed; else the ranks furthest behind,
    once they are over their own allowance.
    """
    live = {r: v for r, v in views.items() if v.confirmed and v.record.get("phase") not in FINISHED}
    over = [r for r, v in live.items() if v.idle_s(now) > float(v.record.get("allowance_s", 0.0))]
    missing = [r for r in range(world_size) if r not in views or not views[r].confirmed]
    if now - watched_since <= startup_allowance:
        missing = []
    if not over and not missing:
        return None
    failed = [r for r, v in views.items() if v.confirmed and v.record.get("phase") == "failed"]
    # A silent rank is blamed whatever its allowance: a rank stopped during start-up left a heartbeat
    # that still claims the start-up floor while the others time out waiting for it.
    silent = [r for r in live if live[r].silent_s(now) > silent_after]
    if missing or silent or failed:
        blamed = sorted(set(missing) | set(silent) | set(failed))
    else:
        # The others wait for the rank furthest behind: a stall only once that rank is over its own
        # allowance (a long save or evaluation there is no stall, however long its peers wait).
        behind = min(v.position() for v in live.values())
        blamed = sorted(r for r in over if live[r].position() == behind)
        if not blamed:
            return None
    culprits = []
    for r in blamed:
        view = views.get(r)
        if r in missing:
            culprits.append(
                {"rank": r, "why": f"no heartbeat from this launch in {now - watched_since:.0f} s"}
            )
        elif r in failed:
            culprits.append({**view.record, "why": "failed (see its log); the others waited for it"})
        else:
            idle, silent_for = view.idle_s(now), view.silent_s(now)
            if silent_for > silent_after:
                why = f"no heartbeat for {silent_for:.0f} s (stopped, frozen or gone)"
            else:
                why = f"no progress for {idle:.0f} s (allowed {float(view.record['allowance_s']):.0f} s)"
            culprits.append(
                {**view.record, "idle_s": round(idle, 1), "silent": silent_for > silent_after, "why": why}
            )
    waiting = [
        {**v.record, "idle_s": round(v.idle_s(now), 1)} for r, v in sorted(live.items()) if r not in blamed
    ]
    return Stall(culprits, waiting)


def describe(stall: Stall) -> str:
    """One line naming every blamed rank, its host, phase and step, and why; then who was waiting."""
    parts = []
    for c in stall.culprits:
        if "phase" not in c:
            parts.append(f"rank {c['rank']}: {c['why']}")
            continue
        who = f"rank {c['rank']} (host {c['host']}, pid {c['pid']})"
        where = f"in {c['phase']} at step {c['step']}"
        if c.get("silent"):  # its last heartbeat is up to one interval old
            parts.append(f"{who}: {c['why']}; last seen {where}")
        else:
            parts.append(f"{who} {where}: {c['why']}")
    text = "stalled: " + "; ".join(parts)
    if stall.waiting:
        shown = ", ".join(f"{w['rank']} ({w['phase']}, step {w['step']})" for w in stall.waiting[:8])
        more = f" and {len(stall.waiting) - 8} more" if len(stall.waiting) > 8 else ""
        text += f". Waiting for it: rank {shown}{more}"
    return text
