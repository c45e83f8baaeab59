"""docs/spec.md is generated from harness/spec.py and kept up to date."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from conftest import ROOT

from harness.spec import SECTION_TYPES, RunSpec, SlurmSection


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_spec_docs", ROOT / "scripts" / "gen_spec_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def test_docs_are_up_to_date():
    current = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    assert current == gen.render(gen.SPEC_SOURCE.read_text(encoding="utf-8")), (
        "run: python scripts/gen_spec_docs.py"
    )


def test_docs_cover_every_field():
    doc = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    for name in (f.name for f in dataclasses.fields(RunSpec)):
        assert f"## {name}\n" in doc
    for cls in [*SECTION_TYPES.values(), SlurmSection]:
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in doc, f"{cls.__name__}.{f.name}"
    assert "## launch.slurm\n" in doc


def test_a_field_without_docstring_is_refused():
    source = "class A:\n    x: int = 1\n    y: int = 2\n    '''Why y.'''\n"
    with pytest.raises(ValueError, match="A.x has no docstring"):
        gen.parse_classes(source)


def test_types_and_defaults_read_as_yaml():
    fields = {
        f.name: f for f in gen.parse_classes((ROOT / "harness" / "spec.py").read_text())["ParallelSection"]
    }
    assert fields["zero_stage"].type == "integer or 'auto'" and fields["zero_stage"].default == "`1`"
    assert fields["offload_optimizer"].type == "'none' or 'cpu' or 'nvme'"
    assert fields["nvme_path"].default == "`null`"
