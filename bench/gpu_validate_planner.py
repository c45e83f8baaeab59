"""Measured vs predicted peak memory and step time on a GPU machine, one DeepSpeed engine per layout.

What the CPU tests cannot check: activations as the CUDA caching allocator sees them, DeepSpeed's
buckets and ZeRO-3 gathers at their real sizes, the CUDA context, and the step time (compute,
overlap, NCCL). On a machine with GPUs:

    python bench/gpu_validate_planner.py --gpus 1 --gpu h200-141gb            # default layouts
    python bench/gpu_validate_planner.py --gpus 8 --gpu h100-80gb --preset llama-1b --seq-len 4096
    python bench/gpu_validate_planner.py --dry-run --gpus 8                   # predictions only, no GPU

The driver (this process, no torch) starts ``deepspeed --num_gpus N`` once per layout with
``--worker``; each worker builds the engine the way ``harness train`` does (``harness.train.engine``),
runs warm-up and timed optimizer steps on random tokens, and writes rank 0's numbers: peak
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, device memory in use from
``torch.cuda.mem_get_info`` (what nvidia-smi shows, CUDA context included), and the median step time.
The driver prints them next to the planner's prediction and the error, and writes ``--out`` JSON.

Reading the result: "predicted alloc" (peak minus the CUDA-context/workspace allowance) should be
close to max_memory_allocated; "predicted peak" should bound the in-use number from above by the
fragmentation allowance; the step-time error tells how far the speed model's efficiency and overlap
constants are off for this GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_LAYOUTS: list[dict[str, Any]] = [
    {"zero_stage": 1, "micro_batch_size": 4},
    {"zero_stage": 2, "micro_batch_size": 4},
    {"zero_stage": 2, "micro_batch_size": 8, "checkpointing": True},
    {"zero_stage": 3, "micro_batch_size": 4},
    {"zero_stage": 3, "micro_batch_size": 4, "offload_optimizer": "cpu"},
    {"zero_stage": 2, "micro_batch_size": 4, "grad_accum": 4},
]


def layout_sets(layout: dict[str, Any], preset: str, seq_len: int, gpu: str, gpus: int) -> list[str]:
    """``--set`` overrides turning examples/tiny-cpu.yaml into this layout on this machine."""
    return [
        f"model.preset={preset}",
        f"model.gradient_checkpointing={str(layout.get('checkpointing', False)).lower()}",
        f"data.seq_len={seq_len}",
        "precision.dtype=bf16",
        f"parallel.zero_stage={layout['zero_stage']}",
        f"parallel.offload_optimizer={layout.get('offload_optimizer', 'none')}",
        f"parallel.offload_params={layout.get('offload_params', 'none')}",
        f"batch.micro_batch_size={layout['micro_batch_size']}",
        f"batch.grad_accum={layout.get('grad_accum', 1)}",
        "launch.nodes=1",
        f"launch.gpus_per_node={gpus}",
        f"launch.gpu={gpu}",
        "train.steps=100",
        "schedule.warmup_steps=1",
        "checkpoint.export_hf=false",
    ]


def predict(sets: list[str], world: int) -> dict[str, float]:
    """The planner's numbers for one layout (no torch)."""
    from harness.planner.layout import Layout
    from harness.planner.memory import FRAMEWORK_BYTES, estimate_memory
    from harness.planner.search import context_from_spec
    from harness.planner.speed import estimate_speed
    from harness.specload import load_spec

    spec = load_spec(ROOT / "examples" / "tiny-cpu.yaml", sets)
    ctx = context_from_spec(spec, world)
    p = spec.parallel
    lay = Layout(
        zero_stage=int(p.zero_stage),
        offload_optimizer=p.offload_optimizer,
        offload_params=p.offload_params,
        micro_batch_size=int(spec.batch.micro_batch_size),
        grad_accum=int(spec.batch.grad_accum),
        checkpointing=spec.model.gradient_checkpointing,
    )
    mem, speed = estimate_memory(ctx, lay), estimate_speed(ctx, lay)
    return {
        "label": lay.short(),
        "peak_bytes": mem.total,
        "alloc_bytes": mem.total - FRAMEWORK_BYTES,
        "activations_bytes": mem.activations + mem.logits,
        "step_s": speed.step_s,
        "tokens_per_s": speed.tokens_per_s,
        "fits": mem.fits,
    }


