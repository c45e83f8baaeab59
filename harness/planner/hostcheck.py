"""Refuse a spec whose ranks would run a node out of host memory while they build the model.

``harness show``, ``config`` and ``train`` reach this through :func:`harness.compiler.resolve_layout`,
before anything is written or launched. The numbers are the planner's (``harness.planner.host``), so
``harness plan`` never proposes a layout this refuses.
"""

from __future__ import annotations

from harness.errors import SpecError
from harness.planner.devices import GB
from harness.planner.host import NODE_HOST_HEADROOM
from harness.planner.layout import Context, Layout
from harness.planner.memory import MemoryEstimate
from harness.planner.search import context_from_spec, evaluate, spec_layout
from harness.presets import model_config_dict
from harness.spec import RunSpec


class _Shown(float):
    """A number of GB as the error shows it: ``64``, or ``24.6 (this machine's MemTotal)``."""

    def __new__(cls, value: float, source: str = "") -> _Shown:
        shown = super().__new__(cls, value)
        shown.source = source
        return shown

    def __str__(self) -> str:
        number = f"{float(self):g}" if self.source == "" else f"{float(self):.1f}"
        return f"{number} ({self.source})" if self.source else number


def check_host_memory(spec: RunSpec, world_size: int) -> None:
    """Raise SpecError when the spec's layout needs more host memory per node than the node has.

    Skipped (returns) when the model's config is not available offline or the layout is not resolved."""
    if model_config_dict(spec.model.preset, spec.model.name_or_path, spec.model.overrides) is None:
        return
    layout = spec_layout(spec, world_size)
    if layout is None:
        return
    ctx = context_from_spec(spec, world_size)
    memory = evaluate(ctx, layout).memory
    if memory.host_node <= memory.host_node_capacity:
        return
    given = spec.launch.host_memory_gb
    value = _Shown(given) if given is not None else _Shown(ctx.node_host_bytes / GB, ctx.host_memory_source)
    raise SpecError(
        "launch.host_memory_gb", value, _fix(ctx, layout, memory), reason=_reason(spec, ctx, layout, memory)
    )


def describe_layout(ctx: Context, layout: Layout) -> str:
    """``in fp32 under ZeRO 1``, ``in bf16 under ZeRO 1 with 4 pipeline stages``, ..."""
    words = f"in {ctx.dtype} under ZeRO {layout.zero_stage}"
    extras = []
    if layout.pipeline_stages > 1:
        extras.append(f"{layout.pipeline_stages} pipeline stages")
    if layout.tensor_parallel > 1:
        extras.append(f"tensor parallel {layout.tensor_parallel}")
    offloaded = [
        n
        for n, v in (("optimizer", layout.offload_optimizer), ("parameters", layout.offload_params))
        if v != "none"
    ]
    if offloaded:
        extras.append(f"{' and '.join(offloaded)} offloaded")
    return words + (f" with {', '.join(extras)}" if extras else "")


def _reason(spec: RunSpec, ctx: Context, layout: Layout, memory: MemoryEstimate) -> str:
    ranks = ctx.gpus_per_node
    who = f"{ranks} ranks per node each build" if ranks > 1 else "1 rank per node builds"
    model = spec.model.preset or spec.model.name_or_path
    extra = memory.host_rank_peak - memory.host_construction
    detail = ""
    if extra > 0.05 * GB:
        held = "offloaded states" if ctx.device.peak_flops is not None else "training state"
        detail = f": {memory.host_construction / GB:.1f} GB to build it + {extra / GB:.1f} GB of {held}"
    return (
        f"{who} up to {memory.host_rank_peak / GB:.1f} GB on the host ({model} {describe_layout(ctx, layout)}"
        f"{detail}), {memory.host_node / GB:.0f} GB per node > {memory.host_node_capacity / GB:.1f} GB usable "
        f"({NODE_HOST_HEADROOM:.0%} of {ctx.node_host_bytes / GB:.1f} GB)"
    )


def _fix(ctx: Context, layout: Layout, memory: MemoryEstimate) -> str:
    fixes = []
    if ctx.dtype == "fp32":
        fixes.append("use bf16" if ctx.device.bf16 else "use fp16")
    if layout.zero_stage < 3 and layout.pipeline_stages == layout.tensor_parallel == 1:
        fixes.append("ZeRO 3 or pipeline stages")
    if memory.host_rank_peak - memory.host_construction > 0.05 * GB and ctx.device.peak_flops is not None:
        fixes.append("less offload (parallel.offload_optimizer / offload_params)")
    if ctx.gpus_per_node > 1:
        fixes.append("fewer ranks per node (launch.gpus_per_node)")
    fixes.append(
        "or a host with more memory (set launch.host_memory_gb to the node's real memory if it has more)"
    )
    return ", ".join(fixes)
