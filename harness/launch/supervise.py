"""``harness train`` while the launcher runs: signals become a stop request, and a failure one summary.

Signals. The launcher runs in its own session, so a Ctrl-C in the terminal reaches only ``harness
train``. The first SIGTERM, SIGINT or SIGUSR1 writes the stop request (``<run>/launch/stop``, see
:mod:`harness.train.signals`): every rank finishes its step, saves a complete checkpoint, writes
``preempted`` and exits; ``harness train`` waits for that, at most ``grace_s`` seconds (then it ends the
launch). It never signals the launcher for this: the deepspeed runner dies of SIGTERM/SIGINT at once,
and its launch process kills the ranks 30 s later, checkpoint or not. A second signal aborts at once:
the whole launch is SIGKILLed, and ``harness train`` exits 130.

Failures. :func:`report_failure` prints the first failing rank (:mod:`harness.launch.failures`): rank,
host, exit code or signal, the exception's last line and the rank's log, and records the same in
status.json.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from harness.rundir import RunDir

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""What ``harness train`` turns into a stop request (a second one of any of them aborts)."""
KILL_WAIT_S = 10.0
"""After the grace period: how long the launch gets between SIGTERM and SIGKILL."""


def say(message: str) -> None:
    """One ``harness:`` line on stderr."""
    print(f"harness: {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """How the launcher process ended."""

    rc: int
    """Its exit status (128 + N when a signal N ended it)."""
    stop_signal: int | None = None
    """The signal that asked the ranks to stop, if any."""
    aborted: bool = False
    """A second signal ended the launch at once."""
    grace_expired: bool = False
    """The ranks did not stop within the grace period and were ended."""
    failure_reported: bool = False
    """A rank showed its own failure report on the console (Slurm-style ranks do)."""


def run_launcher(
    cmd: list[str], env: dict[str, str], cwd: str, run_dir: RunDir, verbose: bool, grace_s: float
) -> Outcome:
    """Run the launcher in its own session, relay its output, and handle stop signals (module doc)."""
    from harness.console import LauncherRelay, RankLogFollower

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    relay = LauncherRelay(proc.stdout, run_dir.launcher_log, sys.stdout, verbose).start()
    follower = (
        RankLogFollower(lambda: list(run_dir.rank_logs().values()), sys.stdout).start() if verbose else None
    )
    outcome = Outcome(rc=0)
    deadline: list[float] = []

    def on_signal(signum, frame):  # noqa: ARG001 - signal API
        if outcome.stop_signal is None:
            outcome.stop_signal = signum
            deadline.append(time.monotonic() + grace_s)
            with contextlib.suppress(OSError):
                run_dir.stop_request.write_text(f"{signal.Signals(signum).name}\n", encoding="utf-8")
            say(f"{signal.Signals(signum).name}: asking every rank to save a checkpoint and stop (waiting up to "
                f"{grace_s:.0f} s; press Ctrl-C again to abort at once, without a checkpoint)")  # fmt: skip
            return
        outcome.aborted = True
        _kill_group(proc.pid, signal.SIGKILL)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if deadline and time.monotonic() > deadline[0] and not outcome.grace_expired:
                outcome.grace_expired = True
                say(f"the ranks did not stop within {grace_s:.0f} s: ending them")
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
    finally:
        if outcome.aborted or outcome.grace_expired:
            _kill_group(proc.pid, signal.SIGKILL)  # ranks the launcher left behind
        for s, handler in previous.items():
            signal.signal(s, handler)
        relay.join(timeout_s=10)  # ranks the launcher left behind may keep its output pipe open
        if follower is not None:
            follower.stop()
        run_dir.stop_request.unlink(missing_ok=True)
    rc = proc.returncode
    outcome.rc = 128 - rc if rc < 0 else rc
    outcome.failure_reported = relay.failure_reported
    return outcome


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def report_failure(run_dir: RunDir, world_size: int, since: float) -> int | None:
    """Print the one summary of a failed run and record it in status.json; returns the exit code
    (:data:`EXIT_FAILED`, or :data:`EXIT_USER_ERROR` for a SpecError only the ranks could find), or
    None when no rank recorded a failure (then the caller falls back to the launcher's own words)."""
    from harness.console import FAILURE_TAIL_LINES, tail_lines
    from harness.errors import EXIT_FAILED, EXIT_USER_ERROR
    from harness.launch.failures import first_failure
    from harness.rundir import write_status

    failure = first_failure(run_dir, world_size, since)
    if failure is None:
        return None
    step = last_step(run_dir)
    if failure.user_error:
        write_status(run_dir, "failed", step, user_error=True, **failure.facts())
        print(f"harness: error: {failure.error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    write_status(run_dir, "failed", step, **failure.facts())
    # A SIGKILLed rank's log ends mid-step, and an explained error (a failed save) is complete in itself.
    if failure.signal != "SIGKILL" and not failure.explained:
        lines = tail_lines(failure.log, FAILURE_TAIL_LINES)
        if lines:
            say(f"last {len(lines)} lines of rank {failure.rank}'s log:")
            sys.stderr.write("".join(f"  {line}\n" for line in lines))
    others = f"; {failure.num_others} other rank(s) failed after it" if failure.num_others else ""
    say(f"{failure.headline()}{others}")
    say(f"run failed after step {step}; rank {failure.rank}'s full log: {failure.log}")
    return EXIT_FAILED


def last_step(run_dir: RunDir) -> int:
    """The last step metrics.jsonl recorded (-1 when none)."""
    import json

    from harness.console import tail_lines

    for line in reversed(tail_lines(run_dir.metrics, 50)):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return -1
