"""The one module that spells DeepSpeed's JSON keys: run spec + world size → DeepSpeed config.

The rest of the harness speaks the spec's words. The output is fully resolved: no ``"auto"``,
the batch triple holds, and every value is concrete. Import-light (no torch, no deepspeed).
"""

from __future__ import annotations

import copy
from typing import Any

from harness.batch import BatchPlan
from harness.ds_defaults import (
    ALLGATHER_BUCKET_ELEMS,
    REDUCE_BUCKET_ELEMS,
    STAGE3_MAX_LIVE_PARAMS,
    STAGE3_MAX_REUSE_DISTANCE,
    STAGE3_PARAM_PERSISTENCE_ELEMS,
    STAGE3_PREFETCH_ELEMS,
)
from harness.errors import SpecError, SpecErrors
from harness.spec import AUTO, RunSpec

_DTYPE_NAME = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# DeepSpeed keys the spec owns. A raw `deepspeed:` value that differs from the compiled one would
# slip past the spec's rules (e.g. ZeRO 3 under pipeline stages), so it is refused with the field to set.
SPEC_OWNED_KEYS: dict[tuple[str, ...], str] = {
    ("zero_optimization", "stage"): "parallel.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "parallel.offload_optimizer",
    ("zero_optimization", "offload_optimizer", "nvme_path"): "parallel.nvme_path",
    ("zero_optimization", "offload_param", "device"): "parallel.offload_params",
    ("zero_optimization", "offload_param", "nvme_path"): "parallel.nvme_path",
    ("pipeline", "stages"): "parallel.pipeline_stages",
    ("tensor_parallel", "autotp_size"): "parallel.tensor_parallel",
    ("fp16", "enabled"): "precision",
    ("bf16", "enabled"): "precision",
    # DeepSpeed's old name for bf16: read only when `bf16` is absent, which it never is here.
    ("bfloat16",): "precision",
}
_MISSING = object()
_SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


def build_config(spec: RunSpec, plan: BatchPlan) -> dict[str, Any]:
    """The harness-managed DeepSpeed keys for a resolved spec and batch plan."""
    p = spec.parallel
    cfg: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(spec.optimizer.grad_clip),
        "steps_per_print": max(spec.train.steps, 1),
        "wall_clock_breakdown": False,
        "communication_data_type": _DTYPE_NAME[spec.precision.dtype],
        "zero_optimization": _zero_section(spec),
        "scheduler": _scheduler_section(spec),
    }
    cfg.update(_precision_section(spec))
    if spec.optimizer.impl == "deepspeed":
        cfg["optimizer"] = {
            "type": "AdamW" if spec.optimizer.name == "adamw" else "Adam",
            "params": {
                "lr": spec.optimizer.lr,
                "betas": list(spec.optimizer.betas),
                "eps": spec.optimizer.eps,
                "weight_decay": spec.optimizer.weight_decay,
            },
        }
    elif p.zero_stage != 0:
        # torch.optim is not on ZeRO's tested list; it is exact, so allow it explicitly.
        cfg["zero_allow_untested_optimizer"] = True
    if p.pipeline_stages > 1:
        cfg["pipeline"] = {
            "stages": p.pipeline_stages,
            "partition": p.partition_method,
            "activation_checkpoint_interval": p.activation_checkpoint_interval,
            "seed_layers": False,
            "pipe_partitioned": True,
            "grad_partitioned": True,
        }
    if p.tensor_parallel > 1:
        cfg["tensor_parallel"] = {"autotp_size": p.tensor_parallel}
    if spec.model.gradient_checkpointing or p.activation_checkpoint_interval:
        cfg["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    return cfg


def _precision_section(spec: RunSpec) -> dict[str, Any]:
    pr = spec.precision
    if pr.dtype == "bf16":
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if pr.dtype == "fp16":
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": float(pr.loss_scale),
                "initial_scale_power": pr.initial_scale_power,
                "loss_scale_window": pr.loss_scale_window,
                "hysteresis": pr.hysteresis,
                "min_loss_scale": float(pr.min_loss_scale),
            },
            "bf16": {"enabled": False},
        }
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}}


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def _zero_section(spec: RunSpec) -> dict[str, Any]:
    p = spec.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 0:
        return zero
    zero.update(
        {
            "overlap_comm": p.zero_stage >= 2,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": REDUCE_BUCKET_ELEMS,
        }
    )
    if p.zero_stage in (1, 2):
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = ALLGATHER_BUCKET_ELEMS
    if p.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": STAGE3_PREFETCH_ELEMS,
                "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_ELEMS,
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMS,
                "stage3_max_reuse_distance": STAGE3_MAX_REUSE_DISTANCE,
                # Without this a ZeRO-3 save writes empty 16-bit weights (transformers #25368).
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, p.nvme_path)
    if p.offload_params != "none":
        zero["offload_param"] = _offload(p.offload_params, p.nvme_path)
    return zero


