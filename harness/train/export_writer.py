"""Write named tensors as Hugging Face safetensors shards, one tensor at a time.

The layout is the one ``save_pretrained`` writes: ``model.safetensors`` when everything fits in one
shard, else ``model-00001-of-0000N.safetensors`` files and ``model.safetensors.index.json``
(``{"metadata": {"total_parameters", "total_size"}, "weight_map": {name: file}}``), each file's
metadata ``{"format": "pt"}``. Tensors are packed in the planned order, a new shard starting when the
next tensor would pass ``max_shard_bytes`` (a tensor bigger than the limit gets a shard of its own).

Every name, shape and dtype is known before any weight is read (from the model on the meta device),
so each file's header is written first and each tensor's bytes go straight to their offset as the
tensor arrives, in any order: the writer holds no tensor, and a shard's file is closed as soon as its
last tensor is in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from harness.errors import SpecError

DEFAULT_MAX_SHARD_SIZE = "50GB"
"""transformers' ``save_pretrained`` default."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_shard_size(text: str | int) -> int:
    """Bytes from ``--max-shard-size`` (``150MB``, ``2GB``, ``1.5GiB``, a plain byte count); SpecError
    naming the option when it is not a positive size."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise SpecError(
                "--max-shard-size",
                text,
                "give a size such as 150MB, 2GB or 1.5GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
                reason="not a size",
            )
        size = math.floor(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise SpecError(
            "--max-shard-size",
            text,
            f"give a positive size such as 2GB (default {DEFAULT_MAX_SHARD_SIZE})",
            reason="a shard must hold at least one byte",
        )
    return size


@dataclass(frozen=True)
class Entry:
    """One tensor the export will write: its HF name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        """Bytes of its data."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FlatPieces:
    """A tensor given as consecutive 1-D pieces of its data (views of mapped checkpoint files), not
    joined: the writer writes them one after the other."""

    shape: torch.Size
    pieces: list[torch.Tensor]

    def tensor(self) -> torch.Tensor:
        """The pieces as one tensor of ``shape`` (a view when there is one piece, else a copy)."""
        flat = self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces)
        return flat.view(self.shape)


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """``entries`` in order, cut into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry.num_bytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.num_bytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """``save_pretrained``'s file names for ``num_shards`` shards."""
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


class _Shard:
    """One safetensors file: header written on open, each tensor at its offset, closed when full."""

    def __init__(self, path: Path, entries: list[Entry]) -> None:
        self.path = path
        self.offsets: dict[str, int] = {}
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        begin = 0
        for e in entries:
            header[e.name] = {
                "dtype": _DTYPES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [begin, begin + e.num_bytes],
            }
            self.offsets[e.name] = begin
            begin += e.num_bytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(blob)
        self.size = self.data_start + begin
        self.pending = set(self.offsets)
        self.file: BinaryIO | None = None
        self.header = len(blob).to_bytes(8, "little") + blob

    def write(self, name: str, pieces: list[torch.Tensor], dtype: torch.dtype) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed when its last tensor is in
            self.file.write(self.header)
            self.file.truncate(self.size)
        self.file.seek(self.data_start + self.offsets[name])
        for piece in pieces:
            if piece.numel():
                data = piece.to(dtype).contiguous().reshape(-1).view(torch.uint8)
                self.file.write(data.numpy().data)
        self.pending.discard(name)
        if not self.pending:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ShardWriter:
    """Writes the planned tensors into ``out_dir`` as they arrive; :meth:`finish` checks all came."""

    def __init__(self, out_dir: Path, entries: Sequence[Entry], max_shard_bytes: int) -> None:
        self.entries = {e.name: e for e in entries}
        shards = plan_shards(entries, max_shard_bytes)
        names = shard_file_names(len(shards))
        self.shards = [_Shard(Path(out_dir) / n, s) for n, s in zip(names, shards, strict=True)]
        self.shard_of = {e.name: shard for shard, s in zip(self.shards, shards, strict=True) for e in s}
        self.out_dir = Path(out_dir)

    def write(self, name: str, tensor: torch.Tensor | FlatPieces) -> None:
        """Write one planned tensor (cast to its planned dtype); each name once."""
        entry = self.entries[name]
        shard = self.shard_of[name]
        if name not in shard.pending:
            raise RuntimeError(f"{name} was given twice")
        if tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"{name} has shape {tuple(tensor.shape)}, the model's is {entry.shape}")
        pieces = tensor.pieces if isinstance(tensor, FlatPieces) else [tensor]
        if sum(p.numel() for p in pieces) != math.prod(entry.shape):
            raise RuntimeError(f"{name}: pieces of {sum(p.numel() for p in pieces)} values for {entry.shape}")
        shard.write(name, pieces, entry.dtype)

    def missing(self) -> list[str]:
        """Planned names not written yet, in plan order."""
        return [n for n in self.entries if n in self.shard_of[n].pending]

    def finish(self, total_parameters: int) -> list[Path]:
        """Close every file and write the index when there are several; the shard files."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"no weights for {missing}")
        for shard in self.shards:
            shard.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": total_parameters,
                    "total_size": sum(e.num_bytes for e in self.entries.values()),
                },
                "weight_map": {name: shard.path.name for name, shard in self.shard_of.items()},
            }
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.out_dir / "model.safetensors.index.json").write_text(text, encoding="utf-8")
        return [s.path for s in self.shards]

    def close(self) -> None:
        """Close any open file (after a failure; the caller discards the directory)."""
        for shard in self.shards:
            shard.close()
