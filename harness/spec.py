"""The run spec: one typed description of a training run, read from YAML.

Section and key names are the user contract (see docs/spec.md, generated from the docstrings below).
Loading is strict: unknown keys, duplicate keys, YAML tags and wrong types are errors that name the
field, the value seen and the fix. This module imports no torch or deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AUTO = "auto"
Auto = Literal["auto"]


@dataclass(kw_only=True)
class RunSection:
    name: str = "run"
    """Run name; the run directory is ``output_dir/name``."""
    output_dir: str = "runs"
    """Directory that holds run directories."""


@dataclass(kw_only=True)
class ModelSection:
    preset: str | None = None
    """A preset name such as ``llama-tiny`` or ``gpt2-124m`` (see ``harness presets``); or set name_or_path."""
    name_or_path: str | None = None
    """A local HF checkpoint directory to fine-tune (or a hub name where the hub is reachable)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """HF config fields to change, e.g. ``{num_hidden_layers: 4, hidden_dropout: 0.1}``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (about 1/3 more compute)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch scaled-dot-product), ``eager`` or ``flash_attention_2``."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run; off unless you trust its source."""


@dataclass(kw_only=True)
class DataSection:
    dataset: str = "default"
    """``default`` (an embedded corpus, no download), an HF dataset name, or a local file or directory."""
    files: list[str] = field(default_factory=list)
    """Local data files (txt, json, jsonl, csv, parquet), used instead of ``dataset`` when given."""
    text_field: str = "text"
    """The column holding the text in json/jsonl/csv/parquet data."""
    seq_len: int = 256
    """Tokens per training sequence (documents are packed into blocks of this length)."""
    tokenizer: str | None = None
    """An HF tokenizer directory or name; default: the model checkpoint's, else a BPE trained on the corpus."""
    val_fraction: float = 0.01
    """Fraction of packed blocks held out for validation (perplexity)."""


@dataclass(kw_only=True)
class BatchSection:
    global_batch_size: int | Auto | None = None
    """Samples per optimizer step across all data-parallel ranks."""
    global_batch_tokens: int | None = None
    """Tokens per optimizer step; an alternative to global_batch_size (must be a multiple of data.seq_len)."""
    micro_batch_size: int | Auto | None = None
    """Samples per rank per forward/backward pass."""
    grad_accum: int | Auto | None = None
    """Micro-batches accumulated per optimizer step."""


@dataclass(kw_only=True)
class ParallelSection:
    zero_stage: int | Auto = 1
    """ZeRO stage 0-3 (0: plain data parallel; 1: optimizer states, 2: +gradients, 3: +parameters sharded)."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where optimizer states live: GPU (``none``), host memory (``cpu``) or NVMe (``nvme``)."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO-3 parameters live between uses (needs zero_stage 3)."""
    nvme_path: str | None = None
    """A fast local directory for NVMe offload (required when any offload is ``nvme``)."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (the model is split by decoder layers)."""
    tensor_parallel: int = 1
    """Tensor-parallel degree through DeepSpeed AutoTP (1 = off)."""
    partition_method: str = "parameters"
    """How layers are split over pipeline stages: ``parameters``, ``uniform`` or ``type:<regex>``."""
    activation_checkpoint_interval: int = 0
    """Pipeline stages: recompute activations every N layers (0 = off)."""


@dataclass(kw_only=True)
class PrecisionSection:
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision. ``fp16`` uses dynamic loss scaling (knobs below)."""
    initial_scale_power: int = 16
    """fp16: the first loss scale is 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale is raised."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never goes below this."""
    loss_scale: float = 0.0
    """fp16: a fixed loss scale; 0 means dynamic."""


@dataclass(kw_only=True)
class OptimizerSection:
    name: Literal["adamw", "adam"] = "adamw"
    """Optimizer: ``adamw`` (decoupled weight decay) or ``adam``."""
    impl: Literal["deepspeed", "torch"] = "deepspeed"
    """``deepspeed`` (fused/CPU Adam, required for offload) or ``torch`` (torch.optim, bitwise-exact resume)."""
    lr: float = 3e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas [beta1, beta2]."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


@dataclass(kw_only=True)
class ScheduleSection:
    warmup_steps: int = 0
    """Steps of linear warm-up from lr * min_lr_ratio to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to lr * min_lr_ratio at train.steps."""
    min_lr_ratio: float = 0.1
    """Lowest learning rate as a fraction of optimizer.lr."""


@dataclass(kw_only=True)
class TrainSection:
    steps: int = 100
    """Optimizer steps to train for."""
    log_every: int = 10
    """Log loss, lr, grad norm, tokens/s and MFU every N steps."""
    eval_every: int = 0
    """Evaluate validation loss and perplexity every N steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    save_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    seed: int = 1234
    """Seed for model init, data order and dropout."""
    stall_timeout: int | Auto = AUTO
    """Seconds a rank may go without progress (a step, an evaluation or a save) before the run is ended as
    stalled, naming the rank; ``auto``: derived from the measured step time, with a floor for start-up
    and saves; 0 turns detection off."""


@dataclass(kw_only=True)
class CheckpointSection:
    keep_last: int = 2
    """Complete checkpoints to keep (the newest complete one is never deleted)."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in the run, if any), ``never``, or a checkpoint path."""
    export_hf: bool = False
    """Export an HF checkpoint (safetensors, config, tokenizer) to ``<run>/hf`` at the end."""
    verify: Literal["checksum", "size"] = "checksum"
    """What resume and export check of a checkpoint's files against its COMPLETE marker: sizes and
    checksums (``checksum``), or sizes only (``size``, for very large checkpoints on slow storage)."""


