"""Host memory while the model is built: per-rank and per-node peaks against hand-computed numbers, the
plan filtering on ``launch.host_memory_gb``, and show/train refusing a layout the node cannot hold."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from harness.cli import main
from harness.errors import SpecError
from harness.planner.devices import GB, GIB, get_device
from harness.planner.host import (
    NODE_HOST_HEADROOM,
    has_nvidia_gpus,
    largest_unit,
    meminfo_bytes,
    node_host_memory,
)
from harness.planner.hostcheck import check_host_memory
from harness.planner.layout import Layout
from harness.planner.memory import estimate_memory
from harness.validate import check_spec
from tests import helpers as h
from tests.conftest import EXAMPLES

TINY = str(EXAMPLES / "tiny-cpu.yaml")

# Llama-2-7B by hand: embedding and head 32000 × 4096, a decoder layer 4·4096² (q, k, v, o) +
# 3·4096·11008 (gate, up, down) + 2·4096 (norms), 32 layers, final norm 4096.
EMBED = 32000 * 4096
LAYER = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
P = EMBED + 32 * LAYER + 4096 + EMBED
SEVEN_B_FP32_ON_8 = [
    "model.preset=llama-7b",
    "launch.gpu=h100-80gb",
    "launch.gpus_per_node=8",
    "precision=fp32",
    "batch.micro_batch_size=1",
    "batch.grad_accum=1",
    "batch.global_batch_size=null",
]


def _memory(zero: int, dtype: str = "bf16", pp: int = 1, tp: int = 1, host_gb: float | None = None, **kw):
    ctx = replace(
        h.planner_context("llama-7b", gpus=8), dtype=dtype, host_memory_bytes=host_gb and host_gb * GB
    )
    layout = Layout(zero_stage=zero, pipeline_stages=pp, tensor_parallel=tp, micro_batch_size=1, **kw)
    return ctx, estimate_memory(ctx, layout)


def test_the_hand_computed_model_is_the_planners():
    ctx = h.planner_context("llama-7b")
    assert ctx.stats.total_params == P == 6_738_415_616
    assert largest_unit(ctx, Layout(zero_stage=1)) == LAYER  # a decoder layer outweighs the embedding


@pytest.mark.parametrize(
    ("name", "zero", "dtype", "pp", "tp", "per_rank"),
    [
        # ZeRO 1 keeps the whole model in the run's dtype; working set: a layer in fp32 + its cast copy.
        ("zero1 fp32", 1, "fp32", 1, 1, 4 * P + (4 + 4) * LAYER),
        ("zero1 bf16", 1, "bf16", 1, 1, 2 * P + (4 + 2) * LAYER),
        # ZeRO 3: zero.Init keeps P/8 (every tensor divides by 8), one unit gathered at a time.
        ("zero3 bf16", 3, "bf16", 1, 1, 2 * P / 8 + (4 + 2) * LAYER),
        # 4 stages of 8 layers; the last one also holds the final norm and the head (the heaviest).
        ("pipeline 4", 1, "bf16", 4, 1, 2 * (8 * LAYER + 4096 + EMBED) + (4 + 2) * LAYER),
        # AutoTP 2: projections halved, norms, embedding and head whole; the full layer is computed.
        ("tp 2", 1, "bf16", 1, 2, 2 * (2 * EMBED + 4096 + 32 * (8192 + (LAYER - 8192) // 2)) + 6 * LAYER),
    ],
)
def test_construction_peak_per_rank_and_node(name, zero, dtype, pp, tp, per_rank):
    _, mem = _memory(zero, dtype, pp, tp)
    assert mem.host == 0  # no offload: construction is the whole host peak of a GPU rank
    assert mem.host_construction == pytest.approx(per_rank, abs=1)
    assert mem.host_rank_peak == pytest.approx(per_rank, abs=1)
    assert mem.host_node == pytest.approx(8 * per_rank, abs=8)


def test_the_numbers_in_gb():
    _, fp32 = _memory(1, "fp32")
    _, bf16 = _memory(1, "bf16")
    _, zero3 = _memory(3, "bf16")
    assert round(fp32.host_rank_peak / GB, 1) == 28.6 and round(fp32.host_node / GB) == 229
    assert round(bf16.host_rank_peak / GB, 1) == 14.7
    assert round(zero3.host_rank_peak / GB, 2) == 2.90


def test_offloaded_states_add_to_construction_on_gpu_ranks():
    _, mem = _memory(2, "bf16", offload_optimizer="cpu")
    assert mem.host > 0
    assert mem.host_rank_peak == pytest.approx(2 * P + 6 * LAYER + mem.host, abs=1)


def test_an_offloaded_zero3_partition_is_counted_once():
    _, plain = _memory(3, "bf16")
    _, offloaded = _memory(3, "bf16", offload_optimizer="cpu", offload_params="cpu")
    # The offloaded 16-bit partition is the one zero.Init kept: construction + the other host states.
    assert offloaded.host_rank_peak == pytest.approx(
        plain.host_construction + offloaded.host - 2 * P / 8, rel=1e-9
    )


def test_cpu_ranks_count_the_device_peak_as_host_memory():
    ctx = replace(h.planner_context("llama-7b", gpus=2, gpu="cpu"), dtype="fp32")
    mem = estimate_memory(ctx, Layout(zero_stage=1, micro_batch_size=1))
    assert mem.total > mem.host_construction  # the optimizer states come on top of the kept model
    assert mem.host_rank_peak == pytest.approx(mem.total, rel=1e-12)
    assert mem.host_node == pytest.approx(2 * mem.total, rel=1e-12)


def test_node_capacity_and_fit():
    _, small = _memory(1, "bf16", host_gb=64)
    assert small.host_node_capacity == pytest.approx(NODE_HOST_HEADROOM * 64 * GB)
    assert small.total <= small.capacity and not small.fits  # the GPUs would hold it, the node not
    assert small.why_not() == (
        "needs 117.5 GB of host memory per node (14.7 GB per rank, 14.7 GB of it to build the model) > 57.6 GB usable"
    )
    _, zero3 = _memory(3, "bf16", host_gb=64)
    assert zero3.host_node <= zero3.host_node_capacity


def test_where_the_node_memory_comes_from(tmp_path, monkeypatch):
    h100, cpu = get_device("h100-80gb"), get_device("cpu")
    assert node_host_memory(64.0, "slurm", h100, 8) == (64e9, "launch.host_memory_gb")
    table, why = node_host_memory(None, "slurm", h100, 8)
    assert table == 8 * 256 * GIB and "h100-80gb table default" in why
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\n")
    assert meminfo_bytes(meminfo) == 24576000 * 1024
    assert meminfo_bytes(tmp_path / "missing") is None
    monkeypatch.setattr("harness.planner.host.MEMINFO", meminfo)
    # CPU ranks launched here: this machine's memory; a GPU spec read where there are no GPUs: the table.
    assert node_host_memory(None, "local", cpu, 2)[0] == 24576000 * 1024
    monkeypatch.setattr("harness.planner.host.NVIDIA_GPUS", tmp_path / "no-driver")
    assert node_host_memory(None, "local", h100, 1) == (256 * GIB, node_host_memory(None, "pdsh", h100, 1)[1])
    gpus = tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert has_nvidia_gpus(gpus) and not has_nvidia_gpus(tmp_path / "no-driver")
    monkeypatch.setattr("harness.planner.host.NVIDIA_GPUS", gpus)
    assert node_host_memory(None, "local", h100, 1)[0] == 24576000 * 1024


def test_plan_drops_layouts_the_node_cannot_hold(capsys):
    from harness.planner.cli import plan_spec

    big = plan_spec(h.example_spec(*SEVEN_B_FP32_ON_8, "launch.host_memory_gb=100000"), 8)
    small = plan_spec(h.example_spec(*SEVEN_B_FP32_ON_8, "launch.host_memory_gb=64"), 8)
    assert small.plans and len(small.plans) < len(big.plans)
    cap = NODE_HOST_HEADROOM * 64 * GB
    assert all(c.memory.host_node <= cap for c in small.plans)
    dropped = [c for c in small.rejected if c.memory.total <= c.memory.capacity and c.memory.host_node > cap]
    assert dropped and all("GB of host memory per node" in c.memory.why_not() for c in dropped)
    assert main(["plan", TINY, "--json", "--set", *SEVEN_B_FP32_ON_8, "launch.host_memory_gb=64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["host_memory_bytes"] == 64e9
    assert data["cluster"]["host_memory_source"] == "launch.host_memory_gb"
    assert all(p["memory_bytes"]["host_node"] <= cap for p in data["plans"])


def test_plan_says_why_nothing_fits_the_host(capsys):
    code = main(["plan", TINY, "--set", *SEVEN_B_FP32_ON_8, "launch.host_memory_gb=2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "host memory 2.0 GB per node (launch.host_memory_gb)" in out
    assert "Nothing fits the host:" in out and "> 1.8 GB usable" in out
    assert main(["plan", TINY, "--set", *SEVEN_B_FP32_ON_8, "launch.host_memory_gb=64"]) == 0
    out = capsys.readouterr().out
    assert "node GB" in out and "host memory 64.0 GB per node" in out


def test_show_refuses_a_layout_the_node_cannot_hold(capsys):
    sets = [*SEVEN_B_FP32_ON_8, "launch.host_memory_gb=64"]
    with pytest.raises(SpecError) as err:
        check_host_memory(h.example_spec(*sets), 8)
    assert err.value.message == (
        "launch.host_memory_gb = 64: 8 ranks per node each build up to 28.6 GB on the host (llama-7b in fp32 "
        "under ZeRO 1), 229 GB per node > 57.6 GB usable (90% of 64.0 GB). Fix: use bf16, ZeRO 3 or pipeline "
        "stages, fewer ranks per node (launch.gpus_per_node), or a host with more memory (set "
        "launch.host_memory_gb to the node's real memory if it has more)"
    )
    assert main(["show", TINY, "--set", *sets]) == 2
    assert "229 GB per node" in capsys.readouterr().err
    assert main(["show", TINY, "--set", *sets, "parallel.zero_stage=3"]) == 0


def test_train_refuses_before_writing_anything(tmp_path, monkeypatch, capsys):
    import harness.launch.cli as launch_cli

    def no_launch(*args, **kwargs):  # a regression must not start 8 ranks of a 7B model on this box
        raise AssertionError("harness train launched")

    monkeypatch.setattr(launch_cli, "_launch", no_launch)
    spec, run_dir = h.write_spec(tmp_path, "host", model={"preset": "llama-7b"})
    sets = [*SEVEN_B_FP32_ON_8, "launch.host_memory_gb=64"]
    assert main(["train", str(spec), "--set", *sets]) == 2
    assert "launch.host_memory_gb = 64: 8 ranks per node each build up to 28.6 GB" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("value", [-1, 0])
def test_a_host_memory_that_is_not_positive_is_refused(value, capsys):
    with pytest.raises(SpecError) as err:
        check_spec(h.example_spec(f"launch.host_memory_gb={value}"), 2)
    assert err.value.field == "launch.host_memory_gb"
    assert "a positive number" in err.value.message
    assert main(["show", TINY, "--set", f"launch.host_memory_gb={value}"]) == 2
    assert "launch.host_memory_gb" in capsys.readouterr().err


def test_shipped_examples_fit_their_nodes():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = h.example_spec(base=str(path))
        check_host_memory(spec, spec.world_size)  # no refusal
