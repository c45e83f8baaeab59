"""The harness's training step against a minimal hand-written DeepSpeed loop, side by side in one run.

    deepspeed --num_gpus 2 bench/train_vs_raw.py                      # examples/tiny-cpu.yaml
    deepspeed --num_gpus 2 bench/train_vs_raw.py --spec S.yaml --set parallel.zero_stage=2

Every rank builds two engines from the same spec, DeepSpeed config, seed and data:

- harness: ``harness.train.engines.build_engine`` + ``RunEngine.train_step`` on the harness's
  ``BlockSampler``, plus what the training loop adds: the stop-signal agreement every step
  (``signals.agree_to_stop``: one tiny all-reduce) and the loss averaged over ranks every
  ``train.log_every`` steps (``RunEngine.loss_value``);
- raw: ``deepspeed.initialize(model, param_groups, config)`` (the same decay/no-decay groups, so both
  do the same math) and the textbook loop
  ``loss = engine(input_ids=x, labels=x).loss; engine.backward(loss); engine.step()`` over the same
  packed blocks read in order, ``loss.item()`` once per step.

After warm-up steps on both, the two alternate in measurement windows (harness first in even windows,
raw first in odd ones), each window bracketed by barriers, so load from other processes on the box
hits both alike. Rank 0 prints tokens/s of each (all ranks together) and harness/raw; the goal is
>= 0.97. Build DeepSpeed's JIT ops first (``scripts/warm_ds_ops.py``) so nothing compiles while timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness of this checkout, whatever `pip install -e` points at


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (the deepspeed launcher adds --local_rank unless --no_local_rank)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "tiny-cpu.yaml"), help="run spec YAML")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="K=V")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of each loop first")
    parser.add_argument("--windows", type=int, default=20, help="timed windows per loop (alternating)")
    parser.add_argument("--steps-per-window", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class RawLoop:
    """The hand-written loop: DeepSpeed's own engine and nothing else."""

    def __init__(self, spec, ds_config, vocab_size: int, blocks: np.ndarray, rank: int, world: int) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers import AutoModelForCausalLM

        from harness.train.model import hf_config, param_groups, zero3_init_context

        cfg = hf_config(spec.model, vocab_size)
        with zero3_init_context(ds_config):  # same partitioned init as the harness under ZeRO 3
            net = AutoModelForCausalLM.from_config(
                cfg, attn_implementation=spec.model.attn_implementation, dtype=torch.float32
            )
        self.engine, _, _, _ = deepspeed.initialize(
            model=net, model_parameters=param_groups(net, spec.optimizer.weight_decay), config=ds_config
        )
        self.device = torch.device(get_accelerator().current_device_name())
        self.blocks = blocks
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        self.rank, self.world = rank, world
        self.next_row = rank * self.micro

    def _batch(self) -> torch.Tensor:
        if self.next_row + self.micro > len(self.blocks):
            self.next_row = self.rank * self.micro
        rows = slice(self.next_row, self.next_row + self.micro)
        self.next_row += self.micro * self.world
        return torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64)).to(self.device)

    def step(self) -> float:
        for _ in range(self.accum):
            x = self._batch()
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)
            self.engine.step()
        return loss.item()


def main(argv: list[str] | None = None) -> int:
    """Build both loops, warm up, time alternating windows, print the comparison on rank 0."""
    args = parse_args(argv)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.utils import set_random_seed

    from harness.compiler import compile_resolved
    from harness.rundir import RunDir
    from harness.specload import load_spec
    from harness.train import signals
    from harness.train.data import load_run_data
    from harness.train.engine import data_parallel_coords
    from harness.train.engines import build_engine

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    try:
        spec = load_spec(args.spec, ["run.name=bench-train-vs-raw", *args.overrides])
        spec, plan, ds_config = compile_resolved(spec, world)
        run_dir = RunDir.of(spec).root
        run_dir.mkdir(parents=True, exist_ok=True)
        data = load_run_data(spec, run_dir, rank)

        set_random_seed(spec.train.seed)
        harness_run = build_engine(spec, ds_config, vocab_size=data.vocab_size)
        dp_rank, dp_size = data_parallel_coords(harness_run.engine)
        sampler = data.train_sampler(
            micro_batch_size=harness_run.engine.train_micro_batch_size_per_gpu(),
            grad_accum=harness_run.engine.gradient_accumulation_steps(),
            dp_rank=dp_rank,
            dp_size=dp_size,
        )

        harness_steps = itertools.count(1)

        def harness_step() -> None:  # what the training loop does per step, logging included
            loss = harness_run.train_step(sampler)
            if next(harness_steps) % spec.train.log_every == 0:
                harness_run.loss_value(loss)
            signals.agree_to_stop(harness_run.device)

        set_random_seed(spec.train.seed)
        raw = RawLoop(spec, ds_config, data.vocab_size, data.train, dp_rank, dp_size)
        tokens_per_step = plan.global_batch_size * spec.data.seq_len
        loops = {"harness": harness_step, "raw": raw.step}

        for _ in range(args.warmup_steps):
            for step in loops.values():
                step()
        seconds = {name: [] for name in loops}
        for window in range(args.windows):
            order = ["harness", "raw"] if window % 2 == 0 else ["raw", "harness"]
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps_per_window):
                    loops[name]()
                dist.barrier()
                seconds[name].append(time.perf_counter() - start)

        window_tokens = tokens_per_step * args.steps_per_window
        tps = {name: window_tokens * len(s) / sum(s) for name, s in seconds.items()}
        per_window = [r / h for h, r in zip(seconds["harness"], seconds["raw"], strict=True)]
        result = {
            "spec": args.spec,
            "overrides": args.overrides,
            "world_size": world,
            "zero_stage": spec.parallel.zero_stage,
            "dtype": spec.precision.dtype,
            "micro_batch_size": plan.micro_batch_size,
            "grad_accum": plan.grad_accum,
            "seq_len": spec.data.seq_len,
            "tokens_per_step": tokens_per_step,
            "windows": args.windows,
            "steps_per_window": args.steps_per_window,
            "harness_tokens_per_s": tps["harness"],
            "raw_tokens_per_s": tps["raw"],
            "ratio": tps["harness"] / tps["raw"],
            "ratio_median_window": statistics.median(per_window),
            "window_seconds": seconds,
        }
        if rank == 0:
            print(
                f"model {spec.model.preset or spec.model.name_or_path}, ZeRO {spec.parallel.zero_stage}, "
                f"{spec.precision.dtype}, {world} ranks, micro {plan.micro_batch_size} x accum "
                f"{plan.grad_accum}, seq {spec.data.seq_len}: {tokens_per_step} tokens/step, "
                f"{args.windows} windows x {args.steps_per_window} steps each"
            )
            print(f"harness: {tps['harness']:,.0f} tokens/s")
            print(f"raw:     {tps['raw']:,.0f} tokens/s")
            print(
                f"ratio harness/raw: {result['ratio']:.3f} (median over windows "
                f"{result['ratio_median_window']:.3f}; goal >= 0.97)"
            )
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
