"""The training loop: wires data, model, engine, checkpoints and metrics. Every rank runs it.

The pieces live elsewhere (harness.data, harness.train.model/checkpoint/metrics/signals); this
module only decides the order of things.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from harness.rundir import RunDir, write_status
from harness.spec import RunSpec
from harness.train import checkpoint, signals, stall
from harness.train.engine import data_parallel_coords
from harness.train.engines import build_engine
from harness.train.metrics import MetricsLogger, Throughput, memory_per_rank_bytes
from harness.train.watchdog import PROGRESS

if TYPE_CHECKING:
    from harness.console import RankConsole


@dataclass
class TrainResult:
    """How the run ended on this rank."""

    state: str
    """``complete`` or ``preempted``."""
    step: int
    """The last optimizer step taken."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and the accelerator) identically on every rank."""
    from deepspeed.runtime.utils import set_random_seed

    set_random_seed(seed)


def train(
    spec: RunSpec, ds_config: dict[str, Any], run_dir: Path, console: RankConsole | None = None
) -> TrainResult:
    """Train ``spec`` to ``train.steps`` (or until a stop signal), checkpointing and logging on the way.

    Rank 0's progress lines go to ``console`` (the harness's console lines), else to stdout."""
    from harness.train.data import load_run_data

    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(spec.train.seed)
    data = load_run_data(spec, run_dir, rank)
    run = build_engine(spec, ds_config, vocab_size=data.vocab_size)
    engine = run.engine
    dp_rank, dp_size = data_parallel_coords(engine)
    sampler = data.train_sampler(
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        grad_accum=engine.gradient_accumulation_steps(),
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    step = 0
    # Verified before DeepSpeed loads anything; a corrupted tag is set aside for the previous one.
    say = console.line if console is not None else print
    resume = checkpoint.find_verified_resume(run_dir, spec.checkpoint, rank, run.device, say)
    if resume is not None:
        client = checkpoint.load(engine, resume, rank)
        sampler.load_state_dict(client["sampler"])
        step = client["step"]
    else:
        # Different dropout masks per rank; the model was already built from the shared seed.
        torch.manual_seed(spec.train.seed + 1 + rank)
    metrics = MetricsLogger(run_dir, rank, console=console)
    if resume is not None:
        metrics.log({"step": step, "event": "resumed", "from": str(resume.path)})
    tokens_per_step = engine.train_batch_size() * spec.data.seq_len
    meter = Throughput(run.flops_per_token, world, run.peak_flops_per_rank)
    state = "complete"
    try:
        while step < spec.train.steps:
            PROGRESS.begin_step(step + 1)  # progress marks feed the stall watchdog (train.stall_timeout)
            loss = run.train_step(sampler)
            step += 1
            meter.add(tokens_per_step)
            if step % spec.train.log_every == 0 or step == spec.train.steps:
                PROGRESS.mark("log")
                metrics.log(_step_record(engine, step, run.loss_value(loss), meter))
            if spec.train.eval_every and step % spec.train.eval_every == 0:
                PROGRESS.mark("eval")
                metrics.log(evaluate(run, data, spec, dp_rank, dp_size, step))
            PROGRESS.mark("sync")
            stop = signals.agree_to_stop(run.device)
            if (
                stop
                or step == spec.train.steps
                or (spec.train.save_every and step % spec.train.save_every == 0)
            ):
                PROGRESS.mark("save")
                checkpoint.save(
                    engine,
                    run_dir,
                    step,
                    rank,
                    {"sampler": sampler.state_dict(), "step": step},
                    spec.checkpoint.keep_last,
                )
            if stop:
                state = "preempted"
                break
        PROGRESS.mark("end")
        if state == "complete":
            if not spec.train.eval_every or step % spec.train.eval_every:
                metrics.log(evaluate(run, data, spec, dp_rank, dp_size, step))
            if spec.checkpoint.export_hf and rank == 0:
                from harness.train.export import export_checkpoint

                out = export_checkpoint(checkpoint.complete_checkpoints(run_dir)[-1].path, RunDir(run_dir).hf)
                metrics.log({"step": step, "event": "exported", "path": str(out)})
        stall.barrier(spec.train.stall_timeout)  # on gloo it names a rank that never arrives
        if rank == 0:
            write_status(RunDir(run_dir), state, step)
    finally:
        metrics.close()
    return TrainResult(state, step)


def _step_record(engine, step: int, loss: float, meter: Throughput) -> dict[str, Any]:
    norm = engine.get_global_grad_norm()
    record = {
        "step": step,
        "loss": loss,
        "lr": float(engine.get_lr()[0]),
        "grad_norm": None if norm is None else float(norm),
    }
    record.update(meter.report())
    record["mem_gb"] = memory_per_rank_bytes() / 1e9
    return record


def evaluate(run, data, spec: RunSpec, dp_rank: int, dp_size: int, step: int) -> dict[str, Any]:
    """Validation loss and perplexity over ``train.eval_batches`` micro-batches per rank."""
    losses = run.eval_losses(
        data.val_batches(run.micro_batch_size, dp_rank, dp_size, spec.train.eval_batches)
    )
    # On the engine's device: NCCL reduces only accelerator tensors.
    total = torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64, device=run.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:  # no rank had a whole micro-batch: say so rather than report a loss of 0
        return {
            "step": step,
            "event": "evaluation skipped: the validation split holds fewer than one micro-batch per "
            "data-parallel rank (raise data.val_fraction)",
        }
    mean = float(total[0] / total[1])
    return {"step": step, "val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}
