"""Resolve ``auto`` spec fields through the planner: the fastest layout that fits, with the spec's
concrete fields held fixed.

``harness.compiler.resolve_layout`` calls :func:`resolve_auto` whenever ``parallel.zero_stage`` or a
batch field says ``auto``; ``harness show``, ``config`` and ``train`` therefore all see the same
resolved numbers.
"""

from __future__ import annotations

from dataclasses import replace

from harness.batch import nearest_multiples
from harness.errors import SpecError
from harness.parallel_dims import auto_fields, data_parallel_size, target_global_batch
from harness.planner.devices import GIB
from harness.planner.search import PlanResult, SearchSpace, context_from_spec, search
from harness.spec import AUTO, RunSpec


def space_for_spec(spec: RunSpec, world_size: int) -> SearchSpace:
    """The search space that varies only the spec's ``auto`` fields."""
    p, b = spec.parallel, spec.batch
    global_batch = target_global_batch(spec, data_parallel_size(spec, world_size))
    micro = b.micro_batch_size if isinstance(b.micro_batch_size, int) else None
    accum = b.grad_accum if isinstance(b.grad_accum, int) else None
    checkpointing = spec.model.gradient_checkpointing or p.activation_checkpoint_interval > 0
    return SearchSpace(
        zero_stages=(0, 1, 2, 3) if p.zero_stage == AUTO else (int(p.zero_stage),),
        offload_optimizer=(p.offload_optimizer,),
        offload_params=(p.offload_params,),
        pipeline_stages=(p.pipeline_stages,),
        tensor_parallel=(p.tensor_parallel,),
        checkpointing=(checkpointing,),
        global_batch=global_batch,
        micro_batch=micro,
        grad_accum=accum,
    )


def resolve_auto(spec: RunSpec, world_size: int) -> RunSpec:
    """A copy of ``spec`` with every ``auto`` replaced by the planner's choice for ``world_size`` ranks.

    Raises SpecError naming the auto field and what to change when no layout fits.
    """
    names = auto_fields(spec)
    if not names:
        return spec
    result = search(context_from_spec(spec, world_size), space_for_spec(spec, world_size))
    best = result.best
    if best is None:
        raise _nothing_fits(names, result)
    lay = best.layout
    parallel = spec.parallel
    if parallel.zero_stage == AUTO:
        parallel = replace(parallel, zero_stage=lay.zero_stage)
    b = spec.batch
    # Concrete fields were held fixed by the search, so writing all three keeps them and stays consistent.
    total = lay.micro_batch_size * lay.grad_accum * lay.data_parallel(world_size)
    batch = replace(
        b,
        micro_batch_size=lay.micro_batch_size,
        grad_accum=lay.grad_accum,
        global_batch_size=total if b.global_batch_size == AUTO else b.global_batch_size,
    )
    return replace(spec, parallel=parallel, batch=batch)


def _nothing_fits(names: list[str], result: PlanResult) -> SpecError:
    ctx = result.context
    if not result.evaluated:
        space, dp = result.space, ctx.world_size // max(1, _model_parallel(result))
        which, step = "the data-parallel size", dp
        if space.micro_batch is not None:
            which, step = "batch.micro_batch_size × data-parallel size", space.micro_batch * dp
        elif space.grad_accum is not None:
            which, step = "batch.grad_accum × data-parallel size", space.grad_accum * dp
        glob = space.global_batch
        return SpecError(
            names[0],
            AUTO,
            f"make the global batch ({glob} samples) a multiple of {which} = {step} "
            f"({nearest_multiples(glob, step) if glob else 'or set it'}), or set the batch sizes explicitly",
            reason="no micro batch × accumulation split matches the global batch",
        )
    on_device = [c for c in result.rejected if c.memory.total <= c.memory.capacity]
    if on_device:  # the GPUs would hold a candidate: the node's host memory is what refuses them
        least = min(on_device, key=lambda c: c.memory.host_node)
        return SpecError(
            names[0],
            AUTO,
            f"the candidate with the least host memory ({least.layout.short()}) {least.memory.why_not()} "
            f"(host memory per node: {ctx.host_memory_source}). Use bf16, ZeRO 3 or pipeline stages, fewer "
            "ranks per node, or set launch.host_memory_gb to the node's real memory",
            reason=f"no layout for the {', '.join(names)} field(s) fits the node's host memory",
        )
    smallest = min(result.rejected, key=lambda c: c.memory.total)
    usable = smallest.memory.capacity / GIB
    return SpecError(
        names[0],
        AUTO,
        f"nothing fits {ctx.device.name} ({usable:.1f} GiB usable per GPU); the smallest candidate "
        f"({smallest.layout.short()}) {smallest.memory.why_not()}. Turn on model.gradient_checkpointing, "
        f"set parallel.offload_optimizer: cpu, shorten data.seq_len, or add launch.nodes",
        reason=f"no layout for the {', '.join(names)} field(s) fits in memory",
    )


def _model_parallel(result: PlanResult) -> int:
    space = result.space
    return (space.pipeline_stages or (1,))[0] * (space.tensor_parallel or (1,))[0]
