"""Enumerate layouts that meet the world size and the global batch, drop what does not fit, rank the rest.

A layout is ZeRO stage × optimizer offload × parameter offload × pipeline stages × tensor parallel ×
micro batch × accumulation × activation checkpointing. Every candidate gets a memory estimate; the
ones over budget are kept aside (counted, the fastest reported) and never returned as plans.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import product

from harness.batch import solve_batch
from harness.errors import SpecError
from harness.parallel_dims import ParallelDims, auto_fields, data_parallel_size
from harness.planner.devices import get_device
from harness.planner.host import node_host_memory
from harness.planner.layout import Context, Layout
from harness.planner.memory import MemoryEstimate, estimate_memory
from harness.planner.modelstats import model_stats
from harness.planner.speed import SpeedEstimate, estimate_speed
from harness.presets import model_config_dict
from harness.spec import RunSpec

_LOG_TIE = math.log(1.005)
MAX_FREE_MICRO_BATCH = 64
"""Largest micro batch tried when the global batch is free (``auto``)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One evaluated layout."""

    layout: Layout
    memory: MemoryEstimate
    speed: SpeedEstimate

    @property
    def fits(self) -> bool:
        """Within the device and host memory budgets."""
        return self.memory.fits


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The values each layout dimension may take (None: free, the planner chooses)."""

    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    offload_optimizer: tuple[str, ...] = ("none", "cpu")
    offload_params: tuple[str, ...] = ("none", "cpu")
    pipeline_stages: tuple[int, ...] | None = None
    tensor_parallel: tuple[int, ...] | None = None
    checkpointing: tuple[bool, ...] = (False, True)
    global_batch: int | None = None
    """Target samples per optimizer step; None lets micro × accumulation × d float."""
    micro_batch: int | None = None
    """A fixed micro batch, or None to search."""
    grad_accum: int | None = None
    """A fixed accumulation, or None to search."""


@dataclass(kw_only=True)
class PlanResult:
    """The ranked plans and what was left out."""

    context: Context
    space: SearchSpace
    plans: list[Candidate]
    """Candidates that fit, fastest first."""
    rejected: list[Candidate]
    """Candidates over the memory budget, fastest first."""
    evaluated: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)
    own: Candidate | None = None
    """The spec's own layout, evaluated the same way (None when the spec leaves something ``auto``)."""

    @property
    def best(self) -> Candidate | None:
        """The winner, or None when nothing fits."""
        return self.plans[0] if self.plans else None


