"""The embedded default corpus: Python's own standard library source, read from disk.

``data.dataset: default`` trains on text that every Python install already has, so a first run needs no
network, no download and no data files. The corpus is built deterministically:

1. Walk ``sysconfig.get_paths()["stdlib"]`` and collect every ``*.py`` file as a POSIX path relative to
   that root.
2. Drop noise and machine-specific files: any directory named in :data:`SKIPPED_DIRS` (``site-packages``,
   the test suites, ``idlelib``, ``lib2to3``, ``turtledemo``, ``ensurepip``, the ``encodings`` charmap
   tables, ``__pycache__``, ``lib-dynload``, ``config-*``) and ``_sysconfigdata_*.py`` (it records the
   build machine's paths, so it differs between installs of the same version).
3. Sort the relative paths (plain string order) and take whole files in that order while they fit in
   ``max_bytes`` (file sizes on disk); a file that would overflow the budget is skipped and the walk goes
   on, so smaller later files still fill the remainder.
4. Each file is one document (decoded as UTF-8, undecodable bytes replaced).

The result is identical for a given Python version (the stdlib source ships with the interpreter). With
the default cap of :data:`DEFAULT_CORPUS_MAX_BYTES` it is a few MB of code and docstrings plus the English
pydoc topics; training a BPE on it and tokenizing it takes seconds on two cores.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import SpecError

if TYPE_CHECKING:
    import datasets

DEFAULT_CORPUS_MAX_BYTES = 6_000_000
"""Default size cap of the embedded corpus (6 MB, ~1.4M tokens with a 32k-50k BPE): enough that dropping
the final partial block loses under 0.1% of the tokens up to seq_len 1024, small enough that training a
tokenizer on it and tokenizing it take seconds on two cores."""

SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",
        "__pycache__",
        "lib-dynload",
    }
)
"""Directory names left out of the default corpus (third-party code, test data, generated tables)."""


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> list[Path]:
    """The stdlib files that make up the default corpus, in corpus order (see the module docstring)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = stdlib_root()
    rel_paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages, which can be far larger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("config-")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                rel_paths.append((rel_dir / name).as_posix())
    rel_paths.sort()

    chosen: list[Path] = []
    budget_bytes = max_bytes
    for rel in rel_paths:
        path = root / rel
        size_bytes = path.stat().st_size
        if 0 < size_bytes <= budget_bytes:
            chosen.append(path)
            budget_bytes -= size_bytes
    return chosen


