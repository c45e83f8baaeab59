"""``harness train`` and ``harness slurm``: validate, write the run directory, launch, judge the outcome.

    harness train SPEC [--set k=v ...] [--dry-run] [--verbose]  # local, pdsh, openmpi (--dry-run: slurm too)
    harness slurm SPEC [--set k=v ...] [--submit]               # render <run>/launch/job.sbatch (and sbatch it)

``harness train`` shows the harness's lines only (its own, rank 0's progress and metrics, a failed
rank's last log lines); the launcher's full output is kept in ``<run>/launch/launcher.log`` and every
rank's in ``<run>/launch/rank-N.log`` (:mod:`harness.console`). ``--verbose`` streams all of it.

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

from harness.errors import EXIT_PREEMPTED, SpecError
from harness.launch.commands import Launch, build_launch
from harness.launch.envfile import collect_env, masked, remove_env_file, write_env_file
from harness.launch.shell import join
from harness.launch.slurm import render_sbatch
from harness.rundir import RunDir, write_atomic


def _say(message: str) -> None:
    print(f"harness: {message}", file=sys.stderr, flush=True)


def _hostfile_text(spec) -> str | None:
    from harness.launch.hostfile import load_hostfile, render_hostfile

    if spec.launch.launcher in ("pdsh", "openmpi") and spec.launch.hostfile:
        return render_hostfile(load_hostfile(spec.launch.hostfile))
    return None


def plan_launch(spec, environ=None) -> tuple[Launch, str]:
    """The launch for ``spec`` from this process's point of view (interpreter, cwd, user) and its run dir."""
    run_dir = str(RunDir.of(spec).root)
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
    paths = RunDir(Path(run_dir))
    out.append(f"# writes {paths.spec} and {paths.ds_config} (see `harness show` and `harness config`)")
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
    from harness.compiler import prepare_run_dir
    from harness.rundir import read_status
    from harness.train.reshard import plan_resume

    spec = load_from_args(args)
    if spec.launch.launcher == "slurm" and args.dry_run:
        return _slurm(spec, args.spec, write=False, submit=False)
    launch, run_dir_text = plan_launch(spec)
    world = spec.world_size
    spec = plan_resume(spec, world, dry_run=args.dry_run)  # a checkpoint of another world size
    run_dir, _, _ = prepare_run_dir(spec, world, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(describe(launch, run_dir_text, world))
        return 0
    for note in launch.notes:
        _say(note)
    for path, text in launch.files.items():
        write_atomic(Path(path), text)
    run_dir.status.unlink(missing_ok=True)  # a stale "complete" must not pass for this run
    try:
        if launch.env_file:
            write_env_file(Path(launch.env_file), launch.env_values)
        _say(f"{launch.launcher} launch of {world} ranks, run directory {run_dir.root}")
        _say(f"command: {join(launch.cmd)}")
        if not args.verbose:
            _say(f"full output of the launcher and every rank: {run_dir.launch_dir}/ (--verbose shows it)")
        rc, failure_shown = _run(
            launch.cmd, launch.environment(os.environ), launch.cwd, run_dir, args.verbose
        )
    finally:
        remove_env_file(Path(launch.env_file) if launch.env_file else None)
    status = read_status(run_dir) or {}
    state, step = status.get("state"), status.get("step")
    if rc == 0 and state == "complete":
        _say(f"run complete at step {step}: {run_dir.root}")
        return 0
    if rc == 0 and state == "preempted":
        _say(f"stopped by a signal at step {step} with a complete checkpoint; run the same command to resume")
        return EXIT_PREEMPTED
    if not failure_shown and not args.verbose:
        _show_failure(run_dir)
    if rc != 0:
        _say(
            f"the {launch.launcher} launcher exited with status {rc} (run state: {state or 'no status.json'})"
        )
        return rc
    _say(
        f"the launcher exited 0 but rank 0 recorded {state or 'no status'} in {run_dir.status}: "
        "a rank was killed or the launch process died (the deepspeed runner then still exits 0)"
    )
    return 1


def _show_failure(run_dir: RunDir) -> None:
    """No rank reported an exception (killed, crashed in C, or never started): the launcher's last words."""
    from harness.console import FAILURE_TAIL_LINES, tail_lines

    lines = tail_lines(run_dir.launcher_log, FAILURE_TAIL_LINES)
    if lines:
        _say(f"last {len(lines)} lines of {run_dir.launcher_log}:")
        sys.stderr.write("".join(f"  {line}\n" for line in lines))
    logs = run_dir.rank_logs()
    if logs:
        _say(f"every rank's full output: {', '.join(str(p) for p in logs.values())}")


def _run(cmd: list[str], env: dict[str, str], cwd: str, run_dir: RunDir, verbose: bool) -> tuple[int, bool]:
    """Run the launcher in its own process group; SIGINT/SIGTERM to harness go to the whole group.

    The group matters: the deepspeed runner has no handler on the local path, so signalling it alone
    would leave its launch process and the ranks running. Its output goes through
    :class:`harness.console.LauncherRelay`. Returns the exit status and whether a rank's failure
    report reached the console.
    """
    from harness.console import LauncherRelay, RankLogFollower

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    relay = LauncherRelay(proc.stdout, run_dir.launcher_log, sys.stdout, verbose).start()
    follower = (
        RankLogFollower(lambda: list(run_dir.rank_logs().values()), sys.stdout).start() if verbose else None
    )

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        relay.join(timeout_s=10)  # ranks the launcher left behind may keep its output pipe open
        if follower is not None:
            follower.stop()
    return (128 - rc if rc < 0 else rc), relay.failure_reported


def cmd_slurm(args: argparse.Namespace) -> int:
    """Render the sbatch script into the run directory; with --submit, sbatch it."""
    from harness.cliargs import load_from_args

    return _slurm(load_from_args(args), args.spec, write=True, submit=args.submit)


def _slurm(spec, source: str, *, write: bool, submit: bool) -> int:
    from harness.compiler import prepare_run_dir

    if spec.launch.launcher != "slurm":
        spec = dataclasses.replace(spec, launch=dataclasses.replace(spec.launch, launcher="slurm"))
    paths = RunDir.of(spec)
    run_dir = str(paths.root)
    script = render_sbatch(spec, run_dir=run_dir, python=sys.executable, source=source)
    _, missing = collect_env(spec.launch.env, os.environ)  # Slurm carries them: they must be set at submit
    if missing:
        _say(
            f"launch.env lists {', '.join(missing)}, not set in this shell: the job's ranks will not get them"
        )
    path = str(paths.sbatch_script)
    prepare_run_dir(spec, spec.world_size, dry_run=not write)
    if not write:
        sys.stdout.write(f"# launcher slurm: {spec.world_size} ranks, run directory {run_dir}\n")
        sys.stdout.write(f"# file {path}\n{script}# command:\nsbatch {join([path])}\n")
        return 0
    write_atomic(Path(path), script)
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
    write_atomic(paths.slurm_job_id, job_id + "\n")
    print(f"submitted batch job {job_id}")
    return 0
