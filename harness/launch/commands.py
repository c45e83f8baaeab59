"""Pure (cmd, env) builders for the local, pdsh and openmpi launchers.

Nothing here runs a process or reads the environment of its own accord: :func:`build_launch` takes
the spec, the run directory, the environment and the hostfile text and returns a :class:`Launch` that
``harness train`` prints (``--dry-run``) or runs. What each launcher runs (``D`` = the run directory):

    local    python -u -m deepspeed.launcher.runner --num_gpus N --master_addr 127.0.0.1 --master_port P
                 --no_local_rank --module harness.train.entry --run-dir D
    pdsh     python -u -m deepspeed.launcher.runner --hostfile D/launch/hostfile --launcher pdsh
                 --master_addr A --master_port P [--include I | --exclude E] --no_local_rank
                 --module harness.train.entry --run-dir D
             env: DS_ENV_FILE=D/launch/deepspeed_env, a file holding one line,
                  HARNESS_ENV_FILE=D/launch/rank_env.json (values live only in that 0600 JSON file)
    openmpi  mpirun -n W --hostfile D/launch/hostfile -x HARNESS_ENV_FILE -x MASTER_ADDR -x MASTER_PORT
                 [-x PYTHONPATH ...] python -u -m harness.train.entry --run-dir D

The PDSH runner pastes its arguments, its working directory and DS_ENV_FILE lines *unquoted* into the
remote shell string (``export K=V; cd CWD; python ... --run-dir D``), so those must be plain tokens
(:func:`harness.launch.shell.require_plain`); anything else is refused with the field to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import SpecError
from harness.launch import ENTRY_MODULE
from harness.launch.envfile import ENV_FILE_VAR, collect_env
from harness.launch.hostfile import (
    active_slots,
    check_hostname,
    check_world_size,
    parse_hostfile,
    render_hostfile,
)
from harness.launch.shell import is_plain, reject_control, require_plain
from harness.rundir import RunDir
from harness.spec import RunSpec

RUNNER_FORWARDED_PREFIXES = ("PYTHON", "MLFLOW", "MV2", "UCX", "NCCL")
"""Variables DeepSpeed's PDSH runner copies from its own environment into its (logged) remote command."""
KEEP_FOR_LAUNCHER = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TMPDIR"})
"""launch.env names also left in the launcher's own environment (pdsh and ssh need them to start)."""


@dataclass(frozen=True)
class Launch:
    """Everything one launch runs and writes; ``harness train --dry-run`` prints it."""

    launcher: str
    """local, pdsh or openmpi."""
    cmd: list[str]
    """The command the harness starts (the launcher process)."""
    cwd: str
    """Working directory of the launcher (the PDSH runner also ``cd``s there on every host)."""
    set_env: dict[str, str] = field(default_factory=dict)
    """Variables set for the launcher process (no secrets: paths, addresses, switches)."""
    unset_env: tuple[str, ...] = ()
    """Variables removed from the launcher's environment (they travel in the env file instead)."""
    files: dict[str, str] = field(default_factory=dict)
    """Plain files written before the launch (path -> text); nothing secret."""
    env_file: str | None = None
    """The 0600 env file the ranks load (path), written at launch and removed after the run."""
    env_values: dict[str, str] = field(default_factory=dict, repr=False)
    """What goes into the env file. Secret: never printed (see :func:`harness.launch.envfile.masked`)."""
    missing_env: tuple[str, ...] = ()
    """launch.env names that are not set here (so no rank gets them)."""
    notes: tuple[str, ...] = ()
    """Facts the user should see before the launch (printed, never values)."""

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The launcher process's environment: ``environ`` minus :attr:`unset_env`, plus :attr:`set_env`."""
        env = {k: v for k, v in environ.items() if k not in self.unset_env}
        env.update(self.set_env)
        return env


def entry_args(run_dir: str) -> list[str]:
    """The per-rank entry and its arguments, after ``python -u -m``."""
    return [ENTRY_MODULE, "--run-dir", run_dir]


