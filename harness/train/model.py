"""Build the spec's Hugging Face model: a preset, a local checkpoint, or a hub name.

Under ZeRO 3 DeepSpeed's HF integration config is registered before construction, so
``from_config`` / ``from_pretrained`` partition parameters at init (each rank holds ~1/world).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from harness.errors import SpecError
from harness.presets import preset_config
from harness.spec import ModelSection


def hf_config(model: ModelSection, vocab_size: int | None = None):
    """The transformers config object of the spec's model (no weights, no download for presets)."""
    from transformers import AutoConfig

    if model.preset:
        kwargs = preset_config(model.preset, model.overrides)
        model_type = kwargs.pop("model_type")
        if vocab_size is not None and vocab_size > kwargs["vocab_size"]:
            kwargs["vocab_size"] = vocab_size
        cfg = AutoConfig.for_model(model_type, **kwargs)
    else:
        try:
            cfg = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise SpecError(
                "model.name_or_path",
                model.name_or_path,
                "give a local checkpoint directory with config.json (the hub is not reachable from here)",
                reason=str(exc).splitlines()[0],
            ) from None
        for key, value in model.overrides.items():
            setattr(cfg, key, value)
    cfg.use_cache = False  # training never reuses the KV cache
    return cfg


@contextlib.contextmanager
def zero3_init_context(ds_config: dict[str, Any]):
    """Keep DeepSpeed's HF config alive while the model is built, so ZeRO 3 partitions at init."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def build_model(
    model: ModelSection, ds_config: dict[str, Any], vocab_size: int | None = None
) -> torch.nn.Module:
    """Construct (preset) or load (checkpoint) the causal LM, partitioned at init under ZeRO 3."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model, vocab_size)
    with zero3_init_context(ds_config):
        if model.preset:
            net = AutoModelForCausalLM.from_config(
                cfg, attn_implementation=model.attn_implementation, dtype=torch.float32
            )
        else:
            net = AutoModelForCausalLM.from_pretrained(
                model.name_or_path,
                config=cfg,
                attn_implementation=model.attn_implementation,
                dtype=torch.float32,
                trust_remote_code=model.trust_remote_code,
            )
    if model.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases, norms or 1-D params (the usual transformer recipe)."""
    decay, no_decay = [], []
    for _, p in net.named_parameters():
        if not p.requires_grad:
            continue
        ndim = p.ds_shape.__len__() if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
