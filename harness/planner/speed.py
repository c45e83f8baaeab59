"""Predicted step time, tokens/s and MFU of a layout, one pure function per term of the step.

Each term has its section under "Speed model" in docs/planner.md, where its assumptions and their
sources are written out; :func:`estimate_speed` adds them up:

    micro_batch_s            one micro-batch on the slowest shard  (§ Compute)
    zero_comm                exposed data-parallel communication   (§ ZeRO communication)
    tensor_parallel_comm_s   AutoTP all-reduces                    (§ Tensor-parallel communication)
    pipeline_bubble_s        pipeline fill and drain               (§ Pipeline bubble and sends)
    pipeline_send_s          activations between stages            (§ Pipeline bubble and sends)
    offload_s                PCIe copies and CPU Adam              (§ Offload)
    optimizer_step_s         the on-device optimizer step          (§ Optimizer step)

FLOPs per token (PaLM, Chowdhery et al. 2022, App. B): ``6·N + 12·L·(a·d)·s`` with N the parameters
that take part in a matmul (embedding lookups excluded). Activation checkpointing recomputes the
forward: hardware FLOPs are 4/3 of that. Pure arithmetic, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from harness.ds_defaults import REDUCE_BUCKET_ELEMS, STAGE3_MAX_REUSE_DISTANCE, STAGE3_PARAM_PERSISTENCE_ELEMS
from harness.planner.devices import Device
from harness.planner.layout import Context, Layout
from harness.planner.modelstats import ModelStats, stats_from_shape
from harness.planner.shards import shards_of

COMM_EFFICIENCY = 0.70
"""Fraction of link bandwidth a large NCCL ring collective reaches (bus bandwidth / link bandwidth)."""
OVERLAP_EFFICIENCY = 0.80
"""Fraction of the compute window that overlapped communication can actually hide behind."""
HOST_LINK_EFFICIENCY = 0.80
"""Fraction of the PCIe bandwidth offload copies reach (pinned memory)."""
CPU_ADAM_ELEMS_PER_S_PER_NODE = 2.0e9
"""DeepSpeed CPU Adam throughput per node (memory-bound: ~32 bytes read+written per element)."""
GEMM_TOKENS_HALF = 128
"""Tokens per micro-batch at which matmul efficiency is half its asymptote (small-M GEMMs)."""
GEMM_WIDTH_HALF = 128
"""Hidden width per tensor-parallel rank at which matmul efficiency is half its asymptote."""


def flops_per_token(shape: Mapping[str, int] | ModelStats, seq_len: int) -> float:
    """Model FLOPs per trained token, 6N + 12·L·(a·d)·s (PaLM's MFU convention; no recompute).

    ``shape`` is a ``harness.presets.shape_of`` dict or a :class:`ModelStats`. Pure; no torch.
    """
    stats = shape if isinstance(shape, ModelStats) else stats_from_shape(dict(shape))
    return 6.0 * stats.matmul_params + 12.0 * stats.layers * stats.heads * stats.head_dim * seq_len


@dataclass(frozen=True, slots=True)
class SpeedEstimate:
    """Predicted time of one optimizer step and what it is made of (seconds per step)."""

    compute_s: float
    """Forward + backward (+ recompute) of all micro-batches, without the pipeline bubble."""
    bubble_s: float
    """Pipeline fill and drain: (p-1) idle micro-batch slots."""
    dp_comm_s: float
    """Exposed data-parallel (ZeRO) communication."""
    tp_comm_s: float
    """Tensor-parallel all-reduces (not overlapped)."""
    pp_comm_s: float
    """Pipeline activation sends between stages."""
    offload_s: float
    """Host-device copies and the CPU optimizer step."""
    optimizer_s: float
    """The on-device optimizer step (memory-bound)."""
    step_s: float
    """Predicted optimizer-step time."""
    tokens_per_s: float
    """Global tokens per second."""
    mfu: float | None
    """Model FLOPs utilization (None where the device has no peak: CPU ranks)."""
    dp_bytes: float
    """Bytes each rank sends in ZeRO collectives per step."""


def zero_collectives(ctx: Context, layout: Layout, psi: float) -> tuple[dict[str, float], dict[str, float]]:
    """Data-parallel collectives of one rank, as (once per optimizer step, every micro-step) maps of
    DeepSpeed op name to message bytes the way its comms logger counts them (all_reduce and
    reduce_scatter_tensor: the full input; all_gather_into_tensor: the local partition; reduce: the
    bucket). Measured on 2 CPU ranks by tests/test_planner_memory.py.

    - ZeRO 0: one all-reduce of the 16-bit gradients at the accumulation boundary.
    - ZeRO 1 and 2: gradient buckets (``reduce_bucket_size``) that span several ranks' partitions are
      all-reduced (``use_multi_rank_bucket_allreduce``), the rest reduced to their owner: a fraction
      min(1, bucket / partition) all-reduced. Stage 1 reduces once per step, stage 2 every micro-step;
      both all-gather the updated 16-bit partition after the step.
    - ZeRO 3: every micro-step gathers the parameters in forward and reduce-scatters the gradients;
      backward re-gathers only what forward released (parameters reused within
      ``stage3_max_reuse_distance`` stay gathered). Persistent (small) tensors are gathered once per step.
    """
    w, d = ctx.lp_bytes, layout.data_parallel(ctx.world_size)
    if d <= 1:
        return {}, {}
    z = layout.zero_stage
    if z == 0:
        return {"all_reduce": w * psi}, {}
    if z in (1, 2):
        multi = min(1.0, REDUCE_BUCKET_ELEMS * d / psi)
        reduce = {"all_reduce": w * psi * multi, "reduce": w * psi * (1 - multi)}
        gather = {"all_gather_into_tensor": w * psi / d}
        return ({**reduce, **gather}, {}) if z == 1 else (gather, reduce)
    st = ctx.stats
    persist = float(st.persistent_params(STAGE3_PARAM_PERSISTENCE_ELEMS))
    gathered = max(psi - persist, 0.0)
    regather = max(0.0, 1.0 - STAGE3_MAX_REUSE_DISTANCE / gathered) if gathered else 0.0
    per_micro = {
        "all_gather_into_tensor": w * gathered / d * (1 + regather),
        "reduce_scatter_tensor": w * psi,
    }
    return {"all_gather_into_tensor": w * persist / d}, per_micro


def wire_bytes(messages: dict[str, float], d: int) -> float:
    """Bytes one rank sends in ring collectives over ``d`` ranks for these messages."""
    if d <= 1:
        return 0.0
    factor = {
        "all_reduce": 2 * (d - 1) / d,
        "reduce": (d - 1) / d,
        "reduce_scatter_tensor": (d - 1) / d,
        "all_gather_into_tensor": d - 1,  # the message is the local partition
    }
    return sum(factor[op] * size for op, size in messages.items())


def estimate_speed(ctx: Context, layout: Layout) -> SpeedEstimate:
    """Step time, tokens/s and MFU of ``layout``: the sum of the terms (docs/planner.md § Speed model)."""
    micro_s = micro_batch_s(ctx, layout)
    compute_s = layout.grad_accum * micro_s
    bubble_s = pipeline_bubble_s(layout, micro_s)
    dp_comm_s, dp_bytes = zero_comm(ctx, layout, micro_s)
    tp_comm_s = tensor_parallel_comm_s(ctx, layout)
    pp_comm_s = pipeline_send_s(ctx, layout)
    host_s = offload_s(ctx, layout)
    optimizer_s = optimizer_step_s(ctx, layout)
    step_s = compute_s + bubble_s + dp_comm_s + tp_comm_s + pp_comm_s + host_s + optimizer_s
    tokens_step = (
        layout.micro_batch_size * ctx.seq_len * layout.grad_accum * layout.data_parallel(ctx.world_size)
    )
    tokens_per_s = tokens_step / step_s
    mfu = None
    if ctx.device.peak_flops is not None:
        mfu = (
            flops_per_token(ctx.stats, ctx.seq_len) * tokens_per_s / (ctx.world_size * ctx.device.peak_flops)
        )
    return SpeedEstimate(
        compute_s=compute_s,
        bubble_s=bubble_s,
        dp_comm_s=dp_comm_s,
        tp_comm_s=tp_comm_s,
        pp_comm_s=pp_comm_s,
        offload_s=host_s,
        optimizer_s=optimizer_s,
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        dp_bytes=dp_bytes,
    )


def micro_batch_s(ctx: Context, layout: Layout) -> float:
    """Forward + backward (+ recompute) of one micro-batch on the slowest model-parallel shard.

    docs/planner.md, Speed model § Compute: dense peak × ``train_efficiency``, slower for small matmuls;
    a pipeline runs at its heaviest stage, AutoTP splits the decoder layers t ways (the head replicated).
    The step's compute term is ``grad_accum`` of these.
    """
    st, dev = ctx.stats, ctx.device
    p, t = layout.pipeline_stages, layout.tensor_parallel
    tokens_micro = layout.micro_batch_size * ctx.seq_len
    recompute = 4.0 / 3.0 if layout.checkpointing else 1.0
    rate = dev.compute_flops * _efficiency(dev, ctx, layout)
    attn_per_layer = 12.0 * st.heads * st.head_dim * ctx.seq_len
    layer_flops = 6.0 * st.layer_params + attn_per_layer
    head_flops = 6.0 * (st.lm_head_params or (st.vocab * st.hidden if st.tied else 0))
    if p > 1:
        key = ("stage_flops", p)
        if key not in ctx.cache:
            ctx.cache[key] = max(
                sh.layers * layer_flops + (head_flops if sh.has_head else 0.0)
                for sh in shards_of(ctx, layout)
            )
        stage_flops = ctx.cache[key]
    else:  # under TP the decoder layers split t ways; the head is replicated on every TP rank
        stage_flops = st.layers * layer_flops / t + head_flops
    micro_s = tokens_micro * stage_flops * recompute / rate
    if layout.zero_stage == 0 and ctx.dtype == "bf16":
        micro_s *= dev.stage0_bf16_slowdown
    return micro_s


def zero_comm(ctx: Context, layout: Layout, micro_s: float) -> tuple[float, float]:
    """(exposed seconds, bytes each rank sends) of the data-parallel collectives of one optimizer step.

    docs/planner.md, Speed model § ZeRO communication: :func:`zero_collectives` (what DeepSpeed issues)
    turned into wire bytes (:func:`wire_bytes`) over the data-parallel ring; stage 2 hides its
    per-micro-step reduction behind backward, stage 3 its gathers and reduce-scatter behind forward and
    backward (``micro_s`` is that window), stages 0 and 1 are exposed.
    """
    d, t, m = layout.data_parallel(ctx.world_size), layout.tensor_parallel, layout.grad_accum
    bw_dp = _ring_bw(ctx, d, t)
    per_step, per_micro = zero_collectives(ctx, layout, _shard_params(ctx, layout))
    step_wire, micro_wire = wire_bytes(per_step, d), wire_bytes(per_micro, d)
    dp_bytes = step_wire + m * micro_wire
    if layout.zero_stage == 2:  # overlap_comm: the per-micro-step reduction hides behind backward
        hidden = OVERLAP_EFFICIENCY * (2.0 / 3.0) * micro_s
        exposed = step_wire / bw_dp + m * max(0.0, micro_wire / bw_dp - hidden)
    elif layout.zero_stage == 3:  # prefetched gathers and the reduce-scatter hide behind forward and backward
        exposed = step_wire / bw_dp + m * max(0.0, micro_wire / bw_dp - OVERLAP_EFFICIENCY * micro_s)
    else:  # stages 0 and 1 reduce after backward, at the accumulation boundary
        exposed = dp_bytes / bw_dp
    return exposed, dp_bytes


def tensor_parallel_comm_s(ctx: Context, layout: Layout) -> float:
    """AutoTP's all-reduces of the layer outputs in one optimizer step, not overlapped; 0 at t = 1.

    docs/planner.md, Speed model § Tensor-parallel communication: 4 ring all-reduces of s·b·h per
    layer per micro-batch (2 forward, 2 backward; 6 with recompute) inside the node.
    """
    t = layout.tensor_parallel
    if t <= 1:
        return 0.0
    st, w = ctx.stats, ctx.lp_bytes
    tokens_micro = layout.micro_batch_size * ctx.seq_len
    allreduces = (6 if layout.checkpointing else 4) * st.layers
    return (
        layout.grad_accum * allreduces * 2 * (t - 1) / t * w * tokens_micro * st.hidden / _ring_bw(ctx, t, 1)
    )


def pipeline_bubble_s(layout: Layout, micro_s: float) -> float:
    """Pipeline fill and drain: p − 1 idle micro-batch slots; 0 without a pipeline.

    docs/planner.md, Speed model § Pipeline bubble and sends: the schedule runs m + p − 1 slots of the
    slowest stage, so the bubble is a fraction (p − 1)/(m + p − 1) of compute + bubble.
    """
    return (layout.pipeline_stages - 1) * micro_s


def pipeline_send_s(ctx: Context, layout: Layout) -> float:
    """Activations (forward) and their gradients (backward) sent between stages; 0 without a pipeline.

    docs/planner.md, Speed model § Pipeline bubble and sends: s·b·h values each way per slot, over
    the network when neighbouring stages sit on different nodes.
    """
    p, m = layout.pipeline_stages, layout.grad_accum
    if p <= 1:
        return 0.0
    dev = ctx.device
    tokens_micro = layout.micro_batch_size * ctx.seq_len
    crosses = layout.data_parallel(ctx.world_size) * layout.tensor_parallel * 2 > ctx.gpus_per_node
    bw = (dev.inter_node_bytes_per_s if crosses else dev.intra_node_bytes_per_s) * COMM_EFFICIENCY
    return (m + p - 1) * 2 * ctx.lp_bytes * tokens_micro * ctx.stats.hidden / bw


def offload_s(ctx: Context, layout: Layout) -> float:
    """Host-device copies and the CPU optimizer step of one optimizer step; 0 without offload.

    docs/planner.md, Speed model § Offload: optimizer offload sends the 16-bit gradient partition down
    every micro-step and the parameters up once, and runs CPU Adam over the partition; parameter offload
    copies the partition in for forward and backward every micro-step.
    """
    m, w = layout.grad_accum, ctx.lp_bytes
    part = _partition_params(ctx, layout)
    host_bw = ctx.device.host_link_bytes_per_s * HOST_LINK_EFFICIENCY
    seconds = 0.0
    if layout.offload_optimizer != "none":
        copies = (m + 1) * w * part  # gradients down every micro-step, parameters up once
        seconds += copies / host_bw + part * ctx.gpus_per_node / CPU_ADAM_ELEMS_PER_S_PER_NODE
    if layout.offload_params != "none":
        seconds += (2 * m + 1) * w * part / host_bw
    return seconds


def optimizer_step_s(ctx: Context, layout: Layout) -> float:
    """The on-device optimizer step over the rank's partition (memory-bound); 0 when it runs on the CPU.

    docs/planner.md, Speed model § Optimizer step: the parameters and 16 bytes per parameter of fp32
    master weight, gradient and Adam moments, each read and written once, at HBM bandwidth.
    """
    if layout.offload_optimizer != "none":
        return 0.0  # CPU Adam: the offload term
    return _partition_params(ctx, layout) * (ctx.lp_bytes + 16) * 2 / ctx.device.hbm_bytes_per_s


def _shard_params(ctx: Context, layout: Layout) -> float:
    """Parameters of the largest model-parallel shard (pipeline stage or AutoTP rank): Ψ."""
    return max(sh.params for sh in shards_of(ctx, layout))


def _partition_params(ctx: Context, layout: Layout) -> float:
    """Parameters whose optimizer states one rank updates: Ψ/d under ZeRO 1-3, Ψ under ZeRO 0."""
    psi = _shard_params(ctx, layout)
    return psi / layout.data_parallel(ctx.world_size) if layout.zero_stage >= 1 else psi


def _efficiency(dev: Device, ctx: Context, layout: Layout) -> float:
    tokens = layout.micro_batch_size * ctx.seq_len
    width = ctx.stats.hidden / layout.tensor_parallel
    return (
        dev.train_efficiency
        * tokens
        / (tokens + GEMM_TOKENS_HALF)
        * width
        / (width + GEMM_WIDTH_HALF)
        / (1.0 / (1 + GEMM_TOKENS_HALF / 8192) / (1 + GEMM_WIDTH_HALF / 4096))
    )


def _ring_bw(ctx: Context, group: int, stride: int) -> float:
    """Bandwidth a ring over ``group`` ranks spaced ``stride`` apart gets: the network if it leaves the
    node, NVLink/PCIe inside it."""
    dev = ctx.device
    inside = group * stride <= ctx.gpus_per_node
    return (dev.intra_node_bytes_per_s if inside else dev.inter_node_bytes_per_s) * COMM_EFFICIENCY