def local_launch(*, python: str, run_dir: str, num_ranks: int, master_port: int, cwd: str) -> Launch:
    """One machine: the deepspeed runner starts ``num_ranks`` ranks (rendezvous on 127.0.0.1)."""
    reject_control("run.output_dir / run.name", run_dir)
    cmd = [
        python, "-u", "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(num_ranks),
        # The runner uses 127.0.0.1 without a hostfile whatever is passed; say so explicitly.
        "--master_addr", "127.0.0.1",
        "--master_port", str(master_port),
        "--no_local_rank",
        "--module", *entry_args(run_dir),
    ]  # fmt: skip
    return Launch("local", cmd, cwd)


def pdsh_launch(
    *,
    python: str,
    run_dir: str,
    master_addr: str,
    master_port: int,
    hostfile_text: str,
    include: str | None,
    exclude: str | None,
    env_values: dict[str, str],
    environ: Mapping[str, str],
    cwd: str,
) -> Launch:
    """A hostfile over pdsh/ssh through DeepSpeed's PDSH runner; values reach ranks only via the env file."""
    why = "DeepSpeed's PDSH runner puts it unquoted into the remote shell command"
    require_plain("run.output_dir / run.name (the run directory)", run_dir, why)
    require_plain("the python interpreter path", python, why)
    require_plain("the working directory harness runs in", cwd, why + " (cd <cwd>)")
    paths = RunDir(Path(run_dir))
    env_file, ds_env_file, hostfile = str(paths.env_file), str(paths.ds_env_file), str(paths.hostfile)
    values = dict(env_values)
    notes = []
    # The runner would write these into its logged remote command; unless harmless, they go in the file.
    for name, value in environ.items():
        if name.startswith(RUNNER_FORWARDED_PREFIXES) and name not in values and not is_plain(value):
            values[name] = value
            notes.append(f"{name} has shell characters: it travels in the env file, not the pdsh command")
    unset = tuple(sorted(n for n in values if n not in KEEP_FOR_LAUNCHER))
    cmd = [
        python, "-u", "-m", "deepspeed.launcher.runner",
        "--hostfile", hostfile,
        "--launcher", "pdsh",
        "--master_addr", master_addr,
        "--master_port", str(master_port),
        *(["--include", include] if include else []),
        *(["--exclude", exclude] if exclude else []),
        "--no_local_rank",
        "--module", *entry_args(run_dir),
    ]  # fmt: skip
    return Launch(
        "pdsh",
        cmd,
        cwd,
        set_env={"DS_ENV_FILE": ds_env_file},
        unset_env=unset,
        files={hostfile: hostfile_text, ds_env_file: f"{ENV_FILE_VAR}={env_file}\n"},
        env_file=env_file,
        env_values=values,
        notes=tuple(notes),
    )


