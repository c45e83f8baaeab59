"""``harness train`` and ``harness slurm``: validate, write the run directory, launch, judge the outcome.

    harness train SPEC [--set k=v ...] [--dry-run] [--verbose]  # local, pdsh, openmpi (--dry-run: slurm too)
    harness slurm SPEC [--set k=v ...] [--submit]               # render <run>/launch/job.sbatch (and sbatch it)

``harness train`` shows the harness's lines only (its own, rank 0's progress and metrics, a failed
rank's last log lines); the launcher's full output is kept in ``<run>/launch/launcher.log`` and every
rank's in ``<run>/launch/rank-N.log`` (:mod:`harness.console`). ``--verbose`` streams all of it.

Before anything is written, ``harness train`` checks what it can without ranks
(:mod:`harness.preflight`) and takes the run lock (:mod:`harness.runlock`, held until it exits): a
second launch on the same run directory is refused, naming the holder. While the launcher runs,
SIGTERM, SIGINT and SIGUSR1 ask the ranks to checkpoint and stop, and a second one aborts
(:mod:`harness.launch.supervise`). When a rank fails, one summary names the first failing rank.

Exit codes (:mod:`harness.errors`): the state the ranks recorded in status.json decides
(the deepspeed runner exits 0 when its launch process was SIGKILLed, so its status alone is not trusted):
``complete`` -> 0, ``preempted`` -> :data:`EXIT_PREEMPTED` (checkpoint saved; run again to resume),
a failed rank -> 1 (2 for a user error only the ranks could find), a second signal -> 130; with no
rank record at all, the launcher's own status when it is non-zero,
``stalled`` -> :data:`EXIT_STALLED` (whatever the launcher's status; the message names the rank),
anything else -> 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.errors import EXIT_ABORTED, EXIT_FAILED, EXIT_PREEMPTED, EXIT_STALLED, SpecError
from harness.launch.commands import Launch, build_launch
from harness.launch.envfile import collect_env, masked, remove_env_file, write_env_file
from harness.launch.shell import join
from harness.launch.slurm import render_sbatch
from harness.launch.supervise import report_failure, run_launcher
from harness.launch.supervise import say as _say
from harness.rundir import RunDir, write_atomic


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
    from harness.runlock import RunLock
    from harness.train.reshard import plan_resume

    spec = load_from_args(args)
    if spec.launch.launcher == "slurm" and args.dry_run:
        return _slurm(spec, args.spec, write=False, submit=False)
    launch, run_dir_text = plan_launch(spec)
    world = spec.world_size
    if args.dry_run:  # prints; takes no lock and writes nothing
        spec = plan_resume(spec, world, dry_run=True)
        prepare_run_dir(spec, world, dry_run=True)
        sys.stdout.write(describe(launch, run_dir_text, world))
        return 0
    prepare_run_dir(spec, world, dry_run=True)  # every spec error before the lock and the checks
    plan_resume(spec, world, dry_run=True, say=lambda message: None)  # said once, below, under the lock
    _preflight(spec)
    lock = RunLock(RunDir.of(spec).lock)
    lock.acquire()  # a second launch on this run directory stops here (SpecError, exit 2)
    try:
        spec = plan_resume(spec, world)  # a checkpoint of another world size
        run_dir, _, _ = prepare_run_dir(spec, world)
        return _launch(launch, spec, run_dir, world, args.verbose)
    finally:
        lock.release()


def _preflight(spec) -> None:
    """Refuse, before anything is written or started, what the ranks would only fail on later."""
    from harness.preflight import check_before_launch, checkpoint_bytes

    check_before_launch(spec, RunDir.of(spec).root, checkpoint_bytes(spec))


def _launch(launch: Launch, spec, run_dir: RunDir, world: int, verbose: bool) -> int:
    """Start the launcher in the prepared run directory and turn how it ended into an exit code."""
    from harness.launch.supervise import last_step
    from harness.rundir import read_status, write_status

    for note in launch.notes:
        _say(note)
    for path, text in launch.files.items():
        write_atomic(Path(path), text)
    run_dir.status.unlink(missing_ok=True)  # a stale "complete" must not pass for this run
    run_dir.stop_request.unlink(missing_ok=True)  # nor a stop request a killed harness train left
    for record in run_dir.rank_records().values():
        record.unlink(missing_ok=True)
    started = time.time()
    try:
        if launch.env_file:
            write_env_file(Path(launch.env_file), launch.env_values)
        _say(f"{launch.launcher} launch of {world} ranks, run directory {run_dir.root}")
        _say(f"command: {join(launch.cmd)}")
        if not verbose:
            _say(f"full output of the launcher and every rank: {run_dir.launch_dir}/ (--verbose shows it)")
        grace_s = spec.launch.slurm.preempt_signal_grace_s
        outcome = run_launcher(
            launch.cmd, launch.environment(os.environ), launch.cwd, run_dir, verbose, grace_s
        )
    finally:
        remove_env_file(Path(launch.env_file) if launch.env_file else None)
    rc, failure_shown = outcome.rc, outcome.failure_reported
    if outcome.aborted:
        step = last_step(run_dir)
        write_status(run_dir, "aborted", step)
        _say(f"aborted at once after step {step} (a second signal): the ranks were killed without a "
             "checkpoint; run the same command to resume from the newest complete one")  # fmt: skip
        return EXIT_ABORTED
    status = read_status(run_dir) or {}
    state, step = status.get("state"), status.get("step")
    if rc == 0 and state == "complete":
        _say(f"run complete at step {step}: {run_dir.root}")
        return 0
    if state == "preempted" and (rc == 0 or outcome.stop_signal is not None):
        _say(f"stopped by a signal at step {step} with a complete checkpoint; run the same command to resume")
        return EXIT_PREEMPTED
    if state == "stalled":  # a rank's watchdog ended the run (harness.train.stall); any launcher status
        _say(f"the run stalled (rank {', '.join(map(str, status.get('ranks', [])))} on {status.get('host')}, "
             f"{status.get('phase')} at step {step}); every rank's stacks: {status.get('stacks')}/; exit "
             f"{EXIT_STALLED}: run the same command to resume from the newest complete checkpoint")  # fmt: skip
        return EXIT_STALLED
    code = report_failure(run_dir, world, started)  # the first failing rank, in one summary
    if code is not None:
        return code
    if outcome.grace_expired:
        _say(f"the ranks were ended after the grace period (run state: {state or 'no status.json'})")
        return EXIT_FAILED
    if not failure_shown and not verbose:
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
    return EXIT_FAILED


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
    prepare_run_dir(spec, spec.world_size, dry_run=True)  # every spec error before anything is written
    if write:
        from harness.runlock import RunLock

        _preflight(spec)
        with RunLock(paths.lock):  # refused while a job or harness train runs in this directory
            prepare_run_dir(spec, spec.world_size)
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
