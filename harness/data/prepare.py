"""Turn the data spec into packed train/val token blocks on disk, once, shared by every rank.

``prepare_data`` loads the documents, resolves the tokenizer, tokenizes with ``Dataset.map``, packs the
tokens into ``[num_blocks, seq_len]`` int32 blocks and splits off a seeded validation set. The result is
cached under ``<cache_dir>/data-<key>/`` where ``key`` hashes every input (and the identity of local
files: path, size, mtime), holding::

    train.npy    [num_train_blocks, seq_len] int32
    val.npy      [num_val_blocks, seq_len] int32
    tokenizer/   save_pretrained output, shipped with the run and the HF export
    stats.json   token counts, kept fraction, timings, the inputs

A second call (or another rank) finds the directory and memory-maps the arrays in milliseconds.
Concurrent callers on one machine serialize on an ``fcntl`` lock; the builder writes into a temporary
directory and renames it into place, so readers never see a half-written cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from harness.data.corpus import DEFAULT_CORPUS_MAX_BYTES, default_corpus_fingerprint, load_texts
from harness.data.packing import TOKEN_DTYPE, pack_token_chunks
from harness.data.tokenizer import TOKENIZER_FILES, resolve_tokenizer
from harness.errors import SpecError
from harness.runlock import pid_alive

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

CACHE_FORMAT_VERSION = 1
"""Bump when the on-disk layout or the packing changes, so old caches are not reused."""

NUM_PROC_MIN_BYTES = 256_000_000
"""Text size above which tokenization uses several processes; below it the fast tokenizer's own threads
win, and forking workers costs more than it saves."""

MAP_BATCH_DOCS = 1000
"""Documents per ``Dataset.map`` batch."""

VAL_SPLIT_STREAM = 0x7A1
"""Mixed into the seed for the validation split, so it is unrelated to the sampler's epoch shuffles."""


