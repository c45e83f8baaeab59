"""Failure reports (issue 11, item 7), through the real deepspeed launcher on 2 CPU ranks.

When a rank dies or raises, ``harness train`` prints one summary naming the FIRST failing rank (not
the peer that then fails in a collective): rank, host, signal or exit code, the exception's last line
and the rank's log; status.json says ``failed`` with the same facts. The choice of the first failing
rank is tested as a function first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from conftest import free_port
from helpers import WORKERS, checkout_env, read_status, run_harness, write_spec
from test_signals import LONG_RUN, Run

from harness.launch.failures import first_failure, is_collective_error, read_records
from harness.rundir import RunDir


def _records(tmp_path, **by_rank):
    run = RunDir(tmp_path)
    run.launch_dir.mkdir(parents=True, exist_ok=True)
    for rank, record in by_rank.items():
        run.rank_record(int(rank[1:])).write_text(
            json.dumps({"host": "h", "started_at": time.time(), **record})
        )
    return run


def test_the_cause_is_named_before_the_peers_that_failed_in_a_collective(tmp_path):
    now = time.time()
    run = _records(
        tmp_path,
        r0={"state": "failed", "error": "RuntimeError: Connection closed by peer", "collective": True,
            "failed_at": now - 5, "exit_code": 1},
        r1={"signal": "SIGKILL", "exit_code": None, "ended_at": now},
        r2={"state": "complete", "exit_code": 0},
    )  # fmt: skip
    failure = first_failure(run, 3)
    assert (failure.rank, failure.signal, failure.num_others) == (1, "SIGKILL", 1)
    assert failure.headline() == "rank 1 on host h was killed by SIGKILL"
    assert failure.facts()["log"] == str(run.rank_log(1))
    run = _records(tmp_path, r1={"state": "failed", "error": "ValueError: x", "failed_at": now, "exit_code": 1},
                   r2={"state": "user_error", "error": "data.files = ...", "failed_at": now - 1, "exit_code": 2})  # fmt: skip
    failure = first_failure(run, 3)
    assert failure.rank == 2 and failure.user_error
    assert first_failure(_records(tmp_path / "ok", r0={"state": "complete", "exit_code": 0}), 1) is None


def test_an_explained_failure_is_one_summary_without_the_log_tail(tmp_path, capsys):
    """A failed checkpoint save says everything in its line (sizes, what to do): no log tail."""
    from harness.launch.supervise import report_failure

    message = "CheckpointError: checkpoint step-00000004 could not be saved (...). Fix: free space there"
    for explained in (True, False):
        run = _records(tmp_path / str(explained), r0={"state": "failed", "error": message, "exit_code": 1,
                                                      "failed_at": time.time(), "explained": explained})  # fmt: skip
        run.rank_log(0).write_text("Traceback (most recent call last):\n  boom\n" + message + "\n")
        assert report_failure(run, 1, since=0.0) == 1
        err = capsys.readouterr().err
        assert f"rank 0 on host h failed (exit code 1): {message}" in err
        assert ("Traceback" in err) is (not explained), err


def test_a_rank_that_raised_is_named_by_its_error_even_if_the_launcher_then_killed_it(tmp_path):
    """Seen in CI rehearsal: both ranks raised the same CheckpointError; rank 1 was slower to exit and the
    launcher's SIGTERM ended it. Its error is the story, not the SIGTERM."""
    now = time.time()
    run = _records(tmp_path, r1={"state": "failed", "error": "CheckpointError: no space", "failed_at": now,
                                 "signal": "SIGTERM", "exit_code": None})  # fmt: skip
    assert first_failure(run, 2).headline() == "rank 1 on host h failed: CheckpointError: no space"


def test_collective_errors_are_recognised():
    assert is_collective_error(
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error")
    )
    assert is_collective_error(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert not is_collective_error(RuntimeError("injected fault in rank 1"))


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_kill_9_of_rank_1_is_named_in_one_summary(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "kill9", steps=LONG_RUN)
    run = Run(spec_path, run_dir)
    run.wait_for_step(2)
    os.kill(read_records(RunDir(run_dir))[1]["pid"], signal.SIGKILL)
    rc = run.wait()
    assert rc == 1, f"exit {rc}{run.console}"
    log = RunDir(run_dir).rank_log(1)
    host = socket.gethostname()
    err = run.err.read_text()
    assert f"rank 1 on host {host} was killed by SIGKILL" in err, run.console
    assert f"rank 1's full log: {log}" in err, run.console
    assert err.count("was killed by") == 1 and "Traceback" not in run.console, run.console
    status = read_status(run_dir)
    assert status["state"] == "failed", status
    assert (status["rank"], status["host"], status["signal"], status["log"]) == (1, host, "SIGKILL", str(log))


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_an_exception_in_one_rank_is_named_with_its_last_line(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "raise", steps=LONG_RUN)
    env = checkout_env()
    env["PYTHONPATH"] = os.pathsep.join([str(WORKERS / "fault_site"), env["PYTHONPATH"]])
    env.update(HARNESS_TEST_FAIL_RANK="1", HARNESS_TEST_FAIL_STEP="3")
    proc = run_harness("train", str(spec_path), "--set", f"launch.master_port={free_port()}", env=env,
                       cwd=tmp_path, timeout_s=900)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    host = socket.gethostname()
    line = "RuntimeError: injected fault in rank 1 at step 3"
    assert f"rank 1 on host {host} failed (exit code 1): {line}" in proc.stderr, proc.stderr
    assert f"rank 1's full log: {RunDir(run_dir).rank_log(1)}" in proc.stderr
    assert "rank 0 on host" not in proc.stderr and "1 other rank(s) failed after it" in proc.stderr, (
        proc.stderr
    )
    status = read_status(run_dir)
    assert (status["state"], status["rank"], status["error"]) == ("failed", 1, line), status
