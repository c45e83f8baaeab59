"""``harness plan`` and ``auto`` fields through the CLI (show/config), and the no-torch import rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main
from harness.specload import load_spec
from tests.conftest import EXAMPLES, ROOT

TINY = str(EXAMPLES / "tiny-cpu.yaml")
SEVENTY_B = [
    "model.preset=llama-70b",
    "launch.nodes=8",
    "launch.gpus_per_node=8",
    "launch.gpu=h100-80gb",
    "data.seq_len=4096",
    "batch.global_batch_size=1024",
    "batch.micro_batch_size=null",
    "batch.grad_accum=null",
    "precision.dtype=bf16",
]


def test_plan_70b_table_and_json(capsys):
    assert main(["plan", TINY, "--set", *SEVENTY_B]) == 0
    text = capsys.readouterr().out
    assert "Winner" in text and "slower" in text and "do not fit" in text
    assert main(["plan", TINY, "--json", "--top", "3", "--set", *SEVENTY_B]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["evaluated"] >= 300 and len(data["plans"]) == 3 and data["global_batch"] == 1024
    assert all(p["fits"] for p in data["plans"])
    assert all(not p["fits"] for p in data["fastest_rejected"])
    first = data["plans"][0]["memory_bytes"]
    assert first["total"] <= first["capacity"]


def test_plan_shipped_70b_example(capsys):
    example = EXAMPLES / "llama-70b-pipeline-slurm.yaml"
    if not example.is_file():
        pytest.skip("example not shipped yet")
    assert main(["plan", str(example), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]


def test_nothing_fits_is_a_user_error(capsys):
    code = main(
        ["plan", TINY, "--set", "model.preset=llama-70b", "launch.gpu=v100-16gb", "launch.gpus_per_node=1"]
    )
    assert code == 1
    assert "Nothing fits" in capsys.readouterr().out


def test_auto_fields_resolve_in_show_and_config(capsys):
    sets = ["parallel.zero_stage=auto", "batch.micro_batch_size=auto", "batch.global_batch_size=64"]
    assert main(["show", TINY, "--set", *sets]) == 0
    shown = capsys.readouterr().out
    for name in ("zero_stage", "micro_batch_size", "grad_accum", "global_batch_size"):
        assert f"{name}: auto" not in shown
    assert "global_batch_samples: 64" in shown
    assert main(["config", TINY, "--set", *sets]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["zero_optimization"]["stage"] in (0, 1, 2, 3)
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2 == 64


def test_auto_keeps_concrete_fields_and_resolves_global(capsys):
    from harness.planner.resolve import resolve_auto

    spec = load_spec(TINY, ["parallel.zero_stage=3", "batch.micro_batch_size=auto", "batch.grad_accum=2"])
    resolved = resolve_auto(spec, 2)
    assert resolved.parallel.zero_stage == 3 and resolved.batch.grad_accum == 2
    assert isinstance(resolved.batch.micro_batch_size, int)
    spec = load_spec(TINY, ["parallel.zero_stage=auto", "batch.global_batch_size=auto"])
    resolved = resolve_auto(spec, 2)
    assert resolved.batch.global_batch_size == 4 * 1 * 2  # the spec's micro 4 × accumulation 1 × dp 2
    assert resolved.parallel.zero_stage in (1, 2, 3)  # ZeRO 0's bf16 path is slow on CPU ranks


def test_auto_that_cannot_fit_names_the_field(capsys):
    sets = [
        "parallel.zero_stage=auto",
        "model.preset=llama-70b",
        "launch.gpu=v100-16gb",
        "launch.gpus_per_node=1",
    ]
    assert main(["show", TINY, "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert "parallel.zero_stage" in err and "Fix:" in err and "gradient_checkpointing" in err


def test_plan_imports_no_torch():
    """`harness plan` stays a login-node command: no torch, deepspeed or transformers imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "harness", "plan", TINY, "--set", *SEVENTY_B],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = [
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")
    ]
    assert "harness.planner.search" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "deepspeed", "transformers", "numpy")]
    assert heavy == []


def test_plan_reports_the_specs_own_layout(capsys):
    assert main(["plan", TINY]) == 0
    assert "The spec's own layout (z1 pp1 tp1 mb4x1)" in capsys.readouterr().out


def test_gpu_validation_script_dry_run(tmp_path):
    """bench/gpu_validate_planner.py stays runnable: its predictions print without a GPU."""
    out = tmp_path / "v.json"
    cmd = [sys.executable, "bench/gpu_validate_planner.py", "--dry-run", "--gpus", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) >= 5 and all(r["predicted"]["step_s"] > 0 for r in rows)