def _scheduler_section(spec: RunSpec) -> dict[str, Any]:
    s, lr, steps = spec.schedule, spec.optimizer.lr, spec.train.steps
    kind = _SCHEDULERS[s.decay]
    # DeepSpeed's schedulers raise on warmup_num_steps=0; without warm-up, one step that starts
    # at the peak (warmup_min_ratio 1.0 / warmup_min_lr = lr) is no warm-up at all.
    warmup_num_steps = max(s.warmup_steps, 1)
    if kind == "WarmupCosineLR":
        params: dict[str, Any] = {
            "total_num_steps": steps,
            "warmup_num_steps": warmup_num_steps,
            "warmup_min_ratio": s.min_lr_ratio if s.warmup_steps else 1.0,
            "cos_min_ratio": s.min_lr_ratio,
            "warmup_type": "linear",
        }
    else:
        params = {
            "warmup_min_lr": lr * s.min_lr_ratio if s.warmup_steps else lr,
            "warmup_max_lr": lr,
            "warmup_num_steps": warmup_num_steps,
            "warmup_type": "linear",
        }
        if kind == "WarmupDecayLR":
            params["total_num_steps"] = steps
            params["warmup_min_lr"] = lr * s.min_lr_ratio
    return {"type": kind, "params": params}


def universal_load_keys() -> dict[str, Any]:
    """Raw keys that make DeepSpeed load a universal checkpoint (``checkpoint.load_universal``, read by
    ``DeepSpeedConfig`` in ``runtime/config.py``): :mod:`harness.train.reshard` merges them into the spec
    of the one launch that resumes a checkpoint converted for a new data-parallel size."""
    return {"checkpoint": {"load_universal": True}}


def deep_merge(base: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``raw`` deep-merged over ``base`` (the user's raw ``deepspeed:`` keys over the compiled ones)."""
    out = copy.deepcopy(base)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_raw_keys(compiled: dict[str, Any], raw: dict[str, Any]) -> None:
    """Refuse raw ``deepspeed:`` values for keys the spec owns, unless they equal the compiled value."""
    errors = []
    for path, field in SPEC_OWNED_KEYS.items():
        value = _lookup(raw, path)
        if value is not _MISSING and value != _lookup(compiled, path):
            errors.append(
                SpecError(
                    "deepspeed." + ".".join(path),
                    value,
                    f"remove it and set {field} in the spec instead",
                    reason="the spec owns this DeepSpeed key (its rules would be bypassed)",
                )
            )
    if errors:
        raise SpecErrors(errors)


def _lookup(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def check_batch_triple(cfg: dict[str, Any], dp: int) -> None:
    """train_batch_size = micro × accumulation × dp must hold in the final config, and no "auto"."""
    _no_auto(cfg, "deepspeed")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    if not all(isinstance(v, int) and v >= 1 for v in (micro, accum, total)) or micro * accum * dp != total:
        raise SpecError(
            "deepspeed",
            f"train_batch_size={total}, train_micro_batch_size_per_gpu={micro}, "
            f"gradient_accumulation_steps={accum}, data_parallel_size={dp}",
            "set batch sizes in the batch: section, not as raw deepspeed keys",
            reason="the batch triple does not hold after merging raw deepspeed keys",
        )


def _no_auto(node: Any, path: str) -> None:
    if node == AUTO:
        raise SpecError(path, AUTO, "give a concrete value; the harness resolves every value before launch")
    if isinstance(node, dict):
        for key, value in node.items():
            _no_auto(value, f"{path}.{key}")
