"""Per-rank entry point: ``python -m harness.train.entry --run-dir RUN_DIR`` on every rank.

Started by the deepspeed launcher (local, pdsh), mpirun or srun. Reads the run directory that
``harness train`` prepared, trains, and always closes the process group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run one rank of a prepared run; exit 0 when complete or cleanly preempted."""
    parser = argparse.ArgumentParser(prog="harness.train.entry")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    args = parser.parse_args(argv)
    try:
        from harness.launch.rankenv import apply_scheduler_env
    except ImportError:  # launch package not installed in this tree yet
        apply_scheduler_env = None
    if apply_scheduler_env is not None:
        apply_scheduler_env()

    from harness.rundir import DS_CONFIG_FILE, SPEC_FILE, write_status
    from harness.specload import load_spec
    from harness.train import signals

    run_dir = args.run_dir.resolve()
    spec = load_spec(run_dir / SPEC_FILE)
    ds_config = json.loads((run_dir / DS_CONFIG_FILE).read_text(encoding="utf-8"))
    signals.install()

    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank = dist.get_rank()
    _quiet_libraries(rank)
    try:
        from harness.train.loop import train

        result = train(spec, ds_config, run_dir)
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
    import os
    from pathlib import Path

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port:
        return
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
        leftover.unlink(missing_ok=True)


def _quiet_libraries(rank: int) -> None:
    """Keep the console to the harness's own lines: DeepSpeed's INFO chatter off (HARNESS_DS_LOG=info
    restores it), and progress bars of datasets only on rank 0."""
    import logging
    import os

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(getattr(logging, os.environ.get("HARNESS_DS_LOG", "warning").upper(), logging.WARNING))
    if rank != 0:
        import datasets

        datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
