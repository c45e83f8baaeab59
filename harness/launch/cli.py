"""``harness train`` and ``harness slurm``: validate, write the run directory, launch, judge the outcome.

    harness train SPEC [--set k=v ...] [--dry-run]    # local, pdsh or openmpi (--dry-run: slurm too)
    harness slurm SPEC [--set k=v ...] [--submit]     # render <run>/launch/job.sbatch (and sbatch it)

``harness train`` exits with the launcher's status when it is non-zero; otherwise it trusts only
rank 0's status.json (the deepspeed runner exits 0 when its launch process was SIGKILLed):
``complete`` -> 0, ``preempted`` -> :data:`EXIT_PREEMPTED` (checkpoint saved; run again to resume),
anything else -> 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from harness.errors import SpecError
from harness.launch.commands import Launch, build_launch
from harness.launch.envfile import collect_env, masked, remove_env_file, write_env_file
from harness.launch.shell import join
from harness.launch.slurm import default_script_path, render_sbatch

EXIT_PREEMPTED = 75
"""``harness train`` status when the ranks stopped on a signal with a complete checkpoint (EX_TEMPFAIL: retry)."""


def _say(message: str) -> None:
    print(f"harness: {message}", file=sys.stderr, flush=True)


def _hostfile_text(spec) -> str | None:
    from harness.launch.hostfile import load_hostfile, render_hostfile

    if spec.launch.launcher in ("pdsh", "openmpi") and spec.launch.hostfile:
        return render_hostfile(load_hostfile(spec.launch.hostfile))
    return None


def plan_launch(spec, environ=None) -> tuple[Launch, str]:
    """The launch for ``spec`` from this process's point of view (interpreter, cwd, user) and its run dir."""
    from harness.rundir import run_dir_of

    run_dir = str(run_dir_of(spec))
    launch = build_launch(
        spec,
        run_dir=run_dir,
        environ=os.environ if environ is None else environ,
        python=sys.executable,
        cwd=os.getcwd(),
        hostfile_text=_hostfile_text(spec),
        as_root=os.geteuid() == 0,
    )
    return launch, run_dir


def describe(launch: Launch, run_dir: str, world_size: int) -> str:
    """What ``--dry-run`` prints: every file, the environment changes and the exact command (no secrets)."""
    out = [f"# launcher {launch.launcher}: {world_size} ranks, run directory {run_dir}"]
    out.append(f"# writes {run_dir}/spec.yaml and ds_config.json (see `harness show` and `harness config`)")
    for path, text in launch.files.items():
        out += [f"# file {path}", text.rstrip("\n")]
    if launch.env_file:
        out.append(
            f"# file {launch.env_file} (mode 0600, written at launch, removed after the run; values hidden)"
        )
        out.append(masked(launch.env_values).rstrip("\n"))
    for name, value in launch.set_env.items():
        out.append(f"# env {name}={value}")
    if launch.unset_env:
        out.append(
            f"# env removed from the launcher (ranks get them from the env file): {' '.join(launch.unset_env)}"
        )
    out += [f"# note: {n}" for n in launch.notes]
    out += [f"# command (in {launch.cwd}):", join(launch.cmd)]
    return "\n".join(out) + "\n"


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, write the run directory, run the launcher and report how the run ended."""
    from harness.cliargs import load_from_args
    from harness.rundir import STATUS_FILE, prepare_run_dir, read_status

    spec = load_from_args(args)
    if spec.launch.launcher == "slurm" and args.dry_run:
        return _slurm(spec, args.spec, write=False, submit=False)
    launch, run_dir = plan_launch(spec)
    world = spec.world_size
    prepare_run_dir(spec, world, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(describe(launch, run_dir, world))
        return 0
    for note in launch.notes:
        _say(note)
    for path, text in launch.files.items():
        _write(Path(path), text)
    Path(run_dir, STATUS_FILE).unlink(missing_ok=True)  # a stale "complete" must not pass for this run
    try:
        if launch.env_file:
            write_env_file(Path(launch.env_file), launch.env_values)
        _say(f"{launch.launcher} launch of {world} ranks, run directory {run_dir}")
        _say(f"command: {join(launch.cmd)}")
        rc = _run(launch.cmd, launch.environment(os.environ), launch.cwd)
    finally:
        remove_env_file(Path(launch.env_file) if launch.env_file else None)
    status = read_status(Path(run_dir)) or {}
    state, step = status.get("state"), status.get("step")
    if rc != 0:
        _say(
            f"the {launch.launcher} launcher exited with status {rc} (run state: {state or 'no status.json'})"
        )
        return rc
    if state == "complete":
        _say(f"run complete at step {step}: {run_dir}")
        return 0
    if state == "preempted":
        _say(f"stopped by a signal at step {step} with a complete checkpoint; run the same command to resume")
        return EXIT_PREEMPTED
    _say(
        f"the launcher exited 0 but rank 0 recorded {state or 'no status'} in {run_dir}/{STATUS_FILE}: "
        "a rank was killed or the launch process died (the deepspeed runner then still exits 0)"
    )
    return 1


def _run(cmd: list[str], env: dict[str, str], cwd: str) -> int:
    """Run the launcher in its own process group; SIGINT/SIGTERM to harness go to the whole group.

    The group matters: the deepspeed runner has no handler on the local path, so signalling it alone
    would leave its launch process and the ranks running.
    """
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - rc if rc < 0 else rc


def cmd_slurm(args: argparse.Namespace) -> int:
    """Render the sbatch script into the run directory; with --submit, sbatch it."""
    from harness.cliargs import load_from_args

    return _slurm(load_from_args(args), args.spec, write=True, submit=args.submit)


def _slurm(spec, source: str, *, write: bool, submit: bool) -> int:
    from harness.rundir import prepare_run_dir, run_dir_of

    if spec.launch.launcher != "slurm":
        spec = dataclasses.replace(spec, launch=dataclasses.replace(spec.launch, launcher="slurm"))
    run_dir = str(run_dir_of(spec))
    script = render_sbatch(spec, run_dir=run_dir, python=sys.executable, source=source)
    _, missing = collect_env(spec.launch.env, os.environ)  # Slurm carries them: they must be set at submit
    if missing:
        _say(
            f"launch.env lists {', '.join(missing)}, not set in this shell: the job's ranks will not get them"
        )
    path = default_script_path(run_dir)
    prepare_run_dir(spec, spec.world_size, dry_run=not write)
    if not write:
        sys.stdout.write(f"# launcher slurm: {spec.world_size} ranks, run directory {run_dir}\n")
        sys.stdout.write(f"# file {path}\n{script}# command:\nsbatch {join([path])}\n")
        return 0
    _write(Path(path), script)
    print(f"wrote {path}")
    if not submit:
        print(f"submit with: sbatch {join([path])}")
        return 0
    if not shutil.which("sbatch"):
        raise SpecError("--submit", "sbatch", "run on a Slurm login node, or copy the script there and sbatch it",
                        reason="sbatch is not on PATH")  # fmt: skip
    done = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _say(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    _write(Path(run_dir, "launch", "slurm_job_id"), job_id + "\n")
    print(f"submitted batch job {job_id}")
    return 0


def _write(path: Path, text: str) -> None:
    from harness.rundir import write_atomic

    write_atomic(path, text)
