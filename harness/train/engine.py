"""The DeepSpeed engine for a spec: model, optimizer, and one training step.

Plain (ZeRO 0-3, AutoTP) models step micro-batch by micro-batch through ``engine.backward`` /
``engine.step``; ``harness.train.pipeline_engine`` subclasses :class:`RunEngine` for ``train_batch``,
and ``harness.train.engines.build_engine`` picks one of the two.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from harness.planner.devices import peak_flops
from harness.planner.speed import flops_per_token
from harness.presets import shape_of
from harness.spec import RunSpec
from harness.train.model import build_model, hf_config, param_groups
from harness.train.watchdog import PROGRESS


@dataclass
class RunEngine:
    """A DeepSpeed engine plus how to step and evaluate it."""

    engine: Any
    device: torch.device
    flops_per_token: float
    peak_flops_per_rank: float | None
    micro_batch_size: int

    def train_step(self, sampler) -> torch.Tensor:
        """One optimizer step (all accumulation micro-batches); this rank's mean loss over them, unreduced:
        ``loss_value`` averages it over ranks when the loop logs, so other steps pay no collective."""
        engine = self.engine
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        accum = engine.gradient_accumulation_steps()
        for micro in range(accum):
            PROGRESS.mark("data", micro)  # phases for the stall report (harness.train.watchdog)
            batch = next(sampler).to(self.device)
            PROGRESS.mark("forward")
            loss = engine(input_ids=batch, labels=batch).loss
            PROGRESS.mark("backward")
            engine.backward(loss)
            PROGRESS.mark("optimizer")
            engine.step()
            total += loss.detach().float()
        return total / accum

    def loss_value(self, loss: torch.Tensor) -> float:
        """``train_step``'s loss averaged over all ranks (a collective: every rank calls it, same steps)."""
        return _mean_over_ranks(loss)

    @torch.no_grad()
    def eval_losses(self, batches) -> list[float]:
        """Loss of each validation micro-batch (this rank's shard)."""
        self.engine.eval()
        try:
            return [
                float(self.engine(input_ids=b.to(self.device), labels=b.to(self.device)).loss)
                for b in batches
            ]
        finally:
            self.engine.train()


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def data_parallel_coords(engine) -> tuple[int, int]:
    """(rank, size) of this process in the data-parallel group (differs from the world under PP/TP)."""
    group = getattr(engine, "data_parallel_group", None)
    if hasattr(engine, "grid"):  # PipelineEngine
        return engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    if group is not None and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def model_flops_per_token(spec: RunSpec, vocab_size: int | None) -> float:
    """Model FLOPs per trained token for MFU (the planner's 6N + 12·L·h·s, from the model's config)."""
    return flops_per_token(shape_of(hf_config(spec.model, vocab_size).to_dict()), spec.data.seq_len)


def peak_flops_per_rank(spec: RunSpec) -> float | None:
    """Dense peak FLOP/s of one rank's device for MFU; None on CPU (MFU is then "n/a")."""
    if not torch.cuda.is_available():
        return None

    return peak_flops(spec.launch.gpu, spec.precision.dtype)


def optimizer_args(spec: RunSpec, net: torch.nn.Module) -> tuple[torch.optim.Optimizer | None, Any]:
    """(client optimizer, model_parameters) for ``deepspeed.initialize``: a torch optimizer over the
    decay/no-decay groups for ``optimizer.impl: torch``, else the groups for DeepSpeed's configured one."""
    params: Any = param_groups(net, spec.optimizer.weight_decay)
    if spec.optimizer.impl != "torch":
        return None, params
    opt_cls = torch.optim.AdamW if spec.optimizer.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        params, lr=spec.optimizer.lr, betas=tuple(spec.optimizer.betas), eps=spec.optimizer.eps
    )
    return optimizer, None


def _empty_for_autotp(spec: RunSpec, ds_config: dict[str, Any], vocab_size: int | None):
    """(model, context for ``deepspeed.initialize``): the model empty, its slices filled once AutoTP has
    cut them (``harness.train.tp_materialize``); whole, as a checkpoint format read whole requires."""
    from harness.train.materialize import empty_model
    from harness.train.model import build_empty, load_full_model, run_dtype, with_gradient_checkpointing
    from harness.train.tp_materialize import slices_at_init

    layout, source = build_empty(spec.model, vocab_size, spec.train.seed)  # stays untouched: names, shapes
    if source is None:
        net = load_full_model(spec.model, layout.config, run_dtype(ds_config))
        return with_gradient_checkpointing(net, spec.model), contextlib.nullcontext()
    net = empty_model(layout.config, spec.model.attn_implementation)  # the one AutoTP slices
    filling = slices_at_init(source, run_dtype(ds_config), layout)
    return with_gradient_checkpointing(net, spec.model), filling


def build_plain_engine(spec: RunSpec, ds_config: dict[str, Any], vocab_size: int | None = None) -> RunEngine:
    """Build the model (partitioned at init under ZeRO 3, sliced by AutoTP) in a DeepSpeed engine."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    mpu, filling = None, contextlib.nullcontext()
    if spec.parallel.tensor_parallel > 1:
        from harness.train.tensor_parallel import tensor_parallel_mpu

        mpu = tensor_parallel_mpu(spec.parallel.tensor_parallel)
        net, filling = _empty_for_autotp(spec, ds_config, vocab_size)
    else:
        net = build_model(spec.model, ds_config, vocab_size, seed=spec.train.seed)
    flops = model_flops_per_token(spec, vocab_size)
    optimizer, params = optimizer_args(spec, net)
    with filling:
        engine, _, _, _ = deepspeed.initialize(
            model=net, optimizer=optimizer, model_parameters=params, config=ds_config, mpu=mpu
        )
    device = torch.device(get_accelerator().current_device_name())
    return RunEngine(
        engine=engine,
        device=device,
        flops_per_token=flops,
        peak_flops_per_rank=peak_flops_per_rank(spec),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
    )
