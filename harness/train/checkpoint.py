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

import errno
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.errors import SpecError
from harness.rundir import RunDir, atomic_path, write_atomic
from harness.train import integrity
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

_FULL_DISK_BYTES = 1 << 20
"""Less free than this right after a failed write: the disk is full (the write stopped for want of space)."""


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


@contextmanager
def _recording_writes(engine, tag_dir: Path, rank: int, algorithm: str | None) -> Iterator[dict[str, Any]]:
    """Size and checksum of every file DeepSpeed writes on this rank during the block, by relative path.

    DeepSpeed writes every shard through ``engine.checkpoint_engine.save(state_dict, path)`` (model and
    ZeRO files in ``runtime/engine.py``, pipeline layer files in ``PipelineModule.save_state_dict``), so
    wrapping that one method names exactly this rank's files. Its default engine only calls
    ``torch.save(state_dict, path)``, so the path is swapped for a file object that checksums the bytes
    on their way to disk (only the hash's own time; reading the files back cost 15% of the save); any
    other checkpoint engine keeps its path and the file is read back. ``records["_writing"]`` names a
    file whose write failed.
    """
    records: dict[str, Any] = {}
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:  # a stand-in engine: rank 0 lists what it finds when it merges
        yield records
        return
    had_own = "save" in vars(ckpt_engine)
    original = ckpt_engine.save
    # The zip format writes through file objects; torch's legacy format wants a real file.
    streams = type(ckpt_engine).__name__ == "TorchCheckpointEngine" and getattr(
        ckpt_engine, "zipfile_serialization", False
    )

    def save(state_dict, path, *args, **kwargs):
        records["_writing"] = Path(path).name
        if streams and algorithm:
            with open(path, "wb") as f:
                writer = integrity.HashingWriter(f, algorithm)
                result = original(state_dict, writer, *args, **kwargs)
            record = {"size": Path(path).stat().st_size, "rank": rank, "checksum": writer.hexdigest()}
            records[Path(path).relative_to(tag_dir).as_posix()] = record
        else:
            result = original(state_dict, path, *args, **kwargs)
            records.update(integrity.file_records(tag_dir, [Path(path)], rank, algorithm))
        records.pop("_writing")
        return result

    ckpt_engine.save = save
    try:
        yield records
    finally:
        if had_own:
            ckpt_engine.save = original
        else:
            del ckpt_engine.save


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
        with _recording_writes(engine, tag_dir, rank, algorithm) as records:
            # save_latest=False: DeepSpeed would publish `latest` before every rank wrote; we write it after.
            engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - any failed write: the ranks must agree before anything else
        error = exc
        _barrier(dist)  # stands in for DeepSpeed's closing barrier, which this rank skipped
    if error is None:
        try:
            path = _rank_file(tag_dir, rank)
            records["_writing"] = path.name
            with atomic_path(path) as tmp:
                torch.save({"rng": rng_state(), "client": client, "step": step}, tmp)
            records.pop("_writing")
            records.update(integrity.file_records(tag_dir, [path], rank, algorithm))
            integrity.write_manifest(tag_dir, rank, records)
        except Exception as exc:  # noqa: BLE001
            error = exc
    failed = _agree(dist, engine, world, rank, error)  # also the barrier after every rank's write
    if not failed and rank == 0:
        try:
            files = integrity.merge_manifests(tag_dir, world, algorithm)
            marker = integrity.build_marker(step, world, layout_of(engine, step, world), files, algorithm)
            write_atomic(tag_dir / MARKER, json.dumps(marker) + "\n")
            write_atomic(root / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 etc.)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not failed:
        failed = _agree(dist, engine, world, rank, error)
    if failed:
        where = records.get("_writing")
        own = f"{_error_text(error, root)}{f' writing {where}' if where else ''}" if error is not None else ""
        texts = _gather_texts(dist, world, own)
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        _barrier(dist)
        raise CheckpointError(_save_failure(run_dir, tag, texts)) from error
    if rank == 0:
        rotate(run_dir, keep_last)
    _barrier(dist)
    return tag_dir