def default_corpus_texts(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> list[str]:
    """The embedded default corpus: one document per stdlib source file, at most ``max_bytes`` in total.

    Needs no network and is reproducible for a given Python version; see the module docstring for the
    exact construction.
    """
    return [p.read_bytes().decode("utf-8", errors="replace") for p in default_corpus_files(max_bytes)]


def default_corpus_fingerprint(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> str:
    """A string that changes whenever the default corpus would: the Python version, stdlib path and cap."""
    return f"stdlib-corpus-v1|{sys.version}|{stdlib_root()}|{max_bytes}"


# --- loading the run's texts -------------------------------------------------------------------------

BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
"""Local file suffix -> ``datasets`` builder. A text file is one document (``sample_by="document"``)."""

TEXT_COLUMN = "text"
"""The single column of the dataset :func:`load_texts` returns."""


def load_texts(
    dataset: str = "default",
    files: Sequence[str] = (),
    text_field: str = "text",
    *,
    cache_dir: str | Path | None = None,
    max_bytes: int = DEFAULT_CORPUS_MAX_BYTES,
) -> datasets.Dataset:
    """Load the run's documents as a ``datasets.Dataset`` with one string column, ``text``.

    - ``files`` non-empty: those local files, used instead of ``dataset``.
    - ``dataset == "default"``: the embedded corpus (:func:`default_corpus_texts` with ``max_bytes``).
    - ``dataset`` an existing local file or directory: the file, or every supported file under the
      directory (recursively, sorted, hidden files skipped).
    - otherwise an HF dataset name, ``train`` split, through ``datasets.load_dataset`` (needs the hub or a
      local HF cache; offline this fails with a SpecError naming ``data.dataset``).

    Local files go through ``datasets.load_dataset`` with the builder for their suffix
    (:data:`BUILDER_BY_SUFFIX`). ``text_field`` names the text column of json/jsonl/csv/parquet data;
    a ``.txt`` file is one document in a ``text`` column. ``cache_dir`` is the ``datasets`` cache.
    """
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    if files:
        paths = [_existing_file(f, "data.files") for f in files]
        return _load_local_files(paths, text_field, cache, field="data.files")
    if dataset == "default":
        return datasets.Dataset.from_dict({TEXT_COLUMN: default_corpus_texts(max_bytes)})

    local = Path(dataset).expanduser()
    if local.is_dir():
        paths = sorted(
            p
            for p in local.rglob("*")
            if p.is_file()
            and p.suffix.lower() in BUILDER_BY_SUFFIX
            and not any(part.startswith(".") for part in p.relative_to(local).parts)
        )
        if not paths:
            raise SpecError(
                "data.dataset",
                dataset,
                f"put data files ({', '.join(sorted(BUILDER_BY_SUFFIX))}) in the directory, or point "
                "data.dataset elsewhere",
                reason="the directory holds no supported data files",
            )
        return _load_local_files(paths, text_field, cache, field="data.dataset")
    if local.is_file():
        return _load_local_files([local], text_field, cache, field="data.dataset")
    if dataset.startswith(("/", ".", "~")) or local.suffix.lower() in BUILDER_BY_SUFFIX:
        raise SpecError(
            "data.dataset",
            dataset,
            "check the path (relative paths are from the working directory), or use 'default'",
            reason="no such file or directory",
        )
    return _load_hub_dataset(dataset, text_field, cache)


def _existing_file(path: str, field: str) -> Path:
    """``path`` as a Path if it is a readable file with a supported suffix, else a SpecError on ``field``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(
            field,
            path,
            "check the path (relative paths are from the working directory)",
            reason="no such file",
        )
    if p.suffix.lower() not in BUILDER_BY_SUFFIX:
        raise SpecError(
            field,
            path,
            f"use files ending in {', '.join(sorted(BUILDER_BY_SUFFIX))}",
            reason=f"unsupported file type {p.suffix or '(none)'}",
        )
    return p


def _load_local_files(
    paths: Sequence[Path], text_field: str, cache_dir: str | None, field: str
) -> datasets.Dataset:
    """Load local files grouped by builder, keep only their text column, and concatenate in file order."""
    import datasets

    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(BUILDER_BY_SUFFIX[p.suffix.lower()], []).append(str(p))

    parts = []
    for builder, data_files in groups.items():
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                builder, data_files=data_files, split="train", cache_dir=cache_dir, **kwargs
            )
        except Exception as exc:  # any parse failure is the user's file; report which one
            raise SpecError(
                field,
                data_files if len(data_files) > 1 else data_files[0],
                f"check that the files are valid {builder} data",
                reason=f"datasets could not read them ({type(exc).__name__}: {_first_line(exc)})",
            ) from exc
        column = TEXT_COLUMN if builder == "text" else text_field
        parts.append(_text_column(ds, column, described=", ".join(data_files)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub_dataset(name: str, text_field: str, cache_dir: str | None) -> datasets.Dataset:
    """Load the ``train`` split of an HF hub dataset; offline or unknown names become a SpecError."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown name, missing config: all need the same fix
        raise SpecError(
            "data.dataset",
            name,
            "use 'default', point data.dataset or data.files at local files, or download the dataset "
            "into the HF cache on a machine with network and set HF_DATASETS_OFFLINE=1",
            reason=f"could not load it as an HF dataset ({type(exc).__name__}: {_first_line(exc)})",
        ) from exc
    return _text_column(ds, text_field, described=name)


def _text_column(ds: datasets.Dataset, text_field: str, described: str) -> datasets.Dataset:
    """Keep only ``text_field`` (a string column), renamed to ``text``; a clear error when it is missing."""
    import datasets

    columns = list(ds.column_names)
    if text_field not in columns:
        raise SpecError(
            "data.text_field",
            text_field,
            f"set data.text_field to the column that holds the text, one of: {', '.join(columns)}",
            reason=f"{described} has no column {text_field!r}; its columns are {columns}",
        )
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise SpecError(
            "data.text_field",
            text_field,
            f"set data.text_field to a string column, one of: {', '.join(columns)}",
            reason=f"column {text_field!r} of {described} holds {feature}, not text",
        )
    ds = ds.select_columns([text_field])
    if text_field != TEXT_COLUMN:
        ds = ds.rename_column(text_field, TEXT_COLUMN)
    if feature.dtype != "string":
        # One string type everywhere, so parts from different files concatenate.
        ds = ds.cast_column(TEXT_COLUMN, datasets.Value("string"))
    return ds


def _first_line(exc: BaseException) -> str:
    """The first line of an exception message, shortened for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
