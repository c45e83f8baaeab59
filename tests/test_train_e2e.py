"""End to end through ``harness train`` and the real deepspeed launcher: 2 CPU ranks, tiny models.

ZeRO 0-3 x {tiny Llama, tiny GPT-2} x {bf16, fp32}: every combination is a real run of its own (8 steps,
constant lr 3e-3, logged every step) whose loss must fall, and whose automatic HF export must hold the
fp32 master weights. A launch costs 20-25 s on a quiet 2-core box, so by default only the combinations
no other test trains run: every stage in bf16 and each (stage, model) pair once, counting the fp32 runs
of the exactness and export tests (ZeRO 1 Llama: gradient averaging; ZeRO 2 GPT-2: resume and export;
ZeRO 3 Llama: export), which check their loss falls too. All 16 run with ``HARNESS_FULL_MATRIX=1``.

ZeRO-3 partitioning at init is checked in test_train_export.py (its ZeRO-3 worker launch records it).
"""

from __future__ import annotations

import json

import helpers as h
import pytest
import torch

# (stage, model, dtype) that run by default (see the module docstring); the rest with HARNESS_FULL_MATRIX=1.
DEFAULT_SET = {
    (0, "llama", "bf16"),
    (0, "gpt2", "fp32"),
    (1, "gpt2", "bf16"),
    (2, "llama", "bf16"),
    (3, "gpt2", "bf16"),
}
SHARED = (1, "gpt2", "bf16")
"""The matrix run the metrics test reads too."""
LAUNCH_S = 100
"""Timeout per launch: about 25 s on a quiet 2-core box, 4x for a loaded CI box."""


def _matrix():
    for stage in (0, 1, 2, 3):
        for model in ("llama", "gpt2"):
            for dtype in ("bf16", "fp32"):
                marks = [pytest.mark.dist, pytest.mark.timeout(LAUNCH_S * 2)]
                if (stage, model, dtype) not in DEFAULT_SET:
                    marks.append(pytest.mark.skipif(not h.FULL_MATRIX, reason=h.FULL_MATRIX_REASON))
                yield pytest.param(stage, model, dtype, id=f"zero{stage}-{model}-{dtype}", marks=marks)


def _train_tiny(tmp_path, stage: int, model: str, dtype: str):
    name = f"zero{stage}-{model}-{dtype}"
    spec, run_dir = h.write_spec(
        tmp_path, name, model=model, zero_stage=stage, dtype=dtype, steps=8,
        extra={"checkpoint": {"export_hf": True}},
    )  # fmt: skip
    h.train_ok(spec, run_dir, step=8)
    return run_dir


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One run shared by the matrix and the metrics test."""
    return _train_tiny(tmp_path_factory.mktemp("shared"), *SHARED)


@pytest.mark.parametrize(("stage", "model", "dtype"), _matrix())
def test_zero_stage_trains_with_falling_loss(request, tmp_path, stage, model, dtype):
    if (stage, model, dtype) == SHARED:
        run_dir = request.getfixturevalue("shared_run")
    else:
        run_dir = _train_tiny(tmp_path, stage, model, dtype)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    assert ds_config["bf16"]["enabled"] is (dtype == "bf16")
    losses = h.step_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)), losses
    first, last_two = losses[1], (losses[7] + losses[8]) / 2
    assert last_two < first - 0.1, f"loss did not fall: {losses}"
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert done == ["step-00000008"]

    # The automatic HF export at the end holds the fp32 master weights from every stage, also in bf16
    # runs (not the bf16 copies the forward pass used: those would all be bf16-representable).
    from safetensors.torch import load_file

    exported = [r for r in h.read_metrics(run_dir) if r.get("event") == "exported"]
    assert len(exported) == 1 and exported[0]["step"] == 8
    weights = load_file(run_dir / "hf" / "model.safetensors")
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    total = sum(t.numel() for t in weights.values())
    in_bf16 = sum(int((t == t.bfloat16().float()).sum()) for t in weights.values())
    assert in_bf16 / total < 0.5, f"{in_bf16}/{total} exported weights are bf16 values: not the fp32 masters"


@pytest.mark.dist
@pytest.mark.timeout(LAUNCH_S * 2)
def test_metrics_records_and_tensorboard(shared_run):
    run_dir = shared_run
    records = h.read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert set(r) == {
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tflops_per_rank",
            "mfu",
            "mem_gb",
        }, r
        assert r["tokens_per_s"] > 0
        assert r["tflops_per_rank"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU: "n/a"
        assert r["mem_gb"] > 0
        assert r["lr"] == pytest.approx(3e-3)
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 8
    assert evals[0]["val_ppl"] == pytest.approx(2.718281828 ** evals[0]["val_loss"], rel=1e-6)
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_dry_run_prints_the_launch_and_starts_nothing(tmp_path):
    spec, run_dir = h.write_spec(tmp_path, "dry")
    port = h.free_port()
    proc = h.run_harness("train", str(spec), "--dry-run", "--set", f"launch.master_port={port}", cwd=tmp_path)
    assert proc.returncode == 0, h.output_of(proc)
    command = proc.stdout.strip().splitlines()[-1]
    assert "-m deepspeed.launcher.runner --num_gpus 2" in command
    assert f"--master_port {port}" in command
    assert command.endswith(f"--module harness.train.entry --run-dir {run_dir}")
    assert not run_dir.exists()  # no spec.yaml, no ds_config.json, no status, no ranks
    assert "launch of" not in proc.stderr


def test_dry_run_of_the_shipped_example_writes_nothing(tmp_path):
    proc = h.run_harness(
        "train", str(h.ROOT / "examples" / "tiny-cpu.yaml"), "--dry-run",
        "--set", f"run.output_dir={tmp_path}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, h.output_of(proc)
    assert "--module harness.train.entry --run-dir" in proc.stdout
    assert list(tmp_path.iterdir()) == []
