"""Helpers for the pipeline and tensor-parallel tests: tiny specs, launches, losses, refusals.

Every launch goes through the real deepspeed launcher (``harness train`` or a worker under
``tests/workers``) with a fresh rendezvous port, and counts only when the launcher exits 0 AND rank 0's
status.json says "complete". One launch per layout; the equivalence tests compare the ``loss`` records
of metrics.jsonl (``train.log_every: 1``) of runs that see the same samples in every step.

Tokenized data goes to the one cache conftest points ``$HARNESS_DATA_CACHE`` at, so the default corpus is
tokenized once per machine, not per test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, free_port, harness_cmd

from harness.dsconfig import deep_merge

WORKERS = Path(__file__).resolve().parent / "workers"
LAUNCH_TIMEOUT_S = 900
"""A launch on a busy 2-core box can take minutes (10-25 s when it is quiet)."""

VOCAB = 1024
SEQ_LEN = 64
RTOL = 1e-5
"""The equivalence tolerance (relative) of the done-when list; most layouts agree bitwise."""

TINY: dict[str, dict[str, Any]] = {
    "llama": {
        "preset": "llama-tiny",
        "overrides": {
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
        },
    },
    "gpt2": {
        "preset": "gpt2-tiny",
        # Dropout off: stages draw from different RNG streams than one process does.
        "overrides": {
            "n_layer": 4,
            "n_embd": 64,
            "n_head": 4,
            "vocab_size": VOCAB,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    },  # fmt: skip
}


def write_spec(base: Path, name: str, *, model: str | dict[str, Any] = "llama", ranks: int = 1,
               steps: int = 5, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """A tiny fp32 spec with a torch AdamW (bit-exact), constant lr, logged every step; (spec path, run dir)."""
    out = Path(base) / "runs"
    spec: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(out)},
        "model": copy.deepcopy(TINY[model]) if isinstance(model, str) else copy.deepcopy(model),
        "data": {"dataset": "default", "seq_len": SEQ_LEN, "val_fraction": 0.01},
        "batch": {"micro_batch_size": 2, "grad_accum": 2},
        "parallel": {"zero_stage": 0},
        "precision": "fp32",
        "optimizer": {"impl": "torch", "lr": 3.0e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "train": {"steps": steps, "log_every": 1, "eval_every": 0, "eval_batches": 2, "save_every": 0},
        "checkpoint": {"keep_last": 2, "resume": "auto", "export_hf": False},
        "launch": {"launcher": "local", "nodes": 1, "gpus_per_node": ranks, "gpu": "cpu"},
    }
    spec = deep_merge(spec, extra or {})
    path = Path(base) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path, out / name


def harness(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` of this checkout, output captured."""
    return subprocess.run(harness_cmd(*args), cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)  # fmt: skip


def output_of(proc: subprocess.CompletedProcess) -> str:
    """stdout and stderr tails, for assertion messages."""
    return f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"


def train(spec_path: Path, run_dir: Path, *sets: str) -> Path:
    """``harness train SPEC`` on a free port; asserts exit 0 and a complete status. Returns the run dir."""
    proc = harness("train", str(spec_path), "--set", f"launch.master_port={free_port()}", *sets,
                   cwd=Path(spec_path).parent)  # fmt: skip
    assert_complete(proc, run_dir)
    return run_dir


def assert_complete(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    """Exit code 0 and rank 0's status.json ``complete``."""
    assert proc.returncode == 0, f"exit {proc.returncode}{output_of(proc)}"
    status_file = Path(run_dir) / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else None
    assert status and status.get("state") == "complete", f"status.json: {status}{output_of(proc)}"


def launch_worker(script: str, *args: str, ranks: int) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --master_port <free> tests/workers/SCRIPT ARGS``."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--no_local_rank",
           str(WORKERS / script), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def prepare(spec_path: Path) -> Path:
    """Write the run directory as ``harness train`` does before it launches; returns it."""
    from harness.rundir import prepare_run_dir
    from harness.specload import load_spec

    spec = load_spec(spec_path)
    files, _, _ = prepare_run_dir(spec, spec.world_size)
    return files.run_dir


def train_worker(spec_path: Path, run_dir: Path, out: Path, ranks: int) -> dict[str, Any]:
    """Train through ``workers/pp_train_logits.py``; returns its record (logits before and after)."""
    import torch

    prepare(spec_path)
    proc = launch_worker("pp_train_logits.py", "--run-dir", str(run_dir), "--out", str(out),
                         "--vocab-size", str(VOCAB), ranks=ranks)  # fmt: skip
    assert_complete(proc, run_dir)
    return torch.load(out, weights_only=True)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from metrics.jsonl (a resumed run's records replace earlier ones)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_losses(
    got: dict[int, float], want: dict[int, float], steps: range, rtol: float = RTOL
) -> None:
    """Losses of ``steps`` equal within ``rtol`` relative (the message shows both trajectories)."""
    assert all(s in got and s in want for s in steps), f"missing steps: got {got}, want {want}"
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= rtol, f"relative loss difference {worst:.3g} > {rtol}\n got  {got}\n want {want}"


def assert_refused(spec_path: Path, run_dir: Path, *sets: str, expect: str) -> None:
    """``harness train`` exits 2 with ``expect`` in its message, before writing the run dir or launching."""
    proc = harness("train", str(spec_path), "--set", *sets, cwd=Path(spec_path).parent)
    assert proc.returncode == 2, f"exit {proc.returncode}{output_of(proc)}"
    assert expect in proc.stderr, output_of(proc)
    assert "Traceback" not in proc.stderr, output_of(proc)
    assert "launch of" not in proc.stderr, output_of(proc)  # cmd_train says this just before it launches
    assert not Path(run_dir).exists(), f"{run_dir} was created"
