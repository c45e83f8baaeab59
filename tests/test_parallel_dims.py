"""harness.parallel_dims: the one layout authority (data-parallel size, auto fields, global-batch
target, the rules of a layout for a model family)."""

from __future__ import annotations

import pytest

from harness.errors import SpecError
from harness.parallel_dims import (
    AUTO_FIELDS,
    ModelDims,
    ParallelDims,
    auto_fields,
    data_parallel_size,
    model_dims,
    target_global_batch,
)
from harness.presets import PRESETS
from harness.specload import spec_from_dict

LLAMA = ModelDims(model_type="llama", layers=4, heads=4, kv_heads=2)
GPT2 = ModelDims(model_type="gpt2", layers=4, heads=4, kv_heads=4)


def fields(problems: list[SpecError]) -> list[str]:
    return [p.field for p in problems]


def test_data_parallel_is_world_over_model_parallel():
    dims = ParallelDims(world_size=16, pipeline_stages=2, tensor_parallel=4)
    assert (dims.model_parallel, dims.data_parallel, dims.factors) == (8, 2, True)
    assert ParallelDims(world_size=3).data_parallel == 3


def test_a_world_that_does_not_factor_names_the_degrees_and_the_product():
    dims = ParallelDims(world_size=6, pipeline_stages=4)
    assert not dims.factors
    with pytest.raises(SpecError) as err:
        _ = dims.data_parallel
    assert "world_size=6, pipeline_stages=4, tensor_parallel=1" in err.value.message
    assert "multiple of pipeline_stages × tensor_parallel = 4" in err.value.message
    assert fields(dims.problems()) == ["parallel"]


@pytest.mark.parametrize(
    ("dims", "field", "words"),
    [
        (ParallelDims(world_size=4, pipeline_stages=2, zero_stage=2), "parallel.zero_stage", "pipeline engine"),
        (ParallelDims(world_size=4, pipeline_stages=2, zero_stage=3), "parallel.zero_stage", "ZeRO 2 or 3"),
        (ParallelDims(world_size=4, tensor_parallel=2, zero_stage=3), "parallel.zero_stage", "up to 2"),
        (ParallelDims(world_size=4, pipeline_stages=2, tensor_parallel=2, zero_stage=1), "parallel", "not both"),
        (ParallelDims(world_size=2, zero_stage=0, offload_optimizer="cpu"), "parallel.offload_optimizer", "needs ZeRO"),
        (ParallelDims(world_size=2, zero_stage=2, offload_params="cpu"), "parallel.offload_params", "ZeRO 3"),
        (ParallelDims(world_size=2, zero_stage=2, offload_optimizer="nvme"), "parallel.offload_optimizer", "NVMe"),
        (ParallelDims(world_size=2, offload_optimizer="cpu", optimizer_impl="torch"), "optimizer.impl", "torch"),
    ],
)  # fmt: skip
def test_each_layout_rule_is_one_problem_naming_field_and_fix(dims, field, words):
    problems = dims.problems(LLAMA)
    assert fields(problems) == [field]
    assert words in problems[0].message and "Fix:" in problems[0].message


def test_model_rules_need_the_model():
    dims = ParallelDims(world_size=8, pipeline_stages=8, zero_stage=1)
    assert dims.problems() == []
    assert "more pipeline stages than layers" in dims.problems(LLAMA)[0].message
    tp = ParallelDims(world_size=4, tensor_parallel=4, zero_stage=1)
    assert [p.message for p in tp.problems(LLAMA)] == [
        "parallel.tensor_parallel = 4: 2 kv-heads are not divisible by 4. "
        "Fix: use a degree that divides the model's 2 key-value heads"
    ]
    tp2 = ParallelDims(world_size=2, tensor_parallel=2, zero_stage=1)
    assert tp2.problems(LLAMA) == []
    assert "AutoTP does not support the gpt2 family" in tp2.problems(GPT2)[0].message


def test_auto_zero_stage_skips_the_rules_that_need_a_stage():
    dims = ParallelDims(world_size=2, zero_stage="auto", offload_optimizer="cpu", offload_params="cpu")
    assert dims.problems(LLAMA) == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_dims_of_every_preset(name):
    dims = model_dims(PRESETS[name])
    assert dims.layers >= 1 and dims.heads % dims.kv_heads == 0
    assert dims.model_type == PRESETS[name]["model_type"]


def spec(**batch):
    return spec_from_dict({"model": {"preset": "llama-tiny"}, "data": {"seq_len": 64}, "batch": batch})


def test_auto_fields_in_a_fixed_order():
    assert auto_fields(spec()) == []
    s = spec(micro_batch_size="auto", global_batch_size="auto")
    assert auto_fields(s) == ["batch.global_batch_size", "batch.micro_batch_size"]
    assert set(AUTO_FIELDS) >= set(auto_fields(s))


@pytest.mark.parametrize(
    ("batch", "dp", "target"),
    [
        ({}, 4, 4),  # micro 1 × accumulation 1 × dp: the batch solver's default
        ({"micro_batch_size": 3}, 2, 6),
        ({"micro_batch_size": 3, "grad_accum": 2}, 2, 12),
        ({"global_batch_size": 10}, 2, 10),
        ({"global_batch_tokens": 640}, 2, 10),
        ({"global_batch_size": "auto"}, 2, None),
        ({"global_batch_size": 8, "micro_batch_size": "auto"}, 2, 8),
        ({"micro_batch_size": 2, "grad_accum": "auto"}, 2, None),
    ],
)
def test_target_global_batch(batch, dp, target):
    assert target_global_batch(spec(**batch), dp) == target


def test_data_parallel_size_of_a_spec():
    s = spec_from_dict(
        {"model": {"preset": "llama-tiny"}, "parallel": {"pipeline_stages": 2, "zero_stage": 1}}
    )
    assert data_parallel_size(s, 8) == 4
    with pytest.raises(SpecError, match="world_size=3"):
        data_parallel_size(s, 3)
