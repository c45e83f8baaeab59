"""Per-rank memory of a layout: model states in their real dtypes, DeepSpeed's buffers, activations, logits.

Model states follow what DeepSpeed 0.19 actually allocates (measured on CPU with 2 ranks, see
tests/test_planner_memory.py and docs/planner.md), not the ZeRO paper's 2+2+12 bytes. With P the
parameters a rank's model-parallel shard holds, d the data-parallel degree and w the 16-bit width:

=========  ===========================================  ===================================
stage      after backward                                 inside the optimizer step
=========  ===========================================  ===================================
0 (bf16)   2P lp + 2P lp grads + 4P master + 8P Adam      2P + 4P master + 4P fp32 grads + 8P
1, 2       2P lp + 2P/d grads + 4P/d master + 8P/d        2P + 2P/d + 4P/d + 4P/d fp32 grads + 8P/d
3          2P/d + 2P_persist + 2P/d grads + 12P/d         2P/d + 2P/d grads + 4P/d + 4P/d + 8P/d
=========  ===========================================  ===================================

BF16_Optimizer (stage 0) keeps the fp32 master and moments whole on every rank. Stage 1 keeps full
16-bit gradients on the parameters until the end of backward; stage 2 reduces them into a partition as
it goes. The 16-bit gradient partition is one flat buffer for all parameter groups, so it sits next to
the fp32 gradients inside the step (2P + 18P/d for stages 1-2: DeepSpeed's own estimator number).
Offload moves master, fp32 grads and moments (plus staging copies) to host memory. Buffers:
``reduce_bucket_size`` elements per gradient bucket (one for stage 1, two for stage 2 with
overlap_comm, during backward; one always for stage 3), and ZeRO-3's gathered parameters. Activations
are per layer from the saved tensors of HF's Llama/GPT-2 blocks with SDPA (DERIVED, checked on CPU
with saved-tensor hooks); see docs/planner.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from harness.ds_defaults import (
    REDUCE_BUCKET_ELEMS,
    STAGE3_MAX_LIVE_PARAMS,
    STAGE3_PARAM_PERSISTENCE_ELEMS,
    STAGE3_PREFETCH_ELEMS,
)
from harness.planner.devices import GB, GIB
from harness.planner.host import NODE_HOST_HEADROOM, host_peak
from harness.planner.layout import Context, Layout
from harness.planner.shards import Shard, shards_of

FRAMEWORK_BYTES = 1.5 * GIB
"""CUDA context, cuBLAS workspace and NCCL buffers per GPU rank (0 on CPU ranks)."""
FRAGMENTATION = 0.10
"""Allocator slack on memory that comes and goes each step (activations, logits, buckets)."""
DEVICE_HEADROOM = 0.95
"""A plan fits when its peak is at most this fraction of device memory (the margin)."""
HOST_HEADROOM = 0.80
"""Offloaded states may use at most this fraction of the host memory per GPU (pinned pages)."""
LOGIT_BYTES_EXTRA = 12
"""Bytes per logit beyond the 16-bit logits: fp32 upcast / log-softmax output, its gradient, the
input gradient (HF ``ForCausalLMLoss`` upcasts before cross-entropy)."""


_TERMS = ("lp_params", "lp_grads", "master_params", "master_grads", "optimizer_states")


@dataclass(frozen=True, slots=True)
class StateBytes:
    """Model-state bytes one rank holds at one instant, on the device and (``host_*``) in host memory."""

    lp_params: float = 0.0
    lp_grads: float = 0.0
    master_params: float = 0.0
    master_grads: float = 0.0
    optimizer_states: float = 0.0
    host_lp_params: float = 0.0
    host_lp_grads: float = 0.0
    host_master_params: float = 0.0
    host_master_grads: float = 0.0
    host_optimizer_states: float = 0.0

    @property
    def device(self) -> float:
        """Bytes on the accelerator."""
        return self.lp_params + self.lp_grads + self.master_params + self.master_grads + self.optimizer_states

    @property
    def host(self) -> float:
        """Bytes in host memory."""
        return (
            self.host_lp_params
            + self.host_lp_grads
            + self.host_master_params
            + self.host_master_grads
            + self.host_optimizer_states
        )

    @property
    def total(self) -> float:
        """Device plus host: what the engine holds on this rank."""
        return self.device + self.host

    def term(self, name: str) -> float:
        """One term, device plus host (``lp_params``, ``lp_grads``, ``master_params``, ...)."""
        return getattr(self, name) + getattr(self, "host_" + name)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Peak device bytes of one rank, broken down, plus host bytes for offload."""

    params: float
    """16-bit parameters on the device (ZeRO-3: partition, persistent and gathered ones)."""
    grads: float
    """16-bit gradients on the device at the peak."""
    optimizer: float
    """fp32 master weights, fp32 gradients and Adam moments on the device at the peak."""
    buffers: float
    """DeepSpeed gradient buckets and ZeRO-3 gathered parameters."""
    activations: float
    """Saved activations of the in-flight micro-batches."""
    logits: float
    """Logits and loss (last pipeline stage)."""
    overhead: float
    """CUDA context, workspaces and allocator fragmentation."""
    total: float
    """Predicted peak device bytes per rank."""
    host: float
    """Host bytes per rank (offloaded states and staging copies)."""
    peak_phase: str
    """``backward`` or ``step``: when the peak happens."""
    capacity: float
    """Device bytes a plan may use (device memory × DEVICE_HEADROOM)."""
    host_capacity: float
    """Host bytes per rank a plan may use."""
    host_construction: float = 0.0
    """Host bytes one rank holds while it builds the model (kept parameters + one unit's working set;
    the worst pipeline stage)."""
    host_rank_peak: float = 0.0
    """Peak host bytes of one rank: construction plus what coexists with it (harness.planner.host)."""
    host_node: float = 0.0
    """Peak host bytes of one node: ranks per node × ``host_rank_peak``."""
    host_node_capacity: float = float("inf")
    """Host bytes a node's ranks may use (its memory × NODE_HOST_HEADROOM)."""

    @property
    def fits(self) -> bool:
        """Within the device budget, the host budget per GPU and the node's host memory."""
        return (
            self.total <= self.capacity
            and self.host <= self.host_capacity
            and self.host_node <= self.host_node_capacity
        )

    def why_not(self) -> str:
        """One line saying which budget is exceeded ('' if it fits)."""
        if self.total > self.capacity:
            return f"needs {self.total / GIB:.1f} GiB per GPU > {self.capacity / GIB:.1f} GiB usable"
        if self.host > self.host_capacity:
            return f"needs {self.host / GIB:.1f} GiB host memory per GPU > {self.host_capacity / GIB:.1f} GiB"
        if self.host_node > self.host_node_capacity:
            return (
                f"needs {self.host_node / GB:.1f} GB of host memory per node ({self.host_rank_peak / GB:.1f} GB "
                f"per rank, {self.host_construction / GB:.1f} GB of it to build the model) > "
                f"{self.host_node_capacity / GB:.1f} GB usable"
            )
        return ""


