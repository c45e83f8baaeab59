"""What the planner reasons about: the fixed context of a plan (model, sequence, cluster) and one layout.

Both are plain frozen dataclasses; the memory and speed models are pure functions of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.parallel_dims import ModelDims
from harness.planner.devices import Device
from harness.planner.modelstats import ModelStats


@dataclass(frozen=True, kw_only=True)
class Context:
    """Everything a plan keeps fixed while layouts vary."""

    stats: ModelStats
    """Parameter numbers of the model."""
    seq_len: int
    """Tokens per sample."""
    dtype: str = "bf16"
    """Training precision: ``bf16``, ``fp16`` or ``fp32``."""
    device: Device
    """The GPU type of every rank."""
    nodes: int = 1
    """Machines."""
    gpus_per_node: int = 1
    """Ranks per machine."""
    attn_implementation: str = "sdpa"
    """``sdpa``/``flash_attention_2`` (no s² scores kept) or ``eager`` (scores kept per layer)."""
    dropout: bool = False
    """Whether the model applies dropout (GPT-2's defaults do; the Llama family's do not)."""
    partition_method: str = "parameters"
    """How pipeline stages split the layers (``parameters`` or ``uniform``; ``type:`` is read as uniform)."""
    optimizer_impl: str = "deepspeed"
    """``deepspeed`` or ``torch`` (a torch optimizer cannot run offloaded: no offload layouts then)."""
    host_memory_bytes: float | None = None
    """Host memory of one node; None: the device table's host memory per GPU × ``gpus_per_node``."""
    host_memory_source: str = ""
    """Where ``host_memory_bytes`` comes from, for the plan's header and errors."""
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Per-context memo (pipeline splits), so a search computes each split once."""

    @property
    def world_size(self) -> int:
        """Ranks in the job."""
        return self.nodes * self.gpus_per_node

    @property
    def model_dims(self) -> ModelDims:
        """The numbers the layout rules read (:class:`harness.parallel_dims.ParallelDims`)."""
        st = self.stats
        return ModelDims(model_type=st.model_type, layers=st.layers, heads=st.heads, kv_heads=st.kv_heads)

    @property
    def node_host_bytes(self) -> float:
        """Host memory of one node (``host_memory_bytes``, or the device table's per GPU × GPUs per node)."""
        if self.host_memory_bytes is not None:
            return self.host_memory_bytes
        return float(self.device.host_mem_bytes * self.gpus_per_node)

    @property
    def lp_bytes(self) -> int:
        """Bytes per element of the training dtype (parameters, gradients, activations)."""
        return 4 if self.dtype == "fp32" else 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """One way to run the job: ZeRO stage, offload, model parallelism, batch split, recomputation."""

    zero_stage: int
    """ZeRO stage 0-3."""
    offload_optimizer: str = "none"
    """``none`` or ``cpu`` (fp32 master weights, gradients and Adam moments in host memory)."""
    offload_params: str = "none"
    """``none`` or ``cpu`` (ZeRO-3 16-bit parameter partitions in host memory)."""
    pipeline_stages: int = 1
    """Pipeline-parallel degree p."""
    tensor_parallel: int = 1
    """Tensor-parallel degree t (AutoTP)."""
    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the pipeline's m)."""
    checkpointing: bool = False
    """Activation checkpointing: HF gradient checkpointing, or every layer on pipeline stages."""

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel degree d = world / (p × t)."""
        return world_size // (self.pipeline_stages * self.tensor_parallel)

    def spec_overrides(self, world_size: int) -> dict[str, Any]:
        """The spec fields that select this layout on ``world_size`` ranks, as ``--set`` would take them
        (checkpointing is HF gradient checkpointing without pipeline stages, every layer with them)."""
        pipelined = self.pipeline_stages > 1
        return {
            "parallel.zero_stage": self.zero_stage,
            "parallel.offload_optimizer": self.offload_optimizer,
            "parallel.offload_params": self.offload_params,
            "parallel.pipeline_stages": self.pipeline_stages,
            "parallel.tensor_parallel": self.tensor_parallel,
            "parallel.activation_checkpoint_interval": int(self.checkpointing and pipelined),
            "model.gradient_checkpointing": self.checkpointing and not pipelined,
            "batch.micro_batch_size": self.micro_batch_size,
            "batch.grad_accum": self.grad_accum,
            "batch.global_batch_size": self.micro_batch_size
            * self.grad_accum
            * self.data_parallel(world_size),
            "batch.global_batch_tokens": None,
        }

    def short(self) -> str:
        """A compact label such as ``z3+off(opt) pp1 tp1 mb2x8 ckpt``."""
        off = []
        if self.offload_optimizer != "none":
            off.append("opt")
        if self.offload_params != "none":
            off.append("param")
        label = f"z{self.zero_stage}" + (f"+off({','.join(off)})" if off else "")
        label += (
            f" pp{self.pipeline_stages} tp{self.tensor_parallel} mb{self.micro_batch_size}x{self.grad_accum}"
        )
        return label + (" ckpt" if self.checkpointing else "")
