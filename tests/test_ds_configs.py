"""ds_configs/ is exactly what scripts/gen_ds_configs.py makes from examples/ds_configs/, and DeepSpeed accepts it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT

from harness.dscheck import KNOWN_TOP_LEVEL_KEYS, probe_top_level_keys, validate_config
from harness.parallel_dims import data_parallel_size
from harness.specload import load_spec


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_ds_configs", ROOT / "scripts" / "gen_ds_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
TARGETS = gen.targets()
REQUIRED = ["zero0", "zero1", "zero2", "zero2-offload", "zero3", "zero3-offload-cpu", "zero3-offload-nvme",
            "pipeline", "autotp"]  # fmt: skip


def test_every_required_config_has_bf16_and_fp16():
    names = {t.name for t in TARGETS}
    for base in REQUIRED:
        assert {f"{base}-bf16", f"{base}-fp16"} <= names


def test_regenerating_gives_the_committed_files():
    problems = gen.differences(gen.expected_files())
    assert problems == [], "run: python scripts/gen_ds_configs.py\n" + "\n".join(problems)


def test_check_mode_reports_a_stale_file(tmp_path):
    expected = {"a.json": "{}\n", "README.md": "x\n"}
    (tmp_path / "a.json").write_text("{}\n")
    (tmp_path / "old.json").write_text("{}\n")
    assert gen.differences(expected, tmp_path) == [
        "missing: ds_configs/README.md",
        "stale (no source spec): ds_configs/old.json",
    ]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_deepspeed_accepts_the_config(target):
    cfg = json.loads((ROOT / "ds_configs" / target.filename).read_text(encoding="utf-8"))
    overrides = [o for o in target.overrides if o != "--set"]
    dp = data_parallel_size(load_spec(target.spec, overrides), target.world_size)
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * dp
    )
    validate_config(cfg, dp, deep=True)
    precision = "fp16" if target.name.endswith("-fp16") else "bf16"
    assert cfg[precision]["enabled"] is True


def test_readme_lists_every_config_and_its_source():
    readme = (ROOT / "ds_configs" / "README.md").read_text(encoding="utf-8")
    for target in TARGETS:
        assert target.filename in readme
        assert target.spec.relative_to(ROOT).as_posix() in readme


def test_known_top_level_keys_track_the_installed_deepspeed():
    assert probe_top_level_keys() == KNOWN_TOP_LEVEL_KEYS
