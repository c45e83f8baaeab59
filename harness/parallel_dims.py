"""The one authority on a layout: how the world factors, which fields are ``auto``, the global-batch
target, and every rule a layout must meet for a model family.

:func:`harness.validate.check_spec` raises the problems :meth:`ParallelDims.problems` lists for the
spec's layout; the planner enumerates candidate layouts and keeps only those with no problems. One
list of rules, so the planner never proposes a layout the harness then refuses. (The shape follows
torchtitan's ``ParallelDims``: degrees in one frozen object that checks itself.) Pure, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import SpecError
from harness.presets import shape_of
from harness.spec import AUTO, RunSpec

# Model types DeepSpeed's AutoTP refuses (deepspeed/module_inject/auto_tp.py, AutoTP.supported, 0.19):
# it asks for kernel injection instead, which is inference-only.
AUTOTP_UNSUPPORTED = frozenset({"deberta", "flaubert", "fsmt", "gpt2", "led", "longformer", "xlm", "xlnet"})

AUTO_FIELDS = ("parallel.zero_stage", "batch.global_batch_size", "batch.micro_batch_size", "batch.grad_accum")
"""The spec fields that may say ``auto`` (the planner fills them)."""


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The few numbers of a model that the layout rules read."""

    model_type: str
    """HF ``model_type`` (``llama``, ``gpt2``, ...)."""
    layers: int
    """Decoder layers (the most pipeline stages there can be)."""
    heads: int
    """Attention heads (a tensor-parallel degree must divide them)."""
    kv_heads: int
    """Key-value heads (likewise)."""


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """One layout's degrees and the ZeRO/offload choices that constrain them."""

    world_size: int
    """Ranks in the job (launch.nodes × launch.gpus_per_node, or ``--world-size``)."""
    pipeline_stages: int = 1
    """Pipeline-parallel degree."""
    tensor_parallel: int = 1
    """Tensor-parallel (AutoTP) degree."""
    zero_stage: int | str = 1
    """ZeRO stage 0-3, or ``auto`` while the planner has not chosen one."""
    offload_optimizer: str = "none"
    """``none``, ``cpu`` or ``nvme``."""
    offload_params: str = "none"
    """``none``, ``cpu`` or ``nvme``."""
    optimizer_impl: str = "deepspeed"
    """``deepspeed`` (fused/CPU Adam) or ``torch`` (torch.optim; cannot run on offloaded states)."""

    @classmethod
    def from_spec(cls, spec: RunSpec, world_size: int) -> ParallelDims:
        """The dims a spec asks for on ``world_size`` ranks."""
        p = spec.parallel
        return cls(
            world_size=world_size,
            pipeline_stages=p.pipeline_stages,
            tensor_parallel=p.tensor_parallel,
            zero_stage=p.zero_stage,
            offload_optimizer=p.offload_optimizer,
            offload_params=p.offload_params,
            optimizer_impl=spec.optimizer.impl,
        )

    @property
    def model_parallel(self) -> int:
        """pipeline_stages × tensor_parallel: ranks that hold one copy of the model together."""
        return self.pipeline_stages * self.tensor_parallel

    @property
    def factors(self) -> bool:
        """Whether the world splits into data × pipeline × tensor parallel."""
        mp = self.model_parallel
        return self.world_size >= 1 and mp >= 1 and self.world_size % mp == 0

    @property
    def data_parallel(self) -> int:
        """world / (pipeline × tensor); raises SpecError (naming the degrees) when it does not divide."""
        if not self.factors:
            raise self._factor_error()
        return self.world_size // self.model_parallel

    def _factor_error(self) -> SpecError:
        mp = self.model_parallel
        return SpecError(
            "parallel",
            f"world_size={self.world_size}, pipeline_stages={self.pipeline_stages}, "
            f"tensor_parallel={self.tensor_parallel}",
            f"make the world size (launch.nodes × launch.gpus_per_node) a multiple of pipeline_stages × "
            f"tensor_parallel = {mp}, or change those degrees",
            reason="the world does not factor into data × pipeline × tensor parallel",
        )

    def problems(self, model: ModelDims | None = None) -> list[SpecError]:
        """Every rule this layout breaks (for ``model``'s family and shape when given); empty if legal."""
        out: list[SpecError] = []
        pp, tp, z = self.pipeline_stages, self.tensor_parallel, self.zero_stage
        if pp >= 1 and tp >= 1 and self.world_size >= 1 and not self.factors:
            out.append(self._factor_error())
        if pp > 1 and z in (2, 3):
            out.append(
                SpecError(
                    "parallel.zero_stage",
                    z,
                    "use zero_stage 0 or 1 with pipeline_stages > 1, or pipeline_stages: 1 to keep ZeRO 2/3",
                    reason="DeepSpeed's pipeline engine does not support ZeRO 2 or 3 (gradients are partitioned per stage)",
                )
            )
        if tp > 1 and z == 3:
            out.append(
                SpecError(
                    "parallel.zero_stage",
                    3,
                    "use zero_stage 0, 1 or 2 with tensor_parallel > 1, or tensor_parallel: 1 to keep ZeRO 3",
                    reason="AutoTP training supports ZeRO stages up to 2",
                )
            )
        if tp > 1 and pp > 1:
            out.append(
                SpecError(
                    "parallel",
                    f"pipeline_stages={pp}, tensor_parallel={tp}",
                    "use pipeline stages or tensor parallelism, not both in one run",
                    reason="AutoTP inside DeepSpeed pipeline stages is not supported",
                )
            )
        out.extend(self._offload_problems())
        if model is not None:
            out.extend(self._model_problems(model))
        return out

    def _offload_problems(self) -> list[SpecError]:
        out: list[SpecError] = []
        z, off, offp = self.zero_stage, self.offload_optimizer, self.offload_params
        if off != "none" and self.optimizer_impl == "torch":
            out.append(
                SpecError(
                    "optimizer.impl",
                    "torch",
                    "use optimizer.impl: deepspeed with offload (DeepSpeed's CPU Adam runs the offloaded step)",
                    reason="a torch optimizer cannot run on offloaded states",
                )
            )
        if z == AUTO:
            return out
        if off != "none" and z == 0:
            out.append(
                SpecError(
                    "parallel.offload_optimizer",
                    off,
                    "set parallel.zero_stage to 1, 2 or 3 (offload works on ZeRO-partitioned states), or offload_optimizer: none",
                    reason="offload needs ZeRO",
                )
            )
        if offp != "none" and z != 3:
            out.append(
                SpecError(
                    "parallel.offload_params",
                    offp,
                    "set parallel.zero_stage: 3 (only ZeRO 3 partitions parameters), or offload_params: none",
                    reason="parameter offload needs ZeRO 3",
                )
            )
        if off == "nvme" and z != 3:
            out.append(
                SpecError(
                    "parallel.offload_optimizer",
                    "nvme",
                    "set parallel.zero_stage: 3 for NVMe optimizer offload (ZeRO-Infinity), or use offload_optimizer: cpu",
                    reason="NVMe optimizer offload needs ZeRO 3",
                )
            )
        return out

    def _model_problems(self, model: ModelDims) -> list[SpecError]:
        out: list[SpecError] = []
        pp, tp = self.pipeline_stages, self.tensor_parallel
        if pp > model.layers:
            out.append(
                SpecError(
                    "parallel.pipeline_stages",
                    pp,
                    f"use at most {model.layers} stages (the model has {model.layers} decoder layers)",
                    reason="more pipeline stages than layers",
                )
            )
        if tp > 1 and model.model_type in AUTOTP_UNSUPPORTED:
            out.append(
                SpecError(
                    "parallel.tensor_parallel",
                    tp,
                    "use tensor_parallel: 1 for this model (pipeline_stages or ZeRO 3 split it instead)",
                    reason=f"DeepSpeed's AutoTP does not support the {model.model_type} family",
                )
            )
        elif tp > 1:
            for key, what, count in (
                ("heads", "attention", model.heads),
                ("kv-heads", "key-value", model.kv_heads),
            ):
                if count % tp:
                    out.append(
                        SpecError(
                            "parallel.tensor_parallel",
                            tp,
                            f"use a degree that divides the model's {count} {what} heads",
                            reason=f"{count} {key} are not divisible by {tp}",
                        )
                    )
        return out


