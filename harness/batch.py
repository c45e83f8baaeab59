"""The batch triple, solved in one place: global = micro × grad_accum × data-parallel size."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import SpecError
from harness.spec import AUTO, BatchSection


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch sizes for one layout."""

    micro_batch_size: int
    """Samples per rank per forward/backward."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    data_parallel_size: int
    """Ranks that each see different data (world / (pipeline × tensor))."""
    seq_len: int
    """Tokens per sample."""

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum * self.data_parallel_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step (nanoGPT's tokens_per_iter)."""
        return self.global_batch_size * self.seq_len


def solve_batch(batch: BatchSection, data_parallel_size: int, seq_len: int) -> BatchPlan:
    """Solve the missing member of (global, micro, accumulation) from the two given.

    With one given, the accumulation defaults to 1 (or the micro batch to 1 when only the
    accumulation is given); with none, micro 1 × accumulation 1. ``auto`` values must have been
    resolved by the planner before this is called.
    """
    dp = data_parallel_size
    for name in ("global_batch_size", "micro_batch_size", "grad_accum"):
        if getattr(batch, name) == AUTO:
            raise SpecError(f"batch.{name}", AUTO, "resolve 'auto' with the planner before solving the batch")
    glob = _global_samples(batch, seq_len)
    micro, accum = batch.micro_batch_size, batch.grad_accum
    global_name = "global_batch_tokens" if batch.global_batch_tokens is not None else "global_batch_size"
    for name, value in ((global_name, glob), ("micro_batch_size", micro), ("grad_accum", accum)):
        if value is not None and value < 1:
            shown = batch.global_batch_tokens if name == "global_batch_tokens" else value
            raise SpecError(f"batch.{name}", shown, "use a positive integer")
    shown = f"global={glob}, micro_batch_size={micro}, grad_accum={accum}, data_parallel_size={dp}"
    if glob is None:
        micro = micro or 1
        accum = accum or 1
    elif micro is not None and accum is not None:
        if micro * accum * dp != glob:
            raise SpecError(
                "batch",
                shown,
                f"give only two of the three, or make global = micro × grad_accum × dp "
                f"({micro} × {accum} × {dp} = {micro * accum * dp})",
                reason="inconsistent batch triple",
            )
    else:
        known = micro if micro is not None else accum
        if known is None:
            accum = 1
            known = accum
        if glob % (known * dp):
            which = "micro_batch_size" if micro is not None else "grad_accum"
            raise SpecError(
                "batch",
                shown,
                f"make the global batch a multiple of {which} × data_parallel_size = {known * dp} "
                f"({nearest_multiples(glob, known * dp)})",
                reason="the third batch value would not be an integer",
            )
        other = glob // (known * dp)
        if micro is None:
            micro = other
        else:
            accum = other
    return BatchPlan(micro_batch_size=micro, grad_accum=accum, data_parallel_size=dp, seq_len=seq_len)


def _global_samples(batch: BatchSection, seq_len: int) -> int | None:
    if batch.global_batch_tokens is not None:
        if batch.global_batch_size is not None:
            raise SpecError(
                "batch.global_batch_tokens",
                batch.global_batch_tokens,
                "give global_batch_size or global_batch_tokens, not both",
            )
        if batch.global_batch_tokens % seq_len:
            raise SpecError(
                "batch.global_batch_tokens",
                batch.global_batch_tokens,
                f"use a multiple of data.seq_len ({seq_len}): "
                f"{nearest_multiples(batch.global_batch_tokens, seq_len)}",
                reason="not a whole number of sequences",
            )
        return batch.global_batch_tokens // seq_len
    return batch.global_batch_size  # type: ignore[return-value]


def nearest_multiples(value: int, step: int) -> str:
    """The valid values around ``value`` when it must be a positive multiple of ``step``, in words:
    ``nearest: 24 or 32`` (or just the one above when nothing positive lies below)."""
    below, above = (value // step) * step, -(-value // step) * step
    if below >= step and below != above:
        return f"nearest: {below} or {above}"
    return f"nearest: {max(above, step)}"
