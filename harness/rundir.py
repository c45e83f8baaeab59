"""The run directory: what a launch writes before any rank starts, and where ranks find it.

<output_dir>/<name>/
    spec.yaml            resolved run spec (every auto resolved, world size fixed)
    ds_config.json       the DeepSpeed config compiled from it
    launch/              launcher files (hostfile, env file, sbatch script)
    checkpoints/<tag>/   DeepSpeed shards + harness per-rank state + COMPLETE marker
    metrics.jsonl        one JSON object per logged step / evaluation
    tb/                  TensorBoard scalars
    status.json          rank 0's last word: {"state": "complete" | "preempted" | "failed", "step": N}
    hf/                  HF export (checkpoint.export_hf)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.spec import RunSpec

SPEC_FILE = "spec.yaml"
DS_CONFIG_FILE = "ds_config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
WORLD_FILE = "world.json"


@dataclass(frozen=True)
class RunFiles:
    """Paths of a prepared run directory."""

    run_dir: Path
    spec_path: Path
    ds_config_path: Path


def run_dir_of(spec: RunSpec) -> Path:
    """``output_dir/name`` as an absolute path (ranks may start in another working directory)."""
    return (Path(spec.run.output_dir) / spec.run.name).resolve()


def prepare_run_dir(
    spec: RunSpec, world_size: int | None = None, dry_run: bool = False
) -> tuple[RunFiles, dict[str, Any], str]:
    """Resolve and compile the spec for ``world_size`` ranks and write spec.yaml + ds_config.json.

    Returns the paths, the DeepSpeed config and the resolved spec's YAML. With ``dry_run`` nothing
    is written. Raises SpecError before writing anything if the spec is invalid.
    """
    from harness.compiler import compile_resolved
    from harness.dscheck import validate_config
    from harness.specload import dump_spec

    world = world_size or spec.world_size
    resolved, plan, cfg = compile_resolved(spec, world)
    validate_config(cfg, plan.data_parallel_size, deep=bool(resolved.deepspeed))
    spec_text = dump_spec(resolved)
    run_dir = run_dir_of(resolved)
    files = RunFiles(run_dir, run_dir / SPEC_FILE, run_dir / DS_CONFIG_FILE)
    if not dry_run:
        (run_dir / "launch").mkdir(parents=True, exist_ok=True)
        write_atomic(files.spec_path, spec_text)
        write_atomic(files.ds_config_path, json.dumps(cfg, indent=2) + "\n")
        write_atomic(run_dir / WORLD_FILE, json.dumps({"world_size": world}) + "\n")
    return files, cfg, spec_text


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """rank 0's status.json, or None if the run never finished writing one."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_status(run_dir: Path, state: str, step: int, **extra: Any) -> None:
    """Record how the run ended (rank 0 only)."""
    write_atomic(Path(run_dir) / STATUS_FILE, json.dumps({"state": state, "step": step, **extra}) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
