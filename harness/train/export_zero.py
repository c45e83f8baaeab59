"""The fp32 master weights in a DeepSpeed ZeRO checkpoint, read one parameter at a time.

Each data-parallel rank's ``*_optim_states.pt`` holds its partition of the fp32 masters (ZeRO 1/2 and
DeepSpeed's bf16 optimizer: a slice of each parameter group's flat vector; ZeRO 3: a slice of every
parameter), beside the Adam moments. ``mp_rank_XX_model_states.pt`` names the parameters and their
shapes in the flat order. DeepSpeed's ``zero_to_fp32`` joins whole groups (ZeRO 1/2: the full fp32
model at once); here the files are memory-mapped and a parameter's slices are copied out on demand,
so only what one parameter touches is read.

Touched pages of a mapped file count as resident memory of the process for as long as it is mapped,
so :class:`MappedFile` drops its mapping after every ``budget_bytes`` read and maps again on next use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

RELOAD_BYTES = 256 * 2**20
"""Default bytes read through a mapping before it is dropped (bounds the file pages held)."""


class MappedFile:
    """A ``torch.load(mmap=True)`` of one file, loaded on use and dropped after ``budget_bytes`` read."""

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

    def spent(self, num_bytes: int) -> None:
        """Count ``num_bytes`` read; past the budget, drop the mapping (copies taken from it stay valid)."""
        self._read += num_bytes
        if self._read >= self.budget_bytes:
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
        self.optim = [MappedFile(p, weights_only=False, budget_bytes=budget_bytes) for p in files]
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
        self.model.spent(self.model.budget_bytes)  # drop it: buffers are read again only when asked for

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

    def read(self, name: str) -> torch.Tensor:
        """The whole fp32 parameter ``name`` (a new tensor)."""
        group, offset, shape = self.index[name]
        numel = math.prod(shape)
        pieces = []
        if self.stage == 3:
            part = math.ceil(numel / len(self.optim))
            for f in self.optim:
                pieces += _slices(f.get()[self._optim_key][self.key], offset, offset + part)
        else:
            flats = [f.get()[self._optim_key][self.key][group] for f in self.optim]
            pieces = _slices(flats, offset, offset + numel)
        value = torch.cat(pieces)[:numel].view(shape).float()
        del pieces
        for f in self.optim:
            f.spent(value.numel() * value.element_size() // len(self.optim))
        return value

    def buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The module's buffers (floats as fp32), from the model states file."""
        module = self.model.get().get("module") or {}
        for name in self.buffer_names:
            if name in module:
                value = module[name]
                yield name, value.float() if value.is_floating_point() else value
        self.model.spent(self.model.budget_bytes)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Buffers, then every parameter in flat order (shared aliases are not repeated)."""
        yield from self.buffers()
        for name in self.index:
            yield name, self.read(name)


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
