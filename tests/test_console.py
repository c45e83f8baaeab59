"""harness.console: rank output kept in the run directory, only the harness's lines on the console.

The pure parts are tested as functions and threads; ``test_train_console_and_rank_logs`` runs
``harness train`` through the real deepspeed launcher, once to completion and once with every rank
failing on a user error only the ranks find (a tokenizer bigger than the model's vocabulary): one ``harness: error:`` line, exit 2.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import checkout_env, output_of, read_status, train, write_spec

from harness.console import (
    FAILURE_TAIL_LINES,
    MARKER,
    LauncherRelay,
    RankConsole,
    RankLogFollower,
    harness_text,
    is_failure_report,
    tail_lines,
)
from harness.rundir import RunDir


def test_harness_text_picks_marked_lines_after_any_launcher_prefix():
    assert harness_text(f"{MARKER}step 1 | loss 2.0\n") == "step 1 | loss 2.0"
    assert harness_text(f"node1: {MARKER}step 1\n") == "step 1"  # pdsh prefixes every line
    assert harness_text("[2026-01-01 00:00:00] [INFO] [launch.py:152:main] WORLD INFO DICT\n") is None


def test_tail_lines_from_an_offset(tmp_path):
    log = tmp_path / "rank-0.log"
    log.write_text("".join(f"old {i}\n" for i in range(5)))
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("".join(f"new {i}\n" for i in range(30)))
    assert tail_lines(log, 3) == ["new 27", "new 28", "new 29"]
    assert tail_lines(log, 100, start) == [f"new {i}" for i in range(30)]
    assert tail_lines(tmp_path / "missing.log", 3) == []


def test_rank_console_writes_the_log_and_marked_console_lines(tmp_path, capsys):
    log = tmp_path / "rank-1.log"
    log.write_text("an earlier launch\n")
    start = log.stat().st_size
    log.write_text(log.read_text() + "".join(f"line {i}\n" for i in range(40)))
    stream = io.StringIO()
    console = RankConsole(stream, log, start)
    console.line("step 3 | loss 1.0")
    assert capsys.readouterr().out == "step 3 | loss 1.0\n"  # stdout is the rank's log
    console.report_failure(1, ValueError("bad value\nsecond line"))
    shown = [harness_text(line) for line in stream.getvalue().splitlines()]
    assert shown[0] == "step 3 | loss 1.0"
    assert shown[1] == "rank 1 failed: ValueError: bad value" and is_failure_report(shown[1])
    assert shown[2] == f"last {FAILURE_TAIL_LINES} lines of {log}:"
    assert shown[3:] == [f"  line {i}" for i in range(40 - FAILURE_TAIL_LINES, 40)]
    assert not is_failure_report("step 1 | rank 1 failed: no")


def test_captured_rank_output_goes_to_the_log(tmp_path):
    """fds 1 and 2 into the log (Python, C-level writes, a traceback); the console gets marked lines."""
    log = tmp_path / "launch" / "rank-3.log"
    script = textwrap.dedent(f"""
        import os, sys
        from harness.console import capture_rank_output, print_exception
        from pathlib import Path
        console = capture_rank_output(Path({str(log)!r}), 3)
        print("library chatter")
        os.write(2, b"C-level stderr\\n")
        console.line("step 1 | loss 2.0")
        try:
            raise RuntimeError("boom")
        except RuntimeError as exc:
            print_exception(exc)
            console.report_failure(3, exc)
    """)
    for _ in range(2):  # a second launch appends; the failure report shows only its own part
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=checkout_env()
        )
        assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    shown = [harness_text(line) for line in done.stdout.splitlines()]
    assert None not in shown and shown[:2] == ["step 1 | loss 2.0", "rank 3 failed: RuntimeError: boom"]
    assert shown[2] == f"last 7 lines of {log}:" and shown[-1] == "  RuntimeError: boom"
    text = log.read_text()
    assert text.count("===== harness rank 3, pid") == 2
    for expected in (
        "library chatter",
        "C-level stderr",
        "step 1 | loss 2.0",
        "Traceback",
        "RuntimeError: boom",
    ):
        assert text.count(expected) == 2, text


LAUNCHER_LINES = [
    "[2026-01-01 00:00:00,000] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}",
    f"{MARKER}step 1 | loss 2.0",
    "/site-packages/torch/x.py:83: FutureWarning: deprecated",
    f"{MARKER}rank 1 failed: KeyError: 'x'",
]


def _relay(tmp_path: Path, verbose: bool) -> tuple[LauncherRelay, str, Path]:
    text = "".join(line + "\n" for line in LAUNCHER_LINES)
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdout.write({text!r})"], stdout=subprocess.PIPE
    )
    out = io.StringIO()
    log = tmp_path / f"launcher-{verbose}.log"
    relay = LauncherRelay(proc.stdout, log, out, verbose).start()
    proc.wait()
    relay.join(timeout_s=30)
    return relay, out.getvalue(), log


def test_relay_shows_harness_lines_and_logs_everything(tmp_path):
    relay, shown, log = _relay(tmp_path, verbose=False)
    assert shown == "step 1 | loss 2.0\nrank 1 failed: KeyError: 'x'\n"
    assert log.read_text().splitlines() == LAUNCHER_LINES and relay.failure_reported


def test_relay_verbose_shows_the_launchers_own_lines(tmp_path):
    """Marked lines are left out: with --verbose they come with the rank logs the follower streams."""
    relay, shown, log = _relay(tmp_path, verbose=True)
    assert shown.splitlines() == [LAUNCHER_LINES[0], LAUNCHER_LINES[2]]
    assert log.read_text().splitlines() == LAUNCHER_LINES and relay.failure_reported


def test_follower_streams_what_ranks_append(tmp_path):
    run = RunDir(tmp_path)
    run.launch_dir.mkdir()
    run.rank_log(0).write_text("from the last launch\n")
    out = io.StringIO()
    follower = RankLogFollower(lambda: list(run.rank_logs().values()), out, interval_s=0.01).start()
    with run.rank_log(0).open("a") as f:
        f.write("rank 0 now\n")
    run.rank_log(1).write_text("rank 1 now\nunfinished")
    deadline = time.monotonic() + 10
    while "rank 1 now" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "unfinished" not in out.getvalue()  # a partial line waits for its end...
    follower.stop()
    assert sorted(out.getvalue().splitlines()) == ["rank 0 now", "rank 1 now", "unfinished"]  # ...or the end


LAUNCHER_NOISE = (
    "[INFO]",
    "[WARNING]",
    "FutureWarning",
    "Attempting to get learning rate",
    "Setting accelerator",
)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_train_console_and_rank_logs(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "quiet", steps=3)
    run = RunDir(run_dir)
    proc = train(spec_path)
    assert proc.returncode == 0, output_of(proc)
    console = proc.stdout + proc.stderr
    for noise in LAUNCHER_NOISE:
        assert noise not in console, output_of(proc)
    assert [line.split(" | ")[0] for line in proc.stdout.splitlines() if " | loss " in line] == [
        "step 1",
        "step 2",
        "step 3",
    ], output_of(proc)
    assert f"run complete at step 3: {run_dir}" in proc.stderr
    assert sorted(run.rank_logs()) == [0, 1]
    for rank, log in run.rank_logs().items():
        text = log.read_text()
        assert f"===== harness rank {rank}," in text and "[real_accelerator.py" in text, text[-3000:]
    assert "step 3 | loss" in run.rank_log(0).read_text()
    launcher = run.launcher_log.read_text()
    assert "[INFO] [launch.py" in launcher and f"{MARKER}step 3 | loss" in launcher

    # Every rank fails on a user error only the ranks find (the tokenizer is read there, not by harness
    # train): one line naming the field, exit 2, no traceback; the ranks' logs keep the rest.
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(run.tokenizer, tokenizer)  # the run's own: 1,024 tokens, more than 512
    proc = train(spec_path, f"data.tokenizer={tokenizer}", "model.overrides.vocab_size=512")
    assert proc.returncode == 2, output_of(proc)
    console = proc.stdout + proc.stderr
    assert console.count(f"harness: error: data.tokenizer = '{tokenizer} (") == 1, output_of(proc)
    assert "bigger than the model's vocab_size 512" in proc.stderr, output_of(proc)
    assert "Traceback" not in console and "[launch.py" not in console, output_of(proc)
    assert not any(is_failure_report(line) for line in proc.stdout.splitlines()), output_of(proc)
    for rank in (0, 1):
        text = run.rank_log(rank).read_text()
        assert text.count(f"===== harness rank {rank},") == 2, text[-3000:]  # appended
        assert "bigger than the model's vocab_size 512" in text
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["user_error"], status
