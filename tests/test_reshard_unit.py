"""harness/train/reshard.py without a launch: layouts, the batch re-solve, refusals and their words, the
data position re-derived for a new data-parallel size, and the pre-launch plan on stand-in run directories.

The launches (a checkpoint converted and resumed on another world size) are in tests/test_reshard.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import numpy as np
import pytest
import torch
import yaml

from harness.data.sampler import BlockSampler, global_step_indices
from harness.errors import SpecError
from harness.specload import load_spec
from harness.train import reshard
from harness.train.reshard import Layout, check_reshard, rederive_sampler_state, resolve_batch


def layout(world=2, dp=None, pp=1, tp=1, zero=1, micro=4, accum=1) -> Layout:
    return Layout(world_size=world, data_parallel=dp or world // (pp * tp), pipeline_stages=pp,
                  tensor_parallel=tp, zero_stage=zero, micro_batch_size=micro, grad_accum=accum)  # fmt: skip


# --- layouts and the batch ---------------------------------------------------------------------------


def test_layout_reads_the_markers_layout_record():
    record = {"world_size": 4, "data_parallel_size": 2, "pipeline_stages": 2, "tensor_parallel": 1,
              "zero_stage": 1, "micro_batch_size": 2, "grad_accum": 3, "global_batch_size": 12}  # fmt: skip
    got = reshard.layout_from_mapping(record)
    assert got == layout(world=4, pp=2, micro=2, accum=3)
    assert got.global_batch_size == 12
    assert got.describe() == "4 ranks (data-parallel 2, pipeline 2), ZeRO 1, micro 2 × accumulation 3"
    assert reshard.layout_from_mapping({**record, "data_parallel_size": None}) is None


@pytest.mark.parametrize(
    "global_batch, dp, micro_wanted, expect",
    [(8, 1, 4, (4, 2)), (8, 2, 4, (4, 1)), (8, 4, 4, (2, 1)), (12, 2, 4, (3, 2)), (8, 8, 4, (1, 1))],
)
def test_batch_is_resolved_for_the_new_size_without_a_larger_micro_batch(
    global_batch, dp, micro_wanted, expect
):
    micro, accum = resolve_batch(global_batch, dp, micro_wanted)
    assert (micro, accum) == expect
    assert micro * accum * dp == global_batch and micro <= micro_wanted


def test_batch_that_the_ranks_cannot_share_is_refused_with_the_nearest_sizes():
    with pytest.raises(ValueError):
        resolve_batch(8, 3, 4)
    assert reshard.valid_data_parallel_sizes(8, 3) == [2, 4]
    with pytest.raises(SpecError) as err:
        check_reshard(layout(world=2), layout(world=3), tag="step-00000005")
    text = str(err.value)
    assert "the global batch of 8 samples cannot be split over 3 data-parallel ranks" in text
    assert "nearest: 2 or 4 ranks" in text


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 4)])
def test_a_data_parallel_change_keeps_the_global_batch(old, new):
    before = layout(world=old, micro=8 // old if old > 1 else 4, accum=1 if old > 1 else 2)
    micro, accum = check_reshard(before, layout(world=new, micro=4), tag="t")
    assert micro * accum * new == before.global_batch_size == 8


# --- refusals ---------------------------------------------------------------------------------------


def test_pipeline_or_tensor_parallel_changes_are_refused_with_the_options():
    with pytest.raises(SpecError) as err:
        check_reshard(layout(world=2), layout(world=2, pp=2, zero=1), tag="runs/x/checkpoints/step-00000005")
    text = str(err.value)
    assert text.startswith("checkpoint.resume = 'runs/x/checkpoints/step-00000005'")
    assert "written with pipeline_stages 1 × tensor_parallel 1 and this launch has 2 × 1" in text
    assert "converts checkpoints to a new data-parallel size only" in text
    assert "set parallel.pipeline_stages: 1 and parallel.tensor_parallel: 1" in text
    assert "checkpoint.resume: never" in text
    with pytest.raises(SpecError, match="tensor_parallel 2 and this launch has 1 × 1"):
        check_reshard(layout(world=2, tp=2), layout(world=2), tag="t")


def test_data_parallel_changes_under_pipeline_stages_are_refused():
    with pytest.raises(SpecError) as err:
        check_reshard(layout(world=4, pp=2), layout(world=2, pp=2), tag="t")
    assert "data-parallel size changes (2 → 1) in a run with pipeline stages or tensor parallelism" in str(
        err.value
    )
    assert "resume on 4 ranks as the checkpoint was written" in str(err.value)


def test_zero_stage_and_global_batch_changes_are_refused():
    with pytest.raises(SpecError, match="written with ZeRO 1 and this launch has ZeRO 3.*zero_stage: 1"):
        check_reshard(layout(world=2), layout(world=1, zero=3), tag="t")
    with pytest.raises(SpecError) as err:
        check_reshard(layout(world=2), layout(world=1), tag="t", explicit_global=16)
    assert str(err.value).startswith("batch.global_batch_size = 16")
    assert "set batch.global_batch_size: 8" in str(err.value)


# --- the data position ------------------------------------------------------------------------------


def _sampler(blocks, dp_rank, dp, micro, accum) -> BlockSampler:
    return BlockSampler(
        blocks, micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp, grad_accum_steps=accum, seed=3
    )


def _one_step(samplers) -> np.ndarray:
    """The block indices all ranks read in their next optimizer step, sorted."""
    return np.sort(np.concatenate([s.next_indices() for s in samplers for _ in range(s.grad_accum_steps)]))


@pytest.mark.parametrize(
    "old, new, steps",
    [
        ((2, 4, 1), (1, 4, 2), 5),
        ((1, 4, 2), (2, 4, 1), 5),
        ((2, 4, 1), (4, 2, 1), 7),
        ((4, 1, 2), (2, 2, 2), 12),
    ],
)
def test_position_is_rederived_from_consumed_samples(old, new, steps):
    """(dp, micro, accum) → another split of the same global batch of 8, at and across an epoch's end
    (100 blocks: 12 steps an epoch). The next step reads exactly the global order's next batch."""
    blocks = np.arange(100 * 2).reshape(100, 2)
    dp, micro, accum = old
    before = [_sampler(blocks, r, dp, micro, accum) for r in range(dp)]
    for _ in range(steps):
        _one_step(before)
    state = before[0].state_dict()
    assert reshard.consumed_samples(state) == (steps % 12 or 12) * 8
    dp2, micro2, accum2 = new
    after = []
    for r in range(dp2):
        s = _sampler(blocks, r, dp2, micro2, accum2)
        s.load_state_dict(
            rederive_sampler_state(state, micro_batch_size=micro2, grad_accum=accum2, dp_size=dp2)
        )
        after.append(s)
    epoch, step = divmod(steps, 12)
    for k in range(3):  # the next three steps, same samples as the unchanged split would read
        want = np.sort(global_step_indices(100, seed=3, epoch=epoch + (step + k) // 12, step=(step + k) % 12,
                                           global_batch_size=8))  # fmt: skip
        assert np.array_equal(_one_step(after), want)
        assert np.array_equal(_one_step(before), want)


