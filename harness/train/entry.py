"""Per-rank entry point: ``python -m harness.train.entry --run-dir RUN_DIR`` on every rank.

Started by the deepspeed launcher (local, pdsh), mpirun or srun. Reads the run directory that
``harness train`` prepared, sends all of its own output into ``<run>/launch/rank-N.log``, trains, and
always closes the process group. Only the harness's lines reach the console (:mod:`harness.console`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.console import RankConsole
    from harness.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    """Run one rank of a prepared run; exit 0 when complete or cleanly preempted.

    From the moment the run directory is known, everything this process writes goes to its rank log
    (see :mod:`harness.console`); a failure is shown on the console as the log's last lines.
    """
    parser = argparse.ArgumentParser(prog="harness.train.entry")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    args = parser.parse_args(argv)
    from harness.launch.rankenv import apply_scheduler_env

    apply_scheduler_env()  # RANK for mpirun and srun tasks, which the log's name needs

    from harness.console import capture_rank_output, print_exception
    from harness.rundir import RunDir

    run_dir = RunDir(args.run_dir.resolve())
    rank = int(os.environ.get("RANK", "0"))
    console = capture_rank_output(run_dir.rank_log(rank), rank)
    try:
        return _run_rank(run_dir, console)
    except Exception as exc:  # shown once, with the log's tail; KeyboardInterrupt/SystemExit propagate
        print_exception(exc)
        console.report_failure(rank, exc)
        return 1


def _run_rank(run_dir: RunDir, console: RankConsole) -> int:
    from harness.rundir import read_json, write_status
    from harness.specload import load_spec
    from harness.train import signals

    spec = load_spec(run_dir.spec)
    ds_config = read_json(run_dir.ds_config)
    signals.install()

    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank = dist.get_rank()
    _quiet_libraries(rank)
    try:
        from harness.train.loop import train

        result = train(spec, ds_config, run_dir.root, console=console)
        return 0 if result.state in ("complete", "preempted") else 1
    except BaseException:
        if rank == 0:
            write_status(run_dir, "failed", -1)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _remove_shm_buffers()


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