def model_dims(cfg: dict[str, Any]) -> ModelDims:
    """The layout-relevant numbers of an HF config dict (GPT-2 or Llama-style key names)."""
    shape = shape_of(cfg)
    return ModelDims(
        model_type=str(cfg.get("model_type", "llama")),
        layers=shape["layers"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
    )


def data_parallel_size(spec: RunSpec, world_size: int) -> int:
    """world / (pipeline_stages × tensor_parallel) for the spec; SpecError when it does not divide."""
    return ParallelDims.from_spec(spec, world_size).data_parallel


def auto_fields(spec: RunSpec) -> list[str]:
    """Names of the spec fields that say ``auto`` (in :data:`AUTO_FIELDS` order)."""
    b = spec.batch
    values = (spec.parallel.zero_stage, b.global_batch_size, b.micro_batch_size, b.grad_accum)
    return [name for name, value in zip(AUTO_FIELDS, values, strict=True) if value == AUTO]


def target_global_batch(spec: RunSpec, data_parallel: int) -> int | None:
    """Samples per optimizer step the spec fixes; None when the batch is left to the planner (``auto``).

    ``global_batch_tokens`` counts in sequences; otherwise micro × accumulation × data-parallel size,
    with a missing micro batch or accumulation read as 1 (the batch solver's default).
    """
    b = spec.batch
    if b.global_batch_tokens is not None:
        return b.global_batch_tokens // spec.data.seq_len
    if isinstance(b.global_batch_size, int):
        return b.global_batch_size
    if AUTO in (b.global_batch_size, b.micro_batch_size, b.grad_accum):
        return None
    return (b.micro_batch_size or 1) * (b.grad_accum or 1) * data_parallel
