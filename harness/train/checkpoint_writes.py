"""What a checkpoint save writes on each rank, and how a save that fails on any rank ends.

:func:`recording_writes` names and checksums every file DeepSpeed writes on this rank (the lists go into
the COMPLETE marker, :mod:`harness.train.integrity`). A write that fails (a full disk) must not leave
the other ranks waiting: :func:`agree_failed` makes every rank learn it, :func:`gather_texts` collects
what each rank saw, and :func:`save_failure_message` is the one line every rank raises.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.rundir import RunDir
from harness.train import integrity
from harness.train.integrity import checkpoints_dir, complete_checkpoints

_FULL_DISK_BYTES = 1 << 20
"""Less free than this right after a failed write: the disk is full (the write stopped for want of space)."""


@contextmanager
def recording_writes(engine, tag_dir: Path, rank: int, algorithm: str | None) -> Iterator[dict[str, Any]]:
    """Size and checksum of every file DeepSpeed writes on this rank during the block, by relative path.

    DeepSpeed writes every shard through ``engine.checkpoint_engine.save(state_dict, path)`` (model and
    ZeRO files in ``runtime/engine.py``, pipeline layer files in ``PipelineModule.save_state_dict``), so
    wrapping that one method names exactly this rank's files. Its default engine only calls
    ``torch.save(state_dict, path)``, so the path is swapped for a file object that checksums the bytes
    on their way to disk (only the hash's own time; reading the files back cost 15% of the save); any
    other checkpoint engine keeps its path and the file is read back. ``records["_writing"]`` names a
    file whose write failed.

    While the files are checksummed this way, torch's own CRC32 of every zip record is switched off: it
    cost 20% of a save (four times the xxh3), and ``torch.load`` never checks it, where resume checks
    ours. (``unzip -t`` then reports CRC errors in these files; torch reads them as before.)
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
            with open(path, "wb") as f, _without_zip_crc32():
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


@contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """torch.save without the CRC32 of each zip record (the file's checksum replaces it), then as before."""
    from torch import serialization

    if not hasattr(serialization, "set_crc32_options"):  # torch < 2.5: always computed
        yield
        return
    before = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(before)


def agree_failed(dist, engine, world: int, rank: int, error: BaseException | None) -> bool:
    """True on every rank if any rank's ``error`` is set (one small all-reduce)."""
    import torch

    if not dist.is_initialized():
        return error is not None
    flag = torch.tensor([0.0 if error is None else 1.0], device=getattr(engine, "device", None) or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather_texts(dist, world: int, text: str) -> list[str]:
    """Every rank's error text ('' for none), by rank; only on the failure path."""
    if not dist.is_initialized():
        return [text]
    texts: list[Any] = [None] * world
    dist.all_gather_object(texts, text)
    return [str(t or "") for t in texts]


def error_text(exc: BaseException, root: Path) -> str:
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


def save_failure_message(run_dir: Path, tag: str, texts: list[str]) -> str:
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
        need, basis = predicted_bytes(run_dir), "predicted"
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


def predicted_bytes(run_dir: Path) -> int | None:
    try:
        from harness.preflight import checkpoint_bytes
        from harness.specload import load_spec

        return checkpoint_bytes(load_spec(RunDir(Path(run_dir)).spec))
    except Exception:  # noqa: BLE001 - only a number for a message
        return None
