"""harness.launch.cli: `harness train` (--dry-run and the verdict of a run) and `harness slurm`.

The dry runs go through `python -m harness`; the verdicts run the CLI in-process with a fake launcher
(tests/workers/fake_launcher.py) in place of the deepspeed runner.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import SECRET, TINY_SPEC, WORKERS, run_harness

from harness import cli
from harness.launch import cli as launch_cli
from harness.launch.commands import Launch
from harness.launch.shell import quote

pytestmark = pytest.mark.usefixtures("no_pwned")


def test_dry_run_prints_every_launcher_and_writes_nothing(tmp_path, hostfile):
    env = {**os.environ, "HF_TOKEN": SECRET}
    base = [
        "train",
        TINY_SPEC,
        "--dry-run",
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
        "launch.env=[HF_TOKEN]",
    ]
    multi = [
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        "launch.master_addr=h1",
    ]
    for launcher, more, expect in (
        ("local", [], "deepspeed.launcher.runner --num_gpus 2"),
        ("pdsh", multi, "--launcher pdsh --master_addr h1"),
        ("openmpi", multi, "mpirun -n 2 --hostfile"),
        ("slurm", ["launch.slurm.partition=debug"], "#SBATCH --partition=debug"),
    ):
        out = run_harness(*base, f"launch.launcher={launcher}", *more, env=env)
        assert out.returncode == 0, out.stderr
        assert expect in out.stdout and SECRET not in out.stdout + out.stderr
        assert "hf_SECRET" not in out.stdout + out.stderr
    assert "rank_env.json (mode 0600" in run_harness(*base, "launch.launcher=pdsh", *multi, env=env).stdout
    assert not (tmp_path / "runs").exists()


def test_cli_user_errors_exit_2_with_the_line_number(tmp_path):
    bad = tmp_path / "hf"
    bad.write_text("node1 slots=1\nnode$(touch PWNED) slots=1\n")
    out = run_harness("train", TINY_SPEC, "--dry-run", "--set", "launch.launcher=pdsh", f"launch.hostfile={bad}",
                  "launch.nodes=2", "launch.gpus_per_node=1", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and f"{bad} line 2" in out.stderr and "Traceback" not in out.stderr
    out = run_harness("train", TINY_SPEC, "--dry-run", "--set", "launch.launcher=pdsh", f"launch.hostfile={bad}x",
                  "launch.nodes=2", "launch.gpus_per_node=1", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "cannot read it" in out.stderr


def test_cli_injection_in_run_name_and_output_dir(tmp_path, hostfile):
    value = "run $(touch PWNED) `id`; 'q'"
    multi = [
        "launch.launcher=pdsh",
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
    ]
    # run.name: refused by the spec for every launcher (it names a directory and a Slurm job)
    for more in ([], multi, ["launch.launcher=slurm"]):
        out = run_harness(
            "train", TINY_SPEC, "--dry-run", "--set", f"run.name={json.dumps(value)}", *more, cwd=tmp_path
        )
        assert out.returncode == 2 and "run.name" in out.stderr and "Traceback" not in out.stderr
    # run.output_dir: byte for byte where the harness quotes it, refused where DeepSpeed's PDSH runner would not
    out_dir = tmp_path / value
    common = ["--dry-run", "--set", f"run.output_dir={json.dumps(str(out_dir))}"]
    out = run_harness("train", TINY_SPEC, *common, cwd=tmp_path)
    assert out.returncode == 0 and quote("x", f"{out_dir}/tiny-cpu") in out.stdout
    out = run_harness("train", TINY_SPEC, *common, "launch.launcher=slurm", cwd=tmp_path)
    assert out.returncode == 0 and f"run_dir={quote('x', f'{out_dir}/tiny-cpu')}" in out.stdout
    out = run_harness("train", TINY_SPEC, *common, *multi, cwd=tmp_path)
    assert out.returncode == 2 and "run.output_dir / run.name" in out.stderr
    assert not out_dir.exists()
    out = run_harness(
        "train", TINY_SPEC, "--set", f"run.output_dir={json.dumps('a' + chr(10) + 'b')}", cwd=tmp_path
    )
    assert out.returncode == 2 and "control character" in out.stderr


def test_harness_slurm_writes_the_script_into_the_run_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_HERE"}
    out = run_harness("slurm", TINY_SPEC, "--set", f"run.output_dir={tmp_path}", "run.name=s", "launch.env=[NOT_SET_HERE]",
                  env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "NOT_SET_HERE, not set in this shell" in out.stderr
    script = tmp_path / "s" / "launch" / "job.sbatch"
    assert f"wrote {script}" in out.stdout and (tmp_path / "s" / "spec.yaml").is_file()
    assert f"run_dir={tmp_path}/s" in script.read_text()
    assert "launcher: slurm" in (tmp_path / "s" / "spec.yaml").read_text()


# ``harness train``'s verdict, with a fake launcher in place of the deepspeed runner.


@pytest.fixture
def fake_train(tmp_path, monkeypatch, hostfile):
    def run(mode: str, stale: str | None = None):
        spec_args = ["--set", f"run.output_dir={tmp_path}", "run.name=f", "launch.launcher=pdsh",
                     f"launch.hostfile={hostfile}", "launch.nodes=2", "launch.gpus_per_node=1",
                     "launch.env=[HF_TOKEN]"]  # fmt: skip
        run_dir = tmp_path / "f"
        record = tmp_path / f"record-{mode}.json"
        real_plan = launch_cli.plan_launch

        def plan(spec, environ=None):
            launch, rd = real_plan(spec, environ)
            cmd = [sys.executable, str(WORKERS / "fake_launcher.py"), mode, rd, str(record)]
            return Launch(**{**launch.__dict__, "cmd": cmd}), rd

        monkeypatch.setattr(launch_cli, "plan_launch", plan)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        if stale:
            run_dir.mkdir(exist_ok=True)
            (run_dir / "status.json").write_text(json.dumps({"state": stale, "step": 9}))
        rc = cli.main(["train", TINY_SPEC, *spec_args])
        return rc, run_dir, json.loads(record.read_text()) if record.exists() else None

    return run


def test_train_verdicts(fake_train, capfd):
    rc, run_dir, seen = fake_train("complete")
    assert rc == 0
    assert seen["env_file_mode"] == "0o600" and seen["env_file_values"]["HF_TOKEN"] == SECRET
    assert not seen["own_env_has_secret"]
    assert not Path(seen["env_file"]).exists(), "the env file outlived the run"
    assert fake_train("preempted")[0] == launch_cli.EXIT_PREEMPTED
    assert fake_train("crash")[0] == 7
    assert fake_train("killed")[0] == 128 + 9
    rc, run_dir, seen = fake_train("silent", stale="complete")
    assert rc == 1 and not Path(seen["env_file"]).exists()
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err and "rank 0 recorded no status" in captured.err
    assert not any(SECRET in p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
