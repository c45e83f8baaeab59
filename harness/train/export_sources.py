"""Every fp32 weight of a complete DeepSpeed checkpoint as (HF name, tensor), one at a time.

Which files hold the weights depends on how the run was laid out; each kind is read in a fixed
order, and no kind holds more than one parameter (plus the mapped file pages of one reload budget,
see :class:`harness.train.export_zero.MappedFile`) at once:

* pipeline (``layer_XX-model_states.pt``): each layer file in turn, the ZeRO-1 / bf16 masters of each
  stage one parameter at a time (:func:`harness.train.mp_shards.pipeline_tensors`);
* AutoTP (``mp_rank_01_model_states.pt``): one parameter at a time, joined from every tensor-parallel
  rank's shard (:func:`harness.train.tensor_parallel.tensor_parallel_tensors`);
* ZeRO 1-3 (``*_optim_states.pt``): the masters of the data-parallel partitions, one parameter at a
  time (:class:`harness.train.export_zero.ZeroMasters`), after the module's buffers;
* ZeRO 0: the module in ``mp_rank_00_model_states.pt`` (the master in fp32), except the parameters
  whose fp32 masters the optimizer keeps in flat groups (bf16 / fp16).

A yielded tensor may be a view of a mapped file: use it before asking for the next one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.train.export_zero import RELOAD_BYTES, MappedFile, zero_masters


def checkpoint_tensors(
    tag_dir: Path, ds_config: dict[str, Any], model: torch.nn.Module, budget_bytes: int = RELOAD_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every weight of ``tag_dir``; ``model`` is the run's model on the meta
    device (it names the flat fp32 groups of ZeRO-0 bf16/fp16 checkpoints)."""
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("layer_*-model_states.pt")):
        from harness.train.mp_shards import pipeline_tensors

        return pipeline_tensors(tag_dir, budget_bytes)
    if any(tag_dir.glob("mp_rank_01_model_states.pt")):
        from harness.train.tensor_parallel import tensor_parallel_tensors

        return tensor_parallel_tensors(tag_dir, ds_config, budget_bytes)
    masters = zero_masters(tag_dir, 0, budget_bytes)
    if masters is not None:
        return iter(masters)  # FlatPieces: views of the partitions, written without a copy
    return _zero0_tensors(tag_dir, model, budget_bytes)


def _zero0_tensors(
    tag_dir: Path, model: torch.nn.Module, budget_bytes: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A ZeRO-0 checkpoint: the module's tensors, with the fp32 masters in place of the parameters
    where the optimizer keeps them (bf16/fp16; for fp32 the module is the master)."""
    file = MappedFile(
        Path(tag_dir) / "mp_rank_00_model_states.pt", weights_only=True, budget_bytes=budget_bytes
    )
    states = file.get()
    sizes = {name: v.numel() * v.element_size() for name, v in states["module"].items()}
    flat = (states.get("optimizer") or {}).get("fp32_groups_flat")
    masters = _zero0_master_index(tag_dir, model, [v.numel() for v in flat]) if flat else {}
    covered = {alias for names, _ in masters.values() for alias in names}
    del states, flat
    for name, size in sizes.items():
        if name not in covered:
            file.reserve(size)
            value = file.get()["module"][name]
            yield name, value.float() if value.is_floating_point() else value
    for names, (group, offset, shape) in masters.values():
        file.reserve(4 * math.prod(shape))
        vector = file.get()["optimizer"]["fp32_groups_flat"][group]
        yield names[0], vector[offset : offset + math.prod(shape)].view(shape).float()
    file.release()


def _zero0_master_index(
    tag_dir: Path, model: torch.nn.Module, group_sizes: list[int]
) -> dict[int, tuple[list[str], tuple[int, int, torch.Size]]]:
    """Where each parameter's fp32 master is in a ZeRO-0 bf16/fp16 checkpoint: param id -> (its names,
    (group, offset, shape)).

    DeepSpeed's FP16_Optimizer keeps them as one flat fp32 tensor per optimizer param group (no padding)
    and saves no names for them; the groups are the ones ``harness.train.model.param_groups`` made,
    so the same function over the model built on the meta device gives the names, shapes and order.
    """
    from harness.train.model import param_groups

    names: dict[int, list[str]] = {}  # every name of a parameter (tied embeddings have two)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    groups = param_groups(model, 0.0)
    if len(groups) != len(group_sizes):
        raise RuntimeError(f"{tag_dir}: {len(group_sizes)} fp32 master groups, the model has {len(groups)}")
    index = {}
    for g, (group, size) in enumerate(zip(groups, group_sizes, strict=True)):
        offset = 0
        for p in group["params"]:
            index[id(p)] = (names[id(p)], (g, offset, p.shape))
            offset += p.numel()
        if offset != size:
            raise RuntimeError(f"{tag_dir}: fp32 master group of {size} values, the params hold {offset}")
    return index
