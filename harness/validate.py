"""Cross-field rules for a run spec and a world size. Every problem names the field and the fix.

These run before anything launches; they are pure (no torch, no deepspeed).
"""

from __future__ import annotations

import re

from harness.errors import SpecError, SpecErrors
from harness.launch.slurm_checks import slurm_problems
from harness.parallel_dims import ParallelDims, model_dims
from harness.planner.devices import get_device
from harness.presets import model_config_dict, preset_config, shape_of
from harness.spec import AUTO, RunSpec

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_spec(spec: RunSpec, world_size: int) -> None:
    """Raise SpecErrors listing every rule the spec breaks for this world size."""
    errors: list[SpecError] = []
    for rule in (_ranges, _device, _model, _layout, _nvme, _precision, _schedule, slurm_problems):
        try:
            errors.extend(rule(spec, world_size))
        except SpecError as exc:
            errors.append(exc)
    if errors:
        raise SpecErrors(errors)


def _positive(errors: list[SpecError], field: str, value: int | float, minimum: float = 1) -> None:
    if value < minimum:
        errors.append(SpecError(field, value, f"use a value >= {minimum}"))


def _ranges(spec: RunSpec, world_size: int) -> list[SpecError]:
    e: list[SpecError] = []
    if world_size < 1:
        e.append(
            SpecError("world_size", world_size, "use at least one rank (launch.nodes × launch.gpus_per_node)")
        )
    if not _SAFE_NAME.fullmatch(spec.run.name):
        e.append(
            SpecError(
                "run.name",
                spec.run.name,
                "use letters, digits, '.', '_' and '-' only, not starting with '.' or '-' "
                "(it names a directory and a Slurm job)",
            )
        )
    _positive(e, "launch.nodes", spec.launch.nodes)
    _positive(e, "launch.gpus_per_node", spec.launch.gpus_per_node)
    _positive(e, "data.seq_len", spec.data.seq_len, 8)
    _positive(e, "train.steps", spec.train.steps)
    _positive(e, "train.log_every", spec.train.log_every)
    _positive(e, "train.eval_batches", spec.train.eval_batches)
    _positive(e, "train.eval_every", spec.train.eval_every, 0)
    _positive(e, "train.save_every", spec.train.save_every, 0)
    if spec.train.stall_timeout != AUTO:
        _positive(e, "train.stall_timeout", spec.train.stall_timeout, 0)
    _positive(e, "checkpoint.keep_last", spec.checkpoint.keep_last)
    _positive(e, "parallel.pipeline_stages", spec.parallel.pipeline_stages)
    _positive(e, "parallel.tensor_parallel", spec.parallel.tensor_parallel)
    _positive(e, "parallel.activation_checkpoint_interval", spec.parallel.activation_checkpoint_interval, 0)
    host_gb = spec.launch.host_memory_gb
    if host_gb is not None and not host_gb > 0:
        e.append(
            SpecError(
                "launch.host_memory_gb",
                host_gb,
                "give one node's memory in GB (a positive number, e.g. 512), or leave it out for the default",
            )
        )
    if not 1 <= spec.launch.master_port <= 65535:
        e.append(
            SpecError("launch.master_port", spec.launch.master_port, "use a TCP port between 1 and 65535")
        )
    if not 0.0 <= spec.data.val_fraction < 0.5:
        e.append(
            SpecError("data.val_fraction", spec.data.val_fraction, "use a fraction in [0, 0.5), e.g. 0.01")
        )
    opt = spec.optimizer
    if opt.lr <= 0:
        e.append(SpecError("optimizer.lr", opt.lr, "use a positive learning rate, e.g. 3e-4"))
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        e.append(SpecError("optimizer.betas", opt.betas, "use two numbers in [0, 1), e.g. [0.9, 0.95]"))
    if opt.eps <= 0:
        e.append(SpecError("optimizer.eps", opt.eps, "use a small positive number, e.g. 1e-8"))
    if opt.weight_decay < 0:
        e.append(SpecError("optimizer.weight_decay", opt.weight_decay, "use 0 or a positive number"))
    if opt.grad_clip < 0:
        e.append(SpecError("optimizer.grad_clip", opt.grad_clip, "use 0 (off) or a positive norm, e.g. 1.0"))
    zs = spec.parallel.zero_stage
    if zs != AUTO and zs not in (0, 1, 2, 3):
        e.append(SpecError("parallel.zero_stage", zs, "use 0, 1, 2, 3 or auto"))
    part = spec.parallel.partition_method
    if part not in ("parameters", "uniform") and not part.startswith("type:"):
        e.append(
            SpecError(
                "parallel.partition_method",
                part,
                "use parameters, uniform or type:<regex> (e.g. type:DecoderLayer)",
            )
        )
    elif part.startswith("type:"):
        try:
            re.compile(part[len("type:") :])
        except re.error as exc:
            e.append(
                SpecError(
                    "parallel.partition_method",
                    part,
                    "write a valid regular expression after type:, e.g. type:DecoderLayer",
                    reason=f"bad regex ({exc})",
                )
            )
    return e


def _device(spec: RunSpec, world_size: int) -> list[SpecError]:

    get_device(spec.launch.gpu)
    return []