@dataclass(frozen=True)
class PreparedData:
    """Packed blocks (memory-mapped, read-only), the tokenizer directory and the stats of one dataset."""

    train: np.ndarray
    """Training blocks ``[num_train_blocks, seq_len]`` int32; labels are the inputs."""
    val: np.ndarray
    """Validation blocks ``[num_val_blocks, seq_len]`` int32 (possibly 0 rows)."""
    tokenizer_dir: Path
    """Directory to ``AutoTokenizer.from_pretrained`` from; copy it into the run and the HF export."""
    stats: dict[str, Any]
    """Contents of ``stats.json``."""
    cache_dir: Path
    """The keyed cache directory holding all of the above."""

    @property
    def seq_len_tokens(self) -> int:
        """Tokens per block."""
        return int(self.train.shape[1])

    @property
    def eos_token_id(self) -> int:
        """The EOS id that separates documents inside blocks."""
        return int(self.stats["eos_token_id"])

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (a cache hit that never needs it does not pay for it)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (same object as :attr:`tokenizer`, loaded on first use)."""
        return self.tokenizer


def prepare_data(
    *,
    dataset: str = "default",
    files: Sequence[str] = (),
    text_field: str = "text",
    seq_len: int,
    tokenizer: str | None = None,
    model_path: str | None = None,
    vocab_size: int | None,
    val_fraction: float = 0.01,
    seed: int = 0,
    cache_dir: str | Path,
    corpus_max_bytes: int = DEFAULT_CORPUS_MAX_BYTES,
) -> PreparedData:
    """Load, tokenize, pack and split the run's data, or load it from the cache if already prepared.

    Arguments mirror the spec's ``data`` section (``dataset``, ``files``, ``text_field``, ``seq_len``,
    ``tokenizer``, ``val_fraction``), plus ``model.name_or_path`` (``model_path``, consulted for tokenizer
    files), the model config's ``vocab_size`` (``None`` or 0: unknown, so an existing tokenizer is not
    size-checked and training one is an error), the run seed, and ``cache_dir`` (also the ``datasets``
    cache). ``corpus_max_bytes`` sizes the embedded default corpus. Safe to call from every rank at once.
    """
    _check_args(seq_len=seq_len, val_fraction=val_fraction, vocab_size=vocab_size)
    inputs = {
        "format": CACHE_FORMAT_VERSION,
        "dataset": dataset,
        "files": [str(f) for f in files],
        "text_field": text_field,
        "seq_len": seq_len,
        "tokenizer": tokenizer,
        "model_path": model_path,
        "vocab_size": vocab_size or None,
        "val_fraction": val_fraction,
        "seed": seed,
        "corpus_max_bytes": corpus_max_bytes,
    }
    key = cache_key(inputs)
    root = Path(cache_dir)
    final = root / f"data-{key}"
    if (final / "stats.json").is_file():
        return _load(final)

    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"data-{key}.lock"):
        # Another rank may have built it while this one waited for the lock.
        if (final / "stats.json").is_file():
            return _load(final)
        _remove_stale_tmp(root, key)
        tmp = root / f".data-{key}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            _build(tmp, inputs, key=key, datasets_cache=root / "hf_datasets")
            try:
                os.rename(tmp, final)
            except OSError:
                # Only possible when the lock is not shared (e.g. a filesystem without flock across
                # nodes) and another host finished first: its result is as good as ours.
                if not (final / "stats.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def cache_key(inputs: dict[str, Any]) -> str:
    """A short hash of the inputs plus the identity of everything they point at (files, versions)."""
    identity = {
        **inputs,
        "sources": _source_identity(inputs),
        # importlib.metadata, not the packages: importing transformers would cost a cache hit seconds.
        "versions": [importlib.metadata.version(p) for p in ("tokenizers", "transformers", "datasets")],
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def split_train_val(num_blocks: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint ``(train_indices, val_indices)``, both sorted; at least 1 val block if fraction > 0."""
    num_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * num_blocks))
    if num_val >= num_blocks:
        raise SpecError(
            "data.val_fraction",
            val_fraction,
            "use more data, a smaller data.seq_len, or a smaller val_fraction (0 disables validation)",
            reason=f"{num_blocks} blocks leave no training block after holding out {num_val}",
        )
    rng = np.random.default_rng([seed, VAL_SPLIT_STREAM])
    is_val = np.zeros(num_blocks, dtype=bool)
    is_val[rng.choice(num_blocks, size=num_val, replace=False)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _check_args(*, seq_len: int, val_fraction: float, vocab_size: int | None) -> None:
    """Reject values that cannot work before any expensive step runs."""
    if seq_len < 2:
        raise SpecError("data.seq_len", seq_len, "set it to at least 2 (e.g. 256)")
    if not 0 <= val_fraction < 1:
        raise SpecError("data.val_fraction", val_fraction, "use a fraction in [0, 1), e.g. 0.01")
    if vocab_size is not None and vocab_size < 0:
        raise SpecError("model.overrides.vocab_size", vocab_size, "set a positive vocab_size")


def _source_identity(inputs: dict[str, Any]) -> list[Any]:
    """Path, size and mtime of local inputs, so edited files invalidate the cache."""
    paths: list[Path] = [Path(f).expanduser() for f in inputs["files"]]
    dataset = inputs["dataset"]
    if not inputs["files"]:
        if dataset == "default":
            return [default_corpus_fingerprint(inputs["corpus_max_bytes"])]
        local = Path(dataset).expanduser()
        paths += sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for tok_dir in (inputs["tokenizer"], inputs["model_path"]):
        if tok_dir and Path(tok_dir).is_dir():
            paths += [Path(tok_dir) / n for n in TOKENIZER_FILES]
    identity: list[Any] = []
    for p in paths:
        if p.exists():
            st = p.stat()
            identity.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return identity


def _build(out: Path, inputs: dict[str, Any], key: str, datasets_cache: Path) -> None:
    """Write train.npy, val.npy, tokenizer/ and stats.json into ``out`` (a fresh directory)."""
    out.mkdir(parents=True)
    timings_s: dict[str, float] = {}

    t0 = time.perf_counter()
    texts = load_texts(
        inputs["dataset"],
        inputs["files"],
        inputs["text_field"],
        cache_dir=datasets_cache,
        max_bytes=inputs["corpus_max_bytes"],
    )
    if len(texts) == 0:
        raise SpecError(
            "data.dataset",
            inputs["dataset"],
            "point it at data with at least one document",
            reason="no documents found",
        )
    timings_s["load_texts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok, tok_source = resolve_tokenizer(
        tokenizer=inputs["tokenizer"],
        model_path=inputs["model_path"],
        vocab_size=inputs["vocab_size"],
        texts=_iter_texts(texts),
        out_dir=out / "tokenizer",
    )
    timings_s["tokenizer"] = time.perf_counter() - t0
    eos_token_id = int(tok.eos_token_id)

    t0 = time.perf_counter()
    tokenized = _tokenize(texts, tok, eos_token_id, out / "tokenized", fingerprint=key)
    timings_s["tokenize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seq_len = inputs["seq_len"]
    num_tokens_total = int(pc.sum(tokenized.data.column("num_tokens")).as_py() or 0)
    num_blocks = num_tokens_total // seq_len
    if num_blocks < 1:
        raise SpecError(
            "data.seq_len",
            seq_len,
            "use more data or a smaller data.seq_len",
            reason=f"the corpus has only {num_tokens_total} tokens, not one full block",
        )
    all_blocks = np.lib.format.open_memmap(
        out / "blocks.npy", mode="w+", dtype=TOKEN_DTYPE, shape=(num_blocks, seq_len)
    )
    _, pack_stats = pack_token_chunks(
        _iter_token_chunks(tokenized), seq_len, out=all_blocks, num_docs=len(tokenized)
    )
    train_idx, val_idx = split_train_val(num_blocks, inputs["val_fraction"], inputs["seed"])
    _write_rows(out / "train.npy", all_blocks, train_idx)
    _write_rows(out / "val.npy", all_blocks, val_idx)
    del all_blocks
    (out / "blocks.npy").unlink()
    del tokenized
    shutil.rmtree(out / "tokenized", ignore_errors=True)
    timings_s["pack_split"] = time.perf_counter() - t0

    stats = {
        **pack_stats.to_dict(),
        "num_train_blocks": len(train_idx),
        "num_val_blocks": len(val_idx),
        "eos_token_id": eos_token_id,
        "tokenizer_source": tok_source,
        "tokenizer_len": len(tok),
        "num_text_bytes": int(texts.data.nbytes),
        "timings_s": {k: round(v, 3) for k, v in timings_s.items()},
        "inputs": inputs,
    }
    # Written last: a directory with stats.json is complete.
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def _tokenize(
    texts: datasets.Dataset, tok: PreTrainedTokenizerBase, eos_token_id: int, out_dir: Path, fingerprint: str
) -> datasets.Dataset:
    """Tokenize every document with ``Dataset.map`` into ``input_ids`` (EOS appended) and ``num_tokens``."""
    import datasets

    out_dir.mkdir(parents=True, exist_ok=True)
    big = texts.data.nbytes > NUM_PROC_MIN_BYTES
    num_proc = min(8, os.cpu_count() or 1) if big else None
    return texts.map(
        _tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH_DOCS,
        fn_kwargs={"tok": tok, "eos_token_id": eos_token_id},
        remove_columns=texts.column_names,
        features=datasets.Features(
            {"input_ids": datasets.Sequence(datasets.Value("int32")), "num_tokens": datasets.Value("int32")}
        ),
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        cache_file_name=str(out_dir / "tokens.arrow"),
        # An explicit fingerprint: hashing a tokenizer object for datasets' own fingerprint is slow.
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )


def _tokenize_batch(
    batch: dict[str, list], tok: PreTrainedTokenizerBase, eos_token_id: int
) -> dict[str, list]:
    """One ``map`` batch: token ids of each non-empty document plus EOS, and their lengths."""
    docs = [t for t in batch["text"] if t]
    ids = (
        tok(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        if docs
        else []
    )
    ids = [[*doc, eos_token_id] for doc in ids]
    return {"input_ids": ids, "num_tokens": [len(doc) for doc in ids]}


def _iter_texts(texts: datasets.Dataset) -> Iterator[str]:
    """The documents one by one, read a batch at a time (lazy: only consumed to train a tokenizer)."""
    for batch in texts.iter(batch_size=MAP_BATCH_DOCS):
        yield from batch["text"]


def _iter_token_chunks(tokenized: datasets.Dataset, batch_docs: int = 10_000) -> Iterator[np.ndarray]:
    """The token stream as flat int32 arrays, one per batch of documents, without per-token Python work."""
    for table in tokenized.with_format("arrow").iter(batch_size=batch_docs):
        for chunk in table.column("input_ids").chunks:
            # flatten() honours slices of the list array, unlike .values.
            yield chunk.flatten().to_numpy(zero_copy_only=False)


def _write_rows(path: Path, blocks: np.ndarray, rows: np.ndarray, rows_per_copy: int = 65_536) -> None:
    """Copy ``blocks[rows]`` into a new .npy file a slice at a time, so big splits never sit in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=blocks.dtype, shape=(len(rows), blocks.shape[1]))
    for start in range(0, len(rows), rows_per_copy):
        sel = rows[start : start + rows_per_copy]
        out[start : start + len(sel)] = blocks[sel]
    out.flush()


def _load(final: Path) -> PreparedData:
    """Memory-map a complete cache directory."""
    stats = json.loads((final / "stats.json").read_text())
    return PreparedData(
        train=np.load(final / "train.npy", mmap_mode="r"),
        val=np.load(final / "val.npy", mmap_mode="r"),
        tokenizer_dir=final / "tokenizer",
        stats=stats,
        cache_dir=final,
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (blocks until other ranks release it)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_tmp(root: Path, key: str) -> None:
    """Delete temp dirs for ``key`` left by crashed builders on this host (called under the lock)."""
    prefix = f".data-{key}.tmp-{socket.gethostname()}-"
    for tmp in root.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
