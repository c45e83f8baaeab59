"""Resume a checkpoint on a different data-parallel size, through DeepSpeed's universal checkpoints.

ZeRO 1-3 (and bf16 ZeRO 0) save each data-parallel rank's slice of the optimizer states, and
DeepSpeed refuses to load them on another number of ranks (``ZeRORuntimeException`` in
``DeepSpeedEngine._load_zero_checkpoint``, ``runtime/engine.py``). DeepSpeed 0.19 removed its own elastic
training; what it offers instead is the *universal* format: ``deepspeed/checkpoint/ds_to_universal.py``
(``main``) rewrites a tag as one file per parameter and optimizer state, which an engine configured with
``checkpoint.load_universal`` loads on any data-parallel size (``load_hp_checkpoint_state_from_checkpoint_dir``
of the ZeRO optimizers). The harness does three things around it:

* **before launch** (:func:`plan_resume`, called by ``harness train``): compare the checkpoint's layout
  with the new one; refuse what the conversion cannot do (pipeline or tensor-parallel changes, a ZeRO
  stage change, a global batch the new data-parallel size does not divide), each with the reason and the
  options, before anything in the run directory is written; keep the global batch by re-solving micro
  batch × accumulation; convert the tag once into ``<tag>/universal/`` (built in a temporary directory,
  renamed into place, with its own ``COMPLETE`` marker); and add ``load_universal`` to the DeepSpeed
  config of that one launch (:func:`harness.dsconfig.universal_load_keys`).
* **in the ranks** (:func:`load_resharded`, called by :func:`harness.train.checkpoint.load`): load the
  universal copy, and re-derive each rank's data position from the global count of consumed samples
  (:func:`rederive_sampler_state`), so no sample is repeated or skipped.
* the plain fp32/fp16 ZeRO 0 tag holds whole optimizer states in ``mp_rank_00_model_states.pt``; DeepSpeed
  loads it on any data-parallel size as it is, so it needs no conversion, only the new data position.

The pure rules (layouts, refusals, the batch re-solve, the data position) are in
:mod:`harness.train.reshard_rules`. Imports no torch at module level: ``harness train`` imports it on a
login node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.compiler import resolve_layout
from harness.dsconfig import deep_merge, universal_load_keys
from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, write_atomic
from harness.specload import load_spec
from harness.train import integrity
from harness.train.reshard_rules import (  # noqa: F401 - re-exported: the pure rules, one import for callers
    Layout,
    check_reshard,
    consumed_samples,
    layout_from_mapping,
    ranks_text,
    rederive_sampler_state,
    resolve_batch,
    valid_data_parallel_sizes,
)

UNIVERSAL_DIR = "universal"
"""The universal copy of a tag lives in ``<tag>/universal/<tag>/`` (rotation removes it with its tag)."""
UNIVERSAL_MARKER = "COMPLETE"
"""Written last into ``<tag>/universal/``: the conversion finished."""
CONVERT_LOG = "convert.log"
"""ds_to_universal's output, kept beside the converted files."""


def spec_layout(spec, world_size: int) -> tuple[Any, Layout]:
    """(resolved spec, its :class:`Layout`) of ``spec`` on ``world_size`` ranks (no torch)."""
    resolved, plan = resolve_layout(spec, world_size)
    p = resolved.parallel
    return resolved, Layout(
        world_size=world_size,
        data_parallel=plan.data_parallel_size,
        pipeline_stages=p.pipeline_stages,
        tensor_parallel=p.tensor_parallel,
        zero_stage=int(p.zero_stage),
        micro_batch_size=plan.micro_batch_size,
        grad_accum=plan.grad_accum,
    )


def checkpoint_layout(tag_dir: Path) -> Layout:
    """The layout that wrote checkpoint ``tag_dir``.

    From the marker's ``layout`` object when it has one. Otherwise (markers written before it existed):
    the world size from the marker, the batch split and data-parallel size from rank 0's own sampler state
    (``harness/rank-00000.pt``, written by the very run that saved the tag), and the ZeRO stage and model
    parallel degrees from the run directory's spec.yaml.
    """
    tag_dir = Path(tag_dir)
    marker = _read_marker(tag_dir)
    layout = marker.get("layout")
    if isinstance(layout, dict):
        found = layout_from_mapping(layout)
        if found is not None:
            return found
    import torch  # only for markers that predate the layout record

    sampler = torch.load(integrity.rank_state_file(tag_dir, 0), weights_only=True)["client"]["sampler"]
    spec = load_spec(RunDir.of_checkpoint(tag_dir).spec)
    world = int(marker.get("world_size", sampler["dp_size"]))
    p = spec.parallel
    return Layout(
        world_size=world,
        data_parallel=int(sampler["dp_size"]),
        pipeline_stages=p.pipeline_stages,
        tensor_parallel=p.tensor_parallel,
        zero_stage=int(p.zero_stage),
        micro_batch_size=int(sampler["micro_batch_size"]),
        grad_accum=int(sampler["grad_accum_steps"]),
    )


