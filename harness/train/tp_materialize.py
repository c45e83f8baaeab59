"""Tensor parallel from an empty model: AutoTP slices the meta model, then each rank fills its slices.

DeepSpeed's AutoTP runs inside ``deepspeed.initialize`` and leaves meta tensors on the meta device
while it slices them (``TensorParallel_Layer.move`` in deepspeed/module_inject/layers.py), recording
for each sliced parameter how its slice maps onto the full tensor (the universal-checkpoint affine map,
``ParamAffineMap``, the same record ``harness export`` rebuilds full tensors from). :func:`slices_at_init`
wraps the engine's AutoTP step for the duration of one ``deepspeed.initialize``: right after AutoTP has
sliced the model, every meta parameter gets its value, the full fp32 tensor computed (or read) one unit
at a time and cut with ``ParamAffineMap.extract`` for this tensor-parallel rank. No rank ever holds the
whole model; the working set is one unit in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from harness.train.materialize import materialize


def _shard_fn(model: nn.Module, tp_rank: int):
    from deepspeed.checkpoint.affine import ParamAffineMap
    from deepspeed.module_inject.layers import _get_param_uc_conversion_meta

    targets = dict(model.named_parameters(remove_duplicate=False))

    def shard(name: str, full: torch.Tensor) -> torch.Tensor:
        target = targets[name]
        conversion = _get_param_uc_conversion_meta(target) or {}
        affine = conversion.get("affine_map")
        if affine and not conversion.get("replicated"):
            return ParamAffineMap.from_dict(affine).extract(full, tp_rank)
        if tuple(target.shape) != tuple(full.shape):
            raise RuntimeError(f"AutoTP sliced {name} to {tuple(target.shape)} without recording how")
        return full

    return shard


def fill_slices(
    model: nn.Module, source, dtype: torch.dtype, layout: nn.Module, tp_rank: int, optimizer=None
) -> list[str]:
    """Fill every meta parameter of the AutoTP-sliced ``model`` with this rank's slice of its value."""
    shard = _shard_fn(model, tp_rank)
    names = materialize(model, source, dtype, shard=shard, layout=layout, optimizer=optimizer)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"tensor-parallel parameters left without a value: {left[:5]}")
    return names


@contextlib.contextmanager
def slices_at_init(source, dtype: torch.dtype, layout: nn.Module):
    """While active, ``deepspeed.initialize`` fills the slices AutoTP cut from an empty model."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    original = DeepSpeedEngine._configure_tensor_parallel

    def configure_then_fill(engine, model, tp_config):
        replaced = original(engine, model, tp_config)
        tp_rank = groups.get_tensor_model_parallel_rank()
        fill_slices(model, source, dtype, layout, tp_rank, optimizer=engine.client_optimizer)
        return replaced

    DeepSpeedEngine._configure_tensor_parallel = configure_then_fill
    try:
        yield
    finally:
        DeepSpeedEngine._configure_tensor_parallel = original
