"""Hang detection (train.stall_timeout): harness.train.watchdog's pure decisions, harness.train.stall's
heartbeat files, and a real 2-rank launch in which one rank is stopped (SIGSTOP) and the run ends as
stalled, naming it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import helpers as h
import pytest
from conftest import harness_cmd

from harness.errors import EXIT_STALLED
from harness.rundir import RunDir
from harness.train import stall
from harness.train.watchdog import (
    AUTO_STEP_FLOOR_S,
    LONG_PHASE_FLOOR_S,
    STARTUP_FLOOR_S,
    Progress,
    RankView,
    allowance_s,
    collective_timeout_s,
    describe,
    find_stall,
    heartbeat_interval_s,
    heartbeat_record,
    observe,
)

# ------------------------------------------------------------------------------------------ allowances


def test_an_explicit_timeout_applies_to_step_phases_once_a_step_was_timed():
    for phase in ("data", "forward", "backward", "optimizer", "log", "sync"):
        assert allowance_s(phase, 20, [0.5]) == 20
    assert allowance_s("forward", 5000, [0.5]) == 5000


def test_start_up_and_the_first_step_get_the_start_up_floor():
    assert allowance_s("startup", 20, [0.5]) == STARTUP_FLOOR_S
    assert allowance_s("forward", 20, []) == STARTUP_FLOOR_S  # the first (warm-up) step
    assert allowance_s("startup", "auto", []) == STARTUP_FLOOR_S


def test_saves_evaluations_and_the_end_get_their_floor():
    for phase, floor in LONG_PHASE_FLOOR_S.items():
        assert allowance_s(phase, 20, [0.5]) == floor
        assert allowance_s(phase, 2 * floor, [0.5]) == 2 * floor


def test_auto_is_ten_median_step_times_with_a_floor():
    assert allowance_s("forward", "auto", [1.0, 30.0, 30.0, 30.0, 1000.0]) == 300.0
    assert allowance_s("forward", "auto", [0.1] * 20) == AUTO_STEP_FLOOR_S


def test_heartbeat_interval_and_collective_timeout():
    assert heartbeat_interval_s(20) == 4.0
    assert heartbeat_interval_s(2) == 1.0 and heartbeat_interval_s(3600) == 10.0
    assert heartbeat_interval_s("auto") == 10.0
    assert collective_timeout_s(0) is None
    longest = max(STARTUP_FLOOR_S, *LONG_PHASE_FLOOR_S.values())
    assert collective_timeout_s("auto") == collective_timeout_s(20) == 2 * longest
    assert collective_timeout_s(100_000) == 200_000
    assert stall.init_kwargs(0) == {}
    assert stall.init_kwargs(20)["timeout"].total_seconds() == 2 * longest


# -------------------------------------------------------------------------------- progress and records


def test_progress_marks_phases_and_times_steps():
    p = Progress()
    assert (p.step, p.phase) == (0, "startup")
    p.begin_step(1)
    p.mark("forward")
    p.mark("data", micro=1)
    assert (p.step, p.micro, p.phase) == (1, 1, "data")
    p.begin_step(2)
    assert (p.step, p.micro, p.phase) == (2, 0, "data")
    assert len(p.step_times()) == 1


def test_heartbeat_record_holds_who_where_and_how_long():
    p = Progress()
    p.begin_step(7)
    p.mark("backward", micro=2)
    record = heartbeat_record(p, rank=3, host="node1", pid=42, beat=5, stall_timeout=20,
                              now_mono=p.last + 1.5, now_wall=1000.0)  # fmt: skip
    assert record["rank"] == 3 and record["host"] == "node1" and record["pid"] == 42 and record["beat"] == 5
    assert (record["step"], record["micro"], record["phase"]) == (7, 2, "backward")
    assert record["idle_s"] == 1.5 and record["last_progress"] == 998.5 and record["written_at"] == 1000.0
    assert record["allowance_s"] == STARTUP_FLOOR_S  # no step timed yet
    json.dumps(record)


# ------------------------------------------------------------------------------------- the decision


def rec(rank, step=5, phase="forward", beat=1, idle=0.0, allowance=20.0, micro=0):
    return {"rank": rank, "host": f"h{rank}", "pid": 100 + rank, "beat": beat, "step": step, "micro": micro,
            "phase": phase, "idle_s": idle, "allowance_s": allowance}  # fmt: skip


def views_of(*records, changed_at=0.0):
    return {r["rank"]: RankView(r, changed_at, confirmed=True) for r in records}


def decide(views, now, world=None, silent_after=14.0):
    return find_stall(views, len(views) if world is None else world, now, watched_since=0.0,
                      silent_after=silent_after, startup_allowance=STARTUP_FLOOR_S)  # fmt: skip


def test_no_stall_within_the_allowance():
    views = views_of(rec(0), rec(1))
    assert decide(views, now=19.0) is None


def test_a_silent_rank_is_blamed_not_the_one_waiting_for_it():
    # Rank 1 stopped at t=0 (heartbeat frozen); rank 0 keeps beating but waits in backward since t=1.
    views = views_of(rec(1, phase="forward"), changed_at=0.0)
    views[0] = RankView(rec(0, phase="backward", idle=23.0), 24.0, confirmed=True)
    stall = decide(views, now=25.0)
    assert stall is not None and stall.ranks == [1]
    assert stall.culprits[0]["why"] == "no heartbeat for 25 s (stopped, frozen or gone)"
    assert [w["rank"] for w in stall.waiting] == [0]
    text = describe(stall)
    assert text.startswith(
        "stalled: rank 1 (host h1, pid 101): no heartbeat for 25 s (stopped, frozen or gone); "
        "last seen in forward at step 5"
    )
    assert "Waiting for it: rank 0 (backward, step 5)" in text


def test_with_every_heartbeat_alive_the_rank_furthest_behind_is_blamed():
    views = {
        0: RankView(rec(0, phase="optimizer", micro=1, idle=21.0), 25.0, confirmed=True),
        1: RankView(rec(1, phase="data", micro=1, idle=24.0), 25.0, confirmed=True),
        2: RankView(rec(2, phase="backward", micro=0, idle=22.0), 25.0, confirmed=True),
    }
    stall = decide(views, now=25.5)
    assert stall is not None and stall.ranks == [2]  # micro 0 is behind micro 1
    assert describe(stall).startswith(
        "stalled: rank 2 (host h2, pid 102) in backward at step 5: no progress for 22 s"
    )


def test_a_rank_stopped_early_is_blamed_though_its_last_heartbeat_claims_the_start_up_floor():
    """Seen in the chaos test: rank 1 was stopped before its heartbeat left start-up, so its record
    still allows 20 minutes; rank 0 times out waiting at step 4. The silent rank is the cause."""
    views = views_of(rec(1, step=0, phase="startup", allowance=1200.0), changed_at=0.0)
    views[0] = RankView(rec(0, step=4, phase="optimizer", idle=21.0), 24.0, confirmed=True)
    stall = decide(views, now=25.0)
    assert stall is not None and stall.ranks == [1]


def test_a_heartbeat_with_this_launchs_token_counts_at_once():
    """A rank stopped right after the rendezvous has beaten once with the launch token: its heartbeat is
    this launch's although the watcher never saw it change; one without the token must change first."""
    views: dict = {}
    observe(views, 1, {**rec(1), "launch": "abc"}, now=0.0, launch="abc")
    observe(views, 2, {**rec(2), "launch": "old"}, now=0.0, launch="abc")
    assert views[1].confirmed and not views[2].confirmed
    observe(views, 2, {**rec(2), "launch": "abc"}, now=1.0, launch="abc")
    assert views[2].confirmed


