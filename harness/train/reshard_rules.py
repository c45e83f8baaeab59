"""The pure rules of resuming on another data-parallel size (no I/O, no torch): layouts, whether a
change can resume and with which batch split, and the data position for the new split.

:mod:`harness.train.reshard` applies them to run directories and checkpoints; docs/resharding.md says what
they allow and refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import SpecError


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How a run was (or will be) laid out: the numbers a resume must match or convert."""

    world_size: int
    """Ranks in the job."""
    data_parallel: int
    """world / (pipeline × tensor)."""
    pipeline_stages: int
    """Pipeline-parallel degree."""
    tensor_parallel: int
    """Tensor-parallel (AutoTP) degree."""
    zero_stage: int
    """ZeRO stage 0-3."""
    micro_batch_size: int
    """Samples per rank per forward/backward."""
    grad_accum: int
    """Micro-batches per optimizer step."""

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum * self.data_parallel

    def describe(self) -> str:
        """One line for messages: ``2 ranks (data-parallel 2), ZeRO 1, micro 4 × accumulation 1``."""
        extra = []
        if self.pipeline_stages > 1:
            extra.append(f"pipeline {self.pipeline_stages}")
        if self.tensor_parallel > 1:
            extra.append(f"tensor {self.tensor_parallel}")
        split = ", ".join([f"data-parallel {self.data_parallel}", *extra])
        return (
            f"{ranks_text(self.world_size)} ({split}), ZeRO {self.zero_stage}, "
            f"micro {self.micro_batch_size} × accumulation {self.grad_accum}"
        )


# Names the marker's ``layout`` object may use for each field (checkpoint.py writes it).
_LAYOUT_KEYS = {
    "world_size": ("world_size", "world"),
    "data_parallel": ("data_parallel", "data_parallel_size", "dp"),
    "pipeline_stages": ("pipeline_stages", "pipeline", "pp"),
    "tensor_parallel": ("tensor_parallel", "tensor", "tp"),
    "zero_stage": ("zero_stage", "zero"),
    "micro_batch_size": ("micro_batch_size", "micro"),
    "grad_accum": ("grad_accum", "grad_accum_steps", "gradient_accumulation_steps"),
}


def layout_from_mapping(raw: dict[str, Any]) -> Layout | None:
    """A :class:`Layout` from a marker's ``layout`` object; None when a field is missing."""
    values = {}
    for name, keys in _LAYOUT_KEYS.items():
        found = next((raw[k] for k in keys if isinstance(raw.get(k), int)), None)
        if found is None:
            return None
        values[name] = int(found)
    return Layout(**values)