def model_states(ctx: Context, layout: Layout, shard: Shard | None = None) -> dict[str, StateBytes]:
    """Model-state bytes of one rank at four instants: ``backward`` (end of backward, before the
    gradients are reduced), ``after_backward`` (reduced and partitioned, before the step), ``in_step``
    (when the inner optimizer runs) and ``step_peak`` (the transient maximum inside the step)."""
    shard = shard or shards_of(ctx, layout)[0]
    w = ctx.lp_bytes
    d = layout.data_parallel(ctx.world_size)
    p = shard.params
    z = layout.zero_stage
    offload = layout.offload_optimizer != "none"
    if z == 0:
        if ctx.dtype == "fp32":  # no wrapper: the optimizer steps the parameters themselves
            s = StateBytes(lp_params=4.0 * p, lp_grads=4.0 * p, optimizer_states=8.0 * p)
            return dict.fromkeys(("backward", "after_backward", "in_step", "step_peak"), s)
        after = StateBytes(lp_params=w * p, lp_grads=w * p, master_params=4.0 * p, optimizer_states=8.0 * p)
        in_step = StateBytes(
            lp_params=w * p, master_params=4.0 * p, master_grads=4.0 * p, optimizer_states=8.0 * p
        )
        return {"backward": after, "after_backward": after, "in_step": in_step, "step_peak": in_step}
    if z in (1, 2):
        part = p / d
        # Stage 1 keeps whole 16-bit gradients on the parameters until backward ends; stage 2 reduces
        # into its partition as it goes.
        bwd_grads = w * p if z == 1 else w * part
        if offload:
            accum = w * part if layout.grad_accum > 1 else 0.0  # accumulated_grads_in_cpu
            host = {
                "host_lp_params": w * part,  # 16-bit staging copy of the partition
                "host_lp_grads": w * shard.largest_tensor + accum,
                "host_master_params": 4 * part,
                "host_master_grads": 4 * part,
                "host_optimizer_states": 8 * part,
            }
            after = StateBytes(lp_params=w * p, lp_grads=w * shard.largest_tensor, **host)
            backward = StateBytes(
                lp_params=w * p, lp_grads=w * shard.largest_tensor + (w * p if z == 1 else 0), **host
            )
            return {"backward": backward, "after_backward": after, "in_step": after, "step_peak": after}
        # The 16-bit gradient partition is one flat buffer over all parameter groups (the harness has two:
        # decay and no-decay); it lives until the last group has stepped, next to each group's fp32 copy.
        # Parameters straddling a partition boundary are counted whole in it.
        grads = w * (part + _straddle(ctx, d))
        states = {"lp_params": w * p, "master_params": 4 * part, "optimizer_states": 8 * part}
        in_step = StateBytes(lp_grads=grads, master_grads=4 * part, **states)
        return {
            "backward": StateBytes(lp_grads=max(bwd_grads, grads), **states),
            "after_backward": StateBytes(lp_grads=grads, **states),
            "in_step": in_step,
            "step_peak": in_step,
        }
    # Stage 3: per-tensor partitions (ceil(numel / d) each); small tensors are also kept whole
    # between steps (released for the step itself).
    part = (
        float(ctx.stats.partitioned_params(d))
        if layout.pipeline_stages == layout.tensor_parallel == 1
        else p / d
    )
    persist = float(ctx.stats.persistent_params(STAGE3_PARAM_PERSISTENCE_ELEMS))
    lp = {"host_lp_params": w * part} if layout.offload_params != "none" else {"lp_params": w * part}
    if offload:
        # The gradient partitions and the fp32 gradients live in (pinned) host memory for the whole run.
        host = {
            "host_lp_grads": w * part,
            "host_master_params": 4 * part,
            "host_master_grads": 4 * part,
            "host_optimizer_states": 8 * part,
        }
        in_step = StateBytes(**lp, **host)
        after = replace(in_step, lp_params=in_step.lp_params + w * persist)
        return {"backward": after, "after_backward": after, "in_step": in_step, "step_peak": in_step}
    states = {"lp_grads": w * part, "master_params": 4 * part, "optimizer_states": 8 * part}
    in_step = StateBytes(master_grads=4 * part, **lp, **states)
    after = StateBytes(**lp, **states)
    after = replace(after, lp_params=after.lp_params + w * persist)
    return {"backward": after, "after_backward": after, "in_step": in_step, "step_peak": in_step}


