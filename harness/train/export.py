"""Export a complete checkpoint to a normal Hugging Face checkpoint (``from_pretrained`` just works).

    harness export runs/tiny-cpu -o hf/          # newest complete checkpoint of the run
    harness export runs/tiny-cpu/checkpoints/step-00000060 -o hf/ --max-shard-size 2GB

Weights are the fp32 master weights: the ZeRO partitions' masters for ZeRO 1-3 (and bf16 runs, whose
optimizer keeps fp32 partitions), the module in fp32 or the optimizer's flat fp32 groups in bf16/fp16
for ZeRO 0; pipeline and AutoTP checkpoints are joined from their per-stage / per-rank files. They are
streamed one parameter at a time (``export_sources``) into safetensors shards laid out as
``save_pretrained`` lays them out (``export_writer``), so the export holds about one parameter and a
bounded window of mapped checkpoint pages, never the whole model (docs/export.md). With config.json,
generation_config.json and the run's tokenizer, everything is written into a temporary directory
renamed into place, so a failed export leaves nothing half-written. A checkpoint whose files differ
from its COMPLETE marker (sizes, checksums) is refused, naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, read_json
from harness.train import checkpoint, integrity
from harness.train.export_sources import checkpoint_tensors
from harness.train.export_writer import (
    DEFAULT_MAX_SHARD_SIZE,
    Entry,
    FlatPieces,
    ShardWriter,
    parse_shard_size,
)
from harness.train.export_zero import RELOAD_BYTES
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
    """fp32 weights of the whole model from a (possibly sharded) DeepSpeed checkpoint, all in memory
    (tests and small models; the export streams :func:`checkpoint_tensors` instead)."""
    model = meta_model(Path(tag_dir))
    return {
        name: (value.tensor() if isinstance(value, FlatPieces) else value).clone()
        for name, value in checkpoint_tensors(tag_dir, ds_config, model)
    }


def meta_model(tag_dir: Path) -> torch.nn.Module:
    """The run's HF model in fp32 on the meta device, weights tied: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    from harness.specload import load_spec
    from harness.train.model import hf_config

    cfg = hf_config(load_spec(RunDir.of_checkpoint(tag_dir).spec).model)
    cfg.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.tie_weights()
    return model


def planned_entries(model: torch.nn.Module) -> tuple[list[Entry], set[str]]:
    """What ``save_pretrained`` would write for ``model``: its state dict in order, each tied tensor
    once (under its first name); and the names left out as second names of tied tensors."""
    entries: list[Entry] = []
    aliases: set[str] = set()
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases.add(name)
            continue
        seen.add(id(value))
        entries.append(Entry(name, tuple(value.shape), value.dtype))
    return entries, aliases


def export_checkpoint(
    tag_dir: Path, out_dir: Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write an HF checkpoint of ``tag_dir`` into ``out_dir`` (replacing it), in safetensors shards of at
    most ``max_shard_size`` (``"2GB"``, or bytes). Returns ``out_dir``."""
    from transformers import AutoTokenizer, GenerationConfig

    from harness.specload import load_spec

    max_shard_bytes = parse_shard_size(max_shard_size)
    _import_deepspeed_quietly()
    tag_dir = resolve_checkpoint(Path(tag_dir))
    run_dir = RunDir.of_checkpoint(tag_dir)
    spec = load_spec(run_dir.spec)
    ds_config = read_json(run_dir.ds_config)
    integrity.require_intact(tag_dir, spec.checkpoint.verify)  # sizes and checksums against its marker
    verify_checkpoint_files(tag_dir)

    model = meta_model(tag_dir)
    entries, aliases = planned_entries(model)
    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(run_dir.tokenizer)) if run_dir.tokenizer.is_dir() else None
    if tok is not None:
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    # Bounded by the smaller of a shard and RELOAD_BYTES: the file pages one mapping may hold.
    budget = min(max_shard_bytes, RELOAD_BYTES)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if tok is not None:
            tok.save_pretrained(str(tmp))
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(tmp))
        if model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        writer = ShardWriter(tmp, entries, max_shard_bytes)
        unexpected = []
        try:
            for name, value in checkpoint_tensors(tag_dir, ds_config, model, budget):
                if name in writer.entries:
                    writer.write(name, value)
                elif name not in aliases:
                    unexpected.append(name)
                del value  # a view of a mapped file: let its mapping go when the source drops it
            missing = writer.missing()
            if missing or unexpected:
                raise RuntimeError(
                    f"checkpoint {tag_dir} does not match the model: missing {missing}, unexpected {unexpected}"
                )
            writer.finish(model.num_parameters())
        finally:
            writer.close()
    return out_dir


def _import_deepspeed_quietly() -> None:
    """Import DeepSpeed without its import-time "Setting accelerator to CPU" warning (on a machine
    without a GPU it says nothing about an export). Its logger's handler binds the stdout of the moment
    it is imported: stderr here, so the export's stdout stays its one line."""
    if "deepspeed" in sys.modules:
        return
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    finally:
        logging.disable(disabled)


def cmd_export(args: argparse.Namespace) -> int:
    """``harness export RUN_DIR_OR_CHECKPOINT -o DIR [--max-shard-size SIZE]``."""
    max_shard_size = getattr(args, "max_shard_size", DEFAULT_MAX_SHARD_SIZE)
    parse_shard_size(max_shard_size)  # a bad size is refused before anything is read
    tag_dir = resolve_checkpoint(Path(args.source))
    out = export_checkpoint(tag_dir, Path(args.output), max_shard_size)
    print(f"exported {tag_dir} -> {out}")
    return 0