@dataclass(kw_only=True)
class SlurmSection:
    partition: str | None = None
    """``#SBATCH --partition``: the partition (queue) to submit to."""
    account: str | None = None
    """``#SBATCH --account``: the account charged for the job."""
    qos: str | None = None
    """``#SBATCH --qos``: quality of service."""
    time: str | None = None
    """``#SBATCH --time``: wall-clock limit, e.g. ``24:00:00``."""
    cpus_per_task: int | None = None
    """``#SBATCH --cpus-per-task``: CPU cores per rank."""
    job_name: str | None = None
    """``#SBATCH --job-name``; default: run.name."""
    output: str | None = None
    """``#SBATCH --output``; default: ``<run>/slurm-%j.out``."""
    gres_gpus: bool = True
    """Request GPUs with ``--gpus-per-node`` (turn off on CPU-only clusters)."""
    preempt_signal_grace_s: int = 120
    """Seconds before the time limit that Slurm sends USR1 (checkpoint, exit, requeue)."""
    requeue: bool = True
    """Requeue the job after a preemption or time-limit checkpoint."""
    min_nodes: int | None = None
    """Fewest nodes the job may run on (``--nodes=min_nodes-nodes``): a requeued job that gets fewer or
    more nodes than before resumes on what it has, same global batch; default: exactly launch.nodes."""
    extra: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` lines, written verbatim after ``#SBATCH `` (e.g. ``--exclusive``)."""


@dataclass(kw_only=True)
class LaunchSection:
    launcher: Literal["local", "pdsh", "openmpi", "slurm"] = "local"
    """How ranks start: one machine, a hostfile over pdsh/ssh, mpirun, or a Slurm batch job."""
    nodes: int = 1
    """Number of machines."""
    gpus_per_node: int = 1
    """Ranks per machine (one per GPU; on a CPU machine, CPU ranks)."""
    gpu: str = "h100-80gb"
    """GPU type for the planner and MFU (see ``harness plan --list-gpus``)."""
    host_memory_gb: float | None = None
    """Host memory of one node in GB, which the planner checks each node's ranks against while they build
    the model. Default: this machine's /proc/meminfo MemTotal when the ranks run here (``launcher:
    local`` with CPU ranks, or with this machine's NVIDIA GPUs); otherwise the device table's host
    memory per GPU × ``gpus_per_node`` (docs/planner.md, "Host memory")."""
    hostfile: str | None = None
    """DeepSpeed hostfile (``host slots=N`` lines) for the pdsh and openmpi launchers."""
    include: str | None = None
    """DeepSpeed ``--include`` host filter (e.g. ``node1@node2:0``)."""
    exclude: str | None = None
    """DeepSpeed ``--exclude`` host filter."""
    master_addr: str | None = None
    """Address of rank 0 (default: 127.0.0.1 locally, the first host of the hostfile or Slurm node list)."""
    master_port: int = 29500
    """TCP port of rank 0's rendezvous."""
    env: list[str] = field(default_factory=list)
    """Names of environment variables to pass to every rank (values are read at launch, never printed)."""
    slurm: SlurmSection = field(default_factory=SlurmSection)
    """Slurm batch-job settings (launcher ``slurm``)."""


@dataclass(kw_only=True)
class RunSpec:
    run: RunSection = field(default_factory=RunSection)
    """Run name and where its directory goes."""
    model: ModelSection = field(default_factory=ModelSection)
    """Which model to build or load."""
    data: DataSection = field(default_factory=DataSection)
    """Which data to train on and how it is tokenized."""
    batch: BatchSection = field(default_factory=BatchSection)
    """Batch sizes: give any two of global, micro and accumulation (or ``auto``)."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """ZeRO, offload, pipeline and tensor parallelism."""
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    """Numeric precision; a plain ``bf16``/``fp16``/``fp32`` is short for ``{dtype: ...}``."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """Optimizer and its hyper-parameters."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Learning-rate schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Training length, logging, evaluation and saving cadence."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoint retention, resume and HF export."""
    launch: LaunchSection = field(default_factory=LaunchSection)
    """How and where ranks are started."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last (validated against DeepSpeed's own config classes)."""

    @property
    def world_size(self) -> int:
        """Ranks the launch section asks for: nodes × gpus_per_node."""
        return self.launch.nodes * self.launch.gpus_per_node


SECTION_TYPES: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "data": DataSection,
    "batch": BatchSection,
    "parallel": ParallelSection,
    "precision": PrecisionSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "launch": LaunchSection,
}
