"""``harness plan SPEC``: the fastest layouts that fit, why the winner won, and what did not fit.

    harness plan examples/llama-70b-pipeline-slurm.yaml
    harness plan examples/tiny-cpu.yaml --set model.preset=llama-7b launch.gpu=a100-80gb --top 8
    harness plan SPEC --json > plan.json

The plan keeps the model, sequence length, precision, global batch and cluster of the spec and varies
everything else: ZeRO stage, offload, pipeline stages, tensor parallel, micro batch × accumulation and
activation checkpointing. Nothing runs; no torch is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from harness.cliargs import load_from_args, world_from_args
from harness.parallel_dims import data_parallel_size, target_global_batch
from harness.planner.devices import GB, GIB, describe
from harness.planner.host import NODE_HOST_HEADROOM
from harness.planner.layout import Layout
from harness.planner.search import (
    Candidate,
    PlanResult,
    SearchSpace,
    context_from_spec,
    evaluate,
    search,
    spec_layout,
)
from harness.spec import RunSpec

NEAR_MISS = 1.25
"""A rejected layout within this factor of the memory budget is reported as a near miss."""
_COMPONENTS = {
    "compute_s": "compute",
    "bubble_s": "pipeline bubble",
    "dp_comm_s": "exposed ZeRO communication",
    "tp_comm_s": "tensor-parallel all-reduces",
    "pp_comm_s": "pipeline sends",
    "offload_s": "host offload (PCIe copies, CPU Adam)",
    "optimizer_s": "optimizer step",
}


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the spec named on the command line; print a table (or JSON with ``--json``)."""
    spec = load_from_args(args)
    world = world_from_args(args, spec)
    result = plan_spec(spec, world)
    top = max(1, int(getattr(args, "top", 5) or 5))
    if getattr(args, "json", False):
        json.dump(plan_json(spec, result, top), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_plan(spec, result, top)
    return 0 if result.best else 1


def plan_spec(spec: RunSpec, world: int) -> PlanResult:
    """Search every layout for the spec's model, sequence, batch and cluster."""
    ctx = context_from_spec(spec, world)
    dp = data_parallel_size(spec, world)  # the spec's own layout fixes what the global batch means
    space = SearchSpace(global_batch=target_global_batch(spec, dp))
    result = search(ctx, space)
    own = spec_layout(spec, world)
    if own is not None:
        result.own = evaluate(ctx, own)
    return result


def _gib(n: float) -> str:
    gib = n / GIB
    return f"{gib:.1f}" if gib >= 10 or gib == 0 else f"{gib:.2f}"


def _layout_cells(c: Candidate) -> list[str]:
    lay = c.layout
    off = "/".join(
        x for x, v in (("opt", lay.offload_optimizer), ("param", lay.offload_params)) if v != "none"
    )
    return [
        f"{lay.zero_stage}" + (f" +{off}" if off else ""),
        str(lay.pipeline_stages),
        str(lay.tensor_parallel),
        f"{lay.micro_batch_size}×{lay.grad_accum}",
        "yes" if lay.checkpointing else "-",
    ]


def _mfu(c: Candidate) -> str:
    return "n/a" if c.speed.mfu is None else f"{100 * c.speed.mfu:.1f}%"


def explain(result: PlanResult, top: int) -> list[str]:
    """Sentences: why the winner won, why each runner-up lost, what the memory model refused."""
    lines: list[str] = []
    best = result.best
    if best is None:
        if result.rejected:
            lines.append(_nothing_fits(result))
        return lines + result.notes
    mem, spd = best.memory, best.speed
    lines.append(
        f"Winner {best.layout.short()}: {spd.tokens_per_s:,.0f} tokens/s, step {spd.step_s:.2f} s, "
        f"{_gib(mem.total)} of {_gib(mem.capacity)} GiB usable per GPU (peak in {mem.peak_phase}); "
        f"{_largest_share(best)}."
    )
    for rank, c in enumerate(result.plans[1:top], start=2):
        slower = 100 * (1 - c.speed.tokens_per_s / spd.tokens_per_s)
        what, delta = _biggest_difference(c, best)
        if abs(slower) < 0.5:
            extra = _techniques(c.layout) - _techniques(best.layout)
            why = (
                f"adds {', '.join(sorted(extra))}"
                if extra
                else f"needs {_gib(c.memory.total)} GiB per GPU vs {_gib(mem.total)}"
            )
            lines.append(
                f"#{rank} {c.layout.short()} ties on speed ({c.speed.tokens_per_s:,.0f} tokens/s) but {why}."
            )
        else:
            lines.append(
                f"#{rank} {c.layout.short()} is {slower:.1f}% slower: {what} {delta:+.2f} s per step."
            )
    if result.rejected:
        fastest = result.rejected[0]
        if fastest.speed.tokens_per_s > spd.tokens_per_s:
            gain = 100 * (fastest.speed.tokens_per_s / spd.tokens_per_s - 1)
            lines.append(
                f"{len(result.rejected)} of {result.evaluated} candidates do not fit; the fastest of them "
                f"({fastest.layout.short()}) would be {gain:.1f}% faster but {fastest.memory.why_not()}."
            )
        else:
            lines.append(f"{len(result.rejected)} of {result.evaluated} candidates do not fit in memory.")
        near = [c for c in result.rejected if c.memory.total <= NEAR_MISS * c.memory.capacity]
        if near and near[0] is not fastest and near[0].speed.tokens_per_s > 1.005 * spd.tokens_per_s:
            gain = 100 * (near[0].speed.tokens_per_s / spd.tokens_per_s - 1)
            lines.append(
                f"Nearest miss: {near[0].layout.short()} would be {gain:.1f}% faster but {near[0].memory.why_not()}."
            )
    if result.own is not None:
        lines.append(_own_line(result))
    return lines + result.notes


def _nothing_fits(result: PlanResult) -> str:
    """Why no candidate fits: the device, or (when some fit the device) the node's host memory."""
    on_device = [c for c in result.rejected if c.memory.total <= c.memory.capacity]
    if not on_device:
        smallest = min(result.rejected, key=lambda c: c.memory.total)
        return (
            f"Nothing fits: the smallest of {result.evaluated} candidates ({smallest.layout.short()}) "
            f"{smallest.memory.why_not()}. Try more nodes, a shorter data.seq_len or a larger GPU."
        )
    ctx = result.context
    smallest = min(on_device, key=lambda c: (c.memory.host_node, c.memory.host))
    return (
        f"Nothing fits the host: {len(on_device)} of {result.evaluated} candidates fit the GPUs, but the one "
        f"with the least host memory ({smallest.layout.short()}) {smallest.memory.why_not()} "
        f"({ctx.gpus_per_node} ranks per node; the node has {ctx.node_host_bytes / GB:.1f} GB: "
        f"{ctx.host_memory_source}). Use bf16, ZeRO 3 or pipeline stages, fewer ranks per node, or set "
        "launch.host_memory_gb to the node's real memory."
    )


def _techniques(lay: Layout) -> set[str]:
    names = {
        "optimizer offload": lay.offload_optimizer != "none",
        "parameter offload": lay.offload_params != "none",
        "activation checkpointing": lay.checkpointing,
        "pipeline stages": lay.pipeline_stages > 1,
        "tensor parallelism": lay.tensor_parallel > 1,
    }
    return {name for name, used in names.items() if used}


def _own_line(result: PlanResult) -> str:
    own = result.own
    assert own is not None
    label = own.layout.short()
    if not own.fits:
        return f"The spec's own layout ({label}) does not fit: it {own.memory.why_not()}."
    rank = next((i for i, c in enumerate(result.plans, start=1) if c.layout == own.layout), None)
    best = result.plans[0]
    where = f"ranks #{rank} of {len(result.plans)}" if rank else "is outside the searched space"
    if best.layout == own.layout:
        return f"The spec's own layout ({label}) is the winner."
    slower = 100 * (1 - own.speed.tokens_per_s / best.speed.tokens_per_s)
    what, delta = _biggest_difference(own, best)
    return f"The spec's own layout ({label}) {where}: {slower:.1f}% slower than the winner ({what} {delta:+.2f} s)."


def _largest_share(c: Candidate) -> str:
    s = c.speed
    parts = {k: getattr(s, k) for k in _COMPONENTS}
    compute = parts.pop("compute_s")
    other = sorted(parts.items(), key=lambda kv: -kv[1])
    share = 100 * compute / s.step_s
    if other and other[0][1] > 0.01 * s.step_s:
        name, value = other[0]
        return f"compute is {share:.0f}% of the step, {_COMPONENTS[name]} {100 * value / s.step_s:.0f}%"
    return f"compute is {share:.0f}% of the step"


def _biggest_difference(c: Candidate, best: Candidate) -> tuple[str, float]:
    deltas = {k: getattr(c.speed, k) - getattr(best.speed, k) for k in _COMPONENTS}
    name = max(deltas, key=lambda k: deltas[k])
    what = _COMPONENTS[name]
    if name == "compute_s":
        if c.layout.checkpointing and not best.layout.checkpointing:
            what = "recomputation (activation checkpointing)"
        elif c.layout.micro_batch_size < best.layout.micro_batch_size:
            what = "compute (smaller micro batch, less efficient matmuls)"
    return what, deltas[name]


def print_plan(spec: RunSpec, result: PlanResult, top: int) -> None:
    """The human-readable plan: header, table, explanation."""
    from rich.console import Console
    from rich.table import Table

    ctx = result.context
    st = ctx.stats
    console = Console(width=max(132, Console().width))
    glob = result.space.global_batch
    batch = f"global batch {glob} samples ({glob * ctx.seq_len:,} tokens)" if glob else "global batch free"
    console.print(
        f"[bold]harness plan[/bold]: {spec.model.preset or spec.model.name_or_path} "
        f"({st.total_params / 1e9:.2f} B params), seq {ctx.seq_len}, {ctx.dtype}, {batch}, "
        f"{ctx.nodes} node(s) × {ctx.gpus_per_node} {ctx.device.name}",
        soft_wrap=True,
    )
    console.print(
        f"host memory {ctx.node_host_bytes / GB:.1f} GB per node ({ctx.host_memory_source}); "
        f"a node's ranks may use {NODE_HOST_HEADROOM:.0%} of it",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"evaluated {result.evaluated} layouts in {result.elapsed_s * 1000:.0f} ms "
        f"({result.evaluated / max(result.elapsed_s, 1e-9):,.0f}/s); {len(result.plans)} fit"
    )
    table = Table(show_lines=False, header_style="bold")
    columns = ("#", "ZeRO", "PP", "TP", "micro×acc", "ckpt", "GiB/GPU", "states", "acts", "bufs", "host")
    columns += ("node GB",)
    for col in columns:
        table.add_column(col, justify="left" if col in ("ZeRO", "ckpt") else "right")
    for col in ("step s", "tokens/s", "MFU"):
        table.add_column(col, justify="right")
    for i, c in enumerate(result.plans[:top], start=1):
        m = c.memory
        table.add_row(
            str(i),
            *_layout_cells(c),
            _gib(m.total),
            _gib(m.params + m.grads + m.optimizer),
            _gib(m.activations + m.logits),
            _gib(m.buffers + m.overhead),
            _gib(m.host),
            f"{m.host_node / GB:.1f}",
            f"{c.speed.step_s:.2f}",
            f"{c.speed.tokens_per_s:,.0f}",
            _mfu(c),
        )
    if result.plans:
        console.print(table)
    for line in explain(result, top):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        "Columns: GiB/GPU = predicted peak per GPU; states = 16-bit params + grads + fp32 optimizer on the "
        "GPU; acts = activations + logits; bufs = DeepSpeed buckets, gathered ZeRO-3 params, CUDA context "
        "and fragmentation; host = offloaded GiB per GPU; node GB = the host memory (GB) a node's ranks need at their peak (building the model in host memory + offloaded states). Predictions, not measurements (docs/planner.md).",
        style="dim",
        highlight=False,
        soft_wrap=True,
    )


