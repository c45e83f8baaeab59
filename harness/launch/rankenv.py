"""Per-rank environment: what every rank calls first, before torch.distributed or DeepSpeed start.

DeepSpeed never maps scheduler variables to ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without ``RANK`` it
tries MPI discovery and fails (``No module named 'mpi4py'``). :func:`scheduler_env` is the pure mapping:

    Open MPI  OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE / _LOCAL_SIZE   (checked first: mpirun inside
              a Slurm allocation also inherits SLURM_PROCID=0 in every process)
    Slurm     SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, LOCAL_WORLD_SIZE from SLURM_TASKS_PER_NODE
    MASTER_ADDR  the first host of SLURM_JOB_NODELIST (``scontrol show hostnames``; its NodeAddr when the
                 name does not resolve), when not given; 127.0.0.1 when every rank is on this machine
    MASTER_PORT  29500 + SLURM_JOB_ID mod 1000 under Slurm (jobs sharing a node differ), else 29500

Variables already set (by the deepspeed launcher, the sbatch script or the user) are never changed.
:func:`apply_scheduler_env` also loads the launcher's env file (``HARNESS_ENV_FILE``, see
:mod:`harness.launch.envfile`) into ``os.environ``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping

from harness.launch.envfile import ENV_FILE_VAR, read_env_file

DEFAULT_MASTER_PORT = 29500
"""torch.distributed's usual rendezvous port."""

_SOURCES = (
    # (scheduler, rank, local rank, world size, local world size)
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", None),
)


def first_host_of_nodelist(nodelist: str) -> str:
    """The first host of a Slurm hostlist without calling Slurm: ``gpu-[007-009,12],cpu1`` -> ``gpu-007``."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    assert head is not None  # the pattern matches any string
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[-,]", ranges, maxsplit=1)[0]
    return prefix + first


def slurm_first_host(nodelist: str) -> str:
    """The first host of ``nodelist`` as ``scontrol show hostnames`` expands it (pure parsing without scontrol)."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    return first_host_of_nodelist(nodelist)


def slurm_master_addr(nodelist: str) -> str:
    """Rank 0's address: the first host of ``nodelist``, or Slurm's NodeAddr for it when the name does not resolve.

    A NodeName need not be a DNS name (``NodeName=n1 NodeAddr=10.0.0.5`` in slurm.conf).
    """
    host = slurm_first_host(nodelist)
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30,
                             check=False)  # fmt: skip
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if m:
            return m.group(1)
    return host


def _tasks_on_this_node(tasks_per_node: str, node_id: int) -> str | None:
    """SLURM_TASKS_PER_NODE (``2(x3),1``) -> the count for node ``node_id``."""
    counts: list[str] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            return None
        counts += [m.group(1)] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def scheduler_env(
    environ: Mapping[str, str], master_addr_of: Callable[[str], str] = slurm_master_addr
) -> dict[str, str]:
    """The variables to add so torch.distributed finds its rank: only those not already in ``environ``.

    Pure apart from ``master_addr_of`` (called only under Slurm when MASTER_ADDR is missing).
    """
    out: dict[str, str] = {}

    def put(name: str, value: str | None) -> None:
        if value is not None and name not in environ and name not in out:
            out[name] = value

    for scheduler, rank, local_rank, size, local_size in _SOURCES:
        if rank not in environ:
            continue
        put("RANK", environ[rank])
        put("LOCAL_RANK", environ.get(local_rank))
        put("WORLD_SIZE", environ.get(size))
        if local_size:
            put("LOCAL_WORLD_SIZE", environ.get(local_size))
        elif "SLURM_TASKS_PER_NODE" in environ and environ.get("SLURM_NODEID", "").isdigit():
            put(
                "LOCAL_WORLD_SIZE",
                _tasks_on_this_node(environ["SLURM_TASKS_PER_NODE"], int(environ["SLURM_NODEID"])),
            )
        if scheduler == "slurm":
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if "MASTER_ADDR" not in environ and nodelist:
                # the job's first host runs task 0 under srun's default block distribution
                put("MASTER_ADDR", master_addr_of(environ.get("SLURM_JOB_NODELIST") or nodelist))
            job_id = environ.get("SLURM_JOB_ID", "")
            if job_id.isdigit():
                put("MASTER_PORT", str(DEFAULT_MASTER_PORT + int(job_id) % 1000))
        break
    if "RANK" in environ or "RANK" in out:
        merged = {**environ, **out}
        # One machine holds every rank: the rendezvous is local. Across machines a guess would hang.
        if merged.get("WORLD_SIZE") in ("1", merged.get("LOCAL_WORLD_SIZE")):
            put("MASTER_ADDR", "127.0.0.1")
        put("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    return out


def apply_scheduler_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Load the launcher's env file, then add the scheduler mapping; return the names set (never values).

    Call it first thing in every rank. ``environ`` defaults to ``os.environ`` (changed in place).
    """
    env = os.environ if environ is None else environ
    loaded: dict[str, str] = {}
    env_file = env.get(ENV_FILE_VAR)
    if env_file:
        loaded = read_env_file(env_file)
        env.update(loaded)
    mapped = scheduler_env(env)
    env.update(mapped)
    return {name: "env file" for name in loaded} | {name: "scheduler" for name in mapped}
