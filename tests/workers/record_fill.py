"""Build a prepared run's engine and record what this rank filled: the parameter names its weight source
computed or read, and the (HF-named) parameters its engine holds.

    deepspeed --num_gpus 2 --master_port P tests/workers/record_fill.py --run-dir RUN --out DIR

Writes ``DIR/rank-N.json``: ``{"read": [...], "held": {name: numel}, "meta_left": int}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch.distributed as dist

import harness.train.model as model_module
import harness.train.pipeline_engine as pipeline_engine
from harness.rundir import RunDir, read_json
from harness.specload import load_spec
from harness.train.engines import build_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = load_spec(RunDir(args.run_dir).spec)
    ds_config = read_json(RunDir(args.run_dir).ds_config)
    sources = []
    build_empty = model_module.build_empty

    def recording_build_empty(*a, **kw):
        net, source = build_empty(*a, **kw)
        sources.append(source)
        return net, source

    model_module.build_empty = recording_build_empty  # plain and tensor-parallel engines
    pipeline_engine.build_empty = recording_build_empty
    deepspeed.init_distributed()
    run = build_engine(spec, ds_config, None)
    module = run.engine.module
    held = {name: p.numel() for name, p in module.named_parameters()}
    record = {
        "read": sorted({name for s in sources if s is not None for name in s.read}),
        "held": held,
        "meta_left": sum(p.is_meta for p in module.parameters()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
