"""The device table: memory, dense peak FLOP/s and link bandwidths per GPU type, for the planner and MFU.

``launch.gpu`` names a row (``h100-80gb``) or describes a custom device::

    launch:
      gpu: custom:mem_gb=94,tflops=989,hbm_tbs=3.9,nvlink_gbs=450,ib_gbs=50,pcie_gbs=50,host_gb=256,eff=0.46
      gpu: custom:base=h100-80gb,mem_gb=94          # start from a row, change some numbers

Sources: docs/planner.md ("Sources of the device table"); peaks are DENSE bf16/fp16 tensor-core
numbers (H100/H200 989 TFLOP/s, not the 2:4-sparse 1979).
Bandwidths are per GPU and one direction (NVLink 4: 900 GB/s bidirectional = 450 GB/s each way).
``train_efficiency`` is the fraction of peak a well-tuned dense bf16 training step reaches on large
matmuls, calibrated to llm-foundry's published single-node MFU (A100 7B 64.2 %, H100 7B 46.4 %).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from harness.errors import SpecError

GB = 1e9
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class Device:
    """One accelerator type, as the planner sees it."""

    name: str
    """Table key (``h100-80gb``) or the custom string."""
    mem_bytes: int
    """Device memory per GPU (nvidia-smi's total)."""
    peak_flops: float | None
    """Dense bf16/fp16 tensor-core FLOP/s per GPU; None where no meaningful peak exists (CPU ranks)."""
    hbm_bytes_per_s: float
    """Device memory bandwidth."""
    intra_node_bytes_per_s: float
    """GPU-to-GPU bandwidth inside a node, one direction (NVLink, or PCIe where there is none)."""
    inter_node_bytes_per_s: float
    """Network bandwidth per GPU between nodes, one direction (one NIC per GPU assumed)."""
    host_link_bytes_per_s: float
    """GPU-to-host bandwidth for offload, one direction, achievable (PCIe)."""
    host_mem_bytes: int
    """Host memory per GPU (the node's RAM / GPUs per node) available for offloaded states."""
    train_efficiency: float
    """Fraction of peak a dense bf16 training step reaches on large matmuls (calibration, see module doc)."""
    bf16: bool = True
    """Whether the device has bf16 tensor cores (V100 does not)."""
    fp32_flops: float | None = None
    """Plain fp32 (non-tensor-core) FLOP/s, the peak for ``precision: fp32`` runs."""
    nominal_flops: float | None = None
    """FLOP/s used for time estimates when ``peak_flops`` is None (CPU ranks)."""
    stage0_bf16_slowdown: float = 1.0
    """Step-time factor of DeepSpeed's bf16 ZeRO-0 path (BF16_Optimizer) relative to ZeRO 1-2."""

    @property
    def compute_flops(self) -> float:
        """The FLOP/s the time model divides by: the dense peak, or the nominal rate for CPU ranks."""
        return self.peak_flops if self.peak_flops is not None else float(self.nominal_flops or 1e10)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            name="a100-40gb",
            fp32_flops=19.5e12,
            mem_bytes=40960 * MIB,
            peak_flops=312e12,
            hbm_bytes_per_s=1.555e12,
            intra_node_bytes_per_s=300 * GB,  # NVLink 3: 600 GB/s bidirectional
            inter_node_bytes_per_s=25 * GB,  # HDR 200 Gb/s per GPU (DGX A100)
            host_link_bytes_per_s=25 * GB,  # PCIe 4 x16: 32 GB/s theoretical
            host_mem_bytes=128 * GIB,  # DGX A100 320 GB: 1 TB / 8
            train_efficiency=0.64,
        ),
        Device(
            name="a100-80gb",
            fp32_flops=19.5e12,
            mem_bytes=81920 * MIB,
            peak_flops=312e12,
            hbm_bytes_per_s=2.039e12,
            intra_node_bytes_per_s=300 * GB,
            inter_node_bytes_per_s=25 * GB,
            host_link_bytes_per_s=25 * GB,
            host_mem_bytes=256 * GIB,  # DGX A100 640 GB: 2 TB / 8
            train_efficiency=0.64,
        ),
        Device(
            name="h100-80gb",
            fp32_flops=67e12,
            mem_bytes=81559 * MIB,
            peak_flops=989e12,
            hbm_bytes_per_s=3.35e12,
            intra_node_bytes_per_s=450 * GB,  # NVLink 4: 900 GB/s bidirectional
            inter_node_bytes_per_s=50 * GB,  # NDR 400 Gb/s per GPU
            host_link_bytes_per_s=50 * GB,  # PCIe 5 x16: 64 GB/s theoretical
            host_mem_bytes=256 * GIB,  # DGX H100: 2 TB / 8
            train_efficiency=0.46,
        ),
        Device(
            name="h200-141gb",
            fp32_flops=67e12,
            mem_bytes=143771 * MIB,
            peak_flops=989e12,  # same GH100 die as H100; more and faster HBM
            hbm_bytes_per_s=4.8e12,
            intra_node_bytes_per_s=450 * GB,
            inter_node_bytes_per_s=50 * GB,
            host_link_bytes_per_s=50 * GB,
            host_mem_bytes=256 * GIB,
            train_efficiency=0.46,  # no public bf16 table: H100's
        ),
        Device(
            name="l40s-48gb",
            fp32_flops=91.6e12,
            mem_bytes=46068 * MIB,
            peak_flops=362e12,  # dense bf16 with fp32 accumulate (733 is sparse)
            hbm_bytes_per_s=0.864e12,  # GDDR6
            intra_node_bytes_per_s=25 * GB,  # no NVLink: PCIe 4 peer-to-peer
            inter_node_bytes_per_s=12.5 * GB,  # 100 Gb/s per GPU assumed
            host_link_bytes_per_s=25 * GB,
            host_mem_bytes=128 * GIB,
            train_efficiency=0.40,  # assumption: no public training MFU found
        ),
        Device(
            name="v100-32gb",
            fp32_flops=15.7e12,
            mem_bytes=32768 * MIB,
            peak_flops=125e12,  # fp16 tensor cores (SXM2)
            hbm_bytes_per_s=0.9e12,
            intra_node_bytes_per_s=150 * GB,  # NVLink 2: 300 GB/s bidirectional
            inter_node_bytes_per_s=12.5 * GB,  # EDR 100 Gb/s
            host_link_bytes_per_s=12 * GB,  # PCIe 3 x16: 16 GB/s theoretical
            host_mem_bytes=64 * GIB,
            train_efficiency=0.30,  # ZeRO paper: 15 PFLOP/s on 400 V100 = 30 % of 125
            bf16=False,
        ),
        Device(
            name="v100-16gb",
            fp32_flops=15.7e12,
            mem_bytes=16384 * MIB,
            peak_flops=125e12,
            hbm_bytes_per_s=0.9e12,
            intra_node_bytes_per_s=150 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            host_link_bytes_per_s=12 * GB,
            host_mem_bytes=64 * GIB,
            train_efficiency=0.30,
            bf16=False,
        ),
        Device(
            name="cpu",
            mem_bytes=16 * GIB,  # nominal per CPU rank; tiny CPU runs only
            peak_flops=None,  # MFU is "n/a" on CPU ranks
            hbm_bytes_per_s=20 * GB,
            intra_node_bytes_per_s=5 * GB,
            inter_node_bytes_per_s=1 * GB,
            host_link_bytes_per_s=20 * GB,
            host_mem_bytes=16 * GIB,
            train_efficiency=0.5,
            nominal_flops=5e10,
            # Measured on 2 CPU ranks (docs/planner.md, Speed model): ~1,400 vs ~7,200 tokens/s for ZeRO 1-2.
            stage0_bf16_slowdown=5.0,
        ),
    )
}

