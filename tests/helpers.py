"""The one helper module of the suite: tiny run specs, the CLI in a subprocess, launches and their results.

Specs. :func:`spec_dict` / :func:`write_spec` build a tiny CPU run spec (2-layer model, fp32, DeepSpeed
AdamW, 2 ranks, constant lr, every step logged); :func:`write_parallel_spec` is the same spec with the
defaults the pipeline and tensor-parallel equivalence tests need (4 layers, dropout off, torch AdamW for
bit-exact losses, 1 rank). :func:`example_spec` loads ``examples/tiny-cpu.yaml`` with ``--set`` overrides,
:func:`sections_spec` builds a llama-tiny spec from plain section dicts.

Commands. :func:`run_harness` runs ``python -m harness`` of this checkout; :func:`train` adds a free
rendezvous port (tests launch side by side); :func:`launch_worker` starts a script of ``tests/workers``
under the deepspeed launcher.

Verdicts. A run counts as good only when the launcher exits 0 AND rank 0's status.json says
``complete`` (:func:`assert_complete`). The exit code alone is not enough: DeepSpeed's ``deepspeed``
runner passes on only a positive return code of its per-node launcher, so a launcher killed by a signal
makes it exit 0, and a rank that leaves without destroying its process group can die (SIGABRT) after the
last step, so an exit code can hide a run that did not finish.

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
from conftest import EXAMPLES, ROOT, free_port, harness_cmd

from harness.dsconfig import deep_merge

WORKERS = Path(__file__).resolve().parent / "workers"
"""Scripts that tests start under the deepspeed launcher or as fakes of srun, scontrol and the launcher."""

TINY_SPEC = str(EXAMPLES / "tiny-cpu.yaml")
"""The shipped 2-rank CPU example most CLI tests start from."""

FULL_MATRIX = os.environ.get("HARNESS_FULL_MATRIX") == "1"
"""Run every slow combination (opt-in); by default a covering subset, to keep the suite within minutes."""
FULL_MATRIX_REASON = "slow extra combination: set HARNESS_FULL_MATRIX=1"

LAUNCH_TIMEOUT_S = 900
"""One launch on a busy 2-core box can take minutes (10-25 s when it is quiet, ~2 s of it imports)."""
CLI_TIMEOUT_S = 300
"""A CLI command that launches nothing (about a second when quiet)."""

SEQ_LEN = 64
VOCAB = 1024
RTOL = 1e-5
"""The equivalence tolerance (relative) of the layout tests; most layouts agree bitwise."""

_TINY_SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # family: (preset, the overrides key of its layer count, the rest of its shape)
    "llama": (
        "llama-tiny",
        "num_hidden_layers",
        {"hidden_size": 64, "intermediate_size": 128, "vocab_size": VOCAB, "num_attention_heads": 4,
         "num_key_value_heads": 2},
    ),
    "gpt2": ("gpt2-tiny", "n_layer", {"n_embd": 64, "n_head": 4, "vocab_size": VOCAB}),
}  # fmt: skip

GPT2_DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

# Test text with shell metacharacters: it must arrive byte for byte or be refused, never run (PWNED).
SECRET = "hf_SECRET_abc123_$(touch PWNED)"
INJECTIONS = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "a; touch PWNED",
    'it\'s "quoted"',
    "a && touch PWNED #",
    "${IFS}touch${IFS}PWNED",
    "|touch PWNED",
]
CONTROL = ["a\nb", "a\rb", "a\x00b", "a\tb", "a\x1bb", "line\n#SBATCH --wrap=touch PWNED"]
PY = "/opt/venv/bin/python"
"""An interpreter path the pure launch builders write into commands (never run)."""


# ------------------------------------------------------------------------------------------------ specs


def tiny_model(family: str = "llama", num_layers: int = 2, **overrides: Any) -> dict[str, Any]:
    """The ``model:`` section of a tiny member of ``family`` (llama or gpt2): hidden 64, 4 heads, vocab
    1024, ``num_layers`` layers; both families share one tokenized dataset."""
    preset, layers_key, shape = _TINY_SHAPES[family]
    return {"preset": preset, "overrides": {layers_key: num_layers, **shape, **overrides}}


def output_dir(base: Path) -> Path:
    """``base/runs``, the ``run.output_dir`` of a test's runs."""
    out = Path(base) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    return out


