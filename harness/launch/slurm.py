"""The sbatch script for ``launch.launcher: slurm``: pure rendering, one srun task per GPU, preemption-safe.

    harness slurm SPEC            # writes <run>/launch/job.sbatch
    harness slurm SPEC --submit   # ... and runs sbatch on it

What the script does (see slurm/README.md and slurm/template.sbatch for a rendered, commented one):

* ``#SBATCH`` directives from ``launch.slurm``, each under a comment saying what it does;
* one task per GPU (``--ntasks-per-node = launch.gpus_per_node``) started by ``srun``, no hostfile and
  no ssh; each task maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE itself
  (:mod:`harness.launch.rankenv`); MASTER_ADDR is the allocation's first host;
* preemption: ``--signal=B:USR1@<grace>`` signals the batch shell, whose trap forwards USR1 to srun and
  so to every rank (ranks finish the step, save a complete checkpoint, exit 0 with status
  ``preempted``); srun runs in the background because bash runs a trap only once the foreground
  command ends; then ``scontrol requeue`` and the requeued job resumes from the newest complete
  checkpoint (``checkpoint.resume: auto``). On TERM (Slurm preempting, requeueing or cancelling the
  job itself) the ranks checkpoint the same way, but Slurm decides whether the job runs again.

Every value is shell-quoted (shlex) on ``#SBATCH`` lines and in commands; control characters and
backslashes (sbatch's own directive parser treats ``\\`` as an escape even inside quotes) are refused
before rendering, by :mod:`harness.launch.slurm_checks` (which :func:`harness.validate.check_spec` also runs).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from harness.errors import SpecErrors
from harness.launch import ENTRY_MODULE
from harness.launch.slurm_checks import default_output, script_problems, spec_run_dir
from harness.rundir import RunDir
from harness.spec import RunSpec
from harness.specload import load_spec

STATUS_IN_SCRIPT = str(RunDir(Path("$run_dir")).status)
"""status.json as the batch script spells it, through its ``$run_dir`` variable."""


def render_sbatch(spec: RunSpec, *, run_dir: str, python: str, source: str = "") -> str:
    """The batch script that trains ``spec`` in ``run_dir`` with ``python``: spec in, script text out.

    ``source`` is the spec path named in the header ("" for none). Raises SpecErrors listing
    :func:`~harness.launch.slurm_checks.script_problems` first: ``harness slurm`` renders specs of any
    launcher before compiling them, and no value may reach the script unchecked.
    """
    problems = script_problems(spec, run_dir=run_dir, python=python, source=source)
    if problems:
        raise SpecErrors(problems)
    ls, sl = spec.launch, spec.launch.slurm
    if ls.master_addr is not None:
        master = f"export MASTER_ADDR={shlex.quote(ls.master_addr)}"
    else:
        master = _MASTER_FROM_NODELIST
    srun = ["srun", "--kill-on-bad-exit=1"]
    if sl.cpus_per_task is not None:
        # srun (22.05+) does not inherit --cpus-per-task from the allocation.
        srun.append(f"--cpus-per-task={sl.cpus_per_task}")
    if sl.min_nodes is not None:
        # The allocation carries no task count (see _directives): one task per GPU on every node it got.
        srun += [f"--ntasks-per-node={ls.gpus_per_node}", '--ntasks="$num_tasks"']
    srun_line = " ".join(srun) + f' "$python" -u -m {ENTRY_MODULE} --run-dir "$run_dir" &'
    head = f"# Rendered by `harness slurm{' ' + shlex.quote(source) if source else ''}`"
    lines = [
        "#!/bin/bash",
        f"{head} for run {shlex.quote(spec.run.name)}.",
        "# Submit with sbatch; submitting again later is safe: the run resumes from its newest complete checkpoint.",
        "#",
    ]
    for comment, text in _directives(spec, run_dir):
        lines += [f"# {comment}", f"#SBATCH {text}"]
    body = _BODY.format(
        run_dir_line=_assign("run_dir", shlex.quote(run_dir)),
        python_line=_assign("python", shlex.quote(python)),
        master=master,
        master_port=ls.master_port,
        srun_line=srun_line,
        requeue=_REQUEUE if sl.requeue else _NO_REQUEUE,
        requeue_stalled=_REQUEUE_STALLED if sl.requeue else _NO_REQUEUE_STALLED,
        status=STATUS_IN_SCRIPT,
        replan="" if sl.min_nodes is None else _REPLAN.format(gpus_per_node=ls.gpus_per_node),
    )
    return "\n".join(lines) + "\n" + body


def _directives(spec: RunSpec, run_dir: str) -> list[tuple[str, str]]:
    """The ``#SBATCH`` lines as (comment above it, directive), string values shell-quoted."""
    ls, sl = spec.launch, spec.launch.slurm
    directives: list[tuple[str, str]] = []

    def directive(comment: str, flag: str, value: object = None) -> None:
        if value is None:
            directives.append((comment, flag))
        else:
            directives.append((comment, f"{flag}={shlex.quote(value) if isinstance(value, str) else value}"))

    job_name = sl.job_name if sl.job_name is not None else spec.run.name
    directive(
        "Name shown by squeue and sacct (launch.slurm.job_name, default run.name).", "--job-name", job_name
    )
    for field, flag, comment in (
        ("partition", "--partition", "Partition (queue) to run in."),
        ("account", "--account", "Account charged for the allocation."),
        ("qos", "--qos", "Quality of service (priority and limits)."),
        ("time", "--time", "Wall-clock limit; USR1 comes preempt_signal_grace_s before it."),
    ):
        value = getattr(sl, field)
        if value is not None:
            directive(comment, flag, value)
    if sl.min_nodes is None:
        directive("Machines (launch.nodes).", "--nodes", ls.nodes)
        directive("One task per GPU: srun starts launch.gpus_per_node ranks on every machine.",
                  "--ntasks-per-node", ls.gpus_per_node)  # fmt: skip
    else:
        directive("Machines: as many as are free, at least launch.slurm.min_nodes, at most launch.nodes.",
                  "--nodes", f"{sl.min_nodes}-{ls.nodes}")  # fmt: skip
        # No --ntasks-per-node: sbatch turns it into ntasks = min_nodes × tasks per node, and select/cons_tres
        # never gives a job more nodes than tasks (choose_nodes), so every attempt would get min_nodes.
        cores = ls.gpus_per_node * (sl.cpus_per_task or 1)
        directive("CPU cores on every machine for its launch.gpus_per_node ranks (srun starts one per GPU).",
                  "--mincpus", cores)  # fmt: skip
    if sl.gres_gpus:
        directive("GPUs per machine, one per task (launch.slurm.gres_gpus: false on CPU-only nodes).",
                  "--gpus-per-node", ls.gpus_per_node)  # fmt: skip
    if sl.cpus_per_task is not None:
        directive("CPU cores per task (data loading, host-side optimizer work).", "--cpus-per-task",
                  sl.cpus_per_task)  # fmt: skip
    if sl.output is not None:
        directive("Where the job's output goes (%j = job id).", "--output", sl.output)
    else:
        directive("Where the job's output goes: the run directory (%j = job id).", "--output",
                  default_output(run_dir))  # fmt: skip
    directive("Append, so a requeued job keeps the output of earlier attempts.", "--open-mode", "append")
    directive(f"USR1 to this batch shell {sl.preempt_signal_grace_s} s before the time limit: checkpoint and requeue.",
              "--signal", f"B:USR1@{sl.preempt_signal_grace_s}")  # fmt: skip
    if sl.requeue:
        directive(
            "The job may be requeued (by the trap below, by preemption or after a node failure).", "--requeue"
        )
    else:
        directive("Never requeue (launch.slurm.requeue: false): a preempted run stops after its checkpoint.",
                  "--no-requeue")  # fmt: skip
    directive("Tasks inherit the submitting shell's environment (launch.env values are never written here).",
              "--export", "ALL")  # fmt: skip
    for line in sl.extra:
        directive("Extra directive from launch.slurm.extra.", line)  # an sbatch option line, written as given
    return directives