def context_from_spec(spec: RunSpec, world_size: int) -> Context:
    """The fixed part of a plan, read from the spec (model shape, sequence, dtype, cluster)."""
    cfg = model_config_dict(spec.model.preset, spec.model.name_or_path, spec.model.overrides)
    if cfg is None:
        raise SpecError(
            "model.name_or_path",
            spec.model.name_or_path,
            "plan with a model.preset or a local checkpoint directory holding config.json "
            "(the planner reads the shape without downloading)",
            reason="the model's config is not available offline",
        )
    device = get_device(spec.launch.gpu)
    gpus_per_node = spec.launch.gpus_per_node
    nodes = spec.launch.nodes
    if nodes * gpus_per_node != world_size:  # --world-size overrides the launch section
        nodes, gpus_per_node = max(1, world_size // gpus_per_node), min(gpus_per_node, world_size)
        if nodes * gpus_per_node != world_size:
            nodes, gpus_per_node = 1, world_size
    dropout = cfg.get("model_type") == "gpt2" and float(cfg.get("resid_pdrop", 0.1)) > 0
    host_bytes, host_source = node_host_memory(
        spec.launch.host_memory_gb, spec.launch.launcher, device, gpus_per_node
    )
    method = spec.parallel.partition_method
    return Context(
        stats=model_stats(cfg),
        seq_len=spec.data.seq_len,
        dtype=spec.precision.dtype,
        device=device,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        attn_implementation=spec.model.attn_implementation,
        dropout=dropout,
        partition_method="parameters" if method == "parameters" else "uniform",
        optimizer_impl=spec.optimizer.impl,
        host_memory_bytes=host_bytes,
        host_memory_source=host_source,
    )


def spec_layout(spec: RunSpec, world_size: int) -> Layout | None:
    """The layout a concrete spec asks for (None when a field is ``auto`` or the batch does not solve)."""
    p, b = spec.parallel, spec.batch
    if auto_fields(spec):
        return None
    try:
        plan = solve_batch(b, data_parallel_size(spec, world_size), spec.data.seq_len)
    except SpecError:
        return None
    return Layout(
        zero_stage=int(p.zero_stage),
        offload_optimizer=p.offload_optimizer,
        offload_params=p.offload_params,
        pipeline_stages=p.pipeline_stages,
        tensor_parallel=p.tensor_parallel,
        micro_batch_size=plan.micro_batch_size,
        grad_accum=plan.grad_accum,
        checkpointing=spec.model.gradient_checkpointing or p.activation_checkpoint_interval > 0,
    )


def evaluate(ctx: Context, layout: Layout) -> Candidate:
    """Memory and speed of one layout."""
    return Candidate(layout, estimate_memory(ctx, layout), estimate_speed(ctx, layout))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _model_parallel_options(ctx: Context, space: SearchSpace) -> list[tuple[int, int]]:
    """(pipeline, tensor) degrees to try: divisors of the world (tensor parallel within a node) that
    :class:`~harness.parallel_dims.ParallelDims` allows for this model, whatever the ZeRO stage."""
    world = ctx.world_size
    pps = space.pipeline_stages or tuple(_divisors(world))
    tps = space.tensor_parallel or tuple(_divisors(ctx.gpus_per_node))
    model = ctx.model_dims
    return [
        (pp, tp)
        for pp in pps
        for tp in tps
        if not ParallelDims(world_size=world, pipeline_stages=pp, tensor_parallel=tp, zero_stage=0).problems(
            model
        )
    ]


def _batch_splits(space: SearchSpace, dp: int, pp: int) -> list[tuple[int, int]]:
    """(micro, accumulation) pairs for one data-parallel degree."""
    if space.global_batch is not None:
        if space.global_batch % dp:
            return []
        per_replica = space.global_batch // dp
        micros = [space.micro_batch] if space.micro_batch else _divisors(per_replica)
        splits = [(mb, per_replica // mb) for mb in micros if per_replica % mb == 0]
        return [(mb, ga) for mb, ga in splits if space.grad_accum in (None, ga)]
    micros = (
        [space.micro_batch] if space.micro_batch else [2**i for i in range(7) if 2**i <= MAX_FREE_MICRO_BATCH]
    )
    # A pipeline needs several micro-batches in flight; otherwise one is the fastest.
    accums = [space.grad_accum] if space.grad_accum else [1] if pp == 1 else [pp, 2 * pp, 4 * pp]
    return [(mb, ga) for mb in micros for ga in accums]


def enumerate_layouts(ctx: Context, space: SearchSpace) -> list[Layout]:
    """Every layout in ``space`` that :meth:`ParallelDims.problems` finds nothing wrong with (the same
    rules ``harness show``/``train`` enforce), for each batch split of the global batch."""
    layouts: list[Layout] = []
    for pp, tp in _model_parallel_options(ctx, space):
        dp = ctx.world_size // (pp * tp)
        splits = _batch_splits(space, dp, pp)
        if not splits:
            continue
        for z, off, offp in product(space.zero_stages, space.offload_optimizer, space.offload_params):
            dims = ParallelDims(
                world_size=ctx.world_size,
                pipeline_stages=pp,
                tensor_parallel=tp,
                zero_stage=z,
                offload_optimizer=off,
                offload_params=offp,
                optimizer_impl=ctx.optimizer_impl,
            )
            if dims.problems():
                continue
            for ckpt in space.checkpointing:
                for mb, ga in splits:
                    layouts.append(
                        Layout(
                            zero_stage=z,
                            offload_optimizer=off,
                            offload_params=offp,
                            pipeline_stages=pp,
                            tensor_parallel=tp,
                            micro_batch_size=mb,
                            grad_accum=ga,
                            checkpointing=ckpt,
                        )
                    )
    return layouts


def _rank_key(c: Candidate) -> tuple[int, int, float]:
    """Fastest first; near-ties (0.5 %) go to the simpler layout (fewer techniques), then the smaller
    device footprint."""
    techniques = (
        (c.layout.offload_optimizer != "none")
        + (c.layout.offload_params != "none")
        + c.layout.checkpointing
        + (c.layout.pipeline_stages > 1)
        + (c.layout.tensor_parallel > 1)
    )
    return (-_speed_bucket(c.speed.tokens_per_s), techniques, c.memory.total)


def _speed_bucket(tokens_per_s: float) -> int:
    """Throughput on a 0.5 % log grid, so near-equal speeds compare equal."""
    return math.floor(math.log(max(tokens_per_s, 1e-9)) / _LOG_TIE)


def search(ctx: Context, space: SearchSpace) -> PlanResult:
    """Evaluate every layout in ``space``; fitting ones ranked by predicted tokens/s."""
    start = time.perf_counter()
    plans: list[Candidate] = []
    rejected: list[Candidate] = []
    layouts = enumerate_layouts(ctx, space)
    for layout in layouts:
        cand = evaluate(ctx, layout)
        (plans if cand.fits else rejected).append(cand)
    plans.sort(key=_rank_key)
    rejected.sort(key=lambda c: -c.speed.tokens_per_s)
    notes = []
    if space.global_batch is not None and not layouts:
        notes.append(
            f"no layout divides the global batch of {space.global_batch} samples over the data-parallel ranks"
        )
    if not ctx.device.bf16 and ctx.dtype == "bf16":
        notes.append(f"{ctx.device.name} has no bf16 tensor cores: use precision: fp16 there")
    return PlanResult(
        context=ctx,
        space=space,
        plans=plans,
        rejected=rejected,
        evaluated=len(layouts),
        elapsed_s=time.perf_counter() - start,
        notes=notes,
    )
