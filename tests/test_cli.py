"""harness.cli: --set groups, `harness show` and `harness config`, and what the planning commands import.

The planning commands import no torch, deepspeed or transformers (they run on login nodes); asserted on
``python -X importtime`` output, not on time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT

from harness.cli import main, set_groups_last
from harness.compiler import compile_config
from harness.specload import load_spec

HEAVY = ("torch", "deepspeed", "transformers")


def imported_modules(*args: str) -> set[str]:
    """Top-level names of every module imported by ``python -m harness ARGS``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "harness", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    assert "harness" in names  # the parse found the importtime lines
    return names


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("show", "examples/tiny-cpu.yaml"),
        ("config", "examples/tiny-cpu.yaml"),
        ("config", "examples/llama-70b-pipeline-slurm.yaml", "--world-size", "64"),
        ("presets",),
    ],
    ids=lambda a: " ".join(a),
)
def test_planning_commands_import_nothing_heavy(args):
    assert not imported_modules(*args) & set(HEAVY)


def test_validate_does_import_deepspeed():
    # The check above would pass vacuously if importtime lines were not parsed.
    assert "deepspeed" in imported_modules("config", "examples/tiny-cpu.yaml", "--validate")


def test_cli_set_is_repeatable_and_multi(tmp_path, capsys):
    assert main(["show", str(EXAMPLES / "tiny-cpu.yaml"), "--set", "train.steps=30", "batch.grad_accum=2",
                 "--set", "launch.gpus_per_node=4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "steps: 30" in out and "grad_accum: 2" in out and "world_size: 4" in out


def test_cli_set_before_the_spec_path_does_not_swallow_it(capsys):
    tiny = str(EXAMPLES / "tiny-cpu.yaml")
    assert main(["show", "--set", "train.steps=30", "batch.grad_accum=2", tiny, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "steps: 30" in out and "grad_accum: 2" in out and "world_size: 4" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["show", "--set", "a=1", "b=2", "s.yaml"], ["show", "s.yaml", "--set", "a=1", "b=2"]),
        (["train", "--set", "a=1", "s.yaml", "--set", "c=[1, 2]", "--dry-run"],
         ["train", "s.yaml", "--dry-run", "--set", "a=1", "--set", "c=[1, 2]"]),
        (["show", "s.yaml", "--set", "a=1"], ["show", "s.yaml", "--set", "a=1"]),
        (["show", "--set", "a", "s.yaml"], ["show", "--set", "a", "s.yaml"]),  # argparse reports it
        (["show", "--", "--set", "a=1"], ["show", "--", "--set", "a=1"]),
    ],
)  # fmt: skip
def test_set_groups_move_to_the_end(argv, expected):
    assert set_groups_last(argv) == expected


def test_show_prints_the_derived_numbers(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {preset: llama-tiny}\ndata: {seq_len: 128}\nbatch: {global_batch_tokens: 24576, micro_batch_size: 4}\n"
        "parallel: {pipeline_stages: 2}\ntrain: {steps: 10}\nlaunch: {nodes: 2, gpus_per_node: 6}\n"
    )
    assert main(["show", str(spec)]) == 0
    out = capsys.readouterr().out
    derived = dict(line.split(": ", 1) for line in out.split("# derived\n", 1)[1].splitlines())
    assert derived == {
        "world_size": "12",
        "data_parallel_size": "6",  # 12 ranks / 2 stages
        "pipeline_stages": "2",
        "tensor_parallel": "1",
        "micro_batch_size": "4",
        "grad_accum": "8",  # 24576 tokens / 128 = 192 samples = 4 × 8 × 6
        "global_batch_samples": "192",
        "global_batch_tokens": "24576",
        "tokens_per_step": "24576",
        "total_tokens": "245760",
    }
    # The resolved spec above the derived numbers loads back to the same spec.
    assert load_spec(text=out.split("# derived\n", 1)[0]) == load_spec(spec)


def test_show_world_size_flag(capsys):
    assert main(["show", str(EXAMPLES / "tiny-cpu.yaml"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert (
        "data_parallel_size: 8" in out
        and "global_batch_samples: 32" in out
        and "tokens_per_step: 8192" in out
    )


def test_config_writes_json_file(tmp_path, capsys):
    import json

    out = tmp_path / "sub" / "ds.json"
    assert main(["config", str(EXAMPLES / "tiny-cpu.yaml"), "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    cfg = json.loads(out.read_text())
    assert cfg == compile_config(load_spec(EXAMPLES / "tiny-cpu.yaml"), 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.json"]
