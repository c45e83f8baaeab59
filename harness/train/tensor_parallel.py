"""AutoTP training (``parallel.tensor_parallel: N``): process groups before the engine, HF export after.

DeepSpeed shards the HF model inside ``deepspeed.initialize`` when the config has
``tensor_parallel.autotp_size``. Two things it leaves to the caller:

* the tensor-parallel groups must exist *before* the engine parses its config, and be passed as
  ``mpu``; otherwise the config checks ``train_batch_size`` against the whole world instead of the
  data-parallel part of it and refuses a correct batch triple;
* its checkpoints hold one shard per tensor-parallel rank (``mp_rank_XX_model_states.pt``);
  :func:`tensor_parallel_state_dict` joins them back into full HF tensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from harness.errors import SpecError
from harness.train.mp_shards import fp32_master_state_dict, load_model_states, model_parallel_ranks


def tensor_parallel_mpu(tp_size: int):
    """DeepSpeed's ``groups`` module with its (data × tensor) mesh built; pass it as ``mpu``.

    Ranks ``[k·tp, (k+1)·tp)`` form one tensor-parallel group; the ranks of a group hold shards of
    the same replica and must read the same data (their data-parallel rank is equal).
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups


def tensor_parallel_state_dict(tag_dir: Path, ds_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 weights in HF key names from an AutoTP checkpoint: every tensor-parallel rank's shard,
    joined by the layout DeepSpeed records in the checkpoint (its universal-checkpoint affine maps).

    The shards are the fp32 master weights of the ZeRO partitions where there are any (bf16, ZeRO 1/2),
    else the module weights (ZeRO 0 in fp32)."""
    from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE, ParamAffineMap
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS, UNIVERSAL_CHECKPOINT_INFO

    tag_dir = Path(tag_dir)
    ranks = model_parallel_ranks(tag_dir)
    expected = ds_config.get("tensor_parallel", {}).get("autotp_size", len(ranks))
    if ranks != list(range(expected)):
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(tag_dir),
            "export a complete checkpoint of the run",
            reason=f"expected model states of tensor-parallel ranks 0-{expected - 1}, found {ranks}",
        )
    shards: list[dict[str, torch.Tensor]] = []
    layout: dict[str, Any] = {}
    for rank in ranks:
        states = load_model_states(tag_dir, rank)
        layout = layout or states.get(UNIVERSAL_CHECKPOINT_INFO, {}).get(AFFINE_MAP, {}).get(
            AFFINE_MAP_PARAMS, {}
        )
        masters = fp32_master_state_dict(tag_dir, rank)
        shards.append(masters if masters is not None else {k: v.float() for k, v in states["module"].items()})
    if not layout:
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(tag_dir),
            "export with the DeepSpeed version that trained the run (0.19 or newer records the AutoTP layout)",
            reason="the checkpoint records no tensor-parallel layout (universal_checkpoint_info.affine_map)",
        )
    patterns = {re.compile(p): entry for p, entry in layout.items()}
    state: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        entry = [e for p, e in patterns.items() if p.match(name)]
        if len(entry) == 1:
            pieces = {rank: shard[name] for rank, shard in enumerate(shards)}
            state[name] = ParamAffineMap.from_dict(entry[0]).rebuild(pieces, SCALE_POWER_BY_STATE["fp32"])
        elif not _is_alias(name, first, shards[0]):
            raise RuntimeError(f"{tag_dir}: DeepSpeed recorded no tensor-parallel layout for {name}")
    return state


def _is_alias(name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> bool:
    """True for a second name of a tied parameter (DeepSpeed records the layout under the first only);
    the export re-ties it."""
    return any(
        other != name and value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        for other, value in shard.items()
    )
