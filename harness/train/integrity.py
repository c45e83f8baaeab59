"""What a checkpoint holds, and whether it still holds it: the COMPLETE marker, its file list and checks.

A tag directory is trusted only by its marker, which rank 0 writes after every rank finished::

    <tag>/COMPLETE   {"format": 2, "step": 6, "tag": "step-00000006", "world_size": 2, "time": ...,
                      "layout": {"world_size": 2, "data_parallel_size": 2, "pipeline_stages": 1,
                                 "tensor_parallel": 1, "zero_stage": 1, "micro_batch_size": 4,
                                 "grad_accum": 1, "global_batch_size": 8, "precision": "fp32",
                                 "consumed_samples": 48},
                      "checksum": "xxh3_64", "total_bytes": 3276800,
                      "files": {"mp_rank_00_model_states.pt": {"size": 1234, "checksum": "9f…", "rank": 0},
                                "harness/rank-00001.pt": {...}, ...}}

Every rank checksums the files it writes as it writes them (:mod:`harness.train.checkpoint_writes`)
and leaves a small manifest beside its ``harness/rank-N.pt``; rank 0 merges the manifests into the
marker. Resume checks sizes always and checksums when ``checkpoint.verify: checksum``; a tag that
fails is renamed ``<tag>.corrupt-<time>`` (kept for inspection; resume and rotation no longer see it)
and resume falls back to the previous complete tag. No torch here: the CLI checks before launch.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import SpecError
from harness.rundir import RunDir, write_atomic

MARKER = "COMPLETE"
MARKER_FORMAT = 2
"""1: ``{step, tag, world_size, time}`` only (no file list, nothing to verify); 2: files and layout."""
TAG_RE = re.compile(r"^step-(\d{8})$")
SET_ASIDE = ".corrupt-"
"""Infix of a tag that failed verification: ``step-00000006.corrupt-20261201T063000``."""
_CHUNK_BYTES = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or trusted. The message is one line for the user, complete in
    itself (what failed, the sizes involved, what to do); no traceback adds to it."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    tag: str
    step: int


def tag_for(step: int) -> str:
    """The checkpoint tag of optimizer step ``step`` (sortable)."""
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoint tags live."""
    return RunDir(Path(run_dir)).checkpoints


