"""Run spec + world size → resolved spec, batch plan and DeepSpeed config.

The layer above the pure parts: it checks the spec (:mod:`harness.validate`), lets the planner fill
``auto`` fields (:mod:`harness.planner.resolve`), solves the batch (:mod:`harness.batch`) and hands
the resolved spec to :mod:`harness.dsconfig`, which spells the DeepSpeed keys. ``harness show``,
``config``, ``train`` and ``slurm`` all go through :func:`compile_resolved`, so they agree.
"""

from __future__ import annotations

import json
from typing import Any

from harness.batch import BatchPlan, solve_batch
from harness.dscheck import validate_config
from harness.dsconfig import build_config, check_batch_triple, check_raw_keys, deep_merge
from harness.parallel_dims import auto_fields, data_parallel_size
from harness.planner.hostcheck import check_host_memory
from harness.planner.resolve import resolve_auto
from harness.rundir import RunDir, write_atomic
from harness.spec import RunSpec
from harness.specload import dump_spec
from harness.validate import check_spec


def resolve_layout(spec: RunSpec, world_size: int) -> tuple[RunSpec, BatchPlan]:
    """Resolve ``auto`` fields for this world size, check the spec, and solve the batch triple."""
    if auto_fields(spec):
        spec = resolve_auto(spec, world_size)
    check_spec(spec, world_size)
    check_host_memory(spec, world_size)  # the ranks' host peak while they build the model, per node
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


def prepare_run_dir(
    spec: RunSpec, world_size: int | None = None, dry_run: bool = False
) -> tuple[RunDir, dict[str, Any], str]:
    """Resolve and compile the spec for ``world_size`` ranks and write spec.yaml + ds_config.json.

    Returns the run directory, the DeepSpeed config and the resolved spec's YAML. With ``dry_run``
    nothing is written. Raises SpecError before writing anything if the spec is invalid.
    """

    world = world_size or spec.world_size
    resolved, plan, cfg = compile_resolved(spec, world)
    validate_config(cfg, plan.data_parallel_size, deep=bool(resolved.deepspeed))
    spec_text = dump_spec(resolved)
    run_dir = RunDir.of(resolved)
    if not dry_run:
        run_dir.launch_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir.spec, spec_text)
        write_atomic(run_dir.ds_config, json.dumps(cfg, indent=2) + "\n")
        write_atomic(run_dir.world, json.dumps({"world_size": world}) + "\n")
    return run_dir, cfg, spec_text
