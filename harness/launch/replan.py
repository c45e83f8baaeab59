"""Re-plan a Slurm run directory for the nodes this attempt of the job was given (``launch.slurm.min_nodes``).

    python -m harness.launch.replan --run-dir RUN_DIR --nodes "$SLURM_JOB_NUM_NODES"

The batch script of a job with ``launch.slurm.min_nodes`` asks Slurm for ``--nodes=min_nodes-nodes``, so a
requeue after a node failure may run on fewer nodes than the attempt before it (or on more, once the
node is back). The run directory was written for the world of an earlier attempt (spec.yaml,
ds_config.json, world.json), and the ranks would read its batch numbers; so before ``srun`` the script
runs this, on the batch host, which does what ``harness train`` does before a launch on a new world:

1. keep the global batch of the previous attempt, re-solving micro batch × accumulation for the new
   data-parallel size (:func:`keep_global_batch`; the largest micro batch not above the previous one);
2. :func:`harness.train.reshard.plan_resume`: compare with the newest complete checkpoint's layout,
   refuse what cannot resume, convert a ZeRO checkpoint once to DeepSpeed's universal format;
3. the planner's memory check of the new layout (:func:`check_memory`), when the world changed;
4. rewrite spec.yaml, ds_config.json and world.json (:func:`harness.compiler.prepare_run_dir`, each
   file atomically) and say what changed in the job's log.

Exit 0 when the ranks may start; 2 with one ``harness: error:`` line when this world cannot work (the
batch script then ends the job without requeueing it). Imports no torch unless a checkpoint is converted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from harness.errors import EXIT_USER_ERROR, SpecError
from harness.rundir import RunDir
from harness.spec import RunSpec
from harness.train.reshard_rules import Layout

MIN_NODES_FIELD = "launch.slurm.min_nodes"
"""The field a refusal names: the node range that let the job start on this many nodes."""


def plural(count: int, noun: str) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{count} {noun}{'s' if count != 1 else ''}"


def without_universal_load(spec: RunSpec) -> RunSpec:
    """``spec`` without the ``checkpoint.load_universal`` key an earlier re-plan added for its one attempt.

    Whether this attempt loads a universal copy is decided afresh by :func:`~harness.train.reshard.plan_resume`,
    as ``harness train`` decides it from the user's spec at every launch.
    """
    from harness.dsconfig import universal_load_keys

    raw = dict(spec.deepspeed)
    for section, keys in universal_load_keys().items():
        inner = raw.get(section)
        if isinstance(inner, dict):
            inner = {k: v for k, v in inner.items() if k not in keys}
            if inner:
                raw[section] = inner
            else:
                raw.pop(section)
    return dataclasses.replace(spec, deepspeed=raw)


def keep_global_batch(spec: RunSpec, old: Layout, new_world: int) -> RunSpec:
    """``spec`` keeping the global batch of layout ``old`` (the previous attempt's), split for ``new_world`` ranks.

    Unchanged when the data-parallel size is the same. Raises SpecError (naming ``launch.slurm.min_nodes``)
    when the new data-parallel size does not divide the global batch.
    """
    from harness.parallel_dims import data_parallel_size
    from harness.train.reshard import resolve_batch, valid_data_parallel_sizes

    new_dp = data_parallel_size(spec, new_world)
    if new_dp == old.data_parallel:
        return spec
    glob = old.global_batch_size
    try:
        micro, accum = resolve_batch(glob, new_dp, old.micro_batch_size)
    except ValueError:
        sizes = " or ".join(str(d) for d in valid_data_parallel_sizes(glob, new_dp))
        raise SpecError(
            MIN_NODES_FIELD,
            spec.launch.slurm.min_nodes,
            f"choose min_nodes so that every node count it allows gives a data-parallel size dividing {glob} "
            f"(nearest data-parallel sizes: {sizes}), or a global batch that all of them divide",
            reason=f"the global batch of {glob} samples cannot be split over {new_dp} data-parallel ranks",
        ) from None
    batch = dataclasses.replace(
        spec.batch, micro_batch_size=micro, grad_accum=accum, global_batch_size=None, global_batch_tokens=None
    )
    return dataclasses.replace(spec, batch=batch)


def check_memory(spec: RunSpec, world: int) -> str | None:
    """The planner's verdict on ``spec``'s own layout on ``world`` ranks: raises SpecError when it does not fit.

    Returns a note when the check could not run (no model config offline, a layout left ``auto``), else None.
    """
    from harness.planner.search import context_from_spec, evaluate
    from harness.planner.search import spec_layout as planner_layout

    try:
        ctx = context_from_spec(spec, world)
    except SpecError as exc:
        return f"memory check skipped: {exc.reason or exc.message}"
    layout = planner_layout(spec, world)
    if layout is None:
        return "memory check skipped: the layout is not fully resolved"
    found = evaluate(ctx, layout)
    if not found.fits:
        raise SpecError(
            MIN_NODES_FIELD,
            spec.launch.slurm.min_nodes,
            "raise launch.slurm.min_nodes to a node count whose layout fits (`harness plan SPEC --world-size "
            "N`), or change the layout (ZeRO stage, offload, activation checkpointing)",
            reason=f"on {plural(ctx.nodes, 'node')} ({world} × {spec.launch.gpu}) the layout "
            f"{layout.short()} {found.memory.why_not()}",
        )
    return None


def replan(run_dir: Path, nodes: int, *, job: str = "?", attempt: str = "0", say=None) -> RunSpec:
    """Rewrite ``run_dir`` for ``nodes`` nodes and return the spec the ranks will read.

    ``say`` gets each line for the job's log (default: stdout, ``harness:`` prefixed). Raises SpecError,
    with nothing in the run directory changed, when this world cannot continue the run.
    """
    from harness.compiler import prepare_run_dir
    from harness.specload import load_spec
    from harness.train.reshard import plan_resume, spec_layout

    say = say or _say
    paths = RunDir(Path(run_dir).resolve())
    spec = without_universal_load(load_spec(paths.spec))
    if RunDir.of(spec).root != paths.root:  # a relative output_dir read from another working directory
        spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, output_dir=str(paths.root.parent),
                                                                 name=paths.root.name))  # fmt: skip
    gpus = spec.launch.gpus_per_node
    old_world = _previous_world(paths, spec.world_size)
    new_world = nodes * gpus
    _, old = spec_layout(spec, old_world)  # the split the previous attempt ran with
    spec = dataclasses.replace(spec, launch=dataclasses.replace(spec.launch, nodes=nodes))
    kept = keep_global_batch(spec, old, new_world)
    # Dry first: a refusal (checkpoint or memory) must come before a conversion or any file is written.
    planned = plan_resume(kept, new_world, dry_run=True, say=lambda message: None)
    note = check_memory(planned, new_world) if new_world != old_world else None
    _, new = spec_layout(planned, new_world)
    head = f"job {job} attempt {attempt} runs on {plural(nodes, 'node')}"
    if new_world == old_world:
        say(f"{head}, as before: {new.describe()}")
    else:
        say(
            f"{head} (was {max(1, old_world // gpus)}): data-parallel {old.data_parallel} → {new.data_parallel}, "
            f"micro {old.micro_batch_size} × accumulation {old.grad_accum} → {new.micro_batch_size} × "
            f"{new.grad_accum}, same global batch {new.global_batch_size}"
        )
    if note:
        say(note)
    planned = plan_resume(kept, new_world, say=say)
    prepare_run_dir(planned, new_world)
    return planned


def _previous_world(paths: RunDir, default: int) -> int:
    """The world the run directory was last written for (world.json), else the spec's."""
    try:
        return int(json.loads(paths.world.read_text(encoding="utf-8"))["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _say(message: str) -> None:
    print(f"harness: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Re-plan under the run lock (taken over from an earlier attempt of the same job); exit 0 or 2."""
    from harness.runlock import RunLock, read_holder

    parser = argparse.ArgumentParser(prog="harness.launch.replan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument(
        "--nodes", required=True, type=int, help="nodes of this attempt (SLURM_JOB_NUM_NODES)"
    )
    args = parser.parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID", "")
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    paths = RunDir(args.run_dir.resolve())
    try:
        if args.nodes < 1:
            raise SpecError("--nodes", args.nodes, "pass the job's node count (SLURM_JOB_NUM_NODES)")
        holder = read_holder(paths.lock)
        if job and holder and holder.get("slurm_job_id") == job:
            paths.lock.unlink(missing_ok=True)  # an earlier attempt of this job: its processes have ended
        with RunLock(paths.lock, extra={"slurm_job_id": job} if job else None):
            replan(paths.root, args.nodes, job=job or "?", attempt=attempt)
    except SpecError as exc:
        print(f"harness: error: {exc.message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