def _straddle(ctx: Context, d: int) -> float:
    """Expected elements of the tensors cut by a rank's partition boundaries that lie outside it
    (half a size-weighted tensor per boundary; a middle rank has two boundaries)."""
    if d <= 1:
        return 0.0
    key = "straddle"
    if key not in ctx.cache:
        sizes = [n for _, n in ctx.stats.tensors]
        ctx.cache[key] = sum(n * n for n in sizes) / sum(sizes) / 2
    return ctx.cache[key] * (2 if d > 2 else 1)


def deepspeed_buffers(ctx: Context, layout: Layout, shard: Shard) -> dict[str, float]:
    """Device bytes of DeepSpeed's own buffers in each phase (``backward``, ``step``).

    Gradient buckets are ``torch.empty(reduce_bucket_size)`` whatever the model size: one during
    backward for stage 1, two for stage 2 (overlap_comm double-buffers), one for the whole run under
    stage 3. ZeRO-3 also holds, when backward starts, the gathered parameters forward left for it
    (everything reused within ``stage3_max_reuse_distance``, at most ``stage3_max_live_parameters``
    plus the prefetch bucket), and in backward the full gradient of the running module.
    """
    w = ctx.lp_bytes
    bucket = w * REDUCE_BUCKET_ELEMS
    z = layout.zero_stage
    if z == 0:
        # The engine flattens gradients into reduce_bucket_size chunks for the all-reduce.
        return {"backward": 0.0, "step": w * min(shard.params, REDUCE_BUCKET_ELEMS)}
    if z == 1:
        return {"backward": bucket, "step": 0.0}
    if z == 2:
        return {"backward": 2 * bucket, "step": 0.0}
    # Forward leaves gathered what backward reuses within stage3_max_reuse_distance (measured: a model
    # under that size stays whole), capped by stage3_max_live_parameters, plus the prefetch bucket.
    gathered = ctx.stats.total_params - ctx.stats.persistent_params(STAGE3_PARAM_PERSISTENCE_ELEMS)
    live = w * min(gathered, STAGE3_MAX_LIVE_PARAMS + STAGE3_PREFETCH_ELEMS)
    return {"backward": bucket + live + w * shard.largest_layer, "step": bucket}


