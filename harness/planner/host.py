"""Host (CPU) memory of a layout: what a rank builds on the host while it constructs the model, per rank
and per node, and where a node's memory figure comes from.

Construction follows ``harness/train/materialize.py``: the model is built on the meta device and each
rank fills only the parameters it keeps, one *unit* at a time (a decoder layer, an embedding, the final
norm, the LM head), in the run's dtype. What a rank keeps: ZeRO 0-2 the whole model (P), ZeRO 3 its
partition (P/d: ``zero.Init`` partitions each parameter as it is created), a pipeline stage its
parameters, an AutoTP rank its slices (``shards.py``). The working set on top of that is the largest
unit in fp32 plus its cast copy. On GPU ranks these bytes are host memory until the engine moves the
model to the device; on CPU ranks the device *is* the host. docs/planner.md ("Host memory") gives the
formula and what coexists with what.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.planner.devices import GB, GIB, Device
from harness.planner.layout import Context, Layout
from harness.planner.shards import Shard, pipeline_shards

NODE_HOST_HEADROOM = 0.90
"""A node's ranks may use at most this fraction of its memory at their peak (the rest: the OS, page
cache, the launcher, data loading)."""
MEMINFO = Path("/proc/meminfo")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "wpe.weight")


@dataclass(frozen=True, slots=True)
class HostPeak:
    """Host bytes of one rank at its peak, and of a node's ranks together."""

    kept: float
    """Parameters the rank keeps after construction, in the run's dtype."""
    working: float
    """The largest unit in fp32 plus its cast copy, while it is filled."""
    steady: float
    """What coexists with construction on the host: offloaded states (GPU ranks), or the device peak
    when it exceeds construction (CPU ranks, whose device memory is host memory)."""
    per_rank: float
    """Peak host bytes of one rank."""
    per_node: float
    """Ranks per node × ``per_rank``."""

    @property
    def construction(self) -> float:
        """Bytes a rank holds while it builds the model: kept parameters plus the working set."""
        return self.kept + self.working


def largest_unit(ctx: Context, layout: Layout, stage_index: int = 0) -> int:
    """Parameters of the largest init unit a rank fills (materialized whole in fp32, even under AutoTP,
    which cuts its slices from the full tensor; ZeRO 3 gathers one unit at a time)."""
    pp = layout.pipeline_stages
    key = ("largest_unit", pp, stage_index if pp > 1 else 0)
    if key in ctx.cache:
        return ctx.cache[key]
    st = ctx.stats
    embeddings = [n for name, n in st.tensors if name.endswith(_EMBEDDINGS)]
    # A tied head owns no parameters unless a pipeline keeps a copy of the embedding on the last stage.
    head = st.lm_head_params or (st.vocab * st.hidden if st.tied and pp > 1 else 0)
    if pp == 1:
        units = [*embeddings, st.layer_params, st.final_params, head]
    else:
        shard = pipeline_shards(ctx, pp)[stage_index]
        units = [*(embeddings if stage_index == 0 else [])]
        units += [st.layer_params] if shard.layers else []
        units += [st.final_params, head] if shard.has_head else []
    ctx.cache[key] = max(units or [0])
    return ctx.cache[key]


def kept_params(ctx: Context, layout: Layout, shard: Shard) -> float:
    """Parameters a rank keeps after construction: its shard, or its ZeRO-3 partition of it."""
    if layout.zero_stage != 3:
        return float(shard.params)
    d = layout.data_parallel(ctx.world_size)
    if layout.pipeline_stages == layout.tensor_parallel == 1:
        return float(ctx.stats.partitioned_params(d))  # ceil(numel / d) per tensor, as zero.Init cuts
    return shard.params / d


def host_peak(
    ctx: Context,
    layout: Layout,
    shard: Shard,
    stage_index: int,
    host_states: float,
    device_peak: float,
) -> HostPeak:
    """Host bytes of a rank of ``shard`` (pipeline stage ``stage_index``) at its peak.

    ``host_states`` are the offloaded model states (memory.model_states' ``host_*``), ``device_peak`` the
    rank's predicted device peak. GPU ranks: construction + offloaded states (conservative: the engine
    moves the model to the GPU before it allocates them). CPU ranks: max(construction, device peak) +
    offloaded states. A ZeRO-3 partition offloaded to the host is the kept partition itself (counted
    once); NVMe offload keeps its states on disk."""
    w = ctx.lp_bytes
    kept = w * kept_params(ctx, layout, shard)
    working = (4 + w) * largest_unit(ctx, layout, stage_index)
    nvme = "nvme" in (layout.offload_optimizer, layout.offload_params)
    states = 0.0 if nvme else host_states
    if layout.zero_stage == 3 and layout.offload_params == "cpu":
        states = max(0.0, states - kept)
    construction = kept + working
    # CPU ranks: the device peak is host memory too, and it contains the kept parameters.
    on_host_device = ctx.device.peak_flops is None
    steady = states + (max(0.0, device_peak - construction) if on_host_device else 0.0)
    per_rank = construction + steady
    return HostPeak(
        kept=kept, working=working, steady=steady, per_rank=per_rank, per_node=ctx.gpus_per_node * per_rank
    )


def meminfo_bytes(path: Path | None = None) -> float | None:
    """MemTotal of this machine in bytes (``/proc/meminfo`` counts kB of 1024 bytes), None if unreadable."""
    try:
        for line in (path or MEMINFO).read_text(encoding="ascii", errors="replace").splitlines():
            name, _, rest = line.partition(":")
            if name == "MemTotal":
                return float(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def has_nvidia_gpus(path: Path | None = None) -> bool:
    """Whether this machine's NVIDIA driver lists at least one GPU (no torch, no nvidia-smi)."""
    try:
        return any((path or NVIDIA_GPUS).iterdir())
    except OSError:
        return False


def node_host_memory(
    given_gb: float | None, launcher: str, device: Device, gpus_per_node: int
) -> tuple[float, str]:
    """(bytes of host memory of one node, where the figure comes from).

    ``launch.host_memory_gb`` when given. Otherwise this machine's MemTotal when the ranks run here:
    ``launcher: local`` with CPU ranks, or with NVIDIA GPUs on this machine. Otherwise (a cluster
    launcher, or a GPU spec read on a machine without GPUs) the device table's host memory per GPU ×
    GPUs per node (DGX reference nodes: docs/planner.md)."""
    if given_gb is not None:
        return given_gb * GB, "launch.host_memory_gb"
    if launcher == "local" and (device.peak_flops is None or has_nvidia_gpus()):
        total = meminfo_bytes()
        if total:
            return total, "this machine's MemTotal; set launch.host_memory_gb to override"
    per_gpu = device.host_mem_bytes / GIB
    return (
        float(device.host_mem_bytes * gpus_per_node),
        f"{device.name} table default, {per_gpu:.0f} GiB per GPU × {gpus_per_node}; "
        "set launch.host_memory_gb for the real nodes",
    )
