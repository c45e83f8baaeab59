"""The DeepSpeed PipelineEngine for a spec: the model's stages (``harness.train.pipeline``) in a
``PipelineModule``, one ``train_batch`` per optimizer step."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.errors import SpecError
from harness.spec import RunSpec
from harness.train.engine import RunEngine, model_flops_per_token, optimizer_args, peak_flops_per_rank
from harness.train.model import (
    build_empty,
    fill_weights,
    load_full_model,
    run_dtype,
    with_gradient_checkpointing,
)
from harness.train.pipeline import (
    CausalLMLoss,
    DecoderLayer,
    ModelModules,
    check_split,
    layer_specs,
    plan_split,
)
from harness.train.watchdog import PROGRESS


def _check_partition(spec: RunSpec, specs: list, parts: list[int] | None = None) -> None:
    method = spec.parallel.partition_method
    names = [s.typename.__name__ for s in specs]
    if method.startswith("type:"):
        pattern = re.compile(method[len("type:") :], re.IGNORECASE)
        if not any(pattern.search(n) for n in names):
            raise SpecError(
                "parallel.partition_method",
                method,
                f"use a regex matching some of the pipeline layers {sorted(set(names))}, e.g. type:DecoderLayer",
                reason="it matches no layer",
            )
    if parts is None:
        return
    for stage in range(len(parts) - 1):
        held = names[parts[stage] : parts[stage + 1]]
        if not any(n.startswith("DecoderLayer") for n in held):
            raise SpecError(
                "parallel.partition_method",
                method,
                "use partition_method: uniform or type:DecoderLayer, or fewer pipeline_stages",
                reason=f"pipeline stage {stage} would hold no decoder layer ({held or 'nothing'})",
            )


def _count_stages_in_grad_norm(pipe: nn.Module) -> None:
    # DeepSpeed's fp32 gradient clipping (ZeRO 0) sums a parameter's norm on model-parallel rank 0,
    # elsewhere only if it is flagged model-parallel; under a pipeline that rank is the stage id, so
    # stages > 0 would drop out of the global norm and clipping would differ from one process.
    # Tied copies on non-owning stages (ds_pipe_replicated) stay out: the owner counts them once.
    for p in pipe.parameters():
        if not getattr(p, "ds_pipe_replicated", False):
            p.model_parallel = True


def _with_labels(sampler):
    while True:
        batch = next(sampler)
        yield batch, batch  # labels are the inputs; the loss shifts them


@dataclass
class PipelineRunEngine(RunEngine):
    """A PipelineEngine: one ``train_batch`` per optimizer step, ``eval_batch`` per validation batch."""

    def train_step(self, sampler) -> torch.Tensor:
        """All accumulation micro-batches through the pipeline schedule; the mean loss over them and
        data-parallel ranks (DeepSpeed already reduced it: the same on every stage)."""
        PROGRESS.mark("pipeline")
        return self.engine.train_batch(data_iter=_with_labels(sampler))

    def loss_value(self, loss: torch.Tensor) -> float:
        """The loss as a number (already the same on every rank)."""
        return float(loss)

    def eval_losses(self, batches) -> list[float]:
        """Loss of each validation micro-batch, averaged over data-parallel ranks."""
        # eval_batch holds a barrier: RunData.val_batches gives every rank the same number of batches.
        return [float(self.engine.eval_batch(iter([(b, b)]), num_micro_batches=1)) for b in batches]


def small_config(cfg):
    """A copy of ``cfg`` two decoder layers deep and 64 wide (4 heads of 16; grouped-query attention
    kept grouped): the same family and forward, for :func:`check_split` at a few MB."""
    small = copy.deepcopy(cfg)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
    small.num_hidden_layers = min(cfg.num_hidden_layers, 2)
    if getattr(cfg, "layer_types", None):
        small.layer_types = list(cfg.layer_types[: small.num_hidden_layers])
    small.num_attention_heads = 4
    if kv is not None:
        small.num_key_value_heads = 4 if kv == heads else (1 if kv == 1 else 2)
    small.hidden_size = 64
    if getattr(cfg, "head_dim", None) is not None:
        small.head_dim = 16
    for key in ("intermediate_size", "n_inner"):
        if getattr(cfg, key, None) is not None:
            setattr(small, key, 128)
    return small


def _check_split_on_small_model(cfg, spec: RunSpec) -> None:
    """``check_split`` on a small model of the spec's family: the pieces must compose to its forward.
    The decoder layers' code is the same at any size, and no rank has to build the real model whole."""
    from harness.train.materialize import FreshInit, empty_model, materialize

    small = empty_model(small_config(cfg), spec.model.attn_implementation)
    materialize(small, FreshInit(small, spec.train.seed), torch.float32)
    plan = plan_split(small)
    check_split(small, plan, layer_specs(plan, ModelModules(small)), spec.data.seq_len)


def build_pipeline_engine(
    spec: RunSpec, ds_config: dict[str, Any], vocab_size: int | None = None
) -> RunEngine:
    """The spec's HF model as a DeepSpeed PipelineModule of ``parallel.pipeline_stages`` stages, in an engine."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.pipe import PipelineModule

    net, source = build_empty(spec.model, vocab_size, spec.train.seed)
    dtype = run_dtype(ds_config)
    if source is None:  # a checkpoint format read whole (not safetensors)
        net, fill = load_full_model(spec.model, net.config, dtype), None
    else:
        fill = functools.partial(fill_weights, net, source, dtype, spec.model)
    with_gradient_checkpointing(net, spec.model)
    flops = model_flops_per_token(spec, vocab_size)
    plan = plan_split(net)
    modules = ModelModules(net, fill)
    specs = layer_specs(plan, modules)
    _check_partition(spec, specs)
    _check_split_on_small_model(net.config, spec)
    loss = CausalLMLoss(net.loss_function, net.config.vocab_size)
    decoder_classes = sorted({s.typename.__name__ for s in specs if issubclass(s.typename, DecoderLayer)})
    pipe = PipelineModule(  # builds, and so fills, only this stage's layers
        layers=specs,
        num_stages=spec.parallel.pipeline_stages,
        loss_fn=loss,
        partition_method=spec.parallel.partition_method,
        activation_checkpoint_interval=spec.parallel.activation_checkpoint_interval,
        # Only decoder layers: a checkpointed embedding would get no gradient (its input is integer ids).
        checkpointable_layers=decoder_classes,
    )
    _check_partition(spec, specs, pipe.parts)
    modules.release()
    del net  # this stage's layers keep their modules; the rest of the model was never filled
    _count_stages_in_grad_norm(pipe)
    optimizer, params = optimizer_args(spec, pipe)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=optimizer, model_parameters=params, config=ds_config
    )
    return PipelineRunEngine(
        engine=engine,
        device=torch.device(get_accelerator().current_device_name()),
        flops_per_token=flops,
        peak_flops_per_rank=peak_flops_per_rank(spec),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
    )
