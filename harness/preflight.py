"""Checks ``harness train`` runs before any rank starts: what would otherwise surface 10 s after launch
as tracebacks in every rank (a missing or empty data file, a binary .jsonl, a text field that is not
there, a tokenizer or model path that does not exist, a run directory that cannot be written, a disk
too small for one checkpoint) becomes one message naming the field and the fix, exit code 2.

Import-light (no torch, datasets or transformers): files are sniffed, not loaded. Hub names (for
data, tokenizer or model) cannot be checked without the network and pass through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.data.corpus import BUILDER_BY_SUFFIX
from harness.data.tokenizer import TOKENIZER_FILES
from harness.errors import SpecError, SpecErrors
from harness.planner.modelstats import model_stats
from harness.presets import model_config_dict
from harness.spec import DataSection, ModelSection, RunSpec

SNIFF_BYTES = 64 * 1024
"""How much of each data file is read to check it is text and holds the text field."""
SNIFF_RECORDS = 5
"""JSON lines / CSV records checked for the text field."""


def check_before_launch(spec: RunSpec, run_dir: Path, checkpoint_bytes: int | None) -> None:
    """Raise SpecErrors listing every problem found; ``checkpoint_bytes`` is the predicted size of one
    checkpoint (None when unknown: the disk check is skipped)."""
    errors: list[SpecError] = []
    errors += data_problems(spec.data)
    errors += path_problems(spec.data.tokenizer, "data.tokenizer", TOKENIZER_FILES, "a tokenizer")
    errors += path_problems(
        spec.model.name_or_path, "model.name_or_path", ("config.json",), "an HF checkpoint"
    )
    errors += run_dir_problems(run_dir, checkpoint_bytes)
    if errors:
        raise SpecErrors(errors)


def looks_local(name: str) -> bool:
    """Whether a data/tokenizer/model name is meant as a local path rather than a hub name."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def data_problems(data: DataSection) -> list[SpecError]:
    """Every listed data file (or the ``data.dataset`` path) exists, is non-empty text, and its first
    records hold ``data.text_field``."""
    if data.files:
        paths, field = [Path(f).expanduser() for f in data.files], "data.files"
    elif data.dataset != "default" and looks_local(data.dataset):
        local = Path(data.dataset).expanduser()
        if not local.exists():
            return [_missing("data.dataset", data.dataset)]
        if local.is_dir():
            return []  # the loader reports a directory without data files, and lists what it found
        paths, field = [local], "data.dataset"
    else:
        return []
    errors: list[SpecError] = []
    for path in paths:
        problem = file_problem(path, data.text_field)
        if problem:
            reason, fix = problem
            errors.append(SpecError(field, str(path), fix, reason=reason))
    return errors


def file_problem(path: Path, text_field: str) -> tuple[str, str] | None:
    """(reason, fix) when ``path`` cannot be training data, else None."""
    if not path.is_file():
        return "no such file", "check the path (relative paths are from the working directory)"
    suffix = path.suffix.lower()
    if suffix not in BUILDER_BY_SUFFIX:
        return (
            f"unsupported file type {suffix or '(none)'}",
            f"use files ending in {', '.join(sorted(BUILDER_BY_SUFFIX))}",
        )
    if not os.access(path, os.R_OK):
        return "not readable", "make the file readable by the user that runs the ranks"
    if path.stat().st_size == 0:
        return "the file is empty", "point at a file that holds documents"
    if suffix == ".parquet":
        return None  # binary by design; the loader checks its columns
    head = path.read_bytes()[:SNIFF_BYTES]
    if b"\0" in head:
        return "binary data (NUL bytes), not text", f"give {suffix} text files (UTF-8)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not a multi-byte character cut at the sniff boundary
            return f"not UTF-8 text (byte {exc.start})", f"save the file as UTF-8 {suffix}"
        text = head[: exc.start].decode("utf-8")
    builder = BUILDER_BY_SUFFIX[suffix]
    if builder == "json":
        return _json_problem(text, suffix, text_field, whole=len(head) == path.stat().st_size)
    if builder == "csv":
        header = text.splitlines()[0] if text.strip() else ""
        columns = [c.strip().strip('"') for c in header.split(",")]
        if text_field not in columns:
            return (
                f"no column {text_field!r} in the header ({', '.join(columns[:8])})",
                "set data.text_field to the column that holds the text",
            )
    return None


def _json_problem(text: str, suffix: str, text_field: str, whole: bool) -> tuple[str, str] | None:
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        if not whole:
            return None  # a large JSON array: the loader checks it
        try:
            records = json.loads(stripped)[:SNIFF_RECORDS]
        except (ValueError, TypeError):
            return "not valid JSON", "repair the file, or give JSON lines (one object per line)"
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not whole and len(lines) > 1:
            lines = lines[:-1]  # the last sniffed line may be cut
        records = []
        for number, line in enumerate(lines[:SNIFF_RECORDS], start=1):
            try:
                records.append(json.loads(line))
            except ValueError:
                return f"line {number} is not a JSON object", "give one JSON object per line (JSON lines)"
    if not records:
        return "no records", "point at a file that holds documents"
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
            return (
                f"record {number} has no field {text_field!r} (it has: {keys})",
                "set data.text_field to the field that holds the text",
            )
    return None


def path_problems(name: str | None, field: str, expected: tuple[str, ...], what: str) -> list[SpecError]:
    """A local tokenizer or model path exists and holds one of ``expected`` (hub names pass)."""
    if not name or not looks_local(name):
        return []
    path = Path(name).expanduser()
    if not path.exists():
        return [_missing(field, name)]
    if not path.is_dir() or not any((path / f).is_file() for f in expected):
        return [
            SpecError(
                field,
                name,
                f"point at a directory written by save_pretrained (it holds {' or '.join(expected)})",
                reason=f"not {what}",
            )
        ]
    return []


def run_dir_problems(run_dir: Path, checkpoint_bytes: int | None) -> list[SpecError]:
    """The run directory can be created and written, and its disk has room for one more checkpoint."""
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [
            SpecError(
                "run.output_dir",
                str(run_dir.parent),
                "choose an output_dir you can write to",
                reason=f"{existing} is not a writable directory",
            )
        ]
    if checkpoint_bytes:
        free = shutil.disk_usage(existing).free
        if free < checkpoint_bytes:
            return [
                SpecError(
                    "run.output_dir",
                    str(run_dir.parent),
                    f"free at least {_gb(checkpoint_bytes - free)} there, or choose an output_dir on a larger disk",
                    reason=f"one checkpoint needs ~{_gb(checkpoint_bytes)}, the disk has {_gb(free)} free",
                )
            ]
    return []


def checkpoint_bytes(spec: RunSpec) -> int | None:
    """Predicted bytes of one checkpoint: the training-dtype weights plus fp32 master weights and two
    Adam moments (what DeepSpeed saves over all ranks); None when the model's shape is not known offline."""

    model: ModelSection = spec.model
    try:
        cfg = model_config_dict(model.preset, model.name_or_path, model.overrides)
        params = model_stats(cfg).total_params if cfg else None
    except (SpecError, KeyError, TypeError):
        return None
    if params is None:
        return None
    weight_bytes = 4 if spec.precision.dtype == "fp32" else 2
    return params * (weight_bytes + 12)  # ZeRO's optimizer keeps an fp32 copy even in fp32 runs


def _missing(field: str, name: str) -> SpecError:
    return SpecError(
        field, name, "check the path (relative paths are from the working directory)", reason="no such path"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
