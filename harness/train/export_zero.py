"""The fp32 master weights in a DeepSpeed ZeRO checkpoint, read one parameter at a time.

Each data-parallel rank's ``*_optim_states.pt`` holds its partition of the fp32 masters (ZeRO 1/2 and
DeepSpeed's bf16 optimizer: a slice of each parameter group's flat vector; ZeRO 3: a slice of every
parameter), beside the Adam moments. ``mp_rank_XX_model_states.pt`` names the parameters and their
shapes in the flat order. DeepSpeed's ``zero_to_fp32`` joins whole groups (ZeRO 1/2: the full fp32
model at once); here the files are memory-mapped and a parameter's slices are copied out on demand,
so only what one parameter touches is read.

Touched pages of a mapped file count as resident memory of the process for as long as it is mapped,
so :class:`MappedFile` drops its mapping before more than ``budget_bytes`` have been read through it and
maps again on next use. A parameter is handed on as :class:`FlatPieces`, views of the mapped
partitions, which the shard writer writes piece by piece: no copy of it is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.train.export_writer import FlatPieces

RELOAD_BYTES = 256 * 2**20
"""Default bytes read through a mapping before it is dropped (bounds the file pages held)."""


class MappedFile:
    """A ``torch.load(mmap=True)`` of one file, loaded on use, its mapping dropped before the bytes read
    through it would pass ``budget_bytes`` (so it holds at most the budget, or one bigger tensor)."""

    def __init__(self, path: Path, weights_only: bool, budget_bytes: int = RELOAD_BYTES) -> None:
        self.path = Path(path)
        self.weights_only = weights_only
        self.budget_bytes = budget_bytes
        self._state: Any = None
        self._read = 0

    def get(self) -> Any:
        """The loaded object (tensors backed by the mapping)."""
        if self._state is None:
            self._state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=self.weights_only)
        return self._state

    def reserve(self, num_bytes: int) -> None:
        """Say ``num_bytes`` are about to be read; drop the mapping first if they would pass the budget.
        (Views taken earlier keep their pages until they are dropped too.)"""
        if self._read + num_bytes > self.budget_bytes:
            self.release()
        self._read += num_bytes

    def release(self) -> None:
        """Drop the mapping now."""
        self._state = None
        self._read = 0


def _slices(flats: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """The pieces of ``[start, end)`` of the concatenation of the 1-D tensors ``flats`` (views)."""
    pieces = []
    base = 0
    for flat in flats:
        lo, hi = max(start, base), min(end, base + flat.numel())
        if lo < hi:
            pieces.append(flat[lo - base : hi - base])
        base += flat.numel()
        if base >= end:
            break
    if sum(p.numel() for p in pieces) != end - start:
        raise RuntimeError(f"fp32 partitions hold {base} values, a parameter needs [{start}, {end})")
    return pieces


class ZeroMasters:
    """The fp32 master weights of one model-parallel rank: ``names()`` in flat order, ``read(name)``.

    ``model_file`` is the rank's ``mp_rank_XX_model_states.pt``; ``optim_files`` its data-parallel
    ranks' ``*_optim_states.pt`` (any order; sorted by data-parallel rank here).
    """

    def __init__(self, model_file: Path, optim_files: list[Path], budget_bytes: int = RELOAD_BYTES) -> None:
        from deepspeed.checkpoint.constants import (
            BUFFER_NAMES,
            FP32_FLAT_GROUPS,
            OPTIMIZER_STATE_DICT,
            PARAM_SHAPES,
            PARTITION_COUNT,
            SINGLE_PARTITION_OF_FP32_GROUPS,
            ZERO_STAGE,
        )

        self.model = MappedFile(model_file, weights_only=False, budget_bytes=budget_bytes)
        states = self.model.get()
        if states.get("frozen_param_shapes"):
            raise RuntimeError(f"{model_file}: frozen parameters are not exported (harness trains all)")
        self.buffer_names: list[str] = list(states.get(BUFFER_NAMES) or [])
        self.shared: dict[str, str] = dict(states.get("shared_params") or {})  # alias -> owner
        groups = [dict(g) for g in states[PARAM_SHAPES]]
        files = sorted(optim_files, key=_data_parallel_rank)
        share = max(1, budget_bytes // len(files))  # each file holds about 1/world of every parameter
        self.optim = [MappedFile(p, weights_only=False, budget_bytes=share) for p in files]
        first = self.optim[0].get()[OPTIMIZER_STATE_DICT]
        self.stage = int(first[ZERO_STAGE])
        count = first[PARTITION_COUNT]
        world = max(count) if isinstance(count, list) else int(count)
        if world != len(files):
            raise RuntimeError(f"{model_file}: ZeRO partitions of {world} ranks, {len(files)} files found")
        self.key = FP32_FLAT_GROUPS if self.stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS
        self._optim_key = OPTIMIZER_STATE_DICT
        paddings = first.get("param_alignment_paddings")
        self.index = self._index(groups, world, paddings)
        self.model.release()  # buffers are read again only when asked for

    def _index(self, groups: list[dict], world: int, paddings) -> dict[str, tuple[int, int, torch.Size]]:
        """name -> (group, offset, shape): ZeRO 1/2 offsets in the group's full flat vector, ZeRO 3
        offsets in every rank's concatenated flat groups (each rank holds ceil(numel/world) of each)."""
        index: dict[str, tuple[int, int, torch.Size]] = {}
        offset = 0
        for g, shapes in enumerate(groups):
            if self.stage != 3:
                offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                shape = torch.Size(shape)
                index[name] = (g, offset, shape)
                numel = math.prod(shape)
                if self.stage == 3:
                    offset += math.ceil(numel / world)
                else:
                    offset += numel + (paddings[g][i] if paddings else 0)
        return index

    def names(self) -> list[str]:
        """Parameter names in the flat order (the order reading is sequential in the files)."""
        return list(self.index)

    def shape(self, name: str) -> torch.Size:
        """The full shape of parameter ``name``."""
        return self.index[name][2]

    def pieces(self, name: str) -> FlatPieces:
        """Parameter ``name`` as the views of the mapped partitions that hold it, in order (no copy)."""
        group, offset, shape = self.index[name]
        numel = math.prod(shape)
        for f in self.optim:
            f.reserve(4 * numel // len(self.optim))
        if self.stage == 3:  # each rank holds ceil(numel / world) values, the last one padded
            part = math.ceil(numel / len(self.optim))
            pieces = []
            for f in self.optim:
                pieces += _slices(f.get()[self._optim_key][self.key], offset, offset + part)
            pieces = _slices(pieces, 0, numel)
        else:
            flats = [f.get()[self._optim_key][self.key][group] for f in self.optim]
            pieces = _slices(flats, offset, offset + numel)
        return FlatPieces(shape, pieces)

    def read(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as one fp32 tensor (a view of a mapped file when one partition holds it)."""
        return self.pieces(name).tensor()

    def release(self) -> None:
        """Drop every mapping (done reading)."""
        self.model.release()
        for f in self.optim:
            f.release()

    def buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The module's buffers (floats as fp32), from the model states file."""
        module = self.model.get().get("module") or {}
        for name in self.buffer_names:
            if name in module:
                value = module[name]
                yield name, value.float() if value.is_floating_point() else value
        self.model.release()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | FlatPieces]]:
        """Buffers, then every parameter in flat order, as :class:`FlatPieces` (shared aliases are not
        repeated); the mappings are dropped at the end."""
        yield from self.buffers()
        for name in self.index:
            yield name, self.pieces(name)
        self.release()


def _data_parallel_rank(path: Path) -> int:
    """N of ``..._zero_pp_rank_N_mp_rank_XX_optim_states.pt``."""
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


def zero_masters(tag_dir: Path, mp_rank: int, budget_bytes: int = RELOAD_BYTES) -> ZeroMasters | None:
    """The ZeRO masters of model-parallel rank ``mp_rank`` in ``tag_dir``; None when it has no ZeRO
    optimizer partitions (ZeRO 0)."""
    tag_dir = Path(tag_dir)
    optim = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if not optim:
        return None
    model_file = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not model_file.is_file():  # ZeRO 3: one per data-parallel rank, each naming every parameter
        model_file = tag_dir / f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"
    return ZeroMasters(model_file, optim, budget_bytes)
