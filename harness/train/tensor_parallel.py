"""AutoTP training (``parallel.tensor_parallel: N``): process groups before the engine, HF export after.

DeepSpeed shards the HF model inside ``deepspeed.initialize`` when the config has
``tensor_parallel.autotp_size``. Two things it leaves to the caller:

* the tensor-parallel groups must exist *before* the engine parses its config, and be passed as
  ``mpu``; otherwise the config checks ``train_batch_size`` against the whole world instead of the
  data-parallel part of it and refuses a correct batch triple;
* its checkpoints hold one shard per tensor-parallel rank (``mp_rank_XX_model_states.pt``);
  :func:`tensor_parallel_tensors` joins them back into full HF tensors, one at a time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.errors import SpecError
from harness.train.export_writer import FlatPieces
from harness.train.export_zero import RELOAD_BYTES, zero_masters
from harness.train.mp_shards import model_parallel_ranks, model_states_file


def tensor_parallel_mpu(tp_size: int):
    """DeepSpeed's ``groups`` module with its (data × tensor) mesh built; pass it as ``mpu``.

    Ranks ``[k·tp, (k+1)·tp)`` form one tensor-parallel group; the ranks of a group hold shards of
    the same replica and must read the same data (their data-parallel rank is equal).
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups


def tensor_parallel_tensors(
    tag_dir: Path, ds_config: dict[str, Any], budget_bytes: int = RELOAD_BYTES
) -> Iterator[tuple[str, torch.Tensor | FlatPieces]]:
    """fp32 weights in HF key names from an AutoTP checkpoint, one parameter at a time: every
    tensor-parallel rank's shard of it, joined by the layout DeepSpeed records in the checkpoint (its
    universal-checkpoint affine maps). Buffers, which have no layout, are tensor-parallel rank 0's.

    The shards are the fp32 master weights of the ZeRO partitions where there are any (bf16, ZeRO 1/2),
    else the module weights (ZeRO 0 in fp32); every rank's files are memory-mapped."""
    from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE, ParamAffineMap
    from deepspeed.checkpoint.constants import (
        AFFINE_MAP,
        AFFINE_MAP_PARAMS,
        BUFFER_NAMES,
        UNIVERSAL_CHECKPOINT_INFO,
    )

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
    share = max(1, budget_bytes // len(ranks))  # each rank's files hold about 1/tp of every parameter
    files = [model_states_file(tag_dir, rank, share) for rank in ranks]
    first = files[0].get()
    sizes = {name: v.numel() * v.element_size() for name, v in first["module"].items()}
    layout = first.get(UNIVERSAL_CHECKPOINT_INFO, {}).get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS, {})
    buffers = set(first.get(BUFFER_NAMES) or [])
    masters = [zero_masters(tag_dir, rank, share) for rank in ranks]
    if masters[0] is not None:
        names = [*(n for n in first["module"] if n in buffers), *masters[0].names()]
    else:  # a tied parameter's second name is not repeated (DeepSpeed records the layout under the first)
        names = [n for n, v in first["module"].items() if not _is_alias(n, v, first["module"])]
    del first
    if not layout:
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(tag_dir),
            "export with the DeepSpeed version that trained the run (0.19 or newer records the AutoTP layout)",
            reason="the checkpoint records no tensor-parallel layout (universal_checkpoint_info.affine_map)",
        )
    patterns = {re.compile(p): entry for p, entry in layout.items()}

    def shard(rank: int, name: str) -> torch.Tensor:
        if masters[rank] is not None and name not in buffers:
            return masters[rank].read(name)
        files[rank].reserve(sizes[name])  # every rank's shard of it is the size of rank 0's
        return files[rank].get()["module"][name].float()

    release = [_releaser(files[rank], masters[rank]) for rank in ranks]
    for name in names:
        entry = [e for p, e in patterns.items() if p.match(name)]
        if name in buffers and not entry:
            yield name, shard(0, name)
        elif len(entry) == 1 and _replicated(affine := ParamAffineMap.from_dict(entry[0]), len(ranks)):
            value = shard(0, name)  # a view of rank 0's file: no copy, the other ranks only compared
            for rank in ranks[1:]:
                if not _same(value, functools.partial(shard, rank, name), share, release[rank]):
                    raise RuntimeError(f"{tag_dir}: tensor-parallel ranks 0 and {rank} hold different {name}")
            yield name, value
            del value
        elif len(entry) == 1:
            pieces = {rank: shard(rank, name) for rank in ranks}
            runs = _contiguous_runs(affine, pieces)  # a split along the first dim: no join needed
            yield name, runs or affine.rebuild(pieces, SCALE_POWER_BY_STATE["fp32"])
            del pieces, runs
        else:
            raise RuntimeError(f"{tag_dir}: DeepSpeed recorded no tensor-parallel layout for {name}")
    for done in release:
        done()


def tensor_parallel_state_dict(tag_dir: Path, ds_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """:func:`tensor_parallel_tensors` gathered into one dict (small models and tests)."""
    return {
        name: (value.tensor() if isinstance(value, FlatPieces) else value).clone()
        for name, value in tensor_parallel_tensors(tag_dir, ds_config)
    }


def _releaser(file: Any, masters: Any):
    """A function dropping every mapping of one rank's files."""

    def release() -> None:
        file.release()
        if masters is not None:
            masters.release()

    return release


def _same(value: torch.Tensor, other, chunk_bytes: int, release) -> bool:
    """``value`` equals ``other()`` (a rank's mapped copy), compared a chunk at a time with that
    rank's mapping dropped after each chunk, so its pages never pile up beside ``value``'s."""
    flat = value.reshape(-1)
    step = max(1, chunk_bytes // flat.element_size())
    for lo in range(0, flat.numel(), step):
        equal = torch.equal(other().reshape(-1)[lo : lo + step], flat[lo : lo + step])
        release()
        if not equal:
            return False
    return True


def _replicated(affine: Any, num_ranks: int) -> bool:
    """True when every rank holds the whole parameter unscaled (embeddings, norms under AutoTP)."""
    whole = all(tuple(shape) == tuple(affine.logical_shape) for shape in affine.shard_shapes.values())
    pieces = [p for ps in affine.pieces_by_rank.values() for p in ps]
    return whole and all(len(p.locations) == num_ranks and p.scale == 1 for p in pieces)


def _contiguous_runs(affine: Any, shards: dict[int, torch.Tensor]) -> FlatPieces | None:
    """The parameter as consecutive slices of the shards, when every piece of the layout is one
    contiguous run on both sides (a split along the first dimension, unscaled); None otherwise."""
    pieces = sorted(
        ((p, rank) for rank, ps in affine.pieces_by_rank.items() for p in ps),
        key=lambda x: x[0].source_offset,
    )
    runs, offset = [], 0
    for piece, rank in pieces:
        dense = _dense(piece.shape, piece.source_strides) and _dense(piece.shape, piece.dest_strides)
        if piece.scale != 1 or not dense or piece.source_offset != offset:
            return None
        runs.append(shards[rank].reshape(-1)[piece.dest_offset : piece.dest_offset + piece.numel])
        offset += piece.numel
    shape = torch.Size(affine.logical_shape)
    return FlatPieces(shape, runs) if offset == shape.numel() else None


def _dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """True when ``strides`` lay ``shape`` out row-major without gaps."""
    expected = 1
    for size, stride in reversed(list(zip(shape, strides, strict=True))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _is_alias(name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> bool:
    """True for a second name of a tied parameter (its storage is an earlier name's)."""
    for other, value in shard.items():
        if other == name:
            return False
        if value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            return True
    return False
