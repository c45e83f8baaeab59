"""What every verb that takes a spec shares: reading the spec and the world size from the command line.

A neutral module below :mod:`harness.cli` and the sub-CLIs (:mod:`harness.planner.cli`,
:mod:`harness.launch.cli`), so none of them imports another. Import-light: no torch.
"""

from __future__ import annotations

import argparse

from harness.errors import SpecError
from harness.spec import RunSpec


def load_from_args(args: argparse.Namespace) -> RunSpec:
    """Load the spec named on the command line with its ``--set`` overrides."""
    from harness.specload import load_spec

    return load_spec(args.spec, args.overrides)


def world_from_args(args: argparse.Namespace, spec: RunSpec) -> int:
    """``--world-size`` if given, else the spec's launch section."""
    world = getattr(args, "world_size", None)
    if world is not None and world < 1:
        raise SpecError("--world-size", world, "use a positive number of ranks")
    return world or spec.world_size