def activation_bytes_per_layer(ctx: Context, micro_batch: int, tp: int = 1) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch (no recomputation).

    Llama family (RMSNorm upcast to fp32, SwiGLU, GQA through SDPA without repeat_kv), per token:
    two norms × (4h fp32 input + 2h normalized + 2h scaled output) = 16h; q 2·a·d, k and v 2·g·d each
    (saved by SDPA after RoPE); the attention output 2·a·d and its contiguous copy into o_proj 2·a·d;
    SwiGLU gate, SiLU, up and product outputs 8F; SDPA's fp32 log-sum-exp 4a. GPT-2: two LayerNorm
    inputs and outputs 8h, q/k/v/out as above, gelu_new's five F-wide tensors 10F, dropout masks 2h.
    ``eager`` attention adds the s×s probabilities (fp32 softmax 4 + 16-bit copy 2 bytes per score).
    Widths of heads and MLP divide by the tensor-parallel degree; norms do not.
    """
    st = ctx.stats
    w = ctx.lp_bytes
    s = ctx.seq_len
    a_d = st.heads * st.head_dim / tp
    g_d = st.kv_heads * st.head_dim / tp
    f = st.ffn / tp
    attn = w * (a_d + 2 * g_d + 2 * a_d) + 4 * st.heads / tp
    if st.gated_mlp:
        per_token = 2 * (4 + 2 * w) * st.hidden + attn + 4 * w * f
    else:
        # HF GPT-2's gelu_new is Python arithmetic: it keeps x, tanh(.), 0.5·x and 1 + tanh(.) besides
        # its output (5 F-wide tensors where a fused GELU keeps 2).
        per_token = 4 * w * st.hidden + attn + 5 * w * f + (2 * st.hidden if ctx.dropout else 0)
    scores = 0.0
    if ctx.attn_implementation == "eager":
        scores = (4 + w + (1 + w if ctx.dropout else 0)) * (st.heads / tp) * s * s
    return micro_batch * (s * per_token + scores)


def activation_memory(ctx: Context, layout: Layout, shard: Shard, stage_index: int) -> tuple[float, float]:
    """(activations, logits) bytes a pipeline stage holds at the start of backward."""
    st = ctx.stats
    w = ctx.lp_bytes
    b, s, p, m = layout.micro_batch_size, ctx.seq_len, layout.pipeline_stages, layout.grad_accum
    per_layer = activation_bytes_per_layer(ctx, b, layout.tensor_parallel)
    layer_input = w * s * b * st.hidden
    in_flight = min(p - stage_index, m) if p > 1 else 1
    if layout.checkpointing:
        acts = in_flight * shard.layers * layer_input + (per_layer if shard.layers else 0.0)
    else:
        acts = in_flight * shard.layers * per_layer
    if p > 1:  # DeepSpeed's pipe buffers: an input and an output activation per buffered micro-batch
        acts += 2 * max(2, in_flight) * layer_input
    logits = 0.0
    if shard.has_head:
        final_norm = (4 + 2 * w) * st.hidden if st.gated_mlp else 2 * w * st.hidden
        acts += s * b * final_norm
        logits = (w + LOGIT_BYTES_EXTRA) * s * b * st.vocab
    return acts, logits


def estimate_memory(ctx: Context, layout: Layout) -> MemoryEstimate:
    """Peak device memory per rank (worst pipeline stage) and host memory, with the breakdown."""
    best: MemoryEstimate | None = None
    worst_host = None
    shards = shards_of(ctx, layout)
    framework = FRAMEWORK_BYTES if ctx.device.peak_flops is not None else 0.0
    # NVMe offload keeps its states on disk: no host-memory budget applies.
    nvme = "nvme" in (layout.offload_optimizer, layout.offload_params)
    host_capacity = float("inf") if nvme else HOST_HEADROOM * ctx.device.host_mem_bytes
    # The first stage has the most micro-batches in flight, the last the logits, the heaviest the most
    # states; no other stage can hold the peak.
    key = ("peak_stages", layout.pipeline_stages, layout.tensor_parallel)
    if key not in ctx.cache:
        heaviest = max(range(len(shards)), key=lambda i: shards[i].params)
        ctx.cache[key] = sorted({0, len(shards) - 1, heaviest})
    for index in ctx.cache[key]:
        shard = shards[index]
        key = (
            "states",
            layout.zero_stage,
            layout.offload_optimizer,
            layout.offload_params,
            layout.pipeline_stages,
            layout.tensor_parallel,
            layout.grad_accum > 1,
            index,
        )
        if key not in ctx.cache:
            ctx.cache[key] = (model_states(ctx, layout, shard), deepspeed_buffers(ctx, layout, shard))
        states, buffers = ctx.cache[key]
        acts, logits = activation_memory(ctx, layout, shard, index)
        bwd, stp = states["backward"], states["step_peak"]
        backward = bwd.device + buffers["backward"] + acts + logits
        step = stp.device + buffers["step"]
        if backward >= step:
            phase, peak_states, transient = "backward", bwd, acts + logits + buffers["backward"]
        else:
            phase, peak_states, transient = "step", stp, buffers["step"]
            acts = logits = 0.0
        overhead = framework + FRAGMENTATION * transient
        est = MemoryEstimate(
            params=peak_states.lp_params,
            grads=peak_states.lp_grads,
            optimizer=peak_states.master_params + peak_states.master_grads + peak_states.optimizer_states,
            buffers=buffers[phase],
            activations=acts,
            logits=logits,
            overhead=overhead,
            total=max(backward, step) + overhead,
            host=max(bwd.host, stp.host),
            peak_phase=phase,
            capacity=DEVICE_HEADROOM * ctx.device.mem_bytes,
            host_capacity=host_capacity,
        )
        host = host_peak(ctx, layout, shard, index, est.host, est.total)
        if worst_host is None or host.per_rank > worst_host.per_rank:
            worst_host = host
        if best is None or est.total > best.total:
            best = est
    assert best is not None and worst_host is not None
    return replace(
        best,
        host_construction=worst_host.construction,
        host_rank_peak=worst_host.per_rank,
        host_node=worst_host.per_node,
        host_node_capacity=NODE_HOST_HEADROOM * ctx.node_host_bytes,
    )
