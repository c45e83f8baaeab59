"""The run directory: every path under it, and the one way files in it are written (atomically).

    <output_dir>/<name>/
        spec.yaml              resolved run spec (every auto resolved, world size fixed)
        ds_config.json         the DeepSpeed config compiled from it
        world.json             the world size spec.yaml and ds_config.json were compiled for
        launch/                launcher files and every process's full output:
            launcher.log           the launcher's own output (``harness train``)
            rank-0.log ...         everything rank N wrote to stdout and stderr (appended per launch)
            rank-0.json ...        how rank N of the latest launch ended (host, pid, error, exit code or signal)
            run.lock               held by the launch that owns the run directory (``harness.runlock``)
            stop                   a stop request from ``harness train`` (it got SIGTERM, SIGINT or SIGUSR1)
            heartbeat/             hang detection: rank-N.json heartbeats, rank-N.stacks, stalled.json
            hostfile               the validated hostfile (pdsh, openmpi)
            deepspeed_env          the DS_ENV_FILE the PDSH runner reads (it names the env file)
            rank_env.json          launch.env values, mode 0600, removed after the run
            job.sbatch             the Slurm batch script (``harness slurm``)
            slurm_job_id           the id of the submitted job
        slurm-<job id>.out     the Slurm job's output (batch script lines and the ranks' console lines)
        tokenizer/             the tokenizer the data was tokenized with (rank 0 copies it in)
        checkpoints/<tag>/     DeepSpeed shards + harness per-rank state + COMPLETE marker
        metrics.jsonl          one JSON object per logged step / evaluation
        tb/                    TensorBoard scalars
        status.json            rank 0's last word: {"state": "complete" | "preempted" | "stalled" | "failed", "step": N}
        hf/                    HF export (checkpoint.export_hf)

:class:`RunDir` is the only place these names are spelled; :func:`write_atomic` and
:func:`atomic_path` are the only temp-file-then-rename code in the package.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.spec import RunSpec


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created by asking for a path)."""

    root: Path
    """The run directory itself, ``output_dir/name``."""

    @classmethod
    def of(cls, spec: RunSpec) -> RunDir:
        """``output_dir/name`` as an absolute path (ranks may start in another working directory)."""
        return cls((Path(spec.run.output_dir) / spec.run.name).resolve())

    @classmethod
    def of_checkpoint(cls, tag_dir: Path) -> RunDir:
        """The run directory that holds checkpoint tag directory ``tag_dir``."""
        return cls(Path(tag_dir).parent.parent)

    @property
    def spec(self) -> Path:
        """The resolved run spec every rank loads."""
        return self.root / "spec.yaml"

    @property
    def ds_config(self) -> Path:
        """The compiled DeepSpeed config every rank loads."""
        return self.root / "ds_config.json"

    @property
    def world(self) -> Path:
        """``{"world_size": N}``: the world the spec and the config were compiled for."""
        return self.root / "world.json"

    @property
    def status(self) -> Path:
        """Rank 0's record of how the run ended."""
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        """One JSON object per logged step or evaluation (rank 0 appends)."""
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        """TensorBoard event files."""
        return self.root / "tb"

    @property
    def tokenizer(self) -> Path:
        """The run's tokenizer (exported with the model)."""
        return self.root / "tokenizer"

    @property
    def hf(self) -> Path:
        """The end-of-run Hugging Face export."""
        return self.root / "hf"

    @property
    def checkpoints(self) -> Path:
        """Where checkpoint tag directories live."""
        return self.root / "checkpoints"

    @property
    def launch_dir(self) -> Path:
        """Launcher files and the processes' logs."""
        return self.root / "launch"

    @property
    def launcher_log(self) -> Path:
        """The launcher process's own output, as ``harness train`` received it."""
        return self.launch_dir / "launcher.log"

    def rank_log(self, rank: int) -> Path:
        """Everything global rank ``rank`` wrote to stdout and stderr."""
        return self.launch_dir / f"rank-{rank}.log"

    def rank_logs(self) -> dict[int, Path]:
        """The rank logs that exist, by rank."""
        logs = {}
        for path in self.launch_dir.glob("rank-*.log"):
            number = path.stem.removeprefix("rank-")
            if number.isdigit():
                logs[int(number)] = path
        return dict(sorted(logs.items()))

    def rank_record(self, rank: int) -> Path:
        """How global rank ``rank`` of the latest launch ended: host, pid, state, error, exit code or signal."""
        return self.launch_dir / f"rank-{rank}.json"

    def rank_records(self) -> dict[int, Path]:
        """The rank records that exist, by rank."""
        found = {}
        for path in self.launch_dir.glob("rank-*.json"):
            number = path.stem.removeprefix("rank-")
            if number.isdigit():
                found[int(number)] = path
        return dict(sorted(found.items()))

    @property
    def lock(self) -> Path:
        """The run lock: one launch per run directory (:mod:`harness.runlock`)."""
        return self.launch_dir / "run.lock"

    @property
    def stop_request(self) -> Path:
        """Written by ``harness train`` on SIGTERM/SIGINT/SIGUSR1: the ranks checkpoint and stop."""
        return self.launch_dir / "stop"

    @property
    def heartbeat_dir(self) -> Path:
        """Hang detection (:mod:`harness.train.stall`): ``rank-N.json`` heartbeats, ``rank-N.stacks`` Python
        stacks dumped at a stall, ``stalled.json`` the stall report."""
        return self.launch_dir / "heartbeat"

    @property
    def hostfile(self) -> Path:
        """The validated hostfile the pdsh and openmpi launchers read."""
        return self.launch_dir / "hostfile"

    @property
    def ds_env_file(self) -> Path:
        """The ``DS_ENV_FILE`` DeepSpeed's PDSH runner reads: it names the env file, it holds no values."""
        return self.launch_dir / "deepspeed_env"

    @property
    def env_file(self) -> Path:
        """The 0600 file that carries launch.env values to the ranks (see :mod:`harness.launch.envfile`)."""
        return self.launch_dir / "rank_env.json"

    @property
    def sbatch_script(self) -> Path:
        """The Slurm batch script ``harness slurm`` renders."""
        return self.launch_dir / "job.sbatch"

    @property
    def slurm_job_id(self) -> Path:
        """The id of the job ``harness slurm --submit`` submitted."""
        return self.launch_dir / "slurm_job_id"

    def slurm_output(self, job_id: str) -> Path:
        """The job's output file (``#SBATCH --output``; pass ``%j`` for Slurm's pattern)."""
        return self.root / f"slurm-{job_id}.out"


def read_status(run_dir: RunDir) -> dict[str, Any] | None:
    """Rank 0's status.json, or None if the run never finished writing one."""
    try:
        return json.loads(run_dir.status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_status(run_dir: RunDir, state: str, step: int, **extra: Any) -> None:
    """Record how the run ended (rank 0 only)."""
    write_atomic(run_dir.status, json.dumps({"state": state, "step": step, **extra}) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the run directory (ds_config.json, world.json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds it is renamed over ``path``.

    Write a file or build a directory at the yielded path. A reader never sees ``path`` half-written;
    if the block raises, the temporary is removed and ``path`` is left as it was. An existing
    directory at ``path`` is removed just before the rename (a rename cannot replace a non-empty one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # a leftover of an attempt that was killed
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` so no reader sees half a file; raises OSError."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