def test_no_stall_while_the_rank_behind_is_within_its_own_allowance():
    """Rank 1 saves (a long allowance) and keeps beating; rank 0 is over its step allowance waiting."""
    views = {
        0: RankView(rec(0, step=6, phase="forward", idle=40.0), 25.0, confirmed=True),
        1: RankView(rec(1, step=5, phase="save", idle=40.0, allowance=1800.0), 25.0, confirmed=True),
    }
    assert decide(views, now=25.5) is None


def test_ranks_at_the_same_point_are_all_named():
    views = {r: RankView(rec(r, phase="sync", idle=30.0), 10.0, confirmed=True) for r in (0, 1)}
    stall = decide(views, now=11.0)
    assert stall is not None and stall.ranks == [0, 1]


def test_finished_ranks_are_never_stalled_and_a_failed_one_is_blamed():
    views = views_of(rec(0, phase="done", idle=999.0), rec(1, idle=5.0))
    assert decide(views, now=1.0) is None
    views = views_of(rec(0, phase="sync", idle=25.0), rec(1, phase="failed", idle=25.0))
    stall = decide(views, now=1.0)
    assert stall is not None and stall.ranks == [1] and "failed" in stall.culprits[0]["why"]


def test_a_rank_without_a_heartbeat_of_this_launch_is_missing_after_the_start_up_allowance():
    views = views_of(rec(0))
    views[0] = RankView(rec(0), STARTUP_FLOOR_S, confirmed=True)
    views[1] = RankView(rec(1), 0.0, confirmed=False)  # a leftover of an earlier launch, never changed
    assert decide(views, now=STARTUP_FLOOR_S - 1, world=3) is None
    stall = decide(views, now=STARTUP_FLOOR_S + 1, world=3)
    assert stall is not None and stall.ranks == [1, 2]
    assert describe(stall).startswith("stalled: rank 1: no heartbeat from this launch")