# custom:key=value → (Device field, multiplier)
_CUSTOM_KEYS: dict[str, tuple[str, float]] = {
    "mem_gb": ("mem_bytes", GB),
    "tflops": ("peak_flops", 1e12),
    "hbm_tbs": ("hbm_bytes_per_s", 1e12),
    "nvlink_gbs": ("intra_node_bytes_per_s", GB),
    "ib_gbs": ("inter_node_bytes_per_s", GB),
    "pcie_gbs": ("host_link_bytes_per_s", GB),
    "host_gb": ("host_mem_bytes", GB),
    "eff": ("train_efficiency", 1.0),
}
_CUSTOM_HELP = (
    "name a GPU type (" + ", ".join(DEVICES) + ") or describe one: custom:mem_gb=80,tflops=400[,hbm_tbs=2,"
    "nvlink_gbs=300,ib_gbs=25,pcie_gbs=25,host_gb=256,eff=0.5] or custom:base=h100-80gb,mem_gb=94"
)


def get_device(gpu: str) -> Device:
    """The device for a ``launch.gpu`` string: a table row or a ``custom:`` description."""
    key = gpu.strip().lower()
    if key in DEVICES:
        return DEVICES[key]
    if not key.startswith("custom:"):
        raise SpecError("launch.gpu", gpu, _CUSTOM_HELP, reason="unknown GPU type")
    values: dict[str, str] = {}
    for item in key[len("custom:") :].split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SpecError("launch.gpu", gpu, _CUSTOM_HELP, reason=f"'{item}' is not key=value")
        values[name.strip()] = value.strip()
    base_name = values.pop("base", None)
    if base_name is not None and base_name not in DEVICES:
        raise SpecError("launch.gpu", gpu, _CUSTOM_HELP, reason=f"unknown base '{base_name}'")
    if base_name is None and not {"mem_gb", "tflops"} <= values.keys():
        raise SpecError(
            "launch.gpu", gpu, _CUSTOM_HELP, reason="a custom device needs mem_gb and tflops (or base=)"
        )
    base = DEVICES[base_name or "a100-80gb"]
    changes: dict[str, object] = {"name": gpu}
    for name, value in values.items():
        if name not in _CUSTOM_KEYS:
            raise SpecError("launch.gpu", gpu, _CUSTOM_HELP, reason=f"unknown key '{name}'")
        try:
            number = float(value)
        except ValueError:
            raise SpecError(
                "launch.gpu", gpu, _CUSTOM_HELP, reason=f"'{name}={value}' is not a number"
            ) from None
        if number <= 0:
            raise SpecError("launch.gpu", gpu, _CUSTOM_HELP, reason=f"'{name}' must be positive")
        field_name, scale = _CUSTOM_KEYS[name]
        scaled = number * scale
        changes[field_name] = int(scaled) if field_name.endswith("_bytes") else scaled
    return replace(base, **changes)


def peak_flops(gpu: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s per GPU for ``launch.gpu`` in ``dtype`` (the MFU denominator).

    bf16/fp16: tensor-core dense peak (989e12 on H100/H200, never the 2:4-sparse 1979e12); fp32: the
    plain fp32 peak (PyTorch leaves TF32 matmuls off by default). None where no peak applies: CPU ranks,
    and bf16 on a GPU without bf16 tensor cores (V100), so MFU prints "n/a".
    """
    dev = get_device(gpu)
    if dev.peak_flops is None:
        return None
    if dtype == "fp32":
        return dev.fp32_flops
    if dtype == "bf16" and not dev.bf16:
        return None
    return dev.peak_flops


def describe(device: Device) -> dict[str, object]:
    """The device as plain numbers for ``--json`` and the docs."""
    return {f.name: getattr(device, f.name) for f in fields(device)}
