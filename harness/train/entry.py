"""Per-rank entry point: ``python -m harness.train.entry --run-dir RUN_DIR`` on every rank.

Started by the deepspeed launcher (local, pdsh), mpirun or srun. The process forks at once
(:mod:`harness.train.watch`): its child is the rank, it stays behind to record how the rank ended.
The rank reads the run directory that ``harness train`` prepared, sends all of its own output into
``<run>/launch/rank-N.log``, records how it ended in ``<run>/launch/rank-N.json`` (which ``harness
train`` turns into one summary, :mod:`harness.launch.failures`), trains, and always closes the process
group. Only the harness's lines reach the console (:mod:`harness.console`).

Exit codes: 0 complete or cleanly stopped (status.json says which), 1 failed, 2 a user error found
only here (a SpecError: a bad ``checkpoint.resume``, a tokenizer that does not fit the model), 130
interrupted before the stop handlers were in place. Under Slurm, where no ``harness train`` supervises
the run, rank 0 takes the run lock (:func:`_slurm_lock`) and a failing rank shows its log's last lines.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.console import RankConsole
    from harness.rundir import RunDir
    from harness.runlock import RunLock
    from harness.spec import RunSpec


def main(argv: list[str] | None = None) -> int:
    """Run one rank of a prepared run; exit 0 when complete or cleanly preempted.

    From the moment the run directory is known, everything this process writes goes to its rank log
    (see :mod:`harness.console`); a failure is recorded for ``harness train``'s summary.
    """
    from harness.train import signals

    signals.install()  # first: a Ctrl-C from here on is a stop request, never a KeyboardInterrupt
    parser = argparse.ArgumentParser(prog="harness.train.entry")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    args = parser.parse_args(argv)
    from harness.launch.rankenv import apply_scheduler_env

    apply_scheduler_env()  # RANK for mpirun and srun tasks, which the log's name needs

    from harness.rundir import RunDir
    from harness.train.watch import fork_rank

    run_dir = RunDir(args.run_dir.resolve())
    rank = int(os.environ.get("RANK", "0"))
    code = fork_rank(run_dir.rank_record(rank), rank, after_exit=_remove_shm_buffers)
    if code is not None:
        return code  # the watcher: the rank has ended and its end is recorded
    try:
        return _rank(run_dir, rank)
    except KeyboardInterrupt:
        return 130


def _rank(run_dir: RunDir, rank: int) -> int:
    from harness.console import capture_rank_output, print_exception
    from harness.errors import EXIT_FAILED, EXIT_USER_ERROR, SpecError
    from harness.launch.failures import is_collective_error, last_line, new_record, update_record
    from harness.rundir import write_status
    from harness.specload import load_spec
    from harness.train.integrity import CheckpointError

    spec, load_error = None, None
    try:
        spec = load_spec(run_dir.spec)
    except SpecError as exc:
        load_error = exc
    slurm = spec is not None and spec.launch.launcher == "slurm"
    lock = None
    if slurm and rank == 0:
        try:
            lock = _slurm_lock(run_dir)
        except SpecError as exc:  # another launch owns the directory: touch nothing of it
            print(f"harness: error: {exc.message}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
    record = run_dir.rank_record(rank)
    new_record(record, rank=rank, host=socket.gethostname(), pid=os.getpid(), started_at=time.time())
    console = capture_rank_output(run_dir.rank_log(rank), rank)
    try:
        if load_error is not None:
            raise load_error
        assert spec is not None
        state = _train(spec, run_dir, console)
        update_record(record, state=state, ended_at=time.time())
        return 0 if state in ("complete", "preempted") else EXIT_FAILED
    except SpecError as exc:  # only the ranks could find it: one line, not a traceback
        print(f"harness: error: {exc.message}", file=sys.stderr, flush=True)
        update_record(record, state="user_error", error=exc.message, failed_at=time.time())
        if rank == 0:
            write_status(run_dir, "failed", -1, rank=rank, error=exc.message, user_error=True)
        if slurm:
            console.line(f"error: {exc.message}")
        return EXIT_USER_ERROR
    except Exception as exc:
        print_exception(exc)  # into the rank log
        error = last_line(exc)
        # A CheckpointError's one line says it all (sizes, what to do): no log tail on the console.
        update_record(record, state="failed", error=error, collective=is_collective_error(exc),
                      explained=isinstance(exc, CheckpointError), failed_at=time.time())  # fmt: skip
        if rank == 0:  # harness train replaces it with the first failing rank's facts
            write_status(run_dir, "failed", -1, rank=rank, host=socket.gethostname(), error=error)
        if slurm:  # no harness train to summarise: this rank's last log lines go to the job's output
            console.report_failure(rank, exc)
        return EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()


def _train(spec: RunSpec, run_dir: RunDir, console: RankConsole) -> str:
    """Train under a process group that is always closed; returns the state the loop ended in."""
    from harness.rundir import read_json
    from harness.train import signals, stall

    signals.install(run_dir.stop_request)
    ds_config = read_json(run_dir.ds_config)
    # Before the rendezvous, so a hang there is caught too (train.stall_timeout; 0: nothing starts).
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    watchdog = stall.Watchdog(run_dir, rank, world, spec.train.stall_timeout, console,
                              before_exit=_remove_shm_buffers).start()  # fmt: skip
    ended = "failed"

    import deepspeed
    import torch.distributed as dist

    try:
        deepspeed.init_distributed(**stall.init_kwargs(spec.train.stall_timeout))
        watchdog.join_launch()
        _quiet_libraries(dist.get_rank())
        from harness.train.loop import train

        state = train(spec, ds_config, run_dir.root, console=console).state
        ended = "done"
        return state
    except BaseException:
        stall.wait_if_ending()  # a stall is being reported (a peer's exit broke a collective): its report stands
        raise
    finally:
        watchdog.stop(ended)
        if dist.is_initialized():
            dist.destroy_process_group()
        _remove_shm_buffers()


def _slurm_lock(run_dir: RunDir) -> RunLock:
    """Rank 0 of a Slurm job holds the run lock (no ``harness train`` runs inside the job).

    The lock records the job id: a requeued job (same id) takes over the lock of its own earlier
    attempt at once, since Slurm requeues only after that attempt's processes ended; other stale locks
    go by the holder's pid (same host) or heartbeat (elsewhere), see :mod:`harness.runlock`.
    """
    from harness.runlock import RunLock, read_holder

    job = os.environ.get("SLURM_JOB_ID")
    holder = read_holder(run_dir.lock)
    if job and holder and holder.get("slurm_job_id") == job:
        run_dir.lock.unlink(missing_ok=True)
    lock = RunLock(run_dir.lock, extra={"slurm_job_id": job} if job else None)
    lock.acquire()
    run_dir.stop_request.unlink(missing_ok=True)  # a stop request of an earlier harness train
    return lock


def _remove_shm_buffers() -> None:
    """Unlink this launch's /dev/shm buffers of DeepSpeed's CPU all-reduce, which DeepSpeed never
    removes (tens of MB per rank; left over they fill the machine's RAM launch after launch)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port:
        return
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
        leftover.unlink(missing_ok=True)


def _quiet_libraries(rank: int) -> None:
    """DeepSpeed logs at INFO into the rank log (``HARNESS_DS_LOG=warning`` trims it); progress bars of
    datasets only on rank 0 (the others would repeat them in every log)."""
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(getattr(logging, os.environ.get("HARNESS_DS_LOG", "info").upper(), logging.INFO))
    if rank != 0:
        import datasets

        datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
