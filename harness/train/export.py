"""Export a complete checkpoint to a normal Hugging Face checkpoint (``from_pretrained`` just works).

    harness export runs/tiny-cpu -o hf/          # newest complete checkpoint of the run
    harness export runs/tiny-cpu/checkpoints/step-00000060 -o hf/

Weights are the fp32 master weights, consolidated with DeepSpeed's own ``zero_to_fp32`` for ZeRO
1-3 (and bf16 runs, whose optimizer keeps fp32 partitions), read directly for ZeRO 0 (the module in
fp32, the optimizer's flat fp32 groups in bf16/fp16). Written as
safetensors with config.json, generation_config.json and the run's tokenizer, into a temporary
directory renamed into place, so a failed export leaves nothing half-written. A checkpoint whose files
differ from its COMPLETE marker (sizes, checksums) is refused, naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, read_json
from harness.train import checkpoint, integrity
from harness.train.safety import verify_checkpoint_files


def resolve_checkpoint(source: Path) -> Path:
    """A complete checkpoint tag directory from a run directory or a tag directory."""
    source = Path(source)
    if RunDir(source).spec.is_file():
        done = checkpoint.complete_checkpoints(source)
        if not done:
            raise SpecError(
                "RUN_DIR_OR_CHECKPOINT",
                str(source),
                "train until a checkpoint is saved, then export",
                reason="the run has no complete checkpoint",
            )
        return done[-1].path
    if not source.is_dir():
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(source),
            "give a run directory or a checkpoint directory",
            reason="no such directory",
        )
    if not checkpoint.is_complete(source):
        raise SpecError(
            "RUN_DIR_OR_CHECKPOINT",
            str(source),
            "export a complete checkpoint (give the run directory to pick the newest complete one)",
            reason=f"incomplete checkpoint: no {checkpoint.MARKER} marker, some rank never finished writing it",
        )
    return source


def consolidated_state_dict(tag_dir: Path, ds_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a (possibly sharded) DeepSpeed checkpoint."""
    if any(tag_dir.glob("layer_*-model_states.pt")):
        from harness.train.mp_shards import pipeline_state_dict

        return pipeline_state_dict(tag_dir)
    if any(tag_dir.glob("mp_rank_01_model_states.pt")):
        from harness.train.tensor_parallel import tensor_parallel_state_dict

        return tensor_parallel_state_dict(tag_dir, ds_config)
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # It prints progress lines and a tqdm bar; errors still raise.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.contiguous().float() for k, v in sd.items()}
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    weights = {k: v.float() for k, v in states["module"].items()}
    weights.update(_zero0_master_weights(tag_dir, states))
    return weights


def _zero0_master_weights(tag_dir: Path, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-0 bf16/fp16 checkpoint ({} for fp32, where the module is the master).

    DeepSpeed's FP16_Optimizer keeps them as one flat fp32 tensor per optimizer param group (no padding)
    and saves no names for them; the groups are the ones ``harness.train.model.param_groups`` made,
    so the same function over the model built on the meta device gives the names, shapes and order.
    """
    flat = (states.get("optimizer") or {}).get("fp32_groups_flat")
    if not flat:
        return {}
    from transformers import AutoModelForCausalLM

    from harness.specload import load_spec
    from harness.train.model import hf_config, param_groups

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config(load_spec(RunDir.of_checkpoint(tag_dir).spec).model)
        )
    names: dict[int, list[str]] = {}  # every name of a parameter (tied embeddings have two)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    groups = param_groups(model, 0.0)
    if len(groups) != len(flat):
        raise RuntimeError(f"{tag_dir}: {len(flat)} fp32 master groups, the model has {len(groups)}")
    masters = {}
    for group, vector in zip(groups, flat, strict=True):
        offset = 0
        for p in group["params"]:
            master = vector[offset : offset + p.numel()].view(p.shape).float().clone()
            masters.update(dict.fromkeys(names[id(p)], master))
            offset += p.numel()
        if offset != vector.numel():
            raise RuntimeError(
                f"{tag_dir}: fp32 master group of {vector.numel()} values, the params hold {offset}"
            )
    return masters


def export_checkpoint(tag_dir: Path, out_dir: Path) -> Path:
    """Write an HF checkpoint of ``tag_dir`` into ``out_dir`` (replacing it). Returns ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from harness.specload import load_spec
    from harness.train.model import hf_config

    tag_dir = resolve_checkpoint(Path(tag_dir))
    run_dir = RunDir.of_checkpoint(tag_dir)
    spec = load_spec(run_dir.spec)
    ds_config = read_json(run_dir.ds_config)
    integrity.require_intact(tag_dir, spec.checkpoint.verify)  # sizes and checksums against its marker
    verify_checkpoint_files(tag_dir)
    state = consolidated_state_dict(tag_dir, ds_config)
    hf_logging.disable_progress_bar()  # shard bars; the caller says in one line what was exported

    cfg = hf_config(spec.model)
    cfg.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {tag_dir} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(run_dir.tokenizer)) if run_dir.tokenizer.is_dir() else None
    if tok is not None:
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if tok is not None:
            tok.save_pretrained(str(tmp))
        model.save_pretrained(str(tmp), safe_serialization=True)
    return out_dir


def _is_tied_copy(model: torch.nn.Module, key: str) -> bool:
    """True for an output embedding that shares storage with the input embedding (GPT-2, Qwen2 small)."""
    out = model.get_output_embeddings()
    return bool(
        out is not None
        and key.endswith("weight")
        and getattr(model.config, "tie_word_embeddings", False)
        and key.startswith(("lm_head", "embed_out"))
    )


def cmd_export(args: argparse.Namespace) -> int:
    """``harness export RUN_DIR_OR_CHECKPOINT -o DIR``."""
    tag_dir = resolve_checkpoint(Path(args.source))
    out = export_checkpoint(tag_dir, Path(args.output))
    print(f"exported {tag_dir} -> {out}")
    return 0
