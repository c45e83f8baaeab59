"""fp32 weights of each model-parallel rank of a DeepSpeed checkpoint (pipeline stage or AutoTP shard).

A pipeline or tensor-parallel checkpoint holds one ``mp_rank_XX_model_states.pt`` per model-parallel
rank (the stage id under pipelines, the tensor rank under AutoTP). Where the optimizer kept fp32
master weights in ZeRO partitions (ZeRO 1/2, and DeepSpeed's bf16 optimizer), those are the weights
to export, as ``harness export`` does for plain ZeRO runs; DeepSpeed's ``zero_to_fp32`` knows how to
reassemble them but only reads ``mp_rank_00``. So each rank's files are shown to it in a scratch
directory under ``mp_rank_00`` names. Without ZeRO partitions (ZeRO 0 in fp32 with a torch optimizer)
the module weights are the master weights and are read directly.

:func:`pipeline_state_dict` joins a pipeline checkpoint's layer files under their HF names (the stages'
layers record them; see ``harness.train.pipeline``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import torch

from harness.errors import SpecError

_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def model_parallel_ranks(tag_dir: Path) -> list[int]:
    """The model-parallel ranks that wrote a ``mp_rank_XX_model_states.pt`` into ``tag_dir``, sorted."""
    found = (_MP_FILE.match(p.name) for p in Path(tag_dir).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def load_model_states(tag_dir: Path, mp_rank: int) -> dict:
    """``mp_rank_XX_model_states.pt`` of one rank (already vetted by ``verify_checkpoint_files``)."""
    path = Path(tag_dir) / f"mp_rank_{mp_rank:02d}_model_states.pt"
    # DeepSpeed pickles a few plain records (enums) here; safety.verify_checkpoint_files allowed them.
    return torch.load(path, map_location="cpu", weights_only=False)


def fp32_master_state_dict(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of one model-parallel rank from its ZeRO partitions, by the names the
    engine's module used; None when the checkpoint has no ZeRO optimizer partitions for that rank."""
    tag_dir = Path(tag_dir)
    optim = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if not optim:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = load_model_states(tag_dir, mp_rank)
    if states.get("module") is None:
        states["module"] = {}  # pipeline stages keep their weights in layer files; zero_to_fp32 wants a dict
    with tempfile.TemporaryDirectory(prefix="harness-mp-") as scratch:
        view = Path(scratch) / "tag"
        view.mkdir()
        torch.save(states, view / "mp_rank_00_model_states.pt")
        for path in optim:
            os.symlink(path.resolve(), view / path.name.replace(f"_mp_rank_{mp_rank:02d}_", "_mp_rank_00_"))
        # It prints progress lines and a tqdm bar.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(scratch, tag="tag")
    return {k: v.contiguous().float() for k, v in sd.items()}


_LAYER_FILE = re.compile(r"^layer_(\d+)-.*model_states\.pt$")


def _hf_key(key: str, hf_names: dict[str, str]) -> str:
    local, _, rest = key.partition(".")
    return f"{hf_names[local]}.{rest}" if rest else hf_names[local]


def pipeline_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights in HF key names from a pipeline checkpoint: the layer files, with the fp32 master
    weights of ZeRO partitions (bf16 / ZeRO 1 runs) in place of the module weights where there are any."""
    tag_dir = Path(tag_dir)
    by_layer: dict[str, dict[str, str]] = {}
    state: dict[str, torch.Tensor] = {}
    for path in sorted(tag_dir.iterdir()):
        m = _LAYER_FILE.match(path.name)
        if not m:
            continue
        layer = torch.load(path, map_location="cpu", weights_only=True)
        extra = layer.pop("_extra_state", None)
        if not isinstance(extra, dict) or "hf_names" not in extra:
            raise SpecError(
                "RUN_DIR_OR_CHECKPOINT",
                str(tag_dir),
                "export a pipeline checkpoint written by harness (its layer files name their HF modules)",
                reason=f"{path.name} does not say which HF modules it holds",
            )
        by_layer[str(int(m.group(1)))] = extra["hf_names"]
        if extra.get("tied_key"):
            by_layer[f"tied_modules.{extra['tied_key']}"] = extra["hf_names"]
        state.update({_hf_key(k, extra["hf_names"]): v.float() for k, v in layer.items()})
    for stage in model_parallel_ranks(tag_dir):
        masters = fp32_master_state_dict(tag_dir, stage) or {}
        for key, value in masters.items():
            # PipelineModule names: "<layer index>.<local>..." or "tied_modules.<key>.<local>...".
            owner, _, rest = key.partition(".")
            if owner == "tied_modules":
                tied_key, _, rest = rest.partition(".")
                owner = f"tied_modules.{tied_key}"
            state[_hf_key(rest, by_layer[owner])] = value
    return state