def _agree(dist, engine, world: int, rank: int, error: BaseException | None) -> bool:
    """True on every rank if any rank's ``error`` is set (one small all-reduce)."""
    if not dist.is_initialized():
        return error is not None
    flag = torch.tensor([0.0 if error is None else 1.0], device=getattr(engine, "device", None) or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _gather_texts(dist, world: int, text: str) -> list[str]:
    """Every rank's error text ('' for none), by rank; only on the failure path."""
    if not dist.is_initialized():
        return [text]
    texts: list[Any] = [None] * world
    dist.all_gather_object(texts, text)
    return [str(t or "") for t in texts]


def _error_text(exc: BaseException, root: Path) -> str:
    """What went wrong on this rank, short. torch's zip writer reports a full disk as a RuntimeError
    without errno ("unexpected pos ...", "file write failed"), so a non-OSError while the file system
    has (almost) nothing free is called what it is."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"[:160]
    try:
        full = shutil.disk_usage(root).free < _FULL_DISK_BYTES
    except OSError:
        full = False
    return os.strerror(errno.ENOSPC) if full else text  # torch's own words stay in the rank's log


def _save_failure(run_dir: Path, tag: str, texts: list[str]) -> str:
    """The one line every rank raises: which ranks failed and why, the space a checkpoint needs (the
    previous checkpoint's size, else the predicted size) against what is free, and what was kept."""
    failures = [f"rank {r}: {t}" for r, t in enumerate(texts) if t]
    reason = "; ".join(failures[:2]) + (f"; {len(failures) - 2} more ranks" if len(failures) > 2 else "")
    root = checkpoints_dir(run_dir)
    previous = complete_checkpoints(run_dir)
    need = None
    if previous:
        need, basis = integrity.checkpoint_bytes_on_disk(previous[-1].path), f"the size of {previous[-1].tag}"
    else:
        need, basis = _predicted_bytes(run_dir), "predicted"
    free = shutil.disk_usage(root).free if root.is_dir() else None
    space = (
        f"a checkpoint of this run needs {integrity.human_bytes(need)} ({basis})"
        if need
        else "the size of a checkpoint is unknown"
    )
    if free is not None:
        space += f", {integrity.human_bytes(free)} is free in {root}"
    kept = f"{previous[-1].tag} is kept" if previous else "there is no earlier checkpoint"
    then = f"resume from {previous[-1].tag}" if previous else "start again"
    return (
        f"checkpoint {tag} could not be saved ({reason}); {space}; the partial {tag} was removed and {kept}. "
        f"Fix: free space there (or lower checkpoint.keep_last, or move run.output_dir), then run the same "
        f"command to {then}"
    )


def _predicted_bytes(run_dir: Path) -> int | None:
    try:
        from harness.preflight import checkpoint_bytes
        from harness.specload import load_spec

        return checkpoint_bytes(load_spec(RunDir(Path(run_dir)).spec))
    except Exception:  # noqa: BLE001 - only a number for a message
        return None


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


def find_verified_resume(
    run_dir: Path, section: CheckpointSection, rank: int, device=None, say: Callable[[str], None] = print
) -> CheckpointInfo | None:
    """The checkpoint every rank resumes from, verified before DeepSpeed loads anything.

    Rank 0 checks it against its marker (``checkpoint.verify``), sets aside a tag that fails and falls
    back to the previous complete one, saying each step through ``say``; then it tells every rank which
    step it chose (one all-reduce), so no rank decides from a file system it may see later than rank 0.
    An explicit ``checkpoint.resume`` tag that fails is refused on every rank.
    """
    import torch.distributed as dist

    chosen: CheckpointInfo | None = None
    refusal: SpecError | None = None
    if rank == 0:
        try:
            chosen = integrity.choose_resume(Path(run_dir), section.resume, section.verify, say)
        except SpecError as exc:
            refusal = exc
    if not dist.is_initialized():
        if refusal is not None:
            raise refusal
        return chosen
    # [refused?, chosen step or -1] from rank 0; the others add zeros.
    decision = torch.tensor([0, 0], dtype=torch.int64, device=device or "cpu")
    if rank == 0:
        decision[0] = int(refusal is not None)
        decision[1] = -1 if chosen is None else chosen.step
    dist.all_reduce(decision)
    if int(decision[0]):
        raise refusal or SpecError("checkpoint.resume", section.resume, "see rank 0's message",
                                   reason="the checkpoint failed verification")  # fmt: skip
    step = int(decision[1])
    if step < 0:
        return None
    path = Path(section.resume) if section.resume != "auto" else checkpoints_dir(run_dir) / tag_for(step)
    return CheckpointInfo(path, path.name, step)


def load(engine, ckpt: CheckpointInfo, rank: int, load_optimizer: bool = True) -> dict[str, Any]:
    """Load DeepSpeed's shards and this rank's harness state; restore RNG. Returns the client state.

    Call :func:`find_verified_resume` first: it checks the files against the marker; this checks that
    nothing in them would run code when DeepSpeed unpickles them."""
    # Written by another data-parallel size: harness.train.reshard loads its universal copy.
    from harness.train.reshard import load_resharded

    resharded = load_resharded(engine, ckpt, rank, load_optimizer, set_rng_state=set_rng_state)
    if resharded is not None:
        return resharded
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
