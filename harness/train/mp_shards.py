"""fp32 weights of each model-parallel rank of a DeepSpeed checkpoint (pipeline stage or AutoTP shard).

A pipeline or tensor-parallel checkpoint holds one ``mp_rank_XX_model_states.pt`` per model-parallel
rank (the stage id under pipelines, the tensor rank under AutoTP). Where the optimizer kept fp32
master weights in ZeRO partitions (ZeRO 1/2, and DeepSpeed's bf16 optimizer), those are the weights
to export, as ``harness export`` does for plain ZeRO runs; :func:`harness.train.export_zero.zero_masters`
reads them one parameter at a time from any rank's files. Without ZeRO partitions (ZeRO 0 in fp32
with a torch optimizer) the module weights are the master weights and are read directly.

:func:`pipeline_tensors` streams a pipeline checkpoint's weights under their HF names (the stages'
layers record them; see ``harness.train.pipeline``), one layer file or one parameter at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from harness.errors import SpecError
from harness.train.export_writer import FlatPieces
from harness.train.export_zero import RELOAD_BYTES, MappedFile, zero_masters

_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def model_parallel_ranks(tag_dir: Path) -> list[int]:
    """The model-parallel ranks that wrote a ``mp_rank_XX_model_states.pt`` into ``tag_dir``, sorted."""
    found = (_MP_FILE.match(p.name) for p in Path(tag_dir).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def model_states_file(tag_dir: Path, mp_rank: int, budget_bytes: int = RELOAD_BYTES) -> MappedFile:
    """``mp_rank_XX_model_states.pt`` of one rank, memory-mapped (already vetted by
    ``verify_checkpoint_files``)."""
    path = Path(tag_dir) / f"mp_rank_{mp_rank:02d}_model_states.pt"
    # DeepSpeed pickles a few plain records (enums) here; safety.verify_checkpoint_files allowed them.
    return MappedFile(path, weights_only=False, budget_bytes=budget_bytes)


def fp32_master_state_dict(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of one model-parallel rank from its ZeRO partitions, by the names the
    engine's module used; None when the checkpoint has no ZeRO optimizer partitions for that rank.
    Whole in memory: for small models and tests (the export streams :func:`zero_masters`)."""
    masters = zero_masters(tag_dir, mp_rank)
    return None if masters is None else {name: masters.read(name).clone() for name in masters.names()}


_LAYER_FILE = re.compile(r"^layer_(\d+)-.*model_states\.pt$")


def _hf_key(key: str, hf_names: dict[str, str]) -> str:
    local, _, rest = key.partition(".")
    return f"{hf_names[local]}.{rest}" if rest else hf_names[local]


def _layer_names(tag_dir: Path, path: Path, layer: dict) -> dict[str, str]:
    extra = layer.get("_extra_state")
    if not isinstance(extra, dict) or "hf_names" not in extra:
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(tag_dir),
            "export a pipeline checkpoint written by harness (its layer files name their HF modules)",
            reason=f"{path.name} does not say which HF modules it holds",
        )
    return extra


def pipeline_tensors(
    tag_dir: Path, budget_bytes: int = RELOAD_BYTES
) -> Iterator[tuple[str, torch.Tensor | FlatPieces]]:
    """fp32 weights in HF key names from a pipeline checkpoint, one at a time: the layer files' tensors,
    except those the ZeRO partitions (bf16 / ZeRO 1 runs) hold fp32 masters of, which come from there."""
    tag_dir = Path(tag_dir)
    layer_files = [
        (p, int(m.group(1))) for p in sorted(tag_dir.iterdir()) if (m := _LAYER_FILE.match(p.name))
    ]
    by_layer: dict[str, dict[str, str]] = {}
    for path, index in layer_files:  # names first: each file's _extra_state says what it holds
        extra = _layer_names(
            tag_dir, path, torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        )
        by_layer[str(index)] = extra["hf_names"]
        if extra.get("tied_key"):
            by_layer[f"tied_modules.{extra['tied_key']}"] = extra["hf_names"]

    def hf_name(key: str) -> str:
        # PipelineModule names: "<layer index>.<local>..." or "tied_modules.<key>.<local>...".
        owner, _, rest = key.partition(".")
        if owner == "tied_modules":
            tied_key, _, rest = rest.partition(".")
            owner = f"tied_modules.{tied_key}"
        return _hf_key(rest, by_layer[owner])

    stages = [(s, zero_masters(tag_dir, s, budget_bytes)) for s in model_parallel_ranks(tag_dir)]
    from_masters = {hf_name(k) for _, m in stages if m is not None for k in m.names()}
    seen = set(from_masters)  # a tied module's weight is in the layer files of both its stages
    for path, _ in layer_files:
        layer = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        names = _layer_names(tag_dir, path, layer)["hf_names"]
        for key, value in layer.items():
            if key != "_extra_state" and (name := _hf_key(key, names)) not in seen:
                seen.add(name)
                yield name, value.float()
        del layer
    # A tied module is in both its stages' partitions: the last stage's copy is the one written.
    source = {hf_name(k): (s, k) for s, m in stages if m is not None for k in m.names()}
    for stage, masters in stages:
        if masters is not None:
            for key in masters.names():
                if source[name := hf_name(key)] == (stage, key):
                    yield name, masters.pieces(key)
            masters.release()


def pipeline_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """:func:`pipeline_tensors` gathered into one dict (small models and tests)."""
    return {name: _tensor(value).clone() for name, value in pipeline_tensors(tag_dir)}


def _tensor(value: torch.Tensor | FlatPieces) -> torch.Tensor:
    return value.tensor() if isinstance(value, FlatPieces) else value
