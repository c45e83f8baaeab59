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

Imports no torch at module level: ``harness train`` imports it on a login node.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.compiler import resolve_layout
from harness.dsconfig import deep_merge, universal_load_keys
from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, write_atomic
from harness.specload import load_spec
from harness.train import integrity

UNIVERSAL_DIR = "universal"
"""The universal copy of a tag lives in ``<tag>/universal/<tag>/`` (rotation removes it with its tag)."""
UNIVERSAL_MARKER = "COMPLETE"
"""Written last into ``<tag>/universal/``: the conversion finished."""
CONVERT_LOG = "convert.log"
"""ds_to_universal's output, kept beside the converted files."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How a run was (or will be) laid out: the numbers a resume must match or convert."""

    world_size: int
    """Ranks in the job."""
    data_parallel: int
    """world / (pipeline × tensor)."""
    pipeline_stages: int
    """Pipeline-parallel degree."""
    tensor_parallel: int
    """Tensor-parallel (AutoTP) degree."""
    zero_stage: int
    """ZeRO stage 0-3."""
    micro_batch_size: int
    """Samples per rank per forward/backward."""
    grad_accum: int
    """Micro-batches per optimizer step."""

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum * self.data_parallel

    def describe(self) -> str:
        """One line for messages: ``2 ranks (data-parallel 2), ZeRO 1, micro 4 × accumulation 1``."""
        extra = []
        if self.pipeline_stages > 1:
            extra.append(f"pipeline {self.pipeline_stages}")
        if self.tensor_parallel > 1:
            extra.append(f"tensor {self.tensor_parallel}")
        split = ", ".join([f"data-parallel {self.data_parallel}", *extra])
        return (
            f"{self.world_size} rank{'s' if self.world_size != 1 else ''} ({split}), ZeRO {self.zero_stage}, "
            f"micro {self.micro_batch_size} × accumulation {self.grad_accum}"
        )


# Names the marker's ``layout`` object may use for each field (checkpoint.py writes it).
_LAYOUT_KEYS = {
    "world_size": ("world_size", "world"),
    "data_parallel": ("data_parallel", "data_parallel_size", "dp"),
    "pipeline_stages": ("pipeline_stages", "pipeline", "pp"),
    "tensor_parallel": ("tensor_parallel", "tensor", "tp"),
    "zero_stage": ("zero_stage", "zero"),
    "micro_batch_size": ("micro_batch_size", "micro"),
    "grad_accum": ("grad_accum", "grad_accum_steps", "gradient_accumulation_steps"),
}


def layout_from_mapping(raw: dict[str, Any]) -> Layout | None:
    """A :class:`Layout` from a marker's ``layout`` object; None when a field is missing."""
    values = {}
    for name, keys in _LAYOUT_KEYS.items():
        found = next((raw[k] for k in keys if isinstance(raw.get(k), int)), None)
        if found is None:
            return None
        values[name] = int(found)
    return Layout(**values)


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

    sampler = torch.load(rank_state_file(tag_dir, 0), weights_only=True)["client"]["sampler"]
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