def test_position_refuses_another_global_batch_or_a_partial_step():
    state = {"epoch": 0, "position": 3, "seed": 0, "num_blocks": 100, "micro_batch_size": 4, "dp_size": 2,
             "grad_accum_steps": 1}  # fmt: skip
    with pytest.raises(ValueError, match="global batch changes from 8 to 4"):
        rederive_sampler_state(state, micro_batch_size=4, grad_accum=1, dp_size=1)
    with pytest.raises(ValueError, match="not a whole number of steps"):
        rederive_sampler_state({**state, "grad_accum_steps": 2}, micro_batch_size=4, grad_accum=4, dp_size=1)


# --- before launch, on stand-in run directories -----------------------------------------------------


def _run_with_tag(tmp_path: Path, *, partitioned: bool, world=2, zero=1) -> tuple[Path, Path]:
    """A run directory whose newest tag was written by ``world`` ranks (marker with a layout record)."""
    spec_path, run_dir = h.write_spec(tmp_path, "rs", zero_stage=zero, ranks=world)
    tag = run_dir / "checkpoints" / "step-00000005"
    (tag / "harness").mkdir(parents=True)
    record = {"world_size": world, "data_parallel_size": world, "pipeline_stages": 1, "tensor_parallel": 1,
              "zero_stage": zero, "micro_batch_size": 4, "grad_accum": 1}  # fmt: skip
    (tag / "COMPLETE").write_text(
        json.dumps({"step": 5, "tag": tag.name, "world_size": world, "layout": record})
    )
    if partitioned:
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    for name, text in (("spec.yaml", "sentinel spec\n"), ("world.json", "sentinel world\n"),
                       ("status.json", '{"state": "preempted", "step": 5}\n')):  # fmt: skip
        (run_dir / name).write_text(text)
    return spec_path, run_dir


def test_plan_resume_leaves_a_fresh_run_or_the_same_layout_alone(tmp_path):
    spec_path, run_dir = h.write_spec(tmp_path, "fresh")
    spec = load_spec(spec_path)
    assert reshard.plan_resume(spec, 2) is spec  # no checkpoint at all
    spec_path, run_dir = _run_with_tag(tmp_path / "same", partitioned=True)
    spec = load_spec(spec_path)
    assert reshard.plan_resume(spec, 2) is spec


