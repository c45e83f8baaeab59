"""Streaming export: the shard writer and ``--max-shard-size`` as pure functions and through the CLI,
and the export's peak host memory on a ~68M-parameter checkpoint (a real 2-rank ZeRO-1 launch).

The exported weights themselves (logits equal to the trained engine's, one file or many) are checked
in tests/test_train_export.py, on the checkpoints that file trains.
"""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import helpers as h
import pytest
import torch
from safetensors import safe_open

from harness.errors import SpecError
from harness.train.export_writer import (
    DEFAULT_MAX_SHARD_SIZE,
    Entry,
    FlatPieces,
    ShardWriter,
    parse_shard_size,
    plan_shards,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [("150MB", 150 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("4096", 4096), ("10kb", 10_000),
     ("7 MiB", 7 * 2**20), (123, 123)],
)  # fmt: skip
def test_shard_size_parses_like_save_pretrained(text, size):
    assert parse_shard_size(text) == size


@pytest.mark.parametrize("text", ["12XB", "0", "-1GB", "", "GB", "1.2.3MB", "0.1B", 0])
def test_bad_shard_size_names_the_option(text):
    with pytest.raises(SpecError) as err:
        parse_shard_size(text)
    assert err.value.field == "--max-shard-size" and "Fix: give a" in err.value.message


def test_default_shard_size_is_transformers_default():
    from transformers import PreTrainedModel

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert default == DEFAULT_MAX_SHARD_SIZE
    from harness.cli import build_parser

    args = build_parser().parse_args(["export", "runs/x", "-o", "hf"])
    assert args.max_shard_size == default


@pytest.mark.parametrize("value", ["12XB", "0"])
def test_cli_refuses_a_bad_shard_size_before_reading_anything(tmp_path, capsys, value):
    from harness.cli import main

    out = tmp_path / "hf"
    # The source does not exist either: the size is the first thing checked, and the only error shown.
    assert main(["export", str(tmp_path / "missing"), "-o", str(out), "--max-shard-size", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"harness: error: --max-shard-size = '{value}': "), err
    assert "Fix: give a" in err and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plan_cuts_greedily_and_gives_a_big_tensor_its_own_shard():
    e = [Entry(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(e, 80)  # 80 bytes = 20 floats
    assert [[x.name for x in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards(e, 10**9) == [e]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "a.bias": torch.randn(32, generator=g),
        "big": torch.randn(300, 20, generator=g),  # bigger than the limit below: a shard of its own
        "half": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "ids": torch.arange(17),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }


def _read_shard(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict


def test_writer_shards_load_with_safetensors_in_any_arrival_order(tmp_path):
    tensors = _tensors()
    entries = [Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    limit = 10_000
    writer = ShardWriter(tmp_path, entries, limit)
    order = list(tensors)
    random.Random(1).shuffle(order)
    for name in order:
        value = tensors[name]
        if name == "a.weight":  # given as consecutive pieces of its data, as the ZeRO reader does
            value = FlatPieces(value.shape, list(value.reshape(-1).split(500)))
        writer.write(name, value)
    files = writer.finish(total_parameters=sum(v.numel() for v in tensors.values()))

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert [p.name for p in files] == [
        f"model-0000{i}-of-0000{len(files)}.safetensors" for i in range(1, len(files) + 1)
    ]
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    seen = {}
    for path in files:
        metadata, loaded = _read_shard(path)
        assert metadata == {"format": "pt"}
        assert all(index["weight_map"][k] == path.name for k in loaded)
        size = sum(v.numel() * v.element_size() for v in loaded.values())
        assert size <= limit or len(loaded) == 1, (path.name, size)
        seen.update(loaded)
    assert set(seen) == set(tensors)
    for name, value in tensors.items():
        assert seen[name].dtype == value.dtype and torch.equal(seen[name], value), name


def test_writer_one_shard_is_model_safetensors_without_index(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, [Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 10**9)
    for name, value in tensors.items():
        writer.write(name, value)
    writer.finish(total_parameters=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    _, loaded = _read_shard(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_writer_refuses_a_missing_repeated_or_misshapen_tensor(tmp_path):
    entries = [Entry("a", (2, 3), torch.float32), Entry("b", (4,), torch.float32)]
    writer = ShardWriter(tmp_path, entries, 10**9)
    with pytest.raises(RuntimeError, match=r"a has shape \(3, 2\), the model's is \(2, 3\)"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="a was given twice"):
        writer.write("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"no weights for \['b'\]"):
        writer.finish(total_parameters=10)
    writer.close()


# ---------------------------------------------------------------- peak memory of a real export

_PEAK = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import deepspeed  # everything the export imports, so the baseline holds it
from deepspeed.checkpoint import affine, constants
from transformers import AutoTokenizer, GenerationConfig
from harness.train import export, export_sources, export_writer, export_zero, mp_shards, tensor_parallel
from harness.train.model import param_groups

tag = export.resolve_checkpoint(Path(sys.argv[1]))
entries, _ = export.planned_entries(export.meta_model(tag))
fp32_bytes = sum(e.num_bytes for e in entries)
largest = max(e.num_bytes for e in entries)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the peak from here on
base = status("VmRSS")
export.export_checkpoint(tag, Path(sys.argv[2]), max_shard_size=fp32_bytes // 8)
print(json.dumps({"fp32_bytes": fp32_bytes, "largest": largest, "above_base": status("VmHWM") - base}))
"""

_MEM_MODEL = {"preset": "llama-tiny", "overrides": {
    "num_hidden_layers": 6, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
    "num_key_value_heads": 12, "vocab_size": 16384}}  # fmt: skip
"""68M parameters (270 MB in fp32); its largest tensors (embedding, head) are 19% of it each."""


@pytest.mark.dist
@pytest.mark.timeout(600)  # one 2-rank launch of a 68M model (about 70 s quiet) and an export
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS reset")
def test_export_peak_memory_is_a_fraction_of_the_model(tmp_path):
    spec, run_dir = h.write_spec(tmp_path, "mem-zero1", model=_MEM_MODEL, zero_stage=1, steps=1,
                                 micro_batch_size=1)  # fmt: skip
    h.train_ok(spec, run_dir, step=1)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(run_dir), str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300, env=h.checkout_env(),
    )  # fmt: skip
    assert proc.returncode == 0, h.output_of(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fp32_bytes"] > 250e6
    # The whole state dict at once would be >= 1.0 (the old export peaked at 3.07 here); one eighth-model
    # shard, one 19% tensor and some slack stay under one half. Measured 0.26.
    ratio = got["above_base"] / got["fp32_bytes"]
    assert ratio <= 0.5, f"export peaked at {ratio:.2f} x the model's fp32 bytes above its baseline"
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) >= 8
