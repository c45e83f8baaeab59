"""Resume on a different world size through the real launcher (harness/train/reshard.py).

One uninterrupted reference run per case saves every 5 steps; a copy of its run directory keeps only the
step-5 checkpoint and is resumed on another number of ranks, then on the next one, 5 steps each. A resume
at the original size is bit-exact (tests/test_train_exact.py: fp32, torch AdamW, dropout off here), so
the reference's steps are what a run resumed from the same checkpoint at the original size computes; the
resharded run must match them within 1e-4 relative, and every rank's saved data position must equal
the global count of samples consumed. The pure parts are in tests/test_reshard_unit.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers as h
import pytest
import torch

from harness.train import reshard

SEGMENT_STEPS = 5
"""Steps after each change of world size that are compared (the issue's 'first 5 steps')."""
RESHARD_RTOL = 1e-4
"""Relative loss tolerance after a change: the gradient is summed in another order (measured ~1e-7)."""


def _copy_at_first_checkpoint(reference: Path, run_dir: Path) -> None:
    """``reference`` as it was at its first checkpoint: later tags and the metrics removed."""
    shutil.copytree(reference, run_dir)
    first = reshard.RunDir(run_dir).checkpoints / f"step-{SEGMENT_STEPS:08d}"
    for tag in (run_dir / "checkpoints").glob("step-*"):
        if tag != first:
            shutil.rmtree(tag)
    (run_dir / "metrics.jsonl").unlink()


def _rank_states(tag: Path) -> list[dict]:
    return [
        torch.load(p, weights_only=True)["client"]["sampler"]
        for p in sorted((tag / "harness").glob("rank-*.pt"))
    ]


@pytest.mark.dist
@pytest.mark.parametrize(
    "zero_stage, ranks",
    [
        pytest.param(1, (2, 1, 2), id="zero1-2to1to2", marks=pytest.mark.timeout(340)),
        pytest.param(3, (2, 1, 2, 4), id="zero3-2to1to2to4", marks=pytest.mark.timeout(800)),
        pytest.param(2, (2, 1, 2), id="zero2-2to1to2", marks=pytest.mark.timeout(340)),
        pytest.param(0, (1, 2), id="zero0-1to2", marks=pytest.mark.timeout(200)),
    ],
)  # timeouts: 3-4x the measured 85, 206, 85 (ZeRO 2 as ZeRO 1) and 49 s
def test_resume_on_another_world_size_continues_the_run(tmp_path, zero_stage, ranks, capsys):
    steps = SEGMENT_STEPS * len(ranks)
    extra = {
        "optimizer": {"impl": "torch"},
        "train": {"save_every": SEGMENT_STEPS},
        "checkpoint": {"keep_last": 10},
    }
    spec_path, ref_dir = h.write_spec(
        tmp_path, "ref", zero_stage=zero_stage, ranks=ranks[0], steps=steps, extra=extra
    )
    h.train_ok(spec_path, ref_dir, step=steps)
    want = h.step_losses(ref_dir)
    global_batch = 4 * ranks[0]

    run_dir = tmp_path / "runs" / "resharded"
    _copy_at_first_checkpoint(ref_dir, run_dir)
    worst = {}
    for n, (before, after) in enumerate(zip(ranks, ranks[1:], strict=False), start=1):
        start, end = SEGMENT_STEPS * n, SEGMENT_STEPS * (n + 1)
        proc = h.train(spec_path, "run.name=resharded", f"launch.gpus_per_node={after}", f"train.steps={end}")
        h.assert_complete(proc, run_dir, step=end)
        tag = run_dir / "checkpoints" / f"step-{start:08d}"
        assert f"same global batch of {global_batch}" in proc.stderr, h.output_of(proc)
        if zero_stage == 0:
            assert "not partitioned" in proc.stderr and not reshard.universal_dir(tag).exists()
        else:
            assert "converted it to DeepSpeed's universal format" in proc.stderr, h.output_of(proc)
            assert reshard.is_converted(tag)
        resumed = [r for r in h.read_metrics(run_dir) if r.get("event") == "resumed"]
        assert resumed[-1]["step"] == start and resumed[-1]["from"].endswith(tag.name)
        got = h.step_losses(run_dir)
        segment = range(start + 1, end + 1)
        h.assert_same_losses(got, want, segment, rtol=RESHARD_RTOL)
        worst[f"{before}->{after}"] = max(abs(got[s] - want[s]) / abs(want[s]) for s in segment)
        # Every rank of the new size saved the position of exactly `end` global steps of samples.
        states = _rank_states(run_dir / "checkpoints" / f"step-{end:08d}")
        assert len(states) == after
        for state in states:
            assert state["dp_size"] == after and state["epoch"] == 0
            assert reshard.consumed_samples(state) == end * global_batch
    with capsys.disabled():
        print(f"\n[reshard zero {zero_stage}] max relative loss difference per change: {json.dumps(worst)}")
