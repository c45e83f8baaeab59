"""harness.dsconfig (through harness.compiler.compile_config): every section of the DeepSpeed config,
compiled from the spec's words, never ``"auto"``."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ROOT
from helpers import sections_spec

from harness.compiler import compile_config


def compiled(world: int = 2, **sections: Any) -> dict[str, Any]:
    """The DeepSpeed config for a llama-tiny spec on ``world`` ranks."""
    return compile_config(sections_spec(**sections), world)


# --- the batch triple in the config


def test_config_holds_the_triple():
    cfg = compiled(world=8, batch={"global_batch_size": 64, "micro_batch_size": 2})
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4


# --- sections of the compiled config


def test_zero0_section_is_only_the_stage():
    assert compiled(parallel={"zero_stage": 0})["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_sections(stage):
    zero = compiled(parallel={"zero_stage": stage})["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is (stage == 2)
    assert zero["allgather_partitions"] is True and zero["reduce_scatter"] is True
    assert isinstance(zero["reduce_bucket_size"], int) and isinstance(zero["allgather_bucket_size"], int)
    assert not any(key.startswith("stage3_") for key in zero)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_zero3_section():
    zero = compiled(parallel={"zero_stage": 3})["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for key in (
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
    ):
        assert isinstance(zero[key], int) and zero[key] > 0
    assert "allgather_bucket_size" not in zero


def test_offload_sections():
    zero = compiled(parallel={"zero_stage": 2, "offload_optimizer": "cpu"})["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero
    zero = compiled(parallel={"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})[
        "zero_optimization"
    ]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    nvme = {"zero_stage": 3, "offload_optimizer": "nvme", "offload_params": "nvme", "nvme_path": "/nvme"}
    zero = compiled(parallel=nvme)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}


def test_fp16_knobs():
    cfg = compiled(
        precision={
            "dtype": "fp16",
            "initial_scale_power": 12,
            "loss_scale_window": 500,
            "hysteresis": 4,
            "min_loss_scale": 0.5,
            "loss_scale": 0,
        }
    )
    assert cfg["fp16"] == {
        "enabled": True,
        "loss_scale": 0.0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 4,
        "min_loss_scale": 0.5,
    }
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "fp16"


def test_bf16_and_fp32():
    cfg = compiled(precision="bf16")
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "bf16"
    cfg = compiled(precision="fp32")
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "fp32"


def test_optimizer_and_clipping():
    cfg = compiled(
        optimizer={"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05, "grad_clip": 0.5}
    )
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05},
    }
    assert cfg["gradient_clipping"] == 0.5
    assert compiled(optimizer={"name": "adam"})["optimizer"]["type"] == "Adam"
    cfg = compiled(optimizer={"impl": "torch"}, parallel={"zero_stage": 1})
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True


def test_scheduler_cosine():
    cfg = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 10, "decay": "cosine", "min_lr_ratio": 0.2},
                   train={"steps": 100})  # fmt: skip
    assert cfg["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": 100,
            "warmup_num_steps": 10,
            "warmup_min_ratio": 0.2,
            "cos_min_ratio": 0.2,
            "warmup_type": "linear",
        },
    }


def test_scheduler_cosine_without_warmup_is_valid_for_deepspeed():
    params = compiled(schedule={"warmup_steps": 0, "decay": "cosine"})["scheduler"]["params"]
    # DeepSpeed's WarmupCosineLR raises on warmup_num_steps=0; one step at ratio 1.0 is no warm-up.
    assert params["warmup_num_steps"] == 1 and params["warmup_min_ratio"] == 1.0


def test_scheduler_linear():
    cfg = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 5, "decay": "linear", "min_lr_ratio": 0.1},
                   train={"steps": 50})  # fmt: skip
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    params = cfg["scheduler"]["params"]
    assert params["warmup_max_lr"] == 1e-3 and params["warmup_min_lr"] == pytest.approx(1e-4)
    assert params["total_num_steps"] == 50 and params["warmup_num_steps"] == 5


def test_scheduler_constant():
    cfg = compiled(
        optimizer={"lr": 1e-3}, schedule={"warmup_steps": 5, "decay": "constant", "min_lr_ratio": 0.5}
    )
    assert cfg["scheduler"]["type"] == "WarmupLR"
    params = cfg["scheduler"]["params"]
    assert params["warmup_max_lr"] == 1e-3 and params["warmup_min_lr"] == pytest.approx(5e-4)
    assert "total_num_steps" not in params
    no_warmup = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 0, "decay": "constant"})
    assert no_warmup["scheduler"]["params"]["warmup_min_lr"] == 1e-3


def test_pipeline_section():
    cfg = compiled(world=4, parallel={"pipeline_stages": 2, "partition_method": "uniform",
                                      "activation_checkpoint_interval": 1})  # fmt: skip
    assert cfg["pipeline"]["stages"] == 2
    assert cfg["pipeline"]["partition"] == "uniform"
    assert cfg["pipeline"]["activation_checkpoint_interval"] == 1
    assert "activation_checkpointing" in cfg
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    )
    assert "pipeline" not in compiled(world=4)


def test_tensor_parallel_section():
    cfg = compiled(world=4, parallel={"tensor_parallel": 2})
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    )
    assert "tensor_parallel" not in compiled(world=4)


def test_gradient_checkpointing_section():
    assert "activation_checkpointing" in compiled(
        model={"preset": "llama-tiny", "gradient_checkpointing": True}
    )
    assert "activation_checkpointing" not in compiled()


def test_steps_per_print():
    assert compiled(train={"steps": 37})["steps_per_print"] == 37


def test_raw_keys_merge_deeply():
    cfg = compiled(parallel={"zero_stage": 2}, deepspeed={"zero_optimization": {"reduce_bucket_size": 1000},
                                                          "wall_clock_breakdown": True})  # fmt: skip
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    assert cfg["wall_clock_breakdown"] is True
    # A raw key the spec owns is accepted when it says the same as the spec.
    assert compiled(parallel={"zero_stage": 2}, deepspeed={"zero_optimization": {"stage": 2}})


def _walk(node: Any):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"parallel": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}},
        {"parallel": {"zero_stage": 1, "pipeline_stages": 2}, "precision": "fp16"},
        {"parallel": {"zero_stage": 2, "tensor_parallel": 2}, "precision": "fp32"},
        {"batch": {"global_batch_tokens": 4096, "grad_accum": 2}, "schedule": {"decay": "linear"}},
    ],
)
def test_never_auto(sections):
    assert "auto" not in [v for v in _walk(compiled(world=4, **sections)) if isinstance(v, str)]


def test_never_auto_in_shipped_configs():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert '"auto"' not in text, path.name
