"""Helpers for the end-to-end training tests: tiny specs, launches through the real launcher, results.

Every launch gets a fresh rendezvous port (other suites launch side by side). A run counts as good only
when the launcher exits 0 AND rank 0's status.json says "complete" (a rank can die after training with
the launcher still exiting 0; see shared/notes/deepspeed-pitfalls.md).

Tokenizing the default corpus costs about half a minute; conftest points ``$HARNESS_DATA_CACHE`` (which
every launch inherits) at one cache per machine, like the DeepSpeed JIT cache. The cache key covers every
input (corpus fingerprint, tokenizer, seq_len, seed, library versions).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, free_port, harness_cmd

from harness.dsconfig import deep_merge

WORKERS = Path(__file__).resolve().parent / "workers"

FULL_MATRIX = os.environ.get("HARNESS_FULL_MATRIX") == "1"
"""Run every slow combination (opt-in); by default a covering subset, to keep the suite within minutes."""
FULL_MATRIX_REASON = "slow extra combination: set HARNESS_FULL_MATRIX=1"

LAUNCH_TIMEOUT_S = 900
"""One launch on a busy 2-core box can take minutes (imports alone are ~2 s per rank when quiet)."""

SEQ_LEN = 64

TINY_MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "preset": "llama-tiny",
        "overrides": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "vocab_size": 1024,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "gpt2": {
        "preset": "gpt2-tiny",
        "overrides": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1024},
    },
}
"""Tiny members of both families; equal vocab_size and seq_len, so they share one tokenized dataset."""

GPT2_DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def output_dir(base: Path) -> Path:
    """``base/runs``, the ``run.output_dir`` of a test's runs."""
    out = Path(base) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    return out


def spec_dict(
    name: str,
    out_dir: Path,
    *,
    model: str = "llama",
    zero_stage: int = 1,
    dtype: str = "fp32",
    steps: int = 8,
    micro_batch_size: int = 4,
    grad_accum: int = 1,
    ranks: int = 2,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A tiny CPU run spec (as a dict): constant lr 3e-3, log every step, no periodic eval or save."""
    spec: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(out_dir)},
        "model": copy.deepcopy(TINY_MODELS[model]),
        "data": {"dataset": "default", "seq_len": SEQ_LEN, "val_fraction": 0.01},
        "batch": {"micro_batch_size": micro_batch_size, "grad_accum": grad_accum},
        "parallel": {"zero_stage": zero_stage},
        "precision": dtype,
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "train": {"steps": steps, "log_every": 1, "eval_every": 0, "eval_batches": 2, "save_every": 0},
        "checkpoint": {"keep_last": 2, "resume": "auto", "export_hf": False},
        "launch": {"launcher": "local", "nodes": 1, "gpus_per_node": ranks, "gpu": "cpu"},
    }
    return deep_merge(spec, extra or {})


def write_spec(tmp_path: Path, name: str, **kwargs: Any) -> tuple[Path, Path]:
    """Write a tiny spec (see :func:`spec_dict`) to ``tmp_path/<name>.yaml``; returns (spec path, run dir)."""
    out = output_dir(tmp_path)
    spec = spec_dict(name, out, **kwargs)
    path = Path(tmp_path) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path, out / name


def checkout_env() -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH: the CLI, the launcher's ranks and the
    workers import the harness under test, whichever checkout ``pip install -e`` last pointed at."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_harness(*args: str, cwd: Path | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` of this checkout (captured text output)."""
    return subprocess.run(
        harness_cmd(*args),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=checkout_env(),
    )


def train(spec_path: Path, *sets: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``harness train SPEC --set launch.master_port=<free> SETS...`` through the real deepspeed launcher."""
    return run_harness(
        "train",
        str(spec_path),
        "--set",
        f"launch.master_port={free_port()}",
        *sets,
        cwd=cwd or Path(spec_path).parent,
        timeout_s=LAUNCH_TIMEOUT_S,
    )


def assert_complete(proc: subprocess.CompletedProcess, run_dir: Path, step: int | None = None) -> None:
    """Exit code 0 and rank 0's status.json ``complete`` (at ``step`` when given)."""
    detail = f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"harness train exited {proc.returncode}{detail}"
    status = read_status(run_dir)
    assert status is not None and status.get("state") == "complete", f"status.json: {status}{detail}"
    if step is not None:
        assert status["step"] == step, f"status.json: {status}"


def train_ok(
    spec_path: Path, run_dir: Path, *sets: str, step: int | None = None
) -> subprocess.CompletedProcess:
    """:func:`train`, then :func:`assert_complete`."""
    proc = train(spec_path, *sets)
    assert_complete(proc, run_dir, step)
    return proc


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """status.json of a run, or None."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl, in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step (a resumed run appends; the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def launch_worker(
    script: Path, *args: str, ranks: int = 2, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --master_port <free> SCRIPT ARGS`` (for tests/workers/*.py)."""
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        str(script),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=checkout_env()
    )


def prepare(spec_path: Path, *sets: str) -> Path:
    """Write the run directory of ``spec_path`` (spec.yaml, ds_config.json) as ``harness train`` does."""
    from harness.rundir import prepare_run_dir
    from harness.specload import load_spec

    spec = load_spec(spec_path, list(sets))
    files, _, _ = prepare_run_dir(spec, spec.world_size)
    return files.run_dir


def output_of(proc: subprocess.CompletedProcess) -> str:
    """stdout and stderr tails, for assertion messages."""
    return f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
