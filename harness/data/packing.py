"""Pack tokenized documents into fixed-length training blocks, losing only the final partial block.

Every document is followed by one EOS token, then all documents are concatenated into one token stream
and cut into ``[num_blocks, seq_len]`` int32 blocks. Blocks cross document boundaries (the model sees EOS
where one document ends and the next starts); labels are the inputs, the model shifts them.

Unlike HF ``run_clm``'s ``group_texts``, which drops the remainder of every ``map`` batch, the packer
carries the remainder of each chunk into the next one, so only the single final partial block (fewer than
``seq_len`` tokens) is dropped: ``num_tokens_kept = num_tokens_total - num_tokens_total % seq_len``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

TOKEN_DTYPE = np.int32
"""Token ids are stored as int32: half the disk of int64, and every real vocabulary fits."""


@dataclass(frozen=True)
class PackStats:
    """What packing kept and dropped."""

    num_docs: int
    """Documents packed (each followed by one EOS)."""
    num_tokens_total: int
    """Tokens in the stream, EOS separators included."""
    num_tokens_kept: int
    """Tokens that landed in a full block (all but the final partial block)."""
    seq_len_tokens: int
    """Tokens per block."""

    @property
    def num_blocks(self) -> int:
        """Full blocks produced."""
        return self.num_tokens_kept // self.seq_len_tokens

    @property
    def fraction_kept(self) -> float:
        """``num_tokens_kept / num_tokens_total`` (1.0 for an empty stream)."""
        return self.num_tokens_kept / self.num_tokens_total if self.num_tokens_total else 1.0

    def to_dict(self) -> dict[str, float | int]:
        """The stats as a JSON-ready dict, derived numbers included."""
        return {**asdict(self), "num_blocks": self.num_blocks, "fraction_kept": self.fraction_kept}


def pack_token_chunks(
    chunks: Iterable[np.ndarray],
    seq_len_tokens: int,
    *,
    out: np.ndarray | None = None,
    num_docs: int = 0,
) -> tuple[np.ndarray, PackStats]:
    """Cut a stream of 1-D token chunks (EOS already in place) into ``[num_blocks, seq_len]`` int32 blocks.

    A chunk's tail that does not fill a block is carried into the next chunk, so chunk boundaries (e.g.
    ``Dataset.map`` batches) lose nothing; only the stream's final partial block is dropped. With ``out``
    (e.g. an ``np.lib.format.open_memmap`` of shape ``[num_tokens_total // seq_len, seq_len]``) blocks are
    written into it as they are produced, so the stream never has to fit in memory; it must have exactly
    that many rows. ``num_docs`` is only recorded in the stats.
    """
    if seq_len_tokens < 1:
        raise ValueError(f"seq_len_tokens must be >= 1, got {seq_len_tokens}")
    carry = np.empty(0, dtype=TOKEN_DTYPE)
    pieces: list[np.ndarray] = []
    num_rows_written = 0
    num_tokens_total = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=TOKEN_DTYPE).reshape(-1)
        num_tokens_total += chunk.size
        stream = np.concatenate([carry, chunk]) if carry.size else chunk
        num_full = stream.size // seq_len_tokens
        if num_full:
            blocks = stream[: num_full * seq_len_tokens].reshape(num_full, seq_len_tokens)
            if out is None:
                pieces.append(blocks.copy())
            else:
                if num_rows_written + num_full > out.shape[0]:
                    raise ValueError(f"out has {out.shape[0]} rows, the stream needs more")
                out[num_rows_written : num_rows_written + num_full] = blocks
            num_rows_written += num_full
        # Copy so the carry does not pin the whole previous chunk in memory.
        carry = stream[num_full * seq_len_tokens :].copy()

    stats = PackStats(
        num_docs=num_docs,
        num_tokens_total=num_tokens_total,
        num_tokens_kept=num_rows_written * seq_len_tokens,
        seq_len_tokens=seq_len_tokens,
    )
    if out is not None:
        if num_rows_written != out.shape[0]:
            raise ValueError(f"out has {out.shape[0]} rows but the stream filled {num_rows_written}")
        return out, stats
    if pieces:
        return np.concatenate(pieces), stats
    return np.empty((0, seq_len_tokens), dtype=TOKEN_DTYPE), stats


def pack_documents(
    docs_token_ids: Iterable[Sequence[int]], seq_len_tokens: int, eos_token_id: int
) -> tuple[np.ndarray, PackStats]:
    """Pack in-memory documents: EOS after each, concatenate, cut into blocks (see :func:`pack_token_chunks`)."""
    num_docs = 0

    def chunks() -> Iterable[np.ndarray]:
        nonlocal num_docs
        for ids in docs_token_ids:
            num_docs += 1
            yield np.append(np.asarray(ids, dtype=TOKEN_DTYPE), TOKEN_DTYPE(eos_token_id))

    blocks, stats = pack_token_chunks(chunks(), seq_len_tokens)
    return blocks, PackStats(
        num_docs=num_docs,
        num_tokens_total=stats.num_tokens_total,
        num_tokens_kept=stats.num_tokens_kept,
        seq_len_tokens=seq_len_tokens,
    )