def test_observe_confirms_a_heartbeat_once_it_changes():
    views: dict[int, RankView] = {}
    observe(views, 0, None, 0.0)
    assert views == {}
    observe(views, 0, rec(0, beat=1), 1.0)
    assert not views[0].confirmed and views[0].changed_at == 1.0
    observe(views, 0, rec(0, beat=1), 5.0)
    assert views[0].changed_at == 1.0 and views[0].silent_s(6.0) == 5.0
    observe(views, 0, rec(0, beat=2, idle=3.0), 7.0)
    assert views[0].confirmed and views[0].idle_s(8.0) == 4.0
    observe(views, 1, rec(1), 7.0, trusted=True)
    assert views[1].confirmed


# --------------------------------------------------------------------------------- heartbeat files


def test_watchdog_writes_heartbeats_and_a_last_one_when_done(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    progress = Progress()
    dog = stall.Watchdog(run_dir, 0, 1, 20, progress=progress).start()
    try:
        record = json.loads((run_dir.heartbeat_dir / "rank-0.json").read_text())
        assert record["pid"] == os.getpid() and record["phase"] == "startup" and record["rank"] == 0
        progress.begin_step(1)
    finally:
        dog.stop("done")
    record = json.loads((run_dir.heartbeat_dir / "rank-0.json").read_text())
    assert record["phase"] == "done" and record["step"] == 1 and record["beat"] >= 2
    assert (run_dir.heartbeat_dir / "rank-0.stacks").exists()


def test_stall_timeout_zero_starts_nothing(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    dog = stall.Watchdog(run_dir, 0, 1, 0).start()
    dog.stop()
    assert not run_dir.heartbeat_dir.exists()


def test_negative_stall_timeout_is_refused():
    proc = h.run_harness("show", h.TINY_SPEC, "--set", "train.stall_timeout=-1")
    assert proc.returncode == 2 and "train.stall_timeout = -1" in proc.stderr, h.output_of(proc)


# ------------------------------------------------------------------------------- a real launch


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _heartbeat(run_dir: Path, rank: int) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / "launch" / "heartbeat" / f"rank-{rank}.json").read_text())
    return None


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_a_stopped_rank_is_named_and_the_run_ends_stalled(tmp_path):
    spec, run_dir = h.write_spec(tmp_path, "stall", steps=100_000,
                                 extra={"train": {"stall_timeout": 20, "log_every": 100_000}})  # fmt: skip
    cmd = harness_cmd("train", str(spec), "--set", f"launch.master_port={h.free_port()}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=h.checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    pids: set[int] = set()
    try:
        victim = None
        deadline = time.monotonic() + h.LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            beats = [_heartbeat(run_dir, r) for r in (0, 1)]
            pids |= {b["pid"] for b in beats if b}
            if all(b and b["step"] >= 5 for b in beats):
                victim = beats[1]
                break
            time.sleep(0.5)
        assert victim is not None, "the run never reached step 5"
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=300)
        print(f"SIGSTOP of rank 1 -> harness train exited after {time.monotonic() - stopped_at:.1f} s")
        text = out + err
        assert proc.returncode == EXIT_STALLED, f"exit {proc.returncode}\n{text[-6000:]}"
        assert f"stalled: rank 1 (host {victim['host']}, pid {victim['pid']}): no heartbeat" in text, text[
            -6000:
        ]
        status = h.read_status(run_dir)
        assert status["state"] == "stalled" and status["ranks"] == [1], status
        assert status["phase"] in ("data", "forward", "backward", "optimizer", "log", "sync"), status
        assert f"last seen in {status['phase']} at step" in text
        assert any("is stopped" in note for note in status["notes"]), status
        stacks = (run_dir / "launch" / "heartbeat" / "rank-0.stacks").read_text()
        assert "watchdog found the stall" in stacks and "File " in stacks, stacks[-3000:]
        report = json.loads((run_dir / "launch" / "heartbeat" / "stalled.json").read_text())
        assert [c["rank"] for c in report["culprits"]] == [1]
        time.sleep(2)
        assert not [p for p in pids if _alive(p)], f"rank processes left: {pids}"
    finally:
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_the_sbatch_script_requeues_a_stalled_run():
    from harness.launch.slurm import render_sbatch

    spec = h.example_spec("launch.launcher=slurm")
    script = render_sbatch(spec, run_dir="/runs/x", python="python3")
    stalled = script[script.index("  stalled)") : script.index("    ;;", script.index("  stalled)"))]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in stalled
    off = render_sbatch(h.example_spec("launch.launcher=slurm", "launch.slurm.requeue=false"),
                        run_dir="/runs/x", python="python3")  # fmt: skip
    stalled = off[off.index("  stalled)") : off.index("    ;;", off.index("  stalled)"))]
    assert "scontrol requeue" not in stalled and "exit 76" in stalled
