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


def run_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype the engine trains the module in (bf16/fp16 runs keep no fp32 copy of the whole model)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def weight_source(model: ModelSection, net: torch.nn.Module, seed: int):
    """Where the weights of ``net`` (built empty) come from: fresh by name and seed for a preset, the
    checkpoint's safetensors tensor by tensor, or None when the checkpoint is in another format
    (then :func:`load_full_model` loads it whole, as transformers does)."""
    from harness.train.materialize import FreshInit, SafetensorsWeights

    if model.preset:
        return FreshInit(net, seed)
    if SafetensorsWeights.available(model.name_or_path):
        return SafetensorsWeights(model.name_or_path, getattr(net, "base_model_prefix", ""))
    return None


def load_full_model(model: ModelSection, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """The whole checkpoint through transformers' ``from_pretrained`` (a format read whole, or ZeRO 3)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model.name_or_path,
        config=cfg,
        attn_implementation=model.attn_implementation,
        dtype=dtype,
        trust_remote_code=model.trust_remote_code,
    )


def fill_weights(
    net: torch.nn.Module, source, dtype: torch.dtype, model: ModelSection, **kwargs
) -> list[str]:
    """``materialize`` with the spec's words on a checkpoint that lacks some of the model's tensors."""
    from harness.train.materialize import materialize

    try:
        return materialize(net, source, dtype, **kwargs)
    except KeyError as exc:
        raise SpecError(
            "model.name_or_path",
            model.name_or_path,
            "give a checkpoint of this model (its config.json and weights must match)",
            reason=f"the checkpoint has no tensor for {exc.args[0]}",
        ) from None


def build_model(
    model: ModelSection, ds_config: dict[str, Any], vocab_size: int | None = None, seed: int = 0
) -> torch.nn.Module:
    """The causal LM, whole on this rank in the run's dtype (ZeRO 0-2), or partitioned at init (ZeRO 3).

    Built on the meta device and filled one unit at a time (``harness.train.materialize``), so the host
    never holds more than the model in the run's dtype plus one layer in fp32."""
    dtype = run_dtype(ds_config)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        net = _build_zero3(model, hf_config(model, vocab_size), ds_config, seed)
    else:
        net, source = build_empty(model, vocab_size, seed)
        if source is None:
            net = load_full_model(model, net.config, dtype)
        else:
            fill_weights(net, source, dtype, model)
    return with_gradient_checkpointing(net, model)


def build_empty(model: ModelSection, vocab_size: int | None, seed: int):
    """(the model with every parameter on the meta device, where its weights come from: see
    :func:`weight_source`)."""
    from harness.train.materialize import empty_model

    net = empty_model(hf_config(model, vocab_size), model.attn_implementation)
    return net, weight_source(model, net, seed)


def with_gradient_checkpointing(net: torch.nn.Module, model: ModelSection) -> torch.nn.Module:
    """``net``, recomputing activations in backward when the spec asks for it."""
    if model.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net


def _build_zero3(model: ModelSection, cfg, ds_config: dict[str, Any], seed: int) -> torch.nn.Module:
    """ZeRO 3: constructed under DeepSpeed's ``zero.Init`` (through transformers), each parameter
    partitioned as it is created; fresh weights are then set unit by unit, gathered one unit at a time
    and computed on rank 0, so they equal the other layouts' (same names, same seed)."""
    from transformers import AutoModelForCausalLM

    if not model.preset:
        with zero3_init_context(ds_config):
            return load_full_model(model, cfg, torch.float32)
    with zero3_init_context(ds_config), _without_transformers_zero3_init():
        net = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=model.attn_implementation, dtype=torch.float32
        )
    _init_zero3(net, cfg, model.attn_implementation, seed)
    return net


@contextlib.contextmanager
def _without_transformers_zero3_init():
    """Skip transformers' own ZeRO-3 weight init (rank 0, module by module, in construction order):
    :func:`_init_zero3` sets every weight afterwards by name, so it would be work thrown away."""
    import transformers.integrations.deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:  # another transformers: its init runs, ours overwrites it
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def _init_zero3(net: torch.nn.Module, cfg, attn_implementation: str, seed: int) -> None:
    import deepspeed
    import torch.distributed as dist

    from harness.train.materialize import FreshInit, empty_model, init_units, owned_params

    layout = empty_model(cfg, attn_implementation)  # names and full shapes, no memory
    source = FreshInit(layout, seed)
    params = dict(net.named_parameters(remove_duplicate=False))
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, unit in init_units(layout):
        wanted = owned_params(name, unit, layout)
        if not wanted:
            continue
        targets = [params[n] for n in wanted]
        with deepspeed.zero.GatheredParameters(targets, modifier_rank=0), torch.no_grad():
            if rank == 0:
                values = source.unit_values(name, unit, wanted)
                for n, target in zip(wanted, targets, strict=True):
                    target.copy_(values[n])


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