_MASTER_FROM_NODELIST = """\
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# A NodeName need not resolve (slurm.conf NodeAddr=); ask Slurm for the node's address then.
if ! getent hosts "$head_node" >/dev/null; then
  head_node="$(scontrol show node -o "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')"
fi
export MASTER_ADDR="$head_node\""""

_BODY = """
# Not -e: srun's exit status and status.json are examined below.
set -uo pipefail

{run_dir_line}
{python_line}

# Each task computes its own rank from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; values inherited from
# the submitting shell (an earlier launch, an mpirun) must not override that.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE HARNESS_ENV_FILE "${{!OMPI_COMM_WORLD_@}}"
# Rank 0 runs on the first host of the allocation; it serves the rendezvous.
{master}
export MASTER_PORT={master_port}
echo "harness: job ${{SLURM_JOB_ID}} attempt ${{SLURM_RESTART_COUNT:-0}} on ${{SLURM_JOB_NODELIST}};" \\
  "rendezvous ${{MASTER_ADDR}}:${{MASTER_PORT}}"
{replan}
# status.json is rank 0's last word on this attempt; a stale one must not pass for it.
rm -f -- "{status}"

srun_pid=""
signalled=""
# USR1 (time limit, scancel --signal=USR1 --batch) or TERM (preemption, scontrol requeue, scancel): srun
# forwards USR1 to every rank, which finishes its step, saves a complete checkpoint and exits 0.
# shellcheck disable=SC2329  # called by the traps below
forward_to_ranks() {{
  signalled="$1"
  echo "harness: SIG$1 received: every rank checkpoints at the end of its current step and stops"
  if [[ -n "$srun_pid" ]]; then
    kill -USR1 "$srun_pid" 2>/dev/null || true
  fi
}}
trap 'forward_to_ranks USR1' USR1
trap 'forward_to_ranks TERM' TERM

rc=0
if [[ -z "$signalled" ]]; then
  # In the background: bash runs a trap only after the foreground command has finished.
  {srun_line}
  srun_pid=$!
  if [[ -n "$signalled" ]]; then
    kill -USR1 "$srun_pid" 2>/dev/null || true
  fi
  wait "$srun_pid" || rc=$?
  # A trap interrupts `wait` (status > 128) while srun runs on; wait for srun itself.
  while ((rc > 128)) && kill -0 "$srun_pid" 2>/dev/null; do
    rc=0
    wait "$srun_pid" || rc=$?
  done
fi

state="$(sed -n 's/.*"state": *"\\([a-z]*\\)".*/\\1/p' "{status}" 2>/dev/null || true)"
case "$state" in
  complete)
    echo "harness: run complete (srun exit status $rc)"
    exit 0
    ;;
  preempted)
    if [[ "$signalled" == TERM ]]; then
      # Slurm itself is stopping the job (preemption, scontrol requeue, scancel): it decides what comes next.
      echo "harness: checkpoint saved; Slurm is ending this attempt (a requeued job resumes from it)"
      exit 0
    fi
{requeue}
    ;;
  stalled)
    # A rank stopped making progress and the watchdog ended the run (train.stall_timeout): treat it as a
    # preemption; the run resumes from its newest complete checkpoint.
    echo "harness: a rank stalled (srun exit status $rc); see $run_dir/status.json and $run_dir/launch/heartbeat/" >&2
{requeue_stalled}
    ;;
  *)
    echo "harness: ranks stopped without completing (srun exit status $rc, status '${{state:-none}}')" >&2
    if ((rc == 0)); then
      rc=1
    fi
    exit "$rc"
    ;;
esac
"""

