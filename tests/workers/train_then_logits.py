"""Train a prepared run through the harness's own loop, then save the engine's logits on a fixed batch.

    deepspeed --num_gpus 2 --master_port P tests/workers/train_then_logits.py --run-dir RUN --out OUT.pt

RUN is a prepared run directory (as ``harness train`` writes it). The worker runs
``harness.train.loop.train`` unchanged (same data, model, engine, checkpoints, COMPLETE marker,
status.json) with two probes:

- right after ``harness.train.engine`` builds the model (before ``deepspeed.initialize``), what each
  rank holds: the elements held locally (``p.numel()``; 0 for a ZeRO-3 partitioned parameter), its
  shards (``p.ds_tensor``) and the full size (``p.ds_numel``); rank 0 writes them to OUT.init.json;
- after training, every rank runs the same forward pass of the trained engine (ZeRO 3 gathers
  parameters collectively) on the first validation blocks, in eval mode, and rank 0 saves
  ``{"input_ids", "logits", "step"}`` to OUT.

The export round-trip test compares these logits with the exported Hugging Face model's; the ZeRO-3
test checks each rank held about 1/world of the parameters after init.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import harness.train.engine as engine_module
import harness.train.loop as loop
from harness.rundir import RunDir, read_json
from harness.specload import load_spec

NUM_ROWS = 2


def held_after_init(net: torch.nn.Module) -> dict:
    """What this rank holds of ``net`` right after construction."""
    params = list({id(p): p for p in net.parameters()}.values())
    return {
        "rank": dist.get_rank(),
        "local_numel": sum(p.numel() for p in params),
        "shard_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "num_params": len(params),
        "num_partitioned": sum(hasattr(p, "ds_id") for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = load_spec(RunDir(args.run_dir).spec)
    ds_config = read_json(RunDir(args.run_dir).ds_config)
    held, built = [], []
    build_model, build_engine = engine_module.build_model, loop.build_engine

    def probe_model(*a, **kw):
        net = build_model(*a, **kw)
        held.append(held_after_init(net))
        return net

    def keep_engine(*a, **kw):
        run = build_engine(*a, **kw)
        built.append(run)
        return run

    engine_module.build_model = probe_model
    loop.build_engine = keep_engine
    deepspeed.init_distributed()
    try:
        result = loop.train(spec, ds_config, args.run_dir.resolve())
        assert result.state == "complete", result
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, held[0])
        run = built[0]
        from harness.train.data import load_run_data

        data = load_run_data(spec, args.run_dir, dist.get_rank())
        batch = torch.from_numpy(data.val[:NUM_ROWS].astype("int64"))
        run.engine.eval()
        with torch.no_grad():
            logits = run.engine(input_ids=batch.to(run.device)).logits.float().cpu()
        if dist.get_rank() == 0:
            torch.save({"input_ids": batch, "logits": logits, "step": result.step}, args.out)
            Path(f"{args.out}.init.json").write_text(json.dumps(gathered, indent=2) + "\n", encoding="utf-8")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