def _model(spec: RunSpec, world_size: int) -> list[SpecError]:
    m = spec.model
    if bool(m.preset) == bool(m.name_or_path):
        return [
            SpecError(
                "model",
                f"preset={m.preset!r}, name_or_path={m.name_or_path!r}",
                "set exactly one of model.preset (e.g. llama-tiny) or model.name_or_path (a checkpoint directory)",
            )
        ]
    if m.preset:
        preset_config(m.preset)  # raises with a did-you-mean
    cfg = model_config_dict(m.preset, m.name_or_path, m.overrides)
    if cfg is None:
        return []
    try:
        shape = shape_of(cfg)
    except KeyError as exc:
        return [SpecError("model.overrides", m.overrides, f"keep the config key {exc} (the model needs it)")]
    numbers = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")
    bad = [k for k in numbers if not _positive_int(shape.get(k))]
    if bad:
        # The rules below compare these numbers; a string or null from an override would crash them.
        culprits = [k for k, v in m.overrides.items() if k in _SHAPE_KEYS and not _positive_int(v)]
        return [
            SpecError(
                f"model.overrides.{culprits[0]}" if culprits else "model",
                m.overrides.get(culprits[0]) if culprits else cfg,
                f"give the model's {', '.join(bad)} as positive integers",
                reason="the model shape is not made of positive integers",
            )
        ]
    e: list[SpecError] = []
    positions = shape["positions"]
    if _positive_int(positions) and spec.data.seq_len > positions:
        e.append(
            SpecError(
                "data.seq_len",
                spec.data.seq_len,
                f"use at most {positions} tokens, or raise the model's position limit in model.overrides "
                f"({'n_positions' if cfg.get('model_type') == 'gpt2' else 'max_position_embeddings'})",
                reason=f"longer than the model's {positions} positions",
            )
        )
    return e


# HF config keys that shape_of reads (GPT-2 and Llama-style names).
_SHAPE_KEYS = {
    "n_layer", "n_embd", "n_head", "vocab_size", "num_hidden_layers", "hidden_size",
    "num_attention_heads", "num_key_value_heads", "intermediate_size", "n_inner",
}  # fmt: skip


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _layout(spec: RunSpec, world_size: int) -> list[SpecError]:
    """The layout rules (one list, shared with the planner: harness.parallel_dims)."""
    e: list[SpecError] = []
    p = spec.parallel
    if min(p.pipeline_stages, p.tensor_parallel, world_size) < 1:
        return e  # _ranges reports these
    cfg = model_config_dict(spec.model.preset, spec.model.name_or_path, spec.model.overrides)
    model = None
    if cfg is not None and not _model(spec, world_size):
        model = model_dims(cfg)
    e.extend(ParallelDims.from_spec(spec, world_size).problems(model))
    if p.activation_checkpoint_interval and p.pipeline_stages == 1:
        e.append(
            SpecError(
                "parallel.activation_checkpoint_interval",
                p.activation_checkpoint_interval,
                "use model.gradient_checkpointing: true without pipeline stages (this knob is for pipeline_stages > 1)",
            )
        )
    return e


def _nvme(spec: RunSpec, world_size: int) -> list[SpecError]:
    p = spec.parallel
    if "nvme" in (p.offload_optimizer, p.offload_params) and not p.nvme_path:
        return [
            SpecError(
                "parallel.nvme_path",
                None,
                "set parallel.nvme_path to a directory on a fast local NVMe drive",
                reason="NVMe offload needs a path",
            )
        ]
    return []


def _precision(spec: RunSpec, world_size: int) -> list[SpecError]:
    e: list[SpecError] = []
    raw = spec.deepspeed
    dtype = spec.precision.dtype
    for other in ("fp16", "bf16"):
        section = raw.get(other)
        if isinstance(section, dict) and section.get("enabled") and other != dtype:
            e.append(
                SpecError(
                    f"deepspeed.{other}.enabled",
                    True,
                    f"remove it and set precision: {other} instead (precision is {dtype}; fp16 and bf16 are exclusive)",
                    reason="conflicting precision",
                )
            )
    pr = spec.precision
    if dtype == "fp16":
        if not 0 <= pr.initial_scale_power <= 32:
            e.append(
                SpecError("precision.initial_scale_power", pr.initial_scale_power, "use 0-32 (16 is typical)")
            )
        _positive(e, "precision.loss_scale_window", pr.loss_scale_window)
        _positive(e, "precision.hysteresis", pr.hysteresis)
        if pr.min_loss_scale <= 0:
            e.append(
                SpecError("precision.min_loss_scale", pr.min_loss_scale, "use a positive number, e.g. 1")
            )
        if pr.loss_scale < 0:
            e.append(
                SpecError("precision.loss_scale", pr.loss_scale, "use 0 (dynamic) or a positive fixed scale")
            )
    return e


def _schedule(spec: RunSpec, world_size: int) -> list[SpecError]:
    e: list[SpecError] = []
    s = spec.schedule
    if s.warmup_steps < 0 or s.warmup_steps > spec.train.steps:
        e.append(
            SpecError(
                "schedule.warmup_steps",
                s.warmup_steps,
                f"use 0..train.steps ({spec.train.steps}) warm-up steps",
            )
        )
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        e.append(SpecError("schedule.min_lr_ratio", s.min_lr_ratio, "use a ratio in [0, 1], e.g. 0.1"))
    return e


__all__ = ["check_spec"]
