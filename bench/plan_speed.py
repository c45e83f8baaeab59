"""How fast the planner answers: a 70B plan for 8 nodes × 8 H100, in-process and through the CLI.

    python bench/plan_speed.py            # prints plan time, candidates/s, CLI wall time
    python bench/plan_speed.py --repeat 20

The issue's bar: ``harness plan`` on the 70B example in well under 2 s, at least 1,000 candidates per
second. Nothing here is asserted; the numbers are printed for the README and docs/planner.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEVENTY_B = [
    "model.preset=llama-70b",
    "launch.nodes=8",
    "launch.gpus_per_node=8",
    "launch.gpu=h100-80gb",
    "data.seq_len=4096",
    "batch.global_batch_size=1024",
    "batch.micro_batch_size=null",
    "batch.grad_accum=null",
    "precision.dtype=bf16",
]


def spec_args() -> list[str]:
    """The shipped 70B example if present, else tiny-cpu.yaml turned into the same job with --set."""
    example = ROOT / "examples" / "llama-70b-pipeline-slurm.yaml"
    if example.is_file():
        return [str(example)]
    return [str(ROOT / "examples" / "tiny-cpu.yaml"), "--set", *SEVENTY_B]


def in_process(args: list[str], repeat: int) -> tuple[list[float], int, int]:
    """(plan times in s, candidates evaluated, plans that fit) for ``repeat`` fresh plans."""
    from harness.cli import build_parser
    from harness.cliargs import load_from_args, world_from_args
    from harness.planner.cli import plan_spec

    ns = build_parser().parse_args(["plan", *args])
    spec = load_from_args(ns)
    world = world_from_args(ns, spec)
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = plan_spec(spec, world)
        times.append(time.perf_counter() - start)
    assert result is not None
    return times, result.evaluated, len(result.plans)


def cli_wall(args: list[str], repeat: int) -> list[float]:
    """Wall seconds of ``python -m harness plan`` (process start and imports included)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "harness", "plan", *args], cwd=ROOT, check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    """Print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cli-repeat", type=int, default=3)
    opts = parser.parse_args()
    args = spec_args()
    times, evaluated, fitting = in_process(args, opts.repeat)
    best = min(times)
    print(f"spec: {' '.join(args)}")
    print(f"candidates evaluated per plan: {evaluated} ({fitting} fit)")
    print(f"plan time in-process: median {statistics.median(times) * 1000:.0f} ms, best {best * 1000:.0f} ms")
    print(
        f"candidates per second: {evaluated / statistics.median(times):,.0f} (best {evaluated / best:,.0f})"
    )
    walls = cli_wall(args, opts.cli_repeat)
    print(
        f"`harness plan` wall time (new process): median {statistics.median(walls):.2f} s, max {max(walls):.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
