"""harness.planner.devices: the device table, dense peaks by dtype, custom devices."""

from __future__ import annotations

import pytest

from harness.errors import SpecError
from harness.planner.devices import DEVICES, GIB, get_device, peak_flops


def test_peaks_are_dense_not_sparse():
    assert peak_flops("h100-80gb") == 989e12 == peak_flops("h200-141gb")
    assert peak_flops("a100-80gb") == 312e12 == peak_flops("a100-40gb")
    assert peak_flops("cpu") is None
    assert all(d.peak_flops is None or d.peak_flops < 1e15 for d in DEVICES.values())
    assert {
        "a100-40gb",
        "a100-80gb",
        "h100-80gb",
        "h200-141gb",
        "l40s-48gb",
        "v100-32gb",
        "v100-16gb",
    } <= set(DEVICES)


def test_peak_by_dtype():
    assert peak_flops("h100-80gb", "bf16") == peak_flops("h100-80gb", "fp16") == 989e12
    assert peak_flops("h100-80gb", "fp32") == 67e12
    assert peak_flops("v100-32gb", "fp16") == 125e12
    assert peak_flops("v100-32gb", "bf16") is None  # no bf16 tensor cores


def test_custom_devices():
    dev = get_device("custom:mem_gb=94,tflops=400,ib_gbs=25")
    assert dev.mem_bytes == 94e9 and dev.peak_flops == 400e12 and dev.inter_node_bytes_per_s == 25e9
    based = get_device("custom:base=h100-80gb,mem_gb=94")
    assert based.peak_flops == 989e12 and based.mem_bytes == 94e9
    for bad in ("b200", "custom:tflops=400", "custom:mem_gb=x,tflops=1", "custom:mem_gb=80,tflops=1,warp=9"):
        with pytest.raises(SpecError, match="launch.gpu"):
            get_device(bad)


def test_gib_constant():
    assert GIB == 2**30
