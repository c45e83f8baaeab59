"""Train a prepared pipeline or tensor-parallel run with the harness's own loop, and record the engine's
logits on a fixed batch right after it is built and again after training.

    deepspeed --num_gpus 2 --master_port P tests/workers/pp_train_logits.py --run-dir RUN --out OUT.pt

RUN is a prepared run directory (as ``harness train`` writes it); the loop runs unchanged (data, engine,
checkpoints, metrics.jsonl, status.json). The batch is ``[micro_batch_size, seq_len]`` deterministic ids.
Pipeline engines compute logits with ``eval_batch(return_logits=True)`` (they exist on the last stage);
others with a plain forward (AutoTP gathers the LM head's output on every rank). The rank holding the
logits (data-parallel rank 0) saves ``{"input_ids", "initial_logits", "initial_loss", "trained_logits",
"trained_loss", "step"}``: the initial ones show what weights the engine started from (an HF checkpoint's),
the trained ones are what the exported model must reproduce.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import harness.train.loop as loop
from harness.rundir import RunDir, read_json
from harness.specload import load_spec


def fixed_batch(micro_batch_size: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The same ids in every process (and in the test that compares against an HF model)."""
    ids = torch.arange(micro_batch_size * seq_len, dtype=torch.int64) * 7919 + 13
    return (ids % vocab_size).reshape(micro_batch_size, seq_len)


def logits_and_loss(run, ids: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(logits or None on ranks without them, loss) of the engine on ``ids`` in eval mode."""
    engine = run.engine
    if hasattr(engine, "eval_batch"):  # PipelineEngine
        loss, logits = engine.eval_batch(iter([(ids, ids)]), return_logits=True, num_micro_batches=1)
        keep = engine.is_last_stage() and engine.grid.get_data_parallel_rank() == 0
        return (logits.detach().float().cpu() if keep else None), float(loss)
    engine.eval()
    try:
        with torch.no_grad():
            out = engine(input_ids=ids.to(run.device), labels=ids.to(run.device))
    finally:
        engine.train()
    return (out.logits.float().cpu() if dist.get_rank() == 0 else None), float(out.loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    spec = load_spec(RunDir(run_dir).spec)
    ds_config = read_json(RunDir(run_dir).ds_config)
    ids = fixed_batch(ds_config["train_micro_batch_size_per_gpu"], spec.data.seq_len, args.vocab_size)
    record: dict = {"input_ids": ids}
    built = []
    build_engine = loop.build_engine

    def build_and_look(*a, **kw):
        run = build_engine(*a, **kw)
        record["initial_logits"], record["initial_loss"] = logits_and_loss(run, ids)
        built.append(run)
        return run

    loop.build_engine = build_and_look
    deepspeed.init_distributed()
    try:
        result = loop.train(spec, ds_config, run_dir)
        assert result.state == "complete", result
        record["trained_logits"], record["trained_loss"] = logits_and_loss(built[0], ids)
        record["step"] = result.step
        if record["trained_logits"] is not None:
            torch.save(record, args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