def resolve_batch(global_batch: int, data_parallel: int, micro_wanted: int) -> tuple[int, int]:
    """(micro batch, accumulation) that keep ``global_batch`` on ``data_parallel`` ranks.

    The largest micro batch not above ``micro_wanted`` that divides the per-rank share (so memory per
    micro-batch does not grow); raises ValueError when the ranks cannot share the batch evenly.
    """
    if global_batch % data_parallel:
        raise ValueError(f"{global_batch} samples cannot be split evenly over {data_parallel} ranks")
    per_rank = global_batch // data_parallel
    micro = max(m for m in range(1, min(micro_wanted, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def valid_data_parallel_sizes(global_batch: int, near: int) -> list[int]:
    """The data-parallel sizes around ``near`` that divide ``global_batch`` (at most one each side)."""
    divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
    below = [d for d in divisors if d < near]
    above = [d for d in divisors if d > near]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def check_reshard(
    old: Layout, new: Layout, *, tag: str, explicit_global: int | None = None
) -> tuple[int, int]:
    """Whether ``old`` → ``new`` can resume; returns the new (micro batch, accumulation).

    Raises SpecError (field ``checkpoint.resume``) with the reason and the options for a change the
    conversion cannot do. Pure: the unit tests call it with plain layouts.
    """
    keep = f"resume on {ranks_text(old.world_size)} as the checkpoint was written"
    fresh = "or start a new run (checkpoint.resume: never, or another run.name)"
    if (old.pipeline_stages, old.tensor_parallel) != (new.pipeline_stages, new.tensor_parallel):
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"set parallel.pipeline_stages: {old.pipeline_stages} and parallel.tensor_parallel: "
            f"{old.tensor_parallel} (any world size that is a multiple of "
            f"{old.pipeline_stages * old.tensor_parallel} works), {fresh}",
            reason=f"the checkpoint was written with pipeline_stages {old.pipeline_stages} × tensor_parallel "
            f"{old.tensor_parallel} and this launch has {new.pipeline_stages} × {new.tensor_parallel}; the "
            "harness converts checkpoints to a new data-parallel size only (DeepSpeed's universal "
            "conversion is not tested here for pipeline stages or AutoTP slices)",
        )
    if old.data_parallel != new.data_parallel and old.pipeline_stages * old.tensor_parallel > 1:
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"{keep}, {fresh}",
            reason=f"the data-parallel size changes ({old.data_parallel} → {new.data_parallel}) in a run with "
            "pipeline stages or tensor parallelism; the harness converts only plain data-parallel "
            "ZeRO checkpoints",
        )
    if old.zero_stage != new.zero_stage:
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"set parallel.zero_stage: {old.zero_stage}, {fresh}",
            reason=f"the checkpoint was written with ZeRO {old.zero_stage} and this launch has ZeRO "
            f"{new.zero_stage}; a ZeRO stage change on resume is not supported",
        )
    glob = old.global_batch_size
    if explicit_global is not None and explicit_global != glob:
        raise SpecError(
            "batch.global_batch_size",
            explicit_global,
            f"set batch.global_batch_size: {glob} (or leave it out), {fresh}",
            reason=f"the checkpoint's run steps {glob} samples at a time; resuming keeps the global batch "
            "so the data order and learning-rate schedule continue",
        )
    try:
        return resolve_batch(glob, new.data_parallel, new.micro_batch_size)
    except ValueError:
        sizes = valid_data_parallel_sizes(glob, new.data_parallel)
        mp = new.pipeline_stages * new.tensor_parallel
        options = " or ".join(str(d * mp) for d in sizes)
        raise SpecError(
            "checkpoint.resume",
            tag,
            f"launch a world size whose data-parallel size divides {glob} (nearest: {options} ranks), "
            f"{keep}, {fresh}",
            reason=f"the global batch of {glob} samples cannot be split over {new.data_parallel} "
            "data-parallel ranks",
        ) from None


def ranks_text(count: int) -> str:
    """``1 rank``, ``2 ranks``."""
    return f"{count} rank{'s' if count != 1 else ''}"


def consumed_samples(sampler_state: dict[str, Any]) -> int:
    """Samples all data-parallel ranks together have read in the sampler state's epoch."""
    return (
        int(sampler_state["position"])
        * int(sampler_state["micro_batch_size"])
        * int(sampler_state["dp_size"])
    )


def rederive_sampler_state(
    state: dict[str, Any], *, micro_batch_size: int, grad_accum: int, dp_size: int
) -> dict[str, Any]:
    """A :class:`~harness.data.sampler.BlockSampler` state for a new split of the same global batch.

    The global order of an epoch does not depend on the split (see harness/data/sampler.py): after ``k``
    optimizer steps every split has read ``perm[:k*G]``. So the position is re-derived from the samples
    consumed: ``k = position × micro × dp / G`` and the new position is ``k × accumulation``. Raises
    ValueError when the global batch differs or the state is not at an optimizer-step boundary.
    """
    old_global = int(state["micro_batch_size"]) * int(state["dp_size"]) * int(state["grad_accum_steps"])
    new_global = micro_batch_size * dp_size * grad_accum
    if old_global != new_global:
        raise ValueError(f"the global batch changes from {old_global} to {new_global} samples")
    consumed = consumed_samples(state)
    if consumed % old_global:
        raise ValueError(f"{consumed} consumed samples is not a whole number of steps of {old_global}")
    out = dict(state)
    out.update(
        micro_batch_size=micro_batch_size,
        dp_size=dp_size,
        grad_accum_steps=grad_accum,
        position=consumed // old_global * grad_accum,
    )
    return out