def _read_marker(tag_dir: Path) -> dict[str, Any]:
    return integrity.read_marker(tag_dir)


def needs_conversion(tag_dir: Path) -> bool:
    """Whether the tag holds ZeRO-partitioned optimizer states (ZeRO 1-3, bf16 ZeRO 0)."""
    return any(Path(tag_dir).glob("*_optim_states.pt"))


def universal_dir(tag_dir: Path) -> Path:
    """``<tag>/universal``: load dir of the converted copy (its DeepSpeed tag is the tag's name)."""
    return Path(tag_dir) / UNIVERSAL_DIR


def is_converted(tag_dir: Path) -> bool:
    """True when the universal copy of ``tag_dir`` finished converting."""
    return (universal_dir(tag_dir) / UNIVERSAL_MARKER).is_file()


def convert_to_universal(tag_dir: Path, source: Layout | None = None) -> Path:
    """Convert ``tag_dir`` once into ``<tag>/universal/`` with DeepSpeed's ``ds_to_universal``.

    Runs as a subprocess (``python -m deepspeed.checkpoint.ds_to_universal``) in a temporary directory that
    is renamed into place only after the conversion succeeded and the marker is written; an existing
    complete copy is reused. ``--inject_missing_state`` adds the ``universal_checkpoint_info`` record
    that ZeRO 1/2 tags lack; DeepSpeed's reviewers call it safe for data-parallel changes, the only ones
    the harness converts. The tag's files are scanned first (:mod:`harness.train.safety`), because the
    conversion unpickles them with ``weights_only=False``. Raises SpecError when DeepSpeed fails.
    """
    from harness.train.safety import verify_checkpoint_files

    tag_dir = Path(tag_dir)
    out = universal_dir(tag_dir)
    if is_converted(tag_dir):
        return out
    verify_checkpoint_files(tag_dir)
    started = time.time()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        # ds_to_universal writes `latest_universal` beside its output folder, i.e. into tmp. Its worker
        # processes each hold shards in memory: half the cores, at most DeepSpeed's defaults (4 and 2).
        extract = max(1, min(4, (os.cpu_count() or 2) // 2))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp / tag_dir.name), "--inject_missing_state",
               "--num_extract_workers", str(extract), "--num_merge_workers", str(max(1, extract // 2))]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        (tmp / CONVERT_LOG).write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise SpecError(
                "checkpoint.resume",
                str(tag_dir),
                "resume on the world size the checkpoint was written with, or start a new run "
                "(checkpoint.resume: never)",
                reason=f"DeepSpeed's ds_to_universal could not convert it (exit {done.returncode}: {last})",
            )
        record = {
            "tag": tag_dir.name,
            "source_layout": dataclasses.asdict(source) if source else None,
            "seconds": round(time.time() - started, 2),
            "time": time.time(),
        }
        write_atomic(tmp / UNIVERSAL_MARKER, json.dumps(record) + "\n")
    return out


def plan_resume(spec, world_size: int, *, dry_run: bool = False, say=None, _verified: Path | None = None):
    """What ``harness train`` launches when ``checkpoint.resume`` finds a checkpoint of another layout.

    Returns ``spec`` unchanged when there is nothing to resume or the layout is the same; otherwise a
    spec whose batch keeps the checkpoint's global batch on the new data-parallel size and, when the tag
    holds partitioned optimizer states, whose DeepSpeed keys load the universal copy (converted here,
    unless ``dry_run``). Raises SpecError for a change it cannot make, before anything is written.
    """
    say = say or _say
    if spec.checkpoint.resume == "never":
        return spec
    run_dir = RunDir.of(spec)
    if spec.checkpoint.resume == "auto" and not any(run_dir.checkpoints.glob("*/COMPLETE")):
        return spec  # nothing to resume: keep torch out of a fresh start
    if dry_run:
        ckpt = integrity.find_resume(run_dir.root, spec.checkpoint.resume)
    else:  # sizes now (cheap); a truncated tag is set aside before its layout is planned on
        ckpt = integrity.choose_resume(run_dir.root, spec.checkpoint.resume, "size", say)
    if ckpt is None:
        return spec
    old = checkpoint_layout(ckpt.path)
    resolved, new = spec_layout(spec, world_size)
    same = ("data_parallel", "pipeline_stages", "tensor_parallel", "zero_stage")
    if all(getattr(old, name) == getattr(new, name) for name in same):
        return spec  # the usual resume (a changed batch split alone is the sampler's to refuse)
    checked = ckpt.path == _verified or spec.checkpoint.verify != "checksum" or is_converted(ckpt.path)
    if not dry_run and not checked:
        # The conversion reads every file anyway: check them first, so the ranks never fall back from
        # a converted tag to an older one of yet another layout.
        verified = integrity.choose_resume(run_dir.root, spec.checkpoint.resume, "checksum", say)
        if verified is None or verified.path != ckpt.path:  # the fallback's layout may differ: plan again
            return plan_resume(spec, world_size, dry_run=dry_run, say=say,
                               _verified=verified.path if verified else None)  # fmt: skip
    b = resolved.batch
    explicit = (
        b.global_batch_tokens // resolved.data.seq_len if b.global_batch_tokens else b.global_batch_size
    )
    micro, accum = check_reshard(old, new, tag=str(ckpt.path), explicit_global=explicit)
    batch = dataclasses.replace(
        b, micro_batch_size=micro, grad_accum=accum, global_batch_size=None, global_batch_tokens=None
    )
    out = dataclasses.replace(resolved, batch=batch)
    say(
        f"checkpoint {ckpt.tag} was written by {old.describe()}; resuming on {ranks_text(world_size)} with the "
        f"same global batch of {old.global_batch_size}: micro {micro} × accumulation {accum} × "
        f"data-parallel {new.data_parallel}"
    )
    if not needs_conversion(ckpt.path):
        say(
            "its optimizer states are not partitioned (ZeRO 0): DeepSpeed loads them on any data-parallel size"
        )
        return out
    if dry_run:
        say(f"would convert it to DeepSpeed's universal format in {universal_dir(ckpt.path)}")
    elif is_converted(ckpt.path):
        say(f"using its universal copy {universal_dir(ckpt.path)}")
    else:
        started = time.time()
        path = convert_to_universal(ckpt.path, old)
        say(f"converted it to DeepSpeed's universal format in {time.time() - started:.1f} s: {path}")
    return dataclasses.replace(out, deepspeed=deep_merge(out.deepspeed, universal_load_keys()))


def _say(message: str) -> None:
    print(f"harness: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- ranks


def load_resharded(
    engine, ckpt, rank: int, load_optimizer: bool = True, *, set_rng_state=None
) -> dict[str, Any] | None:
    """For :func:`harness.train.checkpoint.load`: load ``ckpt`` onto a different data-parallel size.

    Returns None when the checkpoint's data-parallel size is this engine's and no universal load was
    asked for (the caller loads as usual). Otherwise loads the universal copy (or, for a ZeRO 0 tag, the
    tag itself), restores this rank's RNG state with ``set_rng_state`` (checkpoint.py's, passed in: this
    module does not import checkpoint.py, which imports it) when the checkpoint had this rank, else seeds
    it from the run's seed, step and rank, and returns the client state with the data position re-derived.
    """
    import numpy as np
    import torch

    from harness.train.engine import data_parallel_coords
    from harness.train.safety import verify_checkpoint_files

    first_file = integrity.rank_state_file(ckpt.path, 0)
    first = torch.load(first_file, weights_only=True)["client"] if first_file.is_file() else {}
    _, dp_size = data_parallel_coords(engine)
    asked = getattr(engine, "load_universal_checkpoint", None)  # absent on test stand-ins
    universal = bool(asked()) if callable(asked) else False
    if "sampler" not in first or (first["sampler"]["dp_size"] == dp_size and not universal):
        return None  # the usual load (which also refuses a tag without this rank's state)
    verify_checkpoint_files(ckpt.path)
    if needs_conversion(ckpt.path):
        if not universal or not is_converted(ckpt.path):
            raise SpecError(
                "checkpoint.resume",
                str(ckpt.path),
                "start the run with `harness train`, which converts the checkpoint before launch",
                reason=f"the checkpoint was written with data-parallel size {first['sampler']['dp_size']} and "
                f"this launch has {dp_size}, but no converted universal copy was prepared for it",
            )
        load_dir, tag = universal_dir(ckpt.path), ckpt.tag
    else:
        load_dir, tag = ckpt.path.parent, ckpt.tag
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    if universal:
        _unshare_step_tensors(engine.optimizer)
    sampler = rederive_sampler_state(
        first["sampler"],
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        grad_accum=engine.gradient_accumulation_steps(),
        dp_size=dp_size,
    )
    own = integrity.rank_state_file(ckpt.path, rank)
    if own.is_file() and set_rng_state is not None:
        set_rng_state(torch.load(own, weights_only=True)["rng"])
    else:
        # A rank the checkpoint did not have: fresh streams that differ by rank, as a fresh start's do.
        seed = int(
            np.random.SeedSequence([int(sampler["seed"]), int(first["step"]), rank]).generate_state(1)[0]
        )
        import random

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return {**first, "sampler": sampler}


def _unshare_step_tensors(optimizer) -> None:
    """Give every parameter group's optimizer state its own ``step`` tensor.

    DeepSpeed's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``,
    ``runtime/zero/stage3.py``) stores one and the same ``step`` tensor in the state of every parameter
    group. torch's Adam/AdamW increment ``step`` in place, once per group, so with two groups (decay and
    no decay) the bias correction ran ahead after the first step (measured: losses 1e-3 apart four steps
    after a 2 → 1 resume, 1e-7 with this).
    """
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()
