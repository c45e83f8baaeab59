"""What checksumming a checkpoint costs: ``harness.train.checkpoint.save`` with and without checksums.

    deepspeed --num_gpus 2 bench/checkpoint_checksum.py                       # ~20 M params, ~0.3 GB
    deepspeed --num_gpus 2 bench/checkpoint_checksum.py --windows 9 --set parallel.zero_stage=3

Every rank builds the spec's engine (``examples/tiny-cpu.yaml`` widened to about 20 M parameters by
default, so a checkpoint is a few hundred MB), takes one optimizer step on random tokens (Adam's moments
exist only after one) and then saves in windows: each window saves once with checksums (every rank
checksums the files it wrote, rank 0 merges the lists into the COMPLETE marker) and once with sizes only,
in alternating order, each save bracketed by barriers, so load from other processes hits both alike.
Rank 0 prints the median save time of each and their ratio (with/without); the goal is <= 1.05. On a
box shared with other work the two medians swing by more than the difference, so it also prints the
direct measure: the time the slowest rank spent inside the checksum's ``update`` calls per save.
The checkpoints go to the spec's run directory (``runs/bench-checkpoint-checksum``), one kept at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness of this checkout, whatever `pip install -e` points at

WIDER = [
    "model.overrides.hidden_size=256",
    "model.overrides.intermediate_size=688",
    "model.overrides.num_hidden_layers=4",
    "model.overrides.vocab_size=32000",
]
"""llama-tiny widened to ~20 M parameters: about 16 bytes each on disk (fp32 weights, master, 2 moments)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (the deepspeed launcher adds --local_rank unless --no_local_rank)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "tiny-cpu.yaml"), help="run spec YAML")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="K=V",
        help="spec overrides, after the default widening (--no-widen drops it)",
    )  # fmt: skip
    parser.add_argument("--no-widen", action="store_true", help="the spec's model as it is")
    parser.add_argument("--windows", type=int, default=7, help="timed windows (one save of each kind)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class TimedHasher:
    """Wraps a checksum object and adds the seconds its ``update`` calls take to ``HASH_SECONDS``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def update(self, data) -> None:
        start = time.perf_counter()
        self.inner.update(data)
        HASH_SECONDS[0] += time.perf_counter() - start

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


HASH_SECONDS = [0.0]
"""Seconds this rank spent checksumming (the direct measure of the cost, immune to other load)."""


def main(argv: list[str] | None = None) -> int:
    """Build the engine, take a step, time alternating saves, print the comparison on rank 0."""
    args = parse_args(argv)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from harness.compiler import compile_resolved
    from harness.rundir import RunDir
    from harness.specload import load_spec
    from harness.train import checkpoint, integrity
    from harness.train.engines import build_engine

    plain_hasher = integrity._hasher
    integrity._hasher = lambda algorithm: TimedHasher(plain_hasher(algorithm))

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_logger.setLevel("WARNING")
    try:
        sets = ["run.name=bench-checkpoint-checksum", *([] if args.no_widen else WIDER), *args.overrides]
        spec, _, ds_config = compile_resolved(load_spec(args.spec, sets), world)
        run_dir = RunDir.of(spec).root
        run = build_engine(spec, ds_config)
        engine = run.engine
        vocab = engine.module.config.vocab_size
        x = torch.randint(
            0, vocab, (engine.train_micro_batch_size_per_gpu(), spec.data.seq_len), device=run.device
        )
        for _ in range(engine.gradient_accumulation_steps()):
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()

        seconds: dict[str, list[float]] = {"checksums": [], "sizes only": []}
        hash_seconds: list[float] = []  # per timed save with checksums: the slowest rank's hashing time
        step = 0
        for window in range(args.windows + 1):  # window 0 warms the page cache and the file system
            order = [True, False] if window % 2 == 0 else [False, True]
            for checksums in order:
                step += 1
                dist.barrier()
                HASH_SECONDS[0] = 0.0
                start = time.perf_counter()
                checkpoint.save(engine, run_dir, step, rank, {"step": step}, keep_last=1, checksums=checksums)
                dist.barrier()
                elapsed = time.perf_counter() - start
                slowest = torch.tensor([HASH_SECONDS[0]], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if window:
                    seconds["checksums" if checksums else "sizes only"].append(elapsed)
                    if checksums:
                        hash_seconds.append(float(slowest))
        newest = checkpoint.complete_checkpoints(run_dir)[-1].path
        marker = checkpoint.read_marker(newest)
        median = {name: statistics.median(s) for name, s in seconds.items()}
        per_window = [a / b for a, b in zip(seconds["checksums"], seconds["sizes only"], strict=True)]
        result = {
            "spec": args.spec,
            "overrides": sets,
            "world_size": world,
            "zero_stage": spec.parallel.zero_stage,
            "dtype": spec.precision.dtype,
            "checkpoint_bytes": marker["total_bytes"],
            "num_files": len(marker["files"]),
            "algorithm": checkpoint.integrity.checksum_algorithm(),
            "windows": args.windows,
            "median_s": median,
            "ratio_of_medians": median["checksums"] / median["sizes only"],
            "ratio_median_window": statistics.median(per_window),
            "hash_s_median": statistics.median(hash_seconds),
            "hash_share_of_save": statistics.median(hash_seconds) / median["sizes only"],
            "window_seconds": seconds,
        }
        if rank == 0:
            print(
                f"{world} ranks, ZeRO {spec.parallel.zero_stage}, {spec.precision.dtype}: checkpoint of "
                f"{marker['total_bytes'] / 1e6:,.1f} MB in {len(marker['files'])} files, "
                f"{args.windows} windows, checksum {result['algorithm']}"
            )
            for name, s in seconds.items():
                print(
                    f"save with {name:10s}: median {median[name]:.3f} s  ({', '.join(f'{v:.3f}' for v in s)})"
                )
            print(
                f"ratio with/without checksums: {result['ratio_of_medians']:.3f} (median per-window ratio "
                f"{result['ratio_median_window']:.3f}; goal <= 1.05)"
            )
            print(
                f"checksumming itself (slowest rank, median): {result['hash_s_median'] * 1e3:.1f} ms = "
                f"{result['hash_share_of_save']:.1%} of the save without checksums"
            )
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
