"""Property: every spec the compiler accepts yields a config DeepSpeed accepts, with the batch triple holding.

Specs are generated over ZeRO stage, offloads, precision, pipeline and tensor degrees, world size and
two members of the batch triple (no raw deepspeed keys). A spec the compiler rejects must be rejected
with a SpecError, never another exception.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from harness.compiler import compile_config
from harness.dscheck import validate_config
from harness.errors import SpecError
from harness.parallel_dims import data_parallel_size
from harness.specload import spec_from_dict

BATCH_PAIRS = [
    ("global_batch_size", "micro_batch_size"),
    ("global_batch_size", "grad_accum"),
    ("micro_batch_size", "grad_accum"),
    ("global_batch_tokens", "micro_batch_size"),
    ("global_batch_tokens", "grad_accum"),
]


@st.composite
def specs(draw) -> tuple[dict[str, Any], int]:
    """A raw spec mapping (as YAML would give) and a world size."""
    seq_len = draw(st.sampled_from([64, 128, 256]))
    zero_stage = draw(st.sampled_from([0, 1, 2, 3]))
    pipeline_stages = draw(st.sampled_from([1, 1, 1, 2, 4]))
    tensor_parallel = draw(st.sampled_from([1, 1, 1, 2, 4] if pipeline_stages == 1 else [1] * 9 + [2]))
    if draw(st.integers(0, 4)):  # mostly a world the layout factors into, sometimes any
        world = pipeline_stages * tensor_parallel * draw(st.integers(1, 4))
    else:
        world = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
    first, second = draw(st.sampled_from(BATCH_PAIRS))
    batch = {second: draw(st.integers(1, 8))}
    if first == "micro_batch_size":
        batch[first] = draw(st.integers(1, 8))
    elif draw(st.booleans()):  # a global batch the triple can hold (a multiple of second × world) ...
        batch[first] = batch[second] * world * draw(st.integers(1, 4))
    else:  # ... or any, often not
        batch[first] = draw(st.integers(1, 64))
    if first == "global_batch_tokens":
        batch[first] *= seq_len
    steps = draw(st.integers(1, 200))
    # Offloads mostly where the stage allows them (about half the specs are accepted), sometimes not.
    rarely = ["none"] * 9 + ["cpu", "nvme"]
    optimizer_choices = {0: rarely, 3: ["none", "none", "cpu", "nvme"]}.get(
        zero_stage, ["none", "cpu"] * 2 + ["nvme"]
    )
    offload_optimizer = draw(st.sampled_from(optimizer_choices))
    offload_params = draw(st.sampled_from(["none", "none", "cpu", "nvme"] if zero_stage == 3 else rarely))
    data = {
        "model": {
            "preset": draw(st.sampled_from(["llama-tiny", "gpt2-tiny", "qwen2-tiny"])),
            "gradient_checkpointing": draw(st.booleans()),
        },
        "data": {"seq_len": seq_len},
        "batch": batch,
        "parallel": {
            "zero_stage": zero_stage,
            "offload_optimizer": offload_optimizer,
            "offload_params": offload_params,
            "nvme_path": draw(st.sampled_from([None, "/local_nvme", "/local_nvme"])),
            "pipeline_stages": pipeline_stages,
            "tensor_parallel": tensor_parallel,
            "partition_method": draw(st.sampled_from(["parameters", "uniform", "type:DecoderLayer"])),
            "activation_checkpoint_interval": draw(st.sampled_from([0, 1])) if pipeline_stages > 1 else 0,
        },
        "precision": {
            "dtype": draw(st.sampled_from(["bf16", "fp16", "fp32"])),
            "initial_scale_power": draw(st.integers(0, 32)),
            "loss_scale": draw(st.sampled_from([0.0, 128.0])),
        },
        "optimizer": {
            "name": draw(st.sampled_from(["adamw", "adam"])),
            "impl": draw(st.sampled_from(["deepspeed", "deepspeed", "deepspeed", "torch"])),
            "lr": draw(st.floats(1e-6, 1e-2)),
            "grad_clip": draw(st.sampled_from([0.0, 1.0])),
        },
        "schedule": {
            "warmup_steps": draw(st.integers(0, steps)),
            "decay": draw(st.sampled_from(["cosine", "linear", "constant"])),
            "min_lr_ratio": draw(st.floats(0.0, 1.0)),
        },
        "train": {"steps": steps},
    }
    return data, world


def _build_scheduler(cfg: dict[str, Any]) -> None:
    """Build the scheduler the way DeepSpeed's engine does (its constructor has checks of its own)."""
    import torch
    from deepspeed.runtime import lr_schedules

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = getattr(lr_schedules, cfg["scheduler"]["type"])(optimizer, **cfg["scheduler"]["params"])
    scheduler.step()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_accepted_specs_yield_configs_deepspeed_accepts(case):
    data, world = case
    try:
        spec = spec_from_dict(data)
        cfg = compile_config(spec, world)
    except SpecError:
        event("rejected by the compiler")
        return
    event("accepted")
    dp = data_parallel_size(spec, world)
    assert (
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * dp
        == cfg["train_batch_size"]
    )
    validate_config(cfg, dp, deep=True)  # DeepSpeed's own DeepSpeedConfig
    _build_scheduler(cfg)
