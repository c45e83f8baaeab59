"""What must hold of every value that reaches an sbatch script: the checks behind ``harness slurm``.

Two entry points, one list of rules:

* :func:`slurm_problems` is a rule of :func:`harness.validate.check_spec` for ``launch.launcher: slurm``
  specs, so ``harness show``, ``config`` and ``train`` refuse a bad ``launch.slurm`` section before
  anything is rendered;
* :func:`script_problems` is what :func:`harness.launch.slurm.render_sbatch` refuses before it writes a
  byte: the same rules plus the inputs that are not spec fields (the absolute run directory, the
  interpreter path, the spec path). ``harness slurm`` renders any spec, whatever its launcher, and
  renders before it compiles, so the renderer cannot rely on ``check_spec`` having run.

Why these rules: a newline (or any control character) in a directive value ends the ``#SBATCH`` line
and the rest would run as a command, which no quoting prevents; sbatch's own directive parser reads
``\\`` as an escape even inside quotes; an empty value would render ``--partition=''``. Pure: no torch.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import SpecError
from harness.launch.shell import control_chars
from harness.rundir import RunDir
from harness.spec import RunSpec

RUN_DIR_FIELD = "run.output_dir / run.name (the run directory)"
"""The field named when the run directory cannot appear in the script (it is two spec fields joined)."""

PYTHON_FIELD = "the python interpreter path"
"""The field named when the interpreter path cannot appear in the script."""

SOURCE_FIELD = "SPEC (the spec file path)"
"""The field named when the spec path (quoted in the script's header comment) cannot appear in it."""


def value_problem(field: str, value: str) -> SpecError | None:
    """The problem with a value bound for an ``#SBATCH`` line or the script's shell code, or None."""
    problem = control_problem(field, value)
    if problem is None and "\\" in value:
        why = "sbatch reads '\\' in a directive as an escape, even inside quotes"
        problem = SpecError(field, value, "remove the backslash", reason=why)
    if problem is None and value == "":
        problem = SpecError(field, value, "give a value or remove the key")
    return problem


def control_problem(field: str, value: str) -> SpecError | None:
    """The problem with a control character in ``value`` (no quoting survives a newline), or None."""
    found = control_chars(value)
    if not found:
        return None
    return SpecError(field, value, "remove newlines and other control characters",
                     reason=f"control character {', '.join(found)}: a newline ends the #SBATCH directive "
                     "and the rest would run as a command")  # fmt: skip


def spec_run_dir(spec: RunSpec) -> str:
    """The run directory as the spec writes it (``output_dir/name``, not made absolute: no file system)."""
    return f"{spec.run.output_dir.rstrip('/')}/{spec.run.name}"


def default_output(run_dir: str) -> str:
    """``--output`` without ``launch.slurm.output``: in the run directory (``%`` escaped; ``%j`` = job id)."""
    return str(RunDir(Path(run_dir.replace("%", "%%"))).slurm_output("%j"))


def slurm_problems(spec: RunSpec, world_size: int | None = None) -> list[SpecError]:
    """Every problem with the values a Slurm spec puts into its sbatch script; [] for other launchers.

    A :func:`harness.validate.check_spec` rule (``world_size`` is unused). Other launchers never read
    ``launch.slurm``, so a local run is not refused for it; ``harness slurm`` checks those specs itself
    (:func:`script_problems`). The node and GPU counts are :mod:`harness.validate`'s own range rules.
    """
    if spec.launch.launcher != "slurm":
        return []
    return _value_problems(spec, run_dir=spec_run_dir(spec), python=None, source="")


def script_problems(spec: RunSpec, *, run_dir: str, python: str, source: str = "") -> list[SpecError]:
    """All that :func:`harness.launch.slurm.render_sbatch` refuses, in the order ``harness slurm`` reports it.

    ``run_dir`` is the absolute run directory, ``python`` the interpreter the script runs, ``source``
    the spec path quoted in its header ("" for none). The counts come first because ``harness slurm``
    renders before :func:`harness.validate.check_spec` runs (its words are the ones users have seen).
    """
    counts = (("launch.nodes", spec.launch.nodes), ("launch.gpus_per_node", spec.launch.gpus_per_node))
    errors = [SpecError(field, value, "use a positive number") for field, value in counts if value < 1]
    return errors + _value_problems(spec, run_dir=run_dir, python=python, source=source)


def _value_problems(spec: RunSpec, *, run_dir: str, python: str | None, source: str) -> list[SpecError]:
    """The value rules, in directive order; ``python`` None skips the interpreter (not known to a spec)."""
    ls, sl = spec.launch, spec.launch.slurm
    values: list[tuple[str, str]] = []  # (field, value) bound for the script, checked in this order
    errors: list[SpecError] = []
    if sl.cpus_per_task is not None and sl.cpus_per_task < 1:
        errors.append(
            SpecError("launch.slurm.cpus_per_task", sl.cpus_per_task, "use a positive number of cores")
        )
    if not 1 <= sl.preempt_signal_grace_s <= 65535:
        errors.append(
            SpecError("launch.slurm.preempt_signal_grace_s", sl.preempt_signal_grace_s,
                      "use 1..65535 seconds (long enough to finish a step and save a checkpoint)")
        )  # fmt: skip
    if sl.min_nodes is not None and not 1 <= sl.min_nodes <= ls.nodes:
        errors.append(
            SpecError("launch.slurm.min_nodes", sl.min_nodes,
                      f"use 1..{ls.nodes} (launch.nodes, the most the job asks for), or leave it out to run on "
                      "exactly launch.nodes", reason="the job asks Slurm for --nodes=min_nodes-launch.nodes")
        )  # fmt: skip
    if sl.job_name is not None:
        values.append(("run.name", spec.run.name))  # it still appears in the header comment
    if source:
        values.append((SOURCE_FIELD, source))
    # --job-name: launch.slurm.job_name, default run.name
    values.append(
        ("launch.slurm.job_name", sl.job_name) if sl.job_name is not None else ("run.name", spec.run.name)
    )
    values += [(f"launch.slurm.{name}", getattr(sl, name)) for name in ("partition", "account", "qos", "time")
               if getattr(sl, name) is not None]  # fmt: skip
    if sl.output is not None:
        values.append(("launch.slurm.output", sl.output))
    else:
        values.append(("run.output_dir", default_output(run_dir)))
    errors += [p for field, value in values if (p := value_problem(field, value))]
    for i, line in enumerate(sl.extra):
        field = f"launch.slurm.extra[{i}]"
        problem = control_problem(field, line)  # the user's own option line, written as given
        if problem is not None:
            errors.append(problem)
        elif not line.startswith("-"):
            errors.append(
                SpecError(field, line, "write the option as on the sbatch command line, e.g. --exclusive")
            )
    tail = [(RUN_DIR_FIELD, run_dir)]
    if python is not None:
        tail.append((PYTHON_FIELD, python))
    if ls.master_addr is not None:
        tail.append(("launch.master_addr", ls.master_addr))
    return errors + [p for field, value in tail if (p := value_problem(field, value))]
