"""The ``harness`` command line. Start-up stays fast: verbs import their heavy parts lazily.

harness show examples/tiny-cpu.yaml                 # resolved spec and derived batch numbers
harness config examples/tiny-cpu.yaml -o ds.json    # the DeepSpeed config
harness plan examples/llama-70b-pipeline-slurm.yaml         # which layout fits and runs fastest
harness train examples/tiny-cpu.yaml                # train through the deepspeed launcher
harness export runs/tiny-cpu -o hf/                 # HF checkpoint from a run or checkpoint
harness checkpoint verify runs/tiny-cpu             # every checkpoint against its COMPLETE marker
harness generate hf/ --prompt "def "                # sample from an exported model
harness slurm examples/llama-70b-slurm.yaml --submit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.cliargs import load_from_args, world_from_args
from harness.errors import EXIT_USER_ERROR, SpecError


def _add_spec_args(p: argparse.ArgumentParser, world: bool = True) -> None:
    p.add_argument("spec", metavar="SPEC", help="run spec YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override spec fields, e.g. --set train.steps=10 optimizer.lr=1e-4 (repeatable; values are YAML)",
    )
    if world:
        p.add_argument(
            "--world-size",
            type=int,
            default=None,
            metavar="N",
            help="ranks to compile for (default: launch.nodes × launch.gpus_per_node)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb (kept import-light)."""
    parser = argparse.ArgumentParser(
        prog="harness",
        description="DeepSpeed training for Hugging Face models from one YAML run spec.",
    )
    from harness import __version__

    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("show", help="print the resolved spec and the derived batch numbers")
    _add_spec_args(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("config", help="print or write the DeepSpeed config JSON")
    _add_spec_args(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write the JSON here instead of stdout")
    p.add_argument(
        "--validate",
        action="store_true",
        help="also run DeepSpeed's own DeepSpeedConfig over the result (imports deepspeed; done anyway "
        "when the spec has raw deepspeed: keys)",
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plan", help="predict memory and speed of layouts and pick the fastest that fits")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--top", type=int, default=5, help="candidates to show")
    p.set_defaults(func=_lazy("harness.planner.cli", "cmd_plan"))

    p = sub.add_parser("train", help="train through the deepspeed launcher (or a hostfile / Slurm)")
    _add_spec_args(p, world=False)
    p.add_argument(
        "--dry-run", action="store_true", help="print the launcher command and files; start nothing"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="stream the launcher's and every rank's full output (kept in <run>/launch/ either way)",
    )
    p.set_defaults(func=_lazy("harness.launch.cli", "cmd_train"))

    p = sub.add_parser("slurm", help="render an sbatch script into the run directory (and submit it)")
    _add_spec_args(p, world=False)
    p.add_argument("--submit", action="store_true", help="submit with sbatch after rendering")
    p.set_defaults(func=_lazy("harness.launch.cli", "cmd_slurm"))

    p = sub.add_parser("export", help="export a run or checkpoint to a Hugging Face checkpoint")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--max-shard-size",
        default="50GB",
        metavar="SIZE",
        help="largest safetensors file, e.g. 150MB, 2GB, 1.5GiB (default: 50GB, as save_pretrained); the "
        "export holds about one shard's worth of the checkpoint in memory at most",
    )
    p.set_defaults(func=_lazy("harness.train.export", "cmd_export"))

    p = sub.add_parser("checkpoint", help="check checkpoints against their COMPLETE markers")
    verbs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = verbs.add_parser("verify", help="sizes and checksums of every file; exit 0 when all tags are intact")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--size-only", action="store_true", help="check sizes only (fast on slow storage)")
    p.set_defaults(func=_lazy("harness.train.checkpoint_cmd", "cmd_verify"))

    p = sub.add_parser("generate", help="sample text from an exported HF checkpoint")
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_lazy("harness.train.generate", "cmd_generate"))

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _lazy(module: str, name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def cmd_show(args: argparse.Namespace) -> int:
    """Print the resolved spec and the numbers a user checks first."""
    from harness.compiler import compile_resolved
    from harness.dscheck import validate_config
    from harness.specload import dump_spec

    spec = load_from_args(args)
    world = world_from_args(args, spec)
    # Compile too, so `show` refuses what `config` refuses (raw keys included; no deepspeed import).
    spec, plan, cfg = compile_resolved(spec, world)
    validate_config(cfg, plan.data_parallel_size, deep=False)
    print(dump_spec(spec), end="")
    print("# derived")
    for key, value in derived_numbers(spec, world, plan).items():
        print(f"{key}: {value}")
    _warn_missing_inputs(spec)
    return 0


def _warn_missing_inputs(spec) -> None:
    """What ``harness train`` would refuse before launch (a missing model directory, tokenizer or data
    file), said by ``show`` too, naming the right field; ``show`` still prints (the files may exist only
    where the run will happen)."""
    from harness.preflight import TOKENIZER_FILES, data_problems, path_problems

    problems = data_problems(spec.data)
    problems += path_problems(spec.data.tokenizer, "data.tokenizer", TOKENIZER_FILES, "a tokenizer")
    problems += path_problems(
        spec.model.name_or_path, "model.name_or_path", ("config.json",), "an HF checkpoint"
    )
    for problem in problems:
        print(f"harness: warning: {problem.message} (harness train refuses this)", file=sys.stderr)


def derived_numbers(spec, world: int, plan) -> dict[str, Any]:
    """The batch arithmetic, printed once (like nanoGPT's tokens_per_iter)."""
    return {
        "world_size": world,
        "data_parallel_size": plan.data_parallel_size,
        "pipeline_stages": spec.parallel.pipeline_stages,
        "tensor_parallel": spec.parallel.tensor_parallel,
        "micro_batch_size": plan.micro_batch_size,
        "grad_accum": plan.grad_accum,
        "global_batch_samples": plan.global_batch_size,
        "global_batch_tokens": plan.tokens_per_step,
        "tokens_per_step": plan.tokens_per_step,
        "total_tokens": plan.tokens_per_step * spec.train.steps,
    }


def cmd_config(args: argparse.Namespace) -> int:
    """Print or write the DeepSpeed config."""
    from harness.compiler import compile_config
    from harness.parallel_dims import data_parallel_size

    spec = load_from_args(args)
    world = world_from_args(args, spec)
    cfg = compile_config(spec, world)
    from harness.dscheck import validate_config

    deep = args.validate or bool(spec.deepspeed)
    validate_config(cfg, data_parallel_size(spec, world), deep=deep)
    text = json.dumps(cfg, indent=2) + "\n"
    if args.output:
        write_output(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List preset names with their shapes."""
    from harness.presets import PRESETS, shape_of

    for name, cfg in PRESETS.items():
        s = shape_of(cfg)
        print(
            f"{name:14s} {cfg['model_type']:8s} layers={s['layers']:<3d} hidden={s['hidden']:<5d} "
            f"heads={s['heads']}/{s['kv_heads']} vocab={s['vocab']}"
        )
    return 0


def write_output(path: Path, text: str) -> None:
    """``-o FILE``: write atomically (no half-written file, nothing left on failure) or say what to pass."""
    from harness.rundir import write_atomic

    try:
        write_atomic(path, text)
    except OSError as exc:
        raise SpecError(
            "--output", str(path), "pass a writable file path (not a directory)", exc.strerror or str(exc)
        ) from None


def set_groups_last(argv: list[str]) -> list[str]:
    """Move each ``--set KEY=VALUE ...`` group to the end of the command line, so that
    ``harness train --set train.steps=5 spec.yaml`` works: argparse would otherwise take the spec path
    as one more override. A group is ``--set`` and the tokens after it that hold ``=`` and do not start
    with ``-``; a bare ``--set`` with no such token stays put (argparse then reports it)."""
    head: list[str] = []
    groups: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            head.extend(argv[i:])
            break
        j = i + 1
        if token == "--set":
            while j < len(argv) and "=" in argv[j] and not argv[j].startswith("-"):
                j += 1
        if j > i + 1:
            groups.extend(argv[i:j])
        else:
            head.append(token)
        i = j
    return head + groups


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``harness`` console command."""
    parser = build_parser()
    args = parser.parse_args(set_groups_last(sys.argv[1:] if argv is None else list(argv)))
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        print(f"harness: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