def openmpi_launch(
    *,
    python: str,
    run_dir: str,
    world_size: int,
    master_addr: str,
    master_port: int,
    hostfile_text: str,
    env_values: dict[str, str],
    environ: Mapping[str, str],
    as_root: bool,
    cwd: str,
) -> Launch:
    """mpirun, one process per slot; ranks map OMPI_COMM_WORLD_* themselves (rankenv)."""
    reject_control("run.output_dir / run.name", run_dir)
    paths = RunDir(Path(run_dir))
    env_file, hostfile = str(paths.env_file), str(paths.hostfile)
    # `-x NAME` forwards NAME's value from mpirun's environment: the value never enters argv. Like
    # DeepSpeed's runners, pass on what the interpreter reads before any env file is loaded (PYTHON*)
    # and the communication libraries' knobs (NCCL*, UCX*, ...).
    forwarded = [ENV_FILE_VAR, "MASTER_ADDR", "MASTER_PORT"]
    forwarded += sorted(n for n in environ if n.startswith(RUNNER_FORWARDED_PREFIXES) and n not in env_values)
    cmd = ["mpirun", "-n", str(world_size), "--hostfile", hostfile]
    for name in forwarded:
        cmd += ["-x", name]
    cmd += [python, "-u", "-m", *entry_args(run_dir)]
    set_env = {ENV_FILE_VAR: env_file, "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    notes = []
    if as_root:
        # Open MPI refuses root unless told twice; containers commonly run as root.
        set_env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        notes.append("running as root: OMPI_ALLOW_RUN_AS_ROOT=1 is set for mpirun")
    unset = tuple(sorted(n for n in env_values if n not in KEEP_FOR_LAUNCHER))
    return Launch(
        "openmpi",
        cmd,
        cwd,
        set_env=set_env,
        unset_env=unset,
        files={hostfile: hostfile_text},
        env_file=env_file,
        env_values=dict(env_values),
        notes=tuple(notes),
    )


def check_master_addr(value: str) -> str:
    """``value`` if it is a usable rendezvous host or address, else SpecError on launch.master_addr."""
    problem = check_hostname("launch.master_addr", value)
    if problem and not (is_plain(value) and not value.startswith("-")):  # IPv6 literals have ':'
        raise problem
    return value


def build_launch(
    spec: RunSpec,
    *,
    run_dir: str,
    environ: Mapping[str, str],
    python: str,
    cwd: str,
    hostfile_text: str | None = None,
    as_root: bool = False,
) -> Launch:
    """The launch for ``spec`` (launcher local, pdsh or openmpi), validated; raises SpecError on any problem."""
    ls = spec.launch
    world = spec.world_size
    if ls.launcher == "slurm":
        raise SpecError(
            "launch.launcher", "slurm", "run `harness slurm SPEC --submit` (harness slurm SPEC renders the script)",
            reason="Slurm starts the ranks itself through a batch job",
        )  # fmt: skip
    if ls.launcher == "local":
        if ls.nodes != 1:
            raise SpecError(
                "launch.nodes", ls.nodes, "use launch.nodes: 1 with the local launcher, or launcher pdsh/openmpi/slurm",
                reason="the local launcher starts ranks on this machine only",
            )  # fmt: skip
        return local_launch(python=python, run_dir=run_dir, num_ranks=ls.gpus_per_node, master_port=ls.master_port,
                            cwd=cwd)  # fmt: skip
    if not ls.hostfile or hostfile_text is None:
        raise SpecError(
            "launch.hostfile", ls.hostfile, "set launch.hostfile to a file of 'host slots=N' lines",
            reason=f"the {ls.launcher} launcher needs to know the hosts",
        )  # fmt: skip
    hosts = parse_hostfile(hostfile_text, source=ls.hostfile)
    active = active_slots(hosts, ls.include, ls.exclude)
    check_world_size(active, world)
    master_addr = check_master_addr(ls.master_addr or next(iter(active)))
    values, missing = collect_env(ls.env, environ)
    canonical = render_hostfile(hosts)
    if ls.launcher == "pdsh":
        launch = pdsh_launch(
            python=python, run_dir=run_dir, master_addr=master_addr, master_port=ls.master_port,
            hostfile_text=canonical, include=ls.include, exclude=ls.exclude, env_values=values,
            environ=environ, cwd=cwd,
        )  # fmt: skip
    else:
        if ls.include or ls.exclude:
            raise SpecError(
                "launch.include" if ls.include else "launch.exclude", ls.include or ls.exclude,
                "list only the hosts and slots to use in the hostfile (mpirun has no include/exclude)",
                reason="the openmpi launcher takes whole hostfile entries",
            )  # fmt: skip
        launch = openmpi_launch(
            python=python, run_dir=run_dir, world_size=world, master_addr=master_addr, master_port=ls.master_port,
            hostfile_text=canonical, env_values=values, environ=environ, as_root=as_root, cwd=cwd,
        )  # fmt: skip
    if missing:
        launch = _with_missing(launch, missing)
    return launch


def _with_missing(launch: Launch, missing: list[str]) -> Launch:
    from dataclasses import replace

    note = f"launch.env lists {', '.join(missing)}, not set here: no rank gets {'it' if len(missing) == 1 else 'them'}"
    return replace(launch, missing_env=tuple(missing), notes=(*launch.notes, note))