def _candidate_json(c: Candidate, world_size: int) -> dict[str, Any]:
    return {
        "layout": asdict(c.layout),
        "label": c.layout.short(),
        "set": c.layout.spec_overrides(world_size),
        "memory_bytes": {k: v for k, v in asdict(c.memory).items() if k != "peak_phase"},
        "peak_phase": c.memory.peak_phase,
        "fits": c.fits,
        "speed": asdict(c.speed),
    }


def plan_json(spec: RunSpec, result: PlanResult, top: int) -> dict[str, Any]:
    """The plan as plain data for ``--json``."""
    ctx = result.context
    return {
        "model": {
            "name": spec.model.preset or spec.model.name_or_path,
            "total_params": ctx.stats.total_params,
            "layers": ctx.stats.layers,
            "hidden": ctx.stats.hidden,
        },
        "seq_len": ctx.seq_len,
        "dtype": ctx.dtype,
        "global_batch": result.space.global_batch,
        "cluster": {
            "nodes": ctx.nodes,
            "gpus_per_node": ctx.gpus_per_node,
            "device": describe(ctx.device),
            "host_memory_bytes": ctx.node_host_bytes,
            "host_memory_source": ctx.host_memory_source,
            "host_memory_usable_bytes": NODE_HOST_HEADROOM * ctx.node_host_bytes,
        },
        "evaluated": result.evaluated,
        "fitting": len(result.plans),
        "elapsed_s": result.elapsed_s,
        "plans": [_candidate_json(c, ctx.world_size) for c in result.plans[:top]],
        "fastest_rejected": [_candidate_json(c, ctx.world_size) for c in result.rejected[:top]],
        "spec_layout": _candidate_json(result.own, ctx.world_size) if result.own else None,
        "explanation": explain(result, top),
    }
