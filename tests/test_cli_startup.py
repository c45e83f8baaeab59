"""The planning commands import no torch, deepspeed or transformers (they run on login nodes).

Asserted on ``python -X importtime`` output, not on time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

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