_REPLAN = """
# launch.slurm.min_nodes: this attempt may have fewer nodes than the one that wrote the run directory (a
# node failed) or more. Re-plan it for the nodes Slurm gave: same global batch (micro batch x
# accumulation re-solved), the newest checkpoint converted when the data-parallel size changed, the
# planner's memory check. A world that cannot continue the run ends the job here, without a requeue.
num_tasks=$((SLURM_JOB_NUM_NODES * {gpus_per_node}))
replan_rc=0
"$python" -m harness.launch.replan --run-dir "$run_dir" --nodes "$SLURM_JOB_NUM_NODES" || replan_rc=$?
if ((replan_rc != 0)); then
  echo "harness: the run cannot continue on ${{SLURM_JOB_NUM_NODES}} node(s) (see above); not requeueing" >&2
  exit "$replan_rc"
fi
"""

_REQUEUE = """\
    echo "harness: checkpoint saved; requeueing job ${SLURM_JOB_ID} (it resumes from that checkpoint)"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      echo "harness: scontrol requeue failed; submit this script again to resume" >&2
      exit 1
    fi
    exit 0"""

_NO_REQUEUE = """\
    echo "harness: checkpoint saved; requeue is off (launch.slurm.requeue), submit this script again to resume"
    exit 0"""


_REQUEUE_STALLED = """\
    echo "harness: requeueing job ${SLURM_JOB_ID} (it resumes from the newest complete checkpoint)"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      echo "harness: scontrol requeue failed; submit this script again to resume" >&2
      exit 76
    fi
    exit 0"""

_NO_REQUEUE_STALLED = """\
    echo "harness: requeue is off (launch.slurm.requeue); submit this script again to resume" >&2
    exit 76"""


def _assign(name: str, quoted: str) -> str:
    """``name=quoted``, telling shellcheck that a ``$`` inside the single quotes is meant literally."""
    literal = "# shellcheck disable=SC2016  # literal on purpose\n" if "$" in quoted or "`" in quoted else ""
    return f"{literal}{name}={quoted}"


def render_example(spec_path) -> str:
    """The script checked in under slurm/ for an example spec: run dir as written, ``python3`` from PATH.

    (``harness slurm`` renders the same with the absolute run directory and this interpreter.)
    """
    from pathlib import Path

    spec = load_spec(str(spec_path))
    run_dir = spec_run_dir(spec)
    root = Path(__file__).resolve().parents[2]
    try:
        source = str(Path(spec_path).resolve().relative_to(root))
    except ValueError:
        source = str(spec_path)
    return render_sbatch(spec, run_dir=run_dir, python="python3", source=source)


def _regenerate_examples() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out_dir = root / "slurm" / "examples"
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec_path in sorted((root / "examples").glob("*.yaml")):
        if load_spec(str(spec_path)).launch.launcher == "slurm":
            (out_dir / f"{spec_path.stem}.sbatch").write_text(render_example(spec_path))
            print(f"wrote {out_dir / spec_path.stem}.sbatch")
    (root / "slurm" / "template.sbatch").write_text(render_example(root / "slurm" / "template.yaml"))
    print(f"wrote {root / 'slurm' / 'template.sbatch'}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--examples"]:
        _regenerate_examples()
    elif len(sys.argv) == 2:
        sys.stdout.write(render_example(sys.argv[1]))
    else:
        sys.exit("usage: python -m harness.launch.slurm (--examples | SPEC.yaml)")
