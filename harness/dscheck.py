"""Validate a compiled config with DeepSpeed's own ``DeepSpeedConfig`` (imports deepspeed lazily).

DeepSpeed silently ignores unknown top-level keys (DeepSpeed #653, #1809), so this module records
which top-level keys DeepSpeed's config parser reads and refuses any other.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import sys
from typing import Any

from harness.dsconfig import check_batch_triple
from harness.errors import SpecError, SpecErrors


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
_READ_ELSEWHERE = {
    "pipeline",
    "tensor_parallel",
    "activation_checkpointing",
    "comms_logger",
    "flops_profiler",
}


# The probe's result for the pinned DeepSpeed, so `harness config` needs no deepspeed import;
# tests/test_ds_configs.py fails when the installed DeepSpeed reads a different set.
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
    """.split()  # noqa: SIM905 - a word table reads better than a 60-item list literal
)


@functools.cache
def probe_top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed's config parser looks up (probed with a minimal config)."""
    DeepSpeedConfig = _quiet(_import_deepspeed_config)  # noqa: N806 - a class

    probe = _KeyRecorder({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    _quiet(lambda: DeepSpeedConfig(probe))
    return frozenset(k for k in probe.seen if isinstance(k, str)) | _READ_ELSEWHERE


def validate_config(cfg: dict[str, Any], data_parallel_size: int, deep: bool = True) -> None:
    """Raise SpecError if DeepSpeed would reject ``cfg`` or would silently ignore a key in it.

    ``deep=False`` checks top-level key names and the batch triple only (no deepspeed import);
    ``deep=True`` also runs DeepSpeed's own ``DeepSpeedConfig`` over it.
    """

    known = KNOWN_TOP_LEVEL_KEYS
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?" if close else "see https://www.deepspeed.ai/docs/config-json/"
            )
            raise SpecError(
                f"deepspeed.{key}",
                cfg[key],
                f"remove it or fix its name; {hint}",
                "DeepSpeed does not know this key",
            )
    check_batch_triple(cfg, data_parallel_size)
    if not deep:
        return
    DeepSpeedConfig = _quiet(_import_deepspeed_config)  # noqa: N806 - a class

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
        named = _pydantic_errors(exc, cfg)
        if named:
            raise SpecErrors(named) from None
        raise SpecError(
            "deepspeed",
            _first_line(exc),
            "fix the key DeepSpeed names above",
            "DeepSpeed rejected the config",
        ) from None


def _import_deepspeed_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


def _pydantic_errors(exc: Exception, cfg: dict[str, Any]) -> list[SpecError]:
    """One SpecError per pydantic error, named by its path in the config (``deepspeed.a.b``)."""
    title = getattr(exc, "title", None)
    if not title or not callable(getattr(exc, "errors", None)):
        return []
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Assertion failed, ")
        path = _find_path(cfg, loc) if loc else None
        if path is None:
            out.append(
                SpecError(f"deepspeed ({title})", msg, "change the keys it names", "DeepSpeed rejected it")
            )
        elif err.get("type") == "extra_forbidden":
            close = _close_field(title, loc)
            hint = f"did you mean '{close}'?" if close else "see https://www.deepspeed.ai/docs/config-json/"
            out.append(
                SpecError(
                    "deepspeed." + ".".join(map(str, path)),
                    err.get("input"),
                    f"remove it or fix its name; {hint}",
                    f"DeepSpeed's {title} has no such key",
                )
            )
        else:
            out.append(
                SpecError(
                    "deepspeed." + ".".join(map(str, path)),
                    err.get("input"),
                    f"give a value DeepSpeed accepts ({msg})",
                    "DeepSpeed rejected the value",
                )
            )
    return out


def _find_path(node: Any, loc: tuple[Any, ...], prefix: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The first path in ``node`` that ends with ``loc`` (pydantic reports it relative to a section)."""
    if prefix[-len(loc) :] == loc:
        return prefix
    if isinstance(node, dict):
        for key, child in node.items():
            found = _find_path(child, loc, (*prefix, key))
            if found:
                return found
    return None


def _close_field(title: str, loc: tuple[Any, ...]) -> str | None:
    """The field of DeepSpeed's config class ``title`` (at ``loc``) nearest in spelling to the bad key."""
    import typing

    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    classes, model = [DeepSpeedConfigModel], None
    while classes and model is None:
        cls = classes.pop()
        model = cls if cls.__name__ == title else None
        classes.extend(cls.__subclasses__())
    for name in loc[:-1]:
        field = model.model_fields.get(name) if model else None
        members = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        model = next((m for m in members if _is_ds_model(m, DeepSpeedConfigModel)), None)
    if model is None:
        return None
    names = [n for n, f in model.model_fields.items() for n in (n, f.alias) if n]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return close[0] if close else None


def _is_ds_model(tp: Any, base: type) -> bool:
    return isinstance(tp, type) and issubclass(tp, base)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n")[:3])


def _quiet(fn):
    """Run ``fn`` with DeepSpeed's logger silenced and its prints on stderr.

    DeepSpeed logs to stdout (its handler binds sys.stdout at import), which would corrupt
    ``harness config > ds.json``; importing it under the redirect binds the handler to stderr.
    Its import also warns "Setting accelerator to CPU" through a logger it configures itself, so
    warnings are disabled globally for the duration (a user error stays one clear message).
    """
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    disabled = logging.root.manager.disable
    logger.setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn()
    finally:
        logging.disable(disabled)
        logger.setLevel(level)
