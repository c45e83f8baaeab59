"""Signals to ``harness train`` (issue 11, item 6), through the real deepspeed launcher on 2 CPU ranks.

SIGTERM or a Ctrl-C (SIGINT to the terminal's foreground process group, which holds ``harness train``
but not its launcher) asks every rank to checkpoint and stop: exit 75, status ``preempted``, a complete
checkpoint that the next run resumes from, and no traceback anywhere. A second Ctrl-C aborts at once
(exit 130). The stop-request plumbing of the ranks is tested as a function first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, harness_cmd
from helpers import checkout_env, read_metrics, read_status, train, write_spec

from harness.launch.failures import read_records
from harness.rundir import RunDir
from harness.runlock import pid_alive
from harness.train import signals

LONG_RUN = 100_000
"""Steps of a run that a test stops long before its end."""


def test_stop_file_is_a_stop_request(tmp_path, monkeypatch):
    monkeypatch.setattr(signals, "_requested", [])
    monkeypatch.setattr(signals, "STOP_FILE_CHECK_S", 0.0)
    stop = tmp_path / "stop"
    previous = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.install(stop)
        assert not signals.stop_requested()
        stop.write_text("SIGTERM\n")
        assert signals.stop_requested()
        monkeypatch.setattr(signals, "_requested", [])
        os.kill(os.getpid(), signal.SIGINT)  # a handled SIGINT: a flag, no KeyboardInterrupt
        assert signals._requested == [signal.SIGINT]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Run:
    """``harness train`` in the background, in its own session as a terminal would start it."""

    def __init__(self, spec_path: Path, run_dir: Path, *sets: str) -> None:
        self.run_dir = Path(run_dir)
        self.out = spec_path.parent / f"{spec_path.stem}.out"
        self.err = spec_path.parent / f"{spec_path.stem}.err"
        cmd = harness_cmd("train", str(spec_path), "--set", f"launch.master_port={free_port()}", *sets)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=spec_path.parent, stdout=out, stderr=err, env=checkout_env(),
                                         start_new_session=True)  # fmt: skip

    def wait_for_step(self, step: int, timeout_s: float = 600, after: int = 0) -> None:
        """Until metrics.jsonl has a record of ``step`` (the ranks are training) among its records after
        the first ``after`` (those of earlier launches of the run)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"harness train ended early ({self.proc.returncode}){self.console}"
            )
            try:
                records = read_metrics(self.run_dir) if (self.run_dir / "metrics.jsonl").exists() else []
            except ValueError:  # a line being written
                records = []
            if any(r.get("step", 0) >= step and "loss" in r for r in records[after:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"no step {step} within {timeout_s} s{self.console}")

    def interrupt(self, sig: int) -> None:
        """What a terminal does on Ctrl-C: the signal to the whole foreground process group."""
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout_s: float = 600) -> int:
        return self.proc.wait(timeout=timeout_s)

    @property
    def console(self) -> str:
        return f"\n--- stdout ---\n{self.out.read_text()[-4000:]}\n--- stderr ---\n{self.err.read_text()[-6000:]}"


def _assert_preempted_with_checkpoint(run: Run, rc: int) -> int:
    assert rc == 75, f"exit {rc}{run.console}"
    status = read_status(run.run_dir)
    assert status is not None and status["state"] == "preempted", f"{status}{run.console}"
    step = status["step"]
    assert (run.run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file(), run.console
    assert f"stopped by a signal at step {step} with a complete checkpoint" in run.err.read_text()
    return step


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_sigterm_stops_with_a_checkpoint_exit_75_and_the_rerun_resumes(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "term", steps=LONG_RUN)
    run = Run(spec_path, run_dir)
    run.wait_for_step(2)
    os.kill(run.proc.pid, signal.SIGTERM)  # to harness train alone, as a scheduler would
    step = _assert_preempted_with_checkpoint(run, run.wait())
    assert "SIGTERM: asking every rank to save a checkpoint and stop" in run.err.read_text()
    assert not RunDir(run_dir).lock.exists() and not RunDir(run_dir).stop_request.exists()

    proc = train(spec_path, f"train.steps={step + 2}")
    assert proc.returncode == 0, proc.stderr
    assert read_status(run_dir) == {"state": "complete", "step": step + 2}
    resumed = [r for r in read_metrics(run_dir) if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == step, resumed


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_ctrl_c_stops_cleanly_without_a_traceback(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "ctrlc", steps=LONG_RUN)
    run = Run(spec_path, run_dir)
    run.wait_for_step(2)
    run.interrupt(signal.SIGINT)
    _assert_preempted_with_checkpoint(run, run.wait())
    assert "Traceback" not in run.console and "KeyboardInterrupt" not in run.console
    for log in RunDir(run_dir).rank_logs().values():
        text = log.read_text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_second_ctrl_c_aborts_at_once_with_130(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "abort", steps=LONG_RUN)
    run = Run(spec_path, run_dir)
    run.wait_for_step(1)
    pids = [r["pid"] for r in read_records(RunDir(run_dir)).values()]
    run.interrupt(signal.SIGINT)
    deadline = time.monotonic() + 60
    while "asking every rank" not in run.err.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.interrupt(signal.SIGINT)
    rc = run.wait(timeout_s=120)
    assert rc == 130, f"exit {rc}{run.console}"
    assert "aborted at once" in run.err.read_text() and "Traceback" not in run.console
    assert read_status(run_dir)["state"] == "aborted"
    assert not RunDir(run_dir).lock.exists()
    assert pids and _gone(pids), "ranks outlived the abort"


def _gone(pids: list[int], timeout_s: float = 60) -> bool:
    """Whether every pid is gone (or a zombie) within ``timeout_s``: SIGKILLed processes are reaped
    by init, not at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) and not _zombie(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
