"""harness.specload: --set parsing and applying, and the spec's YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES
from helpers import sections_spec

from harness.specload import dump_spec, load_spec, parse_overrides


def test_set_several_pairs_in_one():
    assert parse_overrides(["train.steps=10 optimizer.lr=1e-4"]) == [
        ("train.steps", 10),
        ("optimizer.lr", 1e-4),
    ]


def test_set_repeated():
    assert parse_overrides(["train.steps=10", "run.name=x"]) == [("train.steps", 10), ("run.name", "x")]


def test_set_yaml_scalar_typing():
    pairs = dict(
        parse_overrides(["a.int=3 a.float=0.5 a.exp=3e-4 a.bool=true a.null=null a.str=hello a.q='7'"])
    )
    assert pairs == {"a.int": 3, "a.float": 0.5, "a.exp": 3e-4, "a.bool": True, "a.null": None, "a.str": "hello",
                     "a.q": "7"}  # fmt: skip
    assert type(pairs["a.int"]) is int and type(pairs["a.exp"]) is float


def test_set_list_values():
    assert parse_overrides(["optimizer.betas=[0.9, 0.99] train.steps=4"]) == [
        ("optimizer.betas", [0.9, 0.99]),
        ("train.steps", 4),
    ]
    assert parse_overrides(["data.files=[a.txt,b.txt]"]) == [("data.files", ["a.txt", "b.txt"])]


def test_set_value_keeps_equals_signs():
    assert parse_overrides(["run.name=a=b"]) == [("run.name", "a=b")]


def test_set_applies_to_the_spec():
    spec = load_spec(
        EXAMPLES / "tiny-cpu.yaml", ["train.steps=7 optimizer.betas=[0.8, 0.9]", "precision.dtype=fp16"]
    )
    assert spec.train.steps == 7 and spec.optimizer.betas == [0.8, 0.9] and spec.precision.dtype == "fp16"
    spec = load_spec(EXAMPLES / "tiny-cpu.yaml", ["deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert spec.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.relative_to(EXAMPLES).as_posix()
)
def test_dump_spec_round_trip(path: Path):
    spec = load_spec(path)
    assert load_spec(text=dump_spec(spec)) == spec


def test_dump_spec_round_trip_odd_values():
    spec = sections_spec(run={"name": "2024-01-01"}, optimizer={"lr": 1e-5}, deepspeed={"wall_clock_breakdown": True},
                   launch={"slurm": {"time": "1:00:00", "extra": ["--exclusive"]}})  # fmt: skip
    again = load_spec(text=dump_spec(spec))
    assert again == spec and again.run.name == "2024-01-01"
