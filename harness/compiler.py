"""Run spec + world size → resolved spec, batch plan and DeepSpeed config.

The layer above the pure parts: it checks the spec (:mod:`harness.validate`), lets the planner fill
``auto`` fields (:mod:`harness.planner.resolve`), solves the batch (:mod:`harness.batch`) and hands
the resolved spec to :mod:`harness.dsconfig`, which spells the DeepSpeed keys. ``harness show``,
``config``, ``train`` and ``slurm`` all go through :func:`compile_resolved`, so they agree.
"""

from __future__ import annotations

from typing import Any

from harness.batch import BatchPlan, solve_batch
from harness.dsconfig import build_config, check_batch_triple, check_raw_keys, deep_merge
from harness.parallel_dims import auto_fields, data_parallel_size
from harness.spec import RunSpec
from harness.validate import check_spec


def resolve_layout(spec: RunSpec, world_size: int) -> tuple[RunSpec, BatchPlan]:
    """Resolve ``auto`` fields for this world size, check the spec, and solve the batch triple."""
    if auto_fields(spec):
        from harness.planner.resolve import resolve_auto  # lazy: the planner is only needed for auto

        spec = resolve_auto(spec, world_size)
    check_spec(spec, world_size)
    return spec, solve_batch(spec.batch, data_parallel_size(spec, world_size), spec.data.seq_len)


def compile_resolved(spec: RunSpec, world_size: int) -> tuple[RunSpec, BatchPlan, dict[str, Any]]:
    """Resolve the spec, solve the batch and compile: (resolved spec, batch plan, DeepSpeed config)."""
    spec, plan = resolve_layout(spec, world_size)
    compiled = build_config(spec, plan)
    check_raw_keys(compiled, spec.deepspeed)
    merged = deep_merge(compiled, spec.deepspeed)
    check_batch_triple(merged, plan.data_parallel_size)
    return spec, plan, merged


def compile_config(spec: RunSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``spec`` on ``world_size`` ranks (raw ``deepspeed:`` keys merged last)."""
    return compile_resolved(spec, world_size)[2]