def worker(sets: list[str], out: Path, warmup: int, steps: int) -> int:
    """Inside ``deepspeed``: build the harness engine, step, measure, write rank 0's numbers."""
    import torch
    import torch.distributed as dist

    from harness.compiler import compile_config
    from harness.specload import load_spec
    from harness.train.engines import build_engine

    spec = load_spec(ROOT / "examples" / "tiny-cpu.yaml", sets)
    import deepspeed

    deepspeed.init_distributed()
    world = dist.get_world_size()
    ds_config = compile_config(spec, world)
    run = build_engine(spec, ds_config)
    vocab = run.engine.module.config.vocab_size if hasattr(run.engine.module, "config") else 32000
    gen = torch.Generator().manual_seed(dist.get_rank())
    micro, seq = ds_config["train_micro_batch_size_per_gpu"], spec.data.seq_len

    def batches():
        while True:
            yield torch.randint(0, vocab, (micro, seq), generator=gen)

    sampler = batches()
    for _ in range(warmup):
        run.train_step(sampler)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    in_use = 0
    for _ in range(steps):
        start = time.perf_counter()
        run.train_step(sampler)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        free, total = torch.cuda.mem_get_info()
        in_use = max(in_use, total - free)
    result = {
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "in_use": in_use,
        "step_s": statistics.median(times),
        "world_size": world,
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:7.2f}"


def main() -> int:
    """Drive one launch per layout and print measured vs predicted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1, help="GPUs on this machine to use")
    parser.add_argument("--gpu", default="h100-80gb", help="device table row for the predictions")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layouts", default=None, help="JSON list of layouts (default: a ZeRO 1-3 sweep)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout-s", type=int, default=900, help="per layout")
    parser.add_argument("--out", default="gpu_validate_planner.json")
    parser.add_argument("--dry-run", action="store_true", help="print predictions only (no GPU needed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sets", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(json.loads(opts.sets), Path(opts.worker_out), opts.warmup, opts.steps)

    layouts = json.loads(opts.layouts) if opts.layouts else DEFAULT_LAYOUTS
    rows = []
    header = (
        f"{'layout':32s} {'pred peak':>9s} {'pred alloc':>10s} {'max alloc':>9s} {'in use':>7s} {'err':>6s} "
    )
    print(header + f"{'pred s':>7s} {'meas s':>7s} {'err':>6s}")
    for layout in layouts:
        sets = layout_sets(layout, opts.preset, opts.seq_len, opts.gpu, opts.gpus)
        pred = predict(sets, opts.gpus)
        row: dict[str, Any] = {"layout": layout, "predicted": pred}
        if not opts.dry_run:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "m.json"
                cmd = [
                    "deepspeed",
                    "--num_gpus",
                    str(opts.gpus),
                    __file__,
                    "--worker",
                    "--sets",
                    json.dumps(sets),
                ]
                cmd += ["--worker-out", str(out), "--warmup", str(opts.warmup), "--steps", str(opts.steps)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=opts.timeout_s)
                if proc.returncode == 0 and out.is_file():
                    row["measured"] = json.loads(out.read_text())
                else:
                    row["error"] = (proc.stdout + proc.stderr)[-2000:]
        rows.append(row)
        meas = row.get("measured")
        line = f"{pred['label']:32s} {_gib(pred['peak_bytes']):>9s} {_gib(pred['alloc_bytes']):>10s} "
        if meas:
            mem_err = 100 * (pred["alloc_bytes"] / meas["max_allocated"] - 1)
            time_err = 100 * (pred["step_s"] / meas["step_s"] - 1)
            line += f"{_gib(meas['max_allocated']):>9s} {_gib(meas['in_use']):>7s} {mem_err:+5.0f}% "
            line += f"{pred['step_s']:7.3f} {meas['step_s']:7.3f} {time_err:+5.0f}%"
        else:
            line += f"{'-':>9s} {'-':>7s} {'':>6s} {pred['step_s']:7.3f}"
            if "error" in row:
                line += "  (failed: see --out)"
        print(line, flush=True)
    Path(opts.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