def spec_dict(
    name: str,
    out_dir: Path,
    *,
    model: str | dict[str, Any] = "llama",
    zero_stage: int = 1,
    dtype: str = "fp32",
    steps: int = 8,
    micro_batch_size: int = 4,
    grad_accum: int = 1,
    ranks: int = 2,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A tiny CPU run spec (as a dict): constant lr 3e-3, log every step, no periodic eval or save.

    ``model`` is a family for :func:`tiny_model` or a whole ``model:`` section; ``extra`` is merged last.
    """
    spec: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(out_dir)},
        "model": tiny_model(model) if isinstance(model, str) else copy.deepcopy(model),
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


def write_parallel_spec(
    base: Path,
    name: str,
    *,
    model: str | dict[str, Any] = "llama",
    ranks: int = 1,
    steps: int = 5,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """:func:`write_spec` for the layout equivalence tests: 4 layers (dropout off: pipeline stages draw
    from other RNG streams than one process does), ZeRO 0, micro batch 2 × accumulation 2, and a torch
    AdamW with weight decay 0.1 (bit-exact across layouts). Returns (spec path, run dir)."""
    if isinstance(model, str):
        model = tiny_model(model, 4, **(GPT2_NO_DROPOUT if model == "gpt2" else {}))
    optimizer = {"optimizer": {"impl": "torch", "weight_decay": 0.1}}
    return write_spec(base, name, model=model, zero_stage=0, steps=steps, micro_batch_size=2, grad_accum=2,
                      ranks=ranks, extra=deep_merge(optimizer, extra or {}))  # fmt: skip


def example_spec(*overrides: str, base: str = TINY_SPEC):
    """The RunSpec of ``base`` (default examples/tiny-cpu.yaml) with ``--set`` style ``overrides``."""
    from harness.specload import load_spec

    return load_spec(base, list(overrides))


def sections_spec(**sections: Any):
    """A spec on llama-tiny with the given sections (plain dicts, as YAML would give)."""
    from harness.specload import spec_from_dict

    data: dict[str, Any] = {"model": {"preset": "llama-tiny"}}
    data.update(sections)
    return spec_from_dict(data)


# --------------------------------------------------------------------------------------------- commands


def checkout_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with this checkout first on PYTHONPATH: the CLI, the
    launcher's ranks and the workers import the harness under test, whichever checkout ``pip install -e``
    last pointed at."""
    base = dict(os.environ if base is None else base)
    paths = [str(ROOT), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {**base, "PYTHONPATH": os.pathsep.join(paths)}


def run_harness(
    *args: str,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` of this checkout, text output captured; ``env`` is used as given
    (default: :func:`checkout_env`), ``cwd`` defaults to the repository root."""
    return subprocess.run(
        harness_cmd(*args),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=checkout_env() if env is None else env,
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


def train_ok(
    spec_path: Path, run_dir: Path, *sets: str, step: int | None = None
) -> subprocess.CompletedProcess:
    """:func:`train`, then :func:`assert_complete`."""
    proc = train(spec_path, *sets)
    assert_complete(proc, run_dir, step)
    return proc


def trained(spec_path: Path, run_dir: Path, *sets: str) -> Path:
    """:func:`train_ok`; returns the run directory (``trained(*write_spec(...))`` reads well)."""
    train_ok(spec_path, run_dir, *sets)
    return Path(run_dir)


def launch_worker(
    script: str | Path, *args: str, ranks: int = 2, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --master_port <free> SCRIPT ARGS``; ``script`` is a path or the name
    of a file in tests/workers."""
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
        str(WORKERS / script),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=checkout_env()
    )


def prepare(spec_path: Path, *sets: str) -> Path:
    """Write the run directory of ``spec_path`` (spec.yaml, ds_config.json) as ``harness train`` does."""
    from harness.compiler import prepare_run_dir
    from harness.specload import load_spec

    spec = load_spec(spec_path, list(sets))
    prepare_run_dir(spec, spec.world_size)
    return (Path(spec.run.output_dir) / spec.run.name).resolve()


def train_worker(spec_path: Path, run_dir: Path, out: Path, ranks: int) -> dict[str, Any]:
    """Train through ``workers/pp_train_logits.py``; returns its record (logits before and after)."""
    import torch

    prepare(spec_path)
    proc = launch_worker("pp_train_logits.py", "--run-dir", str(run_dir), "--out", str(out),
                         "--vocab-size", str(VOCAB), ranks=ranks)  # fmt: skip
    assert_complete(proc, run_dir)
    return torch.load(out, weights_only=True)


# --------------------------------------------------------------------------------------------- verdicts


def output_of(proc: subprocess.CompletedProcess) -> str:
    """stdout and stderr tails, for assertion messages."""
    return f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """status.json of a run, or None."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def assert_complete(proc: subprocess.CompletedProcess, run_dir: Path, step: int | None = None) -> None:
    """Exit code 0 and rank 0's status.json ``complete`` (at ``step`` when given)."""
    assert proc.returncode == 0, f"exit {proc.returncode}{output_of(proc)}"
    status = read_status(run_dir)
    assert status is not None and status.get("state") == "complete", f"status.json: {status}{output_of(proc)}"
    if step is not None:
        assert status["step"] == step, f"status.json: {status}"


def assert_refused(spec_path: Path, run_dir: Path, *sets: str, expect: str) -> None:
    """``harness train`` exits 2 with ``expect`` in its message, before writing the run dir or launching."""
    proc = run_harness("train", str(spec_path), "--set", *sets, cwd=Path(spec_path).parent)
    assert proc.returncode == 2, f"exit {proc.returncode}{output_of(proc)}"
    assert expect in proc.stderr, output_of(proc)
    assert "Traceback" not in proc.stderr, output_of(proc)
    assert "launch of" not in proc.stderr, output_of(proc)  # cmd_train says this just before it launches
    assert not Path(run_dir).exists(), f"{run_dir} was created"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl, in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step (a resumed run appends; the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(
    got: dict[int, float], want: dict[int, float], steps: range, rtol: float = RTOL
) -> None:
    """Losses of ``steps`` equal within ``rtol`` relative (the message shows both trajectories)."""
    assert all(s in got and s in want for s in steps), f"missing steps: got {got}, want {want}"
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= rtol, f"relative loss difference {worst:.3g} > {rtol}\n got  {got}\n want {want}"


def planner_context(
    preset: str = "llama-7b", nodes: int = 1, gpus: int = 8, gpu: str = "h100-80gb", seq: int = 2048
):
    """A planner Context for a preset on ``nodes`` × ``gpus`` of ``gpu`` (bf16, sdpa)."""
    from harness.planner.devices import get_device
    from harness.planner.layout import Context
    from harness.planner.modelstats import model_stats
    from harness.presets import PRESETS

    return Context(
        stats=model_stats(PRESETS[preset]),
        seq_len=seq,
        device=get_device(gpu),
        nodes=nodes,
        gpus_per_node=gpus,
    )
