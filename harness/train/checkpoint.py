"""Checkpoints that resume exactly and are never trusted half-written or corrupted.

DeepSpeed alone is not enough (docs/deepspeed-behaviour.md): it publishes ``latest``
before every rank has written, saves no RNG state, keeps ``client_state`` from rank 0 only, forgets the
data position and never checks what it loads. So each tag directory gets, besides DeepSpeed's shards:

    <tag>/harness/rank-00000.pt   per-rank RNG states and data-sampler position (weights_only-safe)
    <tag>/COMPLETE                 written by rank 0 after every rank's write: every file's size and
                                   checksum, and the layout (see :mod:`harness.train.integrity`)

Resume picks the newest tag with a COMPLETE marker whose files still match it (a tag that does not is
set aside and the previous one used); rotation deletes only after the new marker exists and never
deletes the newest complete checkpoint. A save that fails on any rank (a full disk) removes its
partial tag on every rank's agreement and ends the run with one line.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.errors import SpecError
from harness.rundir import atomic_path, write_atomic
from harness.train import checkpoint_writes, integrity
from harness.train.integrity import (  # noqa: F401 - re-exported: callers say checkpoint.<name>
    MARKER,
    TAG_RE,
    CheckpointError,
    CheckpointInfo,
    checkpoints_dir,
    complete_checkpoints,
    find_resume,
    is_complete,
    read_marker,
    tag_for,
)

if TYPE_CHECKING:
    from harness.spec import CheckpointSection


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain values (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def layout_of(engine, step: int, world_size: int) -> dict[str, Any]:
    """The layout a checkpoint was written with, for the marker (None where a stand-in engine lacks it)."""

    def ask(name: str):
        method = getattr(engine, name, None)
        return method() if callable(method) else None

    from harness.train.engine import data_parallel_coords

    dp_size = data_parallel_coords(engine)[1]
    stages = int(getattr(engine, "num_stages", 1))
    global_batch = ask("train_batch_size")
    precision = "bf16" if ask("bfloat16_enabled") else "fp16" if ask("fp16_enabled") else "fp32"
    return {
        "world_size": world_size,
        "data_parallel_size": dp_size,
        "pipeline_stages": stages,
        "tensor_parallel": world_size // (dp_size * stages),  # world = data × pipeline × tensor
        "zero_stage": ask("zero_optimization_stage"),
        "micro_batch_size": ask("train_micro_batch_size_per_gpu"),
        "grad_accum": ask("gradient_accumulation_steps"),
        "global_batch_size": global_batch,
        "precision": precision if hasattr(engine, "fp16_enabled") else None,
        "consumed_samples": step * global_batch if global_batch else None,
    }


def save(
    engine,
    run_dir: Path,
    step: int,
    rank: int,
    client: dict[str, Any],
    keep_last: int,
    checksums: bool = True,
) -> Path:
    """Save a checkpoint on every rank; rank 0 marks it complete (with every file's size and checksum)
    and rotates old ones.

    ``client`` is this rank's own state (sampler position, counters); it goes to a per-rank file
    together with the RNG states, because DeepSpeed's client_state is rank 0's only. When a write fails
    on any rank (a full disk), every rank learns it, the partial tag is removed, the previous checkpoint
    stays, and every rank raises :class:`CheckpointError` with one line saying how much space is needed.
    ``checksums=False`` records sizes only (the bench compares the two).
    """
    import torch.distributed as dist

    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    world = _world(dist)
    algorithm = integrity.checksum_algorithm() if checksums else None
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover incomplete attempt at this step
    _barrier(dist)
    error: BaseException | None = None
    records: dict[str, Any] = {}
    try:
        with checkpoint_writes.recording_writes(engine, tag_dir, rank, algorithm) as records:
            # save_latest=False: DeepSpeed would publish `latest` before every rank wrote; we write it after.
            engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - any failed write: the ranks must agree before anything else
        error = exc
        _barrier(dist)  # stands in for DeepSpeed's closing barrier, which this rank skipped
    if error is None:
        try:
            path = integrity.rank_state_file(tag_dir, rank)
            records["_writing"] = path.name
            with atomic_path(path) as tmp:
                torch.save({"rng": rng_state(), "client": client, "step": step}, tmp)
            records.pop("_writing")
            records.update(integrity.file_records(tag_dir, [path], rank, algorithm))
            integrity.write_manifest(tag_dir, rank, records)
        except Exception as exc:  # noqa: BLE001
            error = exc
    failed = checkpoint_writes.agree_failed(
        dist, engine, world, rank, error
    )  # also the barrier after every rank's write
    if not failed and rank == 0:
        try:
            files = integrity.merge_manifests(tag_dir, world, algorithm)
            marker = integrity.build_marker(step, world, layout_of(engine, step, world), files, algorithm)
            write_atomic(tag_dir / MARKER, json.dumps(marker) + "\n")
            write_atomic(root / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 etc.)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not failed:
        failed = checkpoint_writes.agree_failed(dist, engine, world, rank, error)
    if failed:
        where = records.get("_writing")
        own = (
            f"{checkpoint_writes.error_text(error, root)}{f' writing {where}' if where else ''}"
            if error is not None
            else ""
        )
        texts = checkpoint_writes.gather_texts(dist, world, own)
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        _barrier(dist)
        raise CheckpointError(checkpoint_writes.save_failure_message(run_dir, tag, texts)) from error
    if rank == 0:
        rotate(run_dir, keep_last)
    _barrier(dist)
    return tag_dir


def rotate(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than
    the newest complete one. The newest complete checkpoint always stays; set-aside tags
    (``<tag>.corrupt-<time>``) are not tags and are never counted or deleted."""
    done = complete_checkpoints(run_dir)
    if not done:
        return []
    keep = {c.path for c in done[-max(keep_last, 1) :]}
    newest = done[-1].step
    removed = []
    for child in checkpoints_dir(run_dir).iterdir():
        m = TAG_RE.match(child.name)
        if not m or child in keep:
            continue
        if is_complete(child) or int(m.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


_VERIFY, _CHOSEN, _REFUSED, _FAILED = 1, 2, 3, 4
"""What rank 0 tells the other ranks while it chooses the checkpoint to resume from."""


def find_verified_resume(
    run_dir: Path, section: CheckpointSection, rank: int, device=None, say: Callable[[str], None] = print
) -> CheckpointInfo | None:
    """The checkpoint every rank resumes from, verified against its marker before DeepSpeed loads anything.

    Rank 0 walks the candidates (:func:`integrity.choose_resume`: newest complete first). For each, it
    tells every rank which tag to check; every rank checks its share of the files (those written by its
    rank, modulo the world: mostly its own, so a large checkpoint is read in parallel), the problems are
    gathered, and rank 0 sets a failing tag aside, says so through ``say`` and tries the previous one.
    Finally rank 0 tells every rank the step it chose, so no rank decides from a file system it may see
    later than rank 0. An explicit ``checkpoint.resume`` tag that fails is refused on every rank.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return integrity.choose_resume(Path(run_dir), section.resume, section.verify, say)
    world = dist.get_world_size()

    def tell(command: int = 0, step: int = 0) -> tuple[int, int]:
        message = torch.tensor([command, step], dtype=torch.int64, device=device or "cpu")
        dist.broadcast(message, src=0)
        return int(message[0]), int(message[1])

    def tag_path(step: int) -> Path:
        return Path(section.resume) if section.resume != "auto" else checkpoints_dir(run_dir) / tag_for(step)

    def verify_together(tag_dir: Path, mode: str) -> list[integrity.Problem]:
        mine = integrity.verify_tag(tag_dir, mode, share=(rank, world))
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        return sorted({p for problems in every for p in problems}, key=lambda p: p.file)

    if rank == 0:

        def verify(tag_dir: Path, mode: str) -> list[integrity.Problem]:
            tell(_VERIFY, int(TAG_RE.match(tag_dir.name).group(1)))
            return verify_together(tag_dir, mode)

        try:
            chosen = integrity.choose_resume(Path(run_dir), section.resume, section.verify, say, verify)
        except BaseException as exc:
            tell(_REFUSED if isinstance(exc, SpecError) else _FAILED)
            raise
        tell(_CHOSEN, -1 if chosen is None else chosen.step)
        return chosen
    while True:
        command, step = tell()
        if command == _VERIFY:
            verify_together(tag_path(step), section.verify)
        elif command == _CHOSEN:
            return None if step < 0 else CheckpointInfo(tag_path(step), tag_path(step).name, step)
        elif command == _REFUSED:
            raise SpecError("checkpoint.resume", section.resume, "see rank 0's message",
                            reason="rank 0 refused the checkpoint")  # fmt: skip
        else:
            raise RuntimeError("rank 0 could not choose a checkpoint to resume from (see its log)")


def load(engine, ckpt: CheckpointInfo, rank: int, load_optimizer: bool = True) -> dict[str, Any]:
    """Load DeepSpeed's shards and this rank's harness state; restore RNG. Returns the client state.

    Call :func:`find_verified_resume` first: it checks the files against the marker; this checks that
    nothing in them would run code when DeepSpeed unpickles them."""
    # Written by another data-parallel size: harness.train.reshard loads its universal copy.
    from harness.train.reshard import load_resharded

    resharded = load_resharded(engine, ckpt, rank, load_optimizer, set_rng_state=set_rng_state)
    if resharded is not None:
        return resharded
    path = integrity.rank_state_file(ckpt.path, rank)
    if not path.is_file():
        raise SpecError(
            "checkpoint.resume",
            str(ckpt.path),
            "resume with the same number of ranks the checkpoint was written with",
            reason=f"no harness state for rank {rank}",
        )
    from harness.train.safety import verify_checkpoint_files

    verify_checkpoint_files(ckpt.path)
    load_path, _ = engine.load_checkpoint(
        str(ckpt.path.parent),
        tag=ckpt.tag,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=load_optimizer,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt.path}")
    state = torch.load(path, weights_only=True)
    set_rng_state(state["rng"])
    return state["client"]


def _world(dist) -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier(dist) -> None:
    if dist.is_initialized():
        dist.barrier()