def test_plan_resume_dry_run_resolves_the_batch_and_asks_for_a_universal_load(tmp_path):
    spec_path, run_dir = _run_with_tag(tmp_path, partitioned=True)
    said: list[str] = []
    out = reshard.plan_resume(load_spec(spec_path), 1, dry_run=True, say=said.append)
    assert (out.batch.micro_batch_size, out.batch.grad_accum) == (4, 2)
    assert out.deepspeed == {"checkpoint": {"load_universal": True}}
    assert "resuming on 1 rank with the same global batch of 8: micro 4 × accumulation 2" in said[0]
    assert said[-1].startswith("would convert it")
    assert not (run_dir / "checkpoints" / "step-00000005" / "universal").exists()


def test_plan_resume_of_unpartitioned_states_needs_no_conversion(tmp_path):
    spec_path, _ = _run_with_tag(tmp_path, partitioned=False, zero=0)
    out = reshard.plan_resume(load_spec(spec_path), 1, say=lambda _: None)
    assert out.deepspeed == {} and (out.batch.micro_batch_size, out.batch.grad_accum) == (4, 2)


def test_a_tag_to_convert_is_checksummed_first_and_a_corrupt_one_set_aside(tmp_path):
    """Before a reshard the CLI checks the tag's checksums (the ranks would otherwise fall back from the
    planned tag to an older one after it was planned on); a corrupt newest tag gives way to the previous."""
    from harness.train import integrity

    spec_path, run_dir = h.write_spec(tmp_path, "rs", zero_stage=0, ranks=2)
    record = {"world_size": 2, "data_parallel_size": 2, "pipeline_stages": 1, "tensor_parallel": 1,
              "zero_stage": 0, "micro_batch_size": 4, "grad_accum": 1}  # fmt: skip
    algorithm = integrity.checksum_algorithm()
    for step in (3, 5):
        tag = run_dir / "checkpoints" / integrity.tag_for(step)
        (tag / "harness").mkdir(parents=True)
        weights = tag / "mp_rank_00_model_states.pt"
        weights.write_bytes(bytes(range(256)) * 4)
        files = integrity.file_records(tag, [weights], 0, algorithm)
        marker = integrity.build_marker(step, 2, record, files, algorithm)
        (tag / "COMPLETE").write_text(json.dumps(marker))
    newest = run_dir / "checkpoints" / integrity.tag_for(5) / "mp_rank_00_model_states.pt"
    newest.write_bytes(bytes(reversed(range(256))) * 4)  # same size, other bytes
    said: list[str] = []
    out = reshard.plan_resume(load_spec(spec_path), 1, say=said.append)
    assert (out.batch.micro_batch_size, out.batch.grad_accum) == (4, 2)
    assert any("step-00000005 failed verification" in line for line in said), said
    assert "checkpoint step-00000003 was written by" in " ".join(said), said
    assert [c.step for c in integrity.complete_checkpoints(run_dir)] == [3]


def test_refused_resume_exits_2_before_launch_and_writes_nothing(tmp_path):
    spec_path, run_dir = _run_with_tag(tmp_path, partitioned=True)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    proc = h.run_harness("train", str(spec_path), "--set", "launch.gpus_per_node=3", cwd=tmp_path)
    assert proc.returncode == 2, h.output_of(proc)
    assert (
        "cannot be split over 3 data-parallel ranks" in proc.stderr and "nearest: 2 or 4 ranks" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and "launch of" not in proc.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_failed_conversion_leaves_no_universal_copy(tmp_path):
    tag = tmp_path / "checkpoints" / "step-00000005"
    tag.mkdir(parents=True)
    torch.save({"not": "a deepspeed checkpoint"}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(SpecError, match="ds_to_universal could not convert it"):
        reshard.convert_to_universal(tag)
    assert sorted(p.name for p in tag.iterdir()) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_the_resolved_spec_with_universal_keys_compiles(tmp_path):
    """spec.yaml carries the DeepSpeed key of that launch; DeepSpeed's own config parser reads it."""
    from harness.compiler import compile_resolved
    from harness.dscheck import validate_config

    spec_path, _ = _run_with_tag(tmp_path, partitioned=True)
    out = reshard.plan_resume(load_spec(spec_path), 1, dry_run=True, say=lambda _: None)
    resolved, plan, cfg = compile_resolved(out, 1)
    assert cfg["checkpoint"] == {"load_universal": True} and cfg["gradient_accumulation_steps"] == 2
    validate_config(cfg, plan.data_parallel_size, deep=True)
    assert yaml.safe_load(json.dumps(cfg))["train_batch_size"] == 8
