"""Property: every layout ``harness plan`` emits passes ``harness show`` with those values.

The planner filters candidates on :meth:`harness.parallel_dims.ParallelDims.problems`, the same list
``harness.validate`` raises, so a plan's ``set`` overrides (the spec fields that select the layout)
must compile for the spec they were planned for. Specs vary model family (GPT-2 has no AutoTP),
cluster shape, device, dtype, optimizer implementation (torch cannot offload) and the batch fields.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.compiler import compile_resolved
from harness.dscheck import validate_config
from harness.dsconfig import deep_merge
from harness.errors import SpecError
from harness.planner.cli import plan_spec
from harness.specload import apply_overrides, spec_from_dict

PRESETS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "gpt2-124m", "llama-160m", "llama-1b", "mistral-7b"]


@st.composite
def plannable_specs(draw) -> dict[str, Any]:
    """A raw spec mapping whose own layout is plain data parallel (the planner varies the rest)."""
    preset = draw(st.sampled_from(PRESETS))
    seq_len = draw(st.sampled_from([128, 512, 1024] if preset.startswith("gpt2") else [128, 512, 2048]))
    nodes = draw(st.sampled_from([1, 1, 2]))
    gpus = draw(st.sampled_from([1, 2, 4, 8]))
    world = nodes * gpus
    batch: dict[str, Any] = {}
    kind = draw(st.sampled_from(["global", "tokens", "micro", "none", "auto"]))
    if kind == "global":
        batch["global_batch_size"] = world * draw(st.integers(1, 16))
    elif kind == "tokens":
        batch["global_batch_tokens"] = world * seq_len * draw(st.integers(1, 8))
    elif kind == "micro":
        batch["micro_batch_size"] = draw(st.integers(1, 8))
        batch["grad_accum"] = draw(st.integers(1, 4))
    elif kind == "auto":
        batch = {"global_batch_size": "auto", "micro_batch_size": "auto", "grad_accum": "auto"}
    return {
        "model": {"preset": preset},
        "data": {"seq_len": seq_len},
        "batch": batch,
        "parallel": {"zero_stage": draw(st.sampled_from([0, 1, 2, 3, "auto"]))},
        "precision": draw(st.sampled_from(["bf16", "fp16", "fp32"])),
        "optimizer": {"impl": draw(st.sampled_from(["deepspeed", "torch"]))},
        "train": {"steps": 100},
        "launch": {
            "nodes": nodes,
            "gpus_per_node": gpus,
            "gpu": draw(st.sampled_from(["h100-80gb", "a100-40gb", "l40s-48gb", "v100-16gb"])),
        },
    }


def spec_with(data: dict[str, Any], overrides: dict[str, Any]):
    """The spec ``data`` with a plan's ``set`` overrides applied, as ``harness show --set`` would."""
    return spec_from_dict(apply_overrides(deep_merge({}, data), list(overrides.items())))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=plannable_specs())
def test_every_planned_layout_passes_show(data):
    spec = spec_from_dict(deep_merge({}, data))
    world = spec.world_size
    try:  # only specs that show accepts as written (e.g. seq_len within the model's positions)
        compile_resolved(spec, world)
    except SpecError:
        assume(False)
    result = plan_spec(spec, world)
    event(f"{len(result.plans) and 'some' or 'no'} plans")
    for cand in result.plans[:: max(1, len(result.plans) // 25)]:  # a spread of at most ~25 per spec
        overrides = cand.layout.spec_overrides(world)
        try:
            resolved, plan, cfg = compile_resolved(spec_with(data, overrides), world)
            validate_config(cfg, plan.data_parallel_size, deep=False)
        except SpecError as exc:
            pytest.fail(f"planned {cand.layout.short()} for {data} but show refuses it: {exc.message}")
        assert resolved.parallel.zero_stage == cand.layout.zero_stage
        assert (plan.micro_batch_size, plan.grad_accum) == (
            cand.layout.micro_batch_size,
            cand.layout.grad_accum,
        )


def test_gpt2_gets_no_tensor_parallel_plans_and_its_winner_shows(capsys):
    """The drift that motivated one authority: the planner proposed AutoTP for GPT-2, which the
    harness refuses. Through the CLI, as a user would: plan --json, then show --set with the winner."""
    assert main(["plan", "examples/gpt2-124m-1x8.yaml", "--json", "--top", "1000"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert len(plans) > 50
    assert {p["layout"]["tensor_parallel"] for p in plans} == {1}
    winner = plans[0]["set"]
    pairs = [f"{k}={'null' if v is None else json.dumps(v)}" for k, v in winner.items()]
    assert main(["show", "examples/gpt2-124m-1x8.yaml", "--set", *pairs]) == 0
    out = capsys.readouterr().out
    assert f"micro_batch_size: {winner['batch.micro_batch_size']}" in out


def test_llama_still_gets_tensor_parallel_plans(capsys):
    assert main(["plan", "examples/gpt2-124m-1x8.yaml", "--json", "--top", "1000",
                 "--set", "model.preset=llama-160m"]) == 0  # fmt: skip
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert max(p["layout"]["tensor_parallel"] for p in plans) > 1
