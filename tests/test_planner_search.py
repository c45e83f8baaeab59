"""harness.planner.search: only fitting plans are emitted, ranked by speed, meeting the batch and the layout rules."""

from __future__ import annotations

from helpers import planner_context as _ctx
from hypothesis import given, settings
from hypothesis import strategies as hs

from harness.planner.devices import DEVICES
from harness.planner.memory import estimate_memory
from harness.planner.search import SearchSpace, search


def test_rejected_plans_are_never_emitted():
    ctx = _ctx("llama-70b", gpus=8, gpu="a100-40gb", seq=4096)
    result = search(ctx, SearchSpace(global_batch=64))
    assert result.rejected, "a 70B model must not fit everywhere on 8 A100-40GB"
    for cand in result.plans:
        again = estimate_memory(ctx, cand.layout)
        assert cand.fits and again.total <= again.capacity and again.host <= again.host_capacity


@settings(max_examples=40, deadline=None)
@given(
    preset=hs.sampled_from(["llama-1b", "llama-7b", "llama-13b", "gpt2-1.5b", "qwen2-7b", "mistral-7b"]),
    gpu=hs.sampled_from(sorted(d for d in DEVICES if d != "cpu")),
    nodes=hs.sampled_from([1, 2, 4]),
    gpus=hs.sampled_from([1, 2, 4, 8]),
    seq=hs.sampled_from([512, 2048, 8192]),
    batch=hs.sampled_from([None, 32, 256]),
)
def test_every_emitted_plan_fits(preset, gpu, nodes, gpus, seq, batch):
    ctx = _ctx(preset, nodes=nodes, gpus=gpus, gpu=gpu, seq=seq)
    result = search(ctx, SearchSpace(global_batch=batch))
    assert all(
        c.memory.total <= c.memory.capacity and c.memory.host <= c.memory.host_capacity for c in result.plans
    )
    assert not any(c.fits for c in result.rejected)
    speeds = [c.speed.tokens_per_s for c in result.plans]
    assert all(a >= b * 0.995 for a, b in zip(speeds, speeds[1:], strict=False))
    if batch is not None:
        for c in result.plans:
            lay = c.layout
            assert lay.micro_batch_size * lay.grad_accum * lay.data_parallel(nodes * gpus) == batch


def test_layout_rules_match_the_validator():
    ctx = _ctx("llama-7b", nodes=2)
    for lay in (c.layout for c in search(ctx, SearchSpace(global_batch=64)).plans + []):
        assert not (lay.pipeline_stages > 1 and lay.zero_stage > 1)
        assert not (lay.tensor_parallel > 1 and (lay.zero_stage == 3 or lay.pipeline_stages > 1))
