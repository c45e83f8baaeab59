"""Every shipped example spec loads, compiles, and is accepted by DeepSpeed's own DeepSpeedConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES

from harness.compiler import compile_resolved
from harness.dscheck import validate_config
from harness.specload import load_spec

SPECS = sorted(EXAMPLES.rglob("*.yaml"))

REQUIRED = [
    "tiny-cpu.yaml",
    "gpt2-124m-1x8.yaml",
    "llama-7b-2x8-zero3.yaml",
    "llama-7b-offload-1x1.yaml",
    "llama-70b-pipeline-slurm.yaml",
]


def test_the_promised_examples_exist():
    names = {p.name for p in SPECS}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_compiles_and_deepspeed_accepts_it(path: Path):
    spec = load_spec(path)
    resolved, plan, cfg = compile_resolved(spec, spec.world_size)
    assert cfg["train_batch_size"] == plan.micro_batch_size * plan.grad_accum * plan.data_parallel_size
    validate_config(cfg, plan.data_parallel_size, deep=True)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_has_a_header_comment(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and len(first) > 20


def test_examples_say_what_they_promise():
    def load(name: str):
        return load_spec(EXAMPLES / name)

    gpt2 = load("gpt2-124m-1x8.yaml")
    assert (gpt2.model.preset, gpt2.world_size, gpt2.parallel.zero_stage) == ("gpt2-124m", 8, 1)
    zero3 = load("llama-7b-2x8-zero3.yaml")
    assert (zero3.launch.nodes, zero3.launch.gpus_per_node, zero3.parallel.zero_stage) == (2, 8, 3)
    offload = load("llama-7b-offload-1x1.yaml")
    assert offload.world_size == 1 and offload.parallel.offload_optimizer == "cpu"
    assert offload.parallel.zero_stage in (2, 3) and offload.model.gradient_checkpointing
    big = load("llama-70b-pipeline-slurm.yaml")
    assert (big.launch.nodes, big.launch.gpus_per_node, big.launch.launcher) == (8, 8, "slurm")
    assert big.parallel.pipeline_stages > 1 and big.parallel.zero_stage == 1
    slurm = big.launch.slurm
    assert slurm.partition and slurm.time and slurm.account and slurm.cpus_per_task