def resolve_batch(global_batch: int, data_parallel: int, micro_wanted: int) -> tuple[int, int]:
    """(micro batch, accumulation) that keep ``global_batch`` on ``data_parallel`` ranks.

    The largest micro batch not above ``micro_wanted`` that divides the per-rank share (so memory per
    micro-batch does not grow); raises ValueError when the ranks cannot share the batch evenly.
    """
    if global_batch % data_parallel:
        raise ValueError(f"{global_batch} samples cannot be split evenly over {data_parallel} ranks")
    per_rank = global_batch // data_parallel
    micro = max(m for m in range(1, min(micro_wanted, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def valid_data_parallel_sizes(global_batch: int, near: int) -> list[int]:
    """The data-parallel sizes around ``near`` that divide ``global_batch`` (at most one each side)."""
    divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
    below = [d for d in divisors if d < near]
    above = [d for d in divisors if d > near]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def check_reshard(
    old: Layout, new: Layout, *, tag: str, explicit_global: int | None = None
) -> tuple[int, int]:
    """Whether ``old`` → ``new`` can resume; returns the new (micro batch, accumulation).

    Raises SpecError (field ``checkpoint.resume``) with the reason and the options for a change the
    conversion cannot do. Pure: the unit tests call it with plain layouts.
    """
    keep = (
        f"resume on {old.world_size} rank{'s' if old.world_size != 1 else ''} as the checkpoint was written"
    )
    fresh = "or start a new run (checkpoint.resume: never, or another run.name)"
    if (old.pipeline_stages, old.tensor_parallel) != (new.pipeline_stages, new.tensor_parallel):
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"set parallel.pipeline_stages: {old.pipeline_stages} and parallel.tensor_parallel: "
            f"{old.tensor_parallel} (any world size that is a multiple of "
            f"{old.pipeline_stages * old.tensor_parallel} works), {fresh}",
            reason=f"the checkpoint was written with pipeline_stages {old.pipeline_stages} × tensor_parallel "
            f"{old.tensor_parallel} and this launch has {new.pipeline_stages} × {new.tensor_parallel}; the "
            "harness converts checkpoints to a new data-parallel size only (DeepSpeed's universal "
            "conversion is not tested here for pipeline stages or AutoTP slices)",
        )
    if old.data_parallel != new.data_parallel and old.pipeline_stages * old.tensor_parallel > 1:
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"{keep}, {fresh}",
            reason=f"the data-parallel size changes ({old.data_parallel} → {new.data_parallel}) in a run with "
            "pipeline stages or tensor parallelism; the harness converts only plain data-parallel "
            "ZeRO checkpoints",
        )
    if old.zero_stage != new.zero_stage:
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"set parallel.zero_stage: {old.zero_stage}, {fresh}",
            reason=f"the checkpoint was written with ZeRO {old.zero_stage} and this launch has ZeRO "
            f"{new.zero_stage}; a ZeRO stage change on resume is not supported",
        )
    glob = old.global_batch_size
    if explicit_global is not None and explicit_global != glob:
        raise SpecError(
            "batch.global_batch_size",
            explicit_global,
            f"set batch.global_batch_size: {glob} (or leave it out), {fresh}",
            reason=f"the checkpoint's run steps {glob} samples at a time; resuming keeps the global batch "
            "so the data order and learning-rate schedule continue",
        )
    try:
        return resolve_batch(glob, new.data_parallel, new.micro_batch_size)
    except ValueError:
        sizes = valid_data_parallel_sizes(glob, new.data_parallel)
        mp = new.pipeline_stages * new.tensor_parallel
        options = " or ".join(str(d * mp) for d in sizes)
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"launch a world size whose data-parallel size divides {glob} (nearest: {options} ranks), "
            f"{keep}, {fresh}",
            reason=f"the global batch of {glob} samples cannot be split over {new.data_parallel} "
            "data-parallel ranks",
        ) from None


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
        # ds_to_universal writes `latest_universal` beside its output folder, i.e. into tmp.
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp / tag_dir.name), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
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


def plan_resume(spec, world_size: int, *, dry_run: bool = False, say=None):
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
    ckpt = integrity.find_resume(run_dir.root, spec.checkpoint.resume)
    if ckpt is None:
        return spec
    old = checkpoint_layout(ckpt.path)
    resolved, new = spec_layout(spec, world_size)
    same = ("data_parallel", "pipeline_stages", "tensor_parallel", "zero_stage")
    if all(getattr(old, name) == getattr(new, name) for name in same):
        return spec  # the usual resume (a changed batch split alone is the sampler's to refuse)
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
        f"checkpoint {ckpt.tag} was written by {old.describe()}; resuming on {world_size} ranks with the "
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


def consumed_samples(sampler_state: dict[str, Any]) -> int:
    """Samples all data-parallel ranks together have read in the sampler state's epoch."""
    return (
        int(sampler_state["position"])
        * int(sampler_state["micro_batch_size"])
        * int(sampler_state["dp_size"])
    )


def rederive_sampler_state(
    state: dict[str, Any], *, micro_batch_size: int, grad_accum: int, dp_size: int
) -> dict[str, Any]:
    """A :class:`~harness.data.sampler.BlockSampler` state for a new split of the same global batch.

    The global order of an epoch does not depend on the split (see harness/data/sampler.py): after ``k``
    optimizer steps every split has read ``perm[:k*G]``. So the position is re-derived from the samples
    consumed: ``k = position × micro × dp / G`` and the new position is ``k × accumulation``. Raises
    ValueError when the global batch differs or the state is not at an optimizer-step boundary.
    """
    old_global = int(state["micro_batch_size"]) * int(state["dp_size"]) * int(state["grad_accum_steps"])
    new_global = micro_batch_size * dp_size * grad_accum
    if old_global != new_global:
        raise ValueError(f"the global batch changes from {old_global} to {new_global} samples")
    consumed = consumed_samples(state)
    if consumed % old_global:
        raise ValueError(f"{consumed} consumed samples is not a whole number of steps of {old_global}")
    out = dict(state)
    out.update(
        micro_batch_size=micro_batch_size,
        dp_size=dp_size,
        grad_accum_steps=grad_accum,
        position=consumed // old_global * grad_accum,
    )
    return out


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    """A rank's harness state in a tag (written by :func:`harness.train.checkpoint.save`)."""
    return Path(tag_dir) / "harness" / f"rank-{rank:05d}.pt"


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

    first_file = rank_state_file(ckpt.path, 0)
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
    own = rank_state_file(ckpt.path, rank)
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