def is_complete(tag_dir: Path) -> bool:
    """True when every rank finished writing this tag (rank 0's marker exists)."""
    return (Path(tag_dir) / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first (set-aside tags are not tags any more)."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = TAG_RE.match(child.name)
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
    m = TAG_RE.match(path.name)
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


# ------------------------------------------------------------------------------------------ checksums


def checksum_algorithm() -> str:
    """``xxh3_64`` (xxhash, a dependency of datasets; ~30 GB/s) or, without it, ``crc32`` (~6 GB/s)."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _hasher(algorithm: str):
    """An object with ``update(bytes)`` and ``hexdigest()`` for ``algorithm``."""
    if algorithm == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    if algorithm == "crc32":
        return _Crc32()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def file_checksum(path: Path, algorithm: str) -> str:
    """The hex checksum of a file's bytes (read into one reused buffer: no copy per chunk)."""
    digest = _hasher(algorithm)
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while num_read := f.readinto(buffer):
            digest.update(view[:num_read])
    return digest.hexdigest()


class HashingWriter:
    """A write-only file object that checksums the bytes on their way to ``file``: ``torch.save`` into it
    costs a save to the path plus the hash, no second pass over the file (bench/checkpoint_checksum.py)."""

    def __init__(self, file, algorithm: str) -> None:
        self.file = file
        self.algorithm = algorithm
        self.size = 0
        self._digest = _hasher(algorithm)

    def write(self, data) -> int:
        """Checksum, then write (``data`` is often a memoryview of torch's buffer, valid during the call)."""
        self._digest.update(data)
        written = self.file.write(data)
        self.size += len(memoryview(data).cast("B"))
        return written

    def flush(self) -> None:
        """Flush the file (torch calls it when the archive is finished)."""
        self.file.flush()

    def hexdigest(self) -> str:
        """The checksum of everything written so far."""
        return self._digest.hexdigest()


def can_compute(algorithm: str | None) -> bool:
    """True when this process can compute checksums of ``algorithm`` (xxh3 needs xxhash)."""
    if algorithm == "crc32":
        return True
    return algorithm == "xxh3_64" and checksum_algorithm() == "xxh3_64"


def file_records(tag_dir: Path, paths: list[Path], rank: int, algorithm: str | None) -> dict[str, Any]:
    """``{relative path: {size, checksum, rank}}`` of files ``rank`` wrote (no checksum without algorithm)."""
    records = {}
    for path in paths:
        record: dict[str, Any] = {"size": path.stat().st_size, "rank": rank}
        if algorithm:
            record["checksum"] = file_checksum(path, algorithm)
        records[path.relative_to(tag_dir).as_posix()] = record
    return records


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    """A rank's harness state in a tag (RNG states, data position), written by ``checkpoint.save``."""
    return Path(tag_dir) / "harness" / f"rank-{rank:05d}.pt"


def manifest_path(tag_dir: Path, rank: int) -> Path:
    """Where ``rank`` lists the files it wrote until rank 0 merges them into the marker."""
    return Path(tag_dir) / "harness" / f"rank-{rank:05d}.files.json"


def write_manifest(tag_dir: Path, rank: int, records: dict[str, Any]) -> None:
    """This rank's file list (atomic: rank 0 reads it after a barrier)."""
    write_atomic(manifest_path(tag_dir, rank), json.dumps(records) + "\n")


def merge_manifests(tag_dir: Path, world_size: int, algorithm: str | None) -> dict[str, Any]:
    """Rank 0: every rank's file list, plus any file of the tag no rank claimed (checksummed here, so
    the marker lists every file); the per-rank manifests are removed once merged."""
    tag_dir = Path(tag_dir)
    files: dict[str, Any] = {}
    manifests = [manifest_path(tag_dir, r) for r in range(world_size)]
    for path in manifests:
        files.update(json.loads(path.read_text(encoding="utf-8")))
    unclaimed = [
        p
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and p not in manifests
        and p.relative_to(tag_dir).as_posix() not in files
    ]  # fmt: skip
    files.update(file_records(tag_dir, unclaimed, 0, algorithm))
    for path in manifests:
        path.unlink()
    return dict(sorted(files.items()))


def build_marker(step: int, world_size: int, layout: dict[str, Any], files: dict[str, Any],
                 algorithm: str | None) -> dict[str, Any]:  # fmt: skip
    """The COMPLETE marker's content (``world_size`` stays at top level for older readers)."""
    return {
        "format": MARKER_FORMAT,
        "step": step,
        "tag": tag_for(step),
        "world_size": world_size,
        "time": time.time(),
        "layout": layout,
        "checksum": algorithm,
        "total_bytes": sum(f["size"] for f in files.values()),
        "files": files,
    }


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The COMPLETE marker of a tag as a dict (``layout`` and ``files`` from format 2 on).

    Raises OSError when there is none and ValueError when it is not a JSON object."""
    data = json.loads((Path(tag_dir) / MARKER).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{MARKER} is not a JSON object")
    return data


def checkpoint_bytes_on_disk(tag_dir: Path) -> int:
    """A tag's size: its marker's total, or the files' sizes added up (older markers)."""
    try:
        return int(read_marker(tag_dir)["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in Path(tag_dir).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Problem:
    """One way a tag differs from its marker."""

    file: str
    what: str
    """``missing``, ``size``, a checksum algorithm, or ``marker``."""
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what} expected {self.expected}, found {self.found}"


def verify_tag(tag_dir: Path, mode: str = "checksum", share: tuple[int, int] | None = None) -> list[Problem]:
    """Differences between a tag's files and its marker ([] when intact). ``mode`` is ``size`` or
    ``checksum`` (sizes first; checksums only of files whose size is right). ``share=(rank, world)``
    checks only the files whose writer's rank is ``rank`` modulo ``world`` (ranks verify in parallel,
    each mostly what it wrote itself)."""
    tag_dir = Path(tag_dir)
    try:
        marker = read_marker(tag_dir)
    except (OSError, ValueError) as exc:
        return [Problem(MARKER, "marker", "a JSON object", f"unreadable ({type(exc).__name__})")]
    files = marker.get("files")
    if not isinstance(files, dict):
        return []  # format 1: written before checkpoints listed their files; nothing to compare with
    algorithm = marker.get("checksum") if mode == "checksum" else None
    problems = []
    for name, record in files.items():
        if share is not None and int(record.get("rank", 0)) % share[1] != share[0]:
            continue
        path = tag_dir / name
        expected_size = int(record["size"])
        if not path.is_file():
            problems.append(Problem(name, "missing", f"{expected_size:,} bytes", "no such file"))
            continue
        size = path.stat().st_size
        if size != expected_size:
            problems.append(Problem(name, "size", f"{expected_size:,} bytes", f"{size:,} bytes"))
        elif algorithm and "checksum" in record and can_compute(algorithm):
            found = file_checksum(path, algorithm)
            if found != record["checksum"]:
                problems.append(Problem(name, algorithm, record["checksum"], found))
    return problems


def describe_problems(problems: list[Problem], limit: int = 2) -> str:
    """The first problems on one line, and how many more."""
    text = "; ".join(str(p) for p in problems[:limit])
    return text + (f" (and {len(problems) - limit} more)" if len(problems) > limit else "")


def set_aside(tag_dir: Path) -> Path:
    """Rename a failed tag to ``<tag>.corrupt-<UTC time>`` (never deleted: a person may want to look);
    the name no longer matches a tag, so resume and rotation ignore it."""
    tag_dir = Path(tag_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = tag_dir.with_name(f"{tag_dir.name}{SET_ASIDE}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}{SET_ASIDE}{stamp}-{n}")
    os.replace(tag_dir, target)
    return target


def choose_resume(
    run_dir: Path,
    resume: str,
    mode: str,
    say: Callable[[str], None] | None = None,
    verify: Callable[[Path, str], list[Problem]] = verify_tag,
) -> CheckpointInfo | None:
    """:func:`find_resume`, verified (by ``verify``): with ``auto``, a tag that fails is set aside and the
    previous complete one tried, each step said through ``say`` (one line each). An explicit tag that
    fails is refused (SpecError naming the file): the user asked for that one."""
    say = say or (lambda _line: None)
    chosen = find_resume(run_dir, resume)
    if chosen is None:
        return None
    if resume != "auto":
        problems = verify(chosen.path, mode)
        if problems:
            raise SpecError("checkpoint.resume", resume, "resume from another checkpoint (resume: auto "
                            "picks the newest intact one)", reason=describe_problems(problems))  # fmt: skip
        return chosen
    failed = False
    for info in reversed(complete_checkpoints(run_dir)):
        problems = verify(info.path, mode)
        if not problems:
            if failed:
                say(f"resuming from {info.tag} instead (the previous complete checkpoint)")
            return info
        moved = set_aside(info.path)
        problem = describe_problems(problems)
        say(f"checkpoint {info.tag} failed verification: {problem}; set aside as {moved.name}")
        failed = True
    say("no intact checkpoint is left: training starts from step 0")
    return None


def verify_for_resume(run_dir: Path, spec) -> tuple[CheckpointInfo | None, list[str]]:
    """Before launch (cheap: sizes only): the checkpoint ``spec``'s ranks will resume from, and the lines
    to show. Tags whose sizes differ from their marker are set aside now; the ranks check checksums."""
    messages: list[str] = []
    info = choose_resume(Path(run_dir), spec.checkpoint.resume, "size", messages.append)
    return info, messages


def require_intact(tag_dir: Path, mode: str = "checksum") -> None:
    """Raise SpecError (exit 2) naming the failing file if ``tag_dir`` differs from its marker."""
    problems = verify_tag(tag_dir, mode)
    if problems:
        raise SpecError(
            "checkpoint",
            str(tag_dir),
            "use another checkpoint (`harness checkpoint verify RUN_DIR` lists them)",
            reason=f"failed verification: {describe_problems(problems)}",
        )


def human_bytes(num_bytes: int) -> str:
    """``3.2 MB``-style sizes for messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"
