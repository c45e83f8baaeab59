"""Validate a compiled config with DeepSpeed's own ``DeepSpeedConfig`` (imports deepspeed lazily).

DeepSpeed silently ignores unknown top-level keys (DeepSpeed #653, #1809), so this module records
which top-level keys DeepSpeed's config parser reads and refuses any other.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
from typing import Any

from harness.errors import SpecError


class _KeyRecorder(dict):
    """A dict that remembers every key DeepSpeed's parser asks for."""

    def __init__(self, *args: Any, seen: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[str] = seen if seen is not None else set()

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def keys(self):  # noqa: D102 - DeepSpeed writes `KEY in param_dict.keys()`
        recorder = self

        class _Keys(set):
            def __contains__(self, key: object) -> bool:
                recorder.seen.add(key)  # type: ignore[arg-type]
                return super().__contains__(key)

        return _Keys(super().keys())

    def __copy__(self) -> _KeyRecorder:
        return _KeyRecorder(self, seen=self.seen)


# Top-level keys read outside DeepSpeedConfig.__init__ (by the engine or other config parsers).
_READ_ELSEWHERE = {"pipeline", "tensor_parallel", "activation_checkpointing", "comms_logger", "flops_profiler"}


# The probe's result for the pinned DeepSpeed, so `harness config` needs no deepspeed import;
# tests/test_dscheck.py fails when the installed DeepSpeed reads a different set.
KNOWN_TOP_LEVEL_KEYS = frozenset(
    """
    activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger
    communication_data_type compile compression_training csv_monitor curriculum_learning data_efficiency
    data_types dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue
    elasticity expert_parallel flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op
    gradient_clipping gradient_predivide_factor graph_harvesting hybrid_engine log_level
    managed_gradient_accumulation memory_breakdown nebula optimizer pipeline prescale_gradients
    progressive_layer_drop quantize_training scheduler seq_parallel_communication_data_type sparse_attention
    sparse_gradients steps_per_print tensor_parallel tensorboard timers torch_autocast train_batch_size
    train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown
    wandb weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization
    """.split()
)


@functools.cache
def probe_top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed's config parser looks up (probed with a minimal config)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _KeyRecorder({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    _quiet(lambda: DeepSpeedConfig(probe))
    return frozenset(k for k in probe.seen if isinstance(k, str)) | _READ_ELSEWHERE


def validate_config(cfg: dict[str, Any], data_parallel_size: int, deep: bool = True) -> None:
    """Raise SpecError if DeepSpeed would reject ``cfg`` or would silently ignore a key in it.

    ``deep=False`` checks top-level key names and the batch triple only (no deepspeed import);
    ``deep=True`` also runs DeepSpeed's own ``DeepSpeedConfig`` over it.
    """
    from harness.dsconfig import check_batch_triple

    known = KNOWN_TOP_LEVEL_KEYS
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "see https://www.deepspeed.ai/docs/config-json/"
            raise SpecError(
                f"deepspeed.{key}", cfg[key], f"remove it or fix its name; {hint}", "DeepSpeed does not know this key"
            )
    check_batch_triple(cfg, data_parallel_size)
    if not deep:
        return
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks the batch triple against the process group's world size, which is 1
    # outside a launch; check the triple for the real data-parallel size ourselves and let
    # DeepSpeed derive train_batch_size for its world of one.
    trial = copy.deepcopy(cfg)
    trial.pop("train_batch_size", None)
    try:
        _quiet(lambda: DeepSpeedConfig(trial))
    except SpecError:
        raise
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError from DeepSpeed
        raise SpecError(
            "deepspeed", _first_line(exc), "fix the key DeepSpeed names above", "DeepSpeed rejected the config"
        ) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n")[:3])


def _quiet(fn):
    """Run ``fn`` with DeepSpeed's logger silenced (its config parser logs at INFO/WARNING)."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        logger.setLevel(level)
