"""Checkpoints that resume exactly and are never trusted half-written.

DeepSpeed alone is not enough (docs/deepspeed-behaviour.md): it publishes ``latest``
before every rank has written, saves no RNG state, keeps ``client_state`` from rank 0 only and
forgets the data position. So each tag directory gets, besides DeepSpeed's shards:

    <tag>/harness/rank-00000.pt   per-rank RNG states and data-sampler position (weights_only-safe)
    <tag>/COMPLETE                 written by rank 0 after a barrier that follows every rank's write

Resume picks the newest tag with a COMPLETE marker; rotation deletes only after the new marker exists
and never deletes the newest complete checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, write_atomic

MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    """The checkpoint tag of optimizer step ``step`` (sortable)."""
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    tag: str
    step: int


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoint tags live."""
    return RunDir(Path(run_dir)).checkpoints


def is_complete(tag_dir: Path) -> bool:
    """True when every rank finished writing this tag (rank 0's marker exists)."""
    return (Path(tag_dir) / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _TAG_RE.match(child.name)
            if m and is_complete(child):
                found.append(CheckpointInfo(child, child.name, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def find_resume(run_dir: Path, resume: str) -> CheckpointInfo | None:
    """The checkpoint to resume from: ``auto`` → newest complete, ``never`` → None, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    m = _TAG_RE.match(path.name)
    if not path.is_dir() or not m:
        raise SpecError(
            "checkpoint.resume", resume, "give auto, never, or a checkpoint tag directory (…/step-NNNNNNNN)"
        )
    if not is_complete(path):
        raise SpecError(
            "checkpoint.resume",
            resume,
            "resume from a complete checkpoint (resume: auto picks the newest one)",
            reason=f"no {MARKER} marker: some rank never finished writing it",
        )
    return CheckpointInfo(path, path.name, int(m.group(1)))


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


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / "harness" / f"rank-{rank:05d}.pt"


def save(engine, run_dir: Path, step: int, rank: int, client: dict[str, Any], keep_last: int) -> Path:
    """Save a checkpoint on every rank; rank 0 marks it complete and rotates old ones.

    ``client`` is this rank's own state (sampler position, counters); it goes to a per-rank file
    together with the RNG states, because DeepSpeed's client_state is rank 0's only.
    """
    import torch.distributed as dist

    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover incomplete attempt at this step
    _barrier(dist)
    # save_latest=False: DeepSpeed would publish `latest` before every rank wrote; we write it after.
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    path = _rank_file(tag_dir, rank)
    with atomic_path(path) as tmp:
        torch.save({"rng": rng_state(), "client": client, "step": step}, tmp)
    _barrier(dist)
    if rank == 0:
        marker = {"step": step, "tag": tag, "world_size": _world(dist), "time": time.time()}
        write_atomic(tag_dir / MARKER, json.dumps(marker) + "\n")
        write_atomic(root / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 etc.)
        rotate(run_dir, keep_last)
    _barrier(dist)
    return tag_dir


def rotate(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than
    the newest complete one. The newest complete checkpoint always stays."""
    done = complete_checkpoints(run_dir)
    if not done:
        return []
    keep = {c.path for c in done[-max(keep_last, 1) :]}
    newest = done[-1].step
    removed = []
    for child in checkpoints_dir(run_dir).iterdir():
        m = _TAG_RE.match(child.name)
        if not m or child in keep:
            continue
        if is_complete(child) or int(m.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def load(engine, ckpt: CheckpointInfo, rank: int, load_optimizer: bool = True) -> dict[str, Any]:
    """Load DeepSpeed's shards and this rank's harness state; restore RNG. Returns the client state."""
    path = _rank_file(ckpt.path, rank)
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
