"""harness.rundir: the run directory's paths and the one atomic write (files and directories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_SPEC, example_spec

from harness import cli
from harness.compiler import prepare_run_dir
from harness.rundir import RunDir, atomic_path, read_status, write_atomic, write_status


def test_paths_of_a_run_directory():
    run = RunDir(Path("/runs/r"))
    assert (run.spec, run.ds_config, run.world) == (
        Path("/runs/r/spec.yaml"),
        Path("/runs/r/ds_config.json"),
        Path("/runs/r/world.json"),
    )
    assert (run.status, run.metrics, run.tb, run.hf, run.tokenizer, run.checkpoints) == tuple(
        Path("/runs/r", name)
        for name in ("status.json", "metrics.jsonl", "tb", "hf", "tokenizer", "checkpoints")
    )
    launch = Path("/runs/r/launch")
    assert run.launch_dir == launch
    assert (run.launcher_log, run.rank_log(0), run.rank_log(12)) == (
        launch / "launcher.log",
        launch / "rank-0.log",
        launch / "rank-12.log",
    )
    assert (run.hostfile, run.ds_env_file, run.env_file, run.sbatch_script, run.slurm_job_id) == tuple(
        launch / name for name in ("hostfile", "deepspeed_env", "rank_env.json", "job.sbatch", "slurm_job_id")
    )
    assert run.slurm_output("%j") == Path("/runs/r/slurm-%j.out")
    assert RunDir.of_checkpoint(run.checkpoints / "step-00000010") == run


def test_run_dir_of_a_spec_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir.of(example_spec("run.output_dir=out", "run.name=x"))
    assert run.root == tmp_path / "out" / "x" and run.root.is_absolute()


def test_rank_logs_by_rank(tmp_path):
    run = RunDir(tmp_path)
    assert run.rank_logs() == {}
    run.launch_dir.mkdir()
    for name in ("rank-10.log", "rank-2.log", "rank-0.log", "rank-x.log", "launcher.log"):
        (run.launch_dir / name).write_text("")
    assert list(run.rank_logs()) == [0, 2, 10]
    assert run.rank_logs()[2] == run.rank_log(2)


def test_prepare_writes_spec_config_world_and_launch_dir(tmp_path):
    spec = example_spec(f"run.output_dir={tmp_path}", "run.name=p")
    run, cfg, text = prepare_run_dir(spec, 2, dry_run=True)
    assert run == RunDir(tmp_path / "p") and not run.root.exists()
    run, cfg, text = prepare_run_dir(spec, 2)
    assert run.spec.read_text() == text and json.loads(run.ds_config.read_text()) == cfg
    assert json.loads(run.world.read_text()) == {"world_size": 2} and run.launch_dir.is_dir()
    assert not list(run.root.glob(".*.tmp"))


def test_status_round_trip(tmp_path):
    run = RunDir(tmp_path)
    assert read_status(run) is None
    write_status(run, "preempted", 7, reason="USR1")
    assert read_status(run) == {"state": "preempted", "step": 7, "reason": "USR1"}
    run.status.write_text("{half")
    assert read_status(run) is None


def test_write_atomic_text_and_bytes_replace_whole_files(tmp_path):
    path = tmp_path / "deep" / "er" / "f.json"
    write_atomic(path, "one\n")
    assert path.read_text() == "one\n"
    write_atomic(path, b"\x00two")
    assert path.read_bytes() == b"\x00two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_write_atomic_failure_leaves_no_temp_and_the_old_file(tmp_path):
    target = tmp_path / "a-directory"
    target.mkdir()
    with pytest.raises(OSError):
        write_atomic(target, "text")  # a file cannot replace a directory
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]


def test_atomic_path_failure_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_path_builds_and_replaces_a_directory(tmp_path):
    out = tmp_path / "hf"
    for weights in ("first", "second"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(weights)
    assert sorted(p.name for p in out.iterdir()) == ["weights"] and (out / "weights").read_text() == "second"
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("third")
        raise ValueError("export failed")
    assert (out / "weights").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_atomic_path_removes_a_killed_attempts_leftover(tmp_path):
    (tmp_path / ".tok.tmp").mkdir()
    (tmp_path / ".tok.tmp" / "stale").write_text("x")
    with atomic_path(tmp_path / "tok") as tmp:
        assert not tmp.exists()
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_config_output_error_names_the_flag_and_the_fix(tmp_path, capsys):
    target = tmp_path / "dir"
    target.mkdir()
    assert cli.main(["config", TINY_SPEC, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "pass a writable file path" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and not list(target.iterdir())
    assert cli.main(["config", TINY_SPEC, "-o", str(tmp_path / "ds.json")]) == 0
    assert json.loads((tmp_path / "ds.json").read_text())["train_batch_size"] > 0
