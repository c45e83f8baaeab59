"""Measure the model-state bytes a DeepSpeed engine holds on each rank, for several layouts in one launch.

    deepspeed --num_gpus 2 --master_port 29511 tests/workers/measure_model_states.py \\
        --out /tmp/states.json --layouts '[{"zero_stage": 2, "offload_optimizer": "cpu"}]'

Each layout gets its own engine (built, stepped, measured and destroyed in turn) so one launch covers
every ZeRO stage. The model is a tiny HF Llama built from a config object; the DeepSpeed config comes
from ``harness.compiler.compile_config``, so the engine sees exactly what a harness run would.

What "held" means: every tensor reachable from the engine (module parameters, their ``.grad`` and
DeepSpeed's per-parameter attributes such as ``ds_tensor``) and from the ZeRO/bf16 optimizer wrapper and
its inner optimizer (flat buffers, fp32 master partitions, Adam moments), deduplicated by storage so a
view into a flat buffer counts once, at the storage's full size (padding included). Three instants are
taken on the second step, after Adam's lazily created moments exist:

- ``after_backward``: gradients reduced and partitioned, before ``engine.step()``;
- ``in_step``: at the entry of the inner optimizer's ``step`` (fp32 gradients attached to the master
  weights, 16-bit gradients partly freed);
- ``after_step``: what the engine keeps between steps.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness.compiler import compile_config  # noqa: E402
from harness.presets import model_config_dict  # noqa: E402
from harness.specload import load_spec  # noqa: E402

_WALK_MODULES = ("deepspeed", "torch.optim", "transformers", "torch.nn")
# Attributes DeepSpeed hangs on parameters; the walk follows them as well as ``__dict__``.
_TENSOR_ATTRS = ("grad", "ds_tensor", "grad_accum")


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    if storage.data_ptr() == 0 or storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def held_storages(roots: list[tuple[str, Any]]) -> dict[int, dict[str, Any]]:
    """Storages reachable from ``roots``: data_ptr -> {bytes, path of first sighting, dtype}."""
    seen_ids: set[int] = set()
    found: dict[int, dict[str, Any]] = {}
    stack = list(reversed(roots))
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen_ids:
            continue
        seen_ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is not None and key[0] not in found:
                found[key[0]] = {"bytes": key[1], "path": path, "dtype": str(obj.dtype).replace("torch.", "")}
            attrs = _TENSOR_ATTRS if obj.is_leaf else _TENSOR_ATTRS[1:]
            children = [(f"{path}.{a}", getattr(obj, a, None)) for a in attrs]
            children += [(f"{path}.{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
        elif isinstance(obj, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
            children += [(f"{path}<key>", k) for k in obj if isinstance(k, torch.Tensor)]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif type(obj).__module__.startswith(_WALK_MODULES) and hasattr(obj, "__dict__"):
            children = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
        else:
            continue
        stack.extend(reversed([c for c in children if c[1] is not None]))
    return found


def classify(path: str) -> str:
    """The memory-model term of a storage found by the generic walk, from where it was first seen."""
    if "ipg" in path or "bucket" in path:
        return "buffers"
    if "grad" in path:
        return "lp_grads"
    if "fp32" in path:
        return "master_params"
    return "other"


def snapshot(engine: Any) -> dict[str, Any]:
    """Bytes held by the engine and its optimizer right now, by term, plus the largest storages.

    Known roles are claimed first (module parameters and DeepSpeed's partitions of them, their
    gradients, the inner optimizer's parameters, their gradients and its state); whatever else the
    engine or the optimizer wrapper holds is found by a walk and named by attribute path.
    """
    module = engine.module
    inner = _inner_optimizer(engine)
    named = list(module.named_parameters())
    roots: list[tuple[str, str, Any]] = []
    # Gradient buckets first: a parameter's .grad can be a view into one of them.
    for dtype, bucket in getattr(engine.optimizer, "ipg_buckets", {}).items():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        roots += [("buffers", f"optimizer.ipg_buckets[{dtype}].buffer", b) for b in buffers]
    roots += [("lp_params", f"params.{n}", p.data) for n, p in named]
    roots += [("lp_params", f"params.{n}.ds_tensor", getattr(p, "ds_tensor", None)) for n, p in named]
    roots += [("lp_grads", f"params.{n}.grad", p.grad) for n, p in named]
    roots += [("lp_grads", f"params.{n}.grad_accum", getattr(p, "grad_accum", None)) for n, p in named]
    masters = [p for group in inner.param_groups for p in group["params"]]
    roots += [("master_params", f"inner.param_groups.{i}", p) for i, p in enumerate(masters)]
    roots += [("master_grads", f"inner.param_groups.{i}.grad", p.grad) for i, p in enumerate(masters)]
    for i, (key, state) in enumerate(inner.state.items()):
        # ZeRO-3 swaps the fp32 partitions out of param_groups between steps; the state keys keep them.
        roots.append(("master_params", f"inner.state.{i}<key>", key))
        roots += [("optimizer_states", f"inner.state.{i}.{k}", v) for k, v in state.items()]
    roots += [("module_buffers", f"buffers.{n}", b) for n, b in module.named_buffers()]
    found: dict[int, dict[str, Any]] = {}
    for term, path, tensor in roots:
        if isinstance(tensor, torch.Tensor):
            key = _storage_key(tensor)
            if key is not None and key[0] not in found:
                dtype = str(tensor.dtype).replace("torch.", "")
                found[key[0]] = {"bytes": key[1], "path": path, "dtype": dtype, "term": term}
    walked = held_storages(
        [
            ("optimizer", engine.optimizer),
            ("engine", {k: v for k, v in vars(engine).items() if k != "module"}),
        ]
    )
    for ptr, item in walked.items():
        if ptr not in found:
            item["term"] = classify(item["path"])
            found[ptr] = item
    by_term: dict[str, int] = {}
    for item in found.values():
        by_term[item["term"]] = by_term.get(item["term"], 0) + item["bytes"]
    biggest = sorted(found.values(), key=lambda i: -i["bytes"])[:25]
    model_states = sum(v for k, v in by_term.items() if k not in ("module_buffers", "buffers"))
    return {"by_term": by_term, "model_state_bytes": model_states, "biggest": biggest}


def _snapshot_into(snaps: dict, name: str, engine: Any, grad: torch.Tensor) -> None:
    """A tensor hook that records a snapshot once and leaves the gradient alone."""
    snaps.setdefault(name, snapshot(engine))


def _inner_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def measure_layout(
    layout: dict[str, Any], spec_path: str, model_overrides: dict[str, Any], world: int
) -> dict:
    """Build one engine for ``layout``, take two steps, and return the three snapshots."""
    sets = [
        f"parallel.zero_stage={layout['zero_stage']}",
        f"parallel.offload_optimizer={layout.get('offload_optimizer', 'none')}",
        f"parallel.offload_params={layout.get('offload_params', 'none')}",
        f"batch.micro_batch_size={layout.get('micro_batch_size', 2)}",
        f"batch.grad_accum={layout.get('grad_accum', 1)}",
        f"data.seq_len={layout.get('seq_len', 64)}",
        f"precision.dtype={layout.get('dtype', 'bf16')}",  # the planner Context's default, not the spec's
        "train.steps=10",
        "schedule.warmup_steps=1",
    ]
    sets.append("model.overrides=" + json.dumps(model_overrides))
    spec = load_spec(spec_path, sets)
    ds_config = compile_config(spec, world)
    # DeepSpeed's comms logger records every collective ZeRO issues; step 2's calls are kept.
    ds_config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    cfg_dict = model_config_dict(spec.model.preset, None, spec.model.overrides)
    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    cfg._attn_implementation = spec.model.attn_implementation
    torch.manual_seed(0)
    hf_ds = None
    if spec.parallel.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # kept alive so from_config partitions at construction
    model = AutoModelForCausalLM.from_config(cfg)
    # The harness's two groups: weight decay on matrices, none on norms and biases (one flat buffer each).
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    del model

    snaps: dict[str, Any] = {}
    inner = _inner_optimizer(engine)
    calls = {"n": 0, "step": 0}
    original_step = inner.step

    def measured_step(*args: Any, **kwargs: Any) -> Any:
        if calls["step"] == 2 and "in_step" not in snaps:
            snaps["in_step"] = snapshot(engine)
        return original_step(*args, **kwargs)

    inner.step = measured_step
    # The input embedding's gradient is the last one backward produces: DeepSpeed's gradient buckets
    # are still allocated when it lands.
    embed = engine.module.get_input_embeddings().weight

    def in_backward(_param: torch.Tensor) -> None:
        if calls["step"] == 2 and "in_backward" not in snaps:
            snaps["in_backward"] = snapshot(engine)

    hook = embed.register_post_accumulate_grad_hook(in_backward)
    micro, seq = ds_config["train_micro_batch_size_per_gpu"], spec.data.seq_len
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for step in (1, 2):
        calls["step"] = step
        if step == 2:
            comm_before = _comm_counts()
        accum = ds_config["gradient_accumulation_steps"]
        for micro_step in range(accum):
            ids = torch.randint(0, cfg_dict["vocab_size"], (micro, seq), generator=gen)
            loss = engine(input_ids=ids, labels=ids).loss
            if step == 2 and micro_step == accum - 1:
                # Fires first thing in backward: what forward left gathered (ZeRO-3 keeps parameters it
                # will reuse soon) next to the saved activations.
                loss.register_hook(functools.partial(_snapshot_into, snaps, "start_backward", engine))
            engine.backward(loss)
            del loss
            if step == 2 and micro_step == accum - 1:
                gc.collect()
                snaps["after_backward"] = snapshot(engine)
            engine.step()  # every micro-step, as the harness does: DeepSpeed steps at the boundary
    comm = {
        op: {size: n - comm_before.get(op, {}).get(size, 0) for size, n in sizes.items()}
        for op, sizes in _comm_counts().items()
    }
    gc.collect()
    snaps["after_step"] = snapshot(engine)
    inner.step = original_step
    hook.remove()

    engine.destroy()
    engine = inner = None  # drop the last references before the next layout
    if hf_ds is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del hf_ds
    gc.collect()
    comm = {op: {str(k): v for k, v in sizes.items() if v} for op, sizes in comm.items()}
    return {
        "layout": layout,
        "ds_config_zero": ds_config["zero_optimization"],
        "snapshots": snaps,
        "comm_step2": {op: sizes for op, sizes in comm.items() if sizes},
    }


def _comm_counts() -> dict[str, dict[int, int]]:
    """Calls per collective and message size (bytes) so far, from DeepSpeed's comms logger."""
    from deepspeed.comm import comm as ds_comm

    return {
        op: {size: rec[0] for size, rec in sizes.items()}
        for op, sizes in ds_comm.comms_logger.comms_dict.items()
    }


def main() -> int:
    """Measure every layout given on the command line; rank 0's and rank 1's numbers go to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", required=True, help="JSON list of {zero_stage, offload_optimizer, ...}")
    parser.add_argument("--model-overrides", default="{}", help="JSON dict of HF config overrides")
    parser.add_argument("--spec", default=str(ROOT / "examples" / "tiny-cpu.yaml"))
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    out = Path(args.out)
    rank_file = out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    try:
        for layout in json.loads(args.layouts):
            results.append(measure_layout(layout, args.spec, json.loads(args.model_overrides), world))
            # Written after every layout so a launch cut short still tells what it measured.
            rank_file.write_text(
                json.dumps({"rank": rank, "world_size": world, "results": results}, indent=1)
            )
            dist.barrier()
        if rank == 0:
            out.write_text(json.dumps({"world_size": world, "complete": True}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
