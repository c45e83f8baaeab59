"""harness.launch.slurm_checks as pure functions: each rule's words, the field it names and its fix; the
rule in check_spec for Slurm specs only; the renderer refusing what the checks list."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import SpecError, SpecErrors
from harness.launch.slurm import render_sbatch
from harness.launch.slurm_checks import (
    PYTHON_FIELD,
    RUN_DIR_FIELD,
    SOURCE_FIELD,
    default_output,
    script_problems,
    slurm_problems,
    spec_run_dir,
    value_problem,
)
from harness.specload import load_spec
from harness.validate import check_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PY = "/opt/venv/bin/python"


def slurm_spec(*overrides: str):
    """The Slurm example, valid as shipped, with ``--set`` style overrides."""
    return load_spec(str(EXAMPLES / "tiny-cpu-slurm.yaml"), list(overrides))


def only(problems: list[SpecError]) -> SpecError:
    assert len(problems) == 1, [p.message for p in problems]
    return problems[0]


def test_a_valid_spec_has_no_problems():
    spec = slurm_spec()
    assert slurm_problems(spec) == []
    assert script_problems(spec, run_dir="/runs/tiny-cpu-slurm", python=PY, source="examples/x.yaml") == []
    check_spec(spec, spec.world_size)  # does not raise


def test_value_problem_words_for_control_characters_backslashes_and_empty_values():
    nl = value_problem("launch.slurm.partition", "a\nb")
    assert nl.field == "launch.slurm.partition" and nl.value == "a\nb"
    assert nl.message == (
        "launch.slurm.partition = 'a\\nb': control character \\n: a newline ends the #SBATCH directive and the "
        "rest would run as a command. Fix: remove newlines and other control characters"
    )
    backslash = value_problem("launch.slurm.qos", "a\\b")
    assert backslash.message == (
        "launch.slurm.qos = 'a\\\\b': sbatch reads '\\' in a directive as an escape, even inside quotes. "
        "Fix: remove the backslash"
    )
    assert value_problem("launch.slurm.time", "").message == (
        "launch.slurm.time = ''. Fix: give a value or remove the key"
    )
    assert value_problem("launch.slurm.time", "01:00:00") is None
    # shell metacharacters are fine: the renderer quotes them
    assert value_problem("launch.slurm.account", "$(touch PWNED) 'x'") is None


@pytest.mark.parametrize("name", ["partition", "account", "qos", "time", "job_name", "output"])
@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("", "give a value or remove the key"),
        ("a\\b", "remove the backslash"),
        ("a\x1bb", "remove newlines and other control characters"),
    ],
)
def test_every_directive_value_is_checked_by_name(name, value, fix):
    spec = slurm_spec()
    setattr(
        spec.launch.slurm, name, value
    )  # the loader refuses control characters; the check must not rely on it
    problem = only(slurm_problems(spec))
    assert problem.field == f"launch.slurm.{name}" and problem.fix == fix


@pytest.mark.parametrize(
    ("override", "field", "fix"),
    [
        ("launch.slurm.cpus_per_task=0", "launch.slurm.cpus_per_task", "use a positive number of cores"),
        (
            "launch.slurm.preempt_signal_grace_s=0",
            "launch.slurm.preempt_signal_grace_s",
            "use 1..65535 seconds (long enough to finish a step and save a checkpoint)",
        ),
        ("launch.slurm.preempt_signal_grace_s=65536", "launch.slurm.preempt_signal_grace_s", "use 1..65535"),
        (
            "launch.slurm.extra=['touch PWNED']",
            "launch.slurm.extra[0]",
            "write the option as on the sbatch command line, e.g. --exclusive",
        ),
        ("launch.master_addr=''", "launch.master_addr", "give a value or remove the key"),
        ("launch.master_addr='h\\1'", "launch.master_addr", "remove the backslash"),
        ("run.output_dir='/r\\s'", "run.output_dir", "remove the backslash"),  # the default --output
    ],
)
def test_numbers_extra_lines_and_addresses(override, field, fix):
    problems = slurm_problems(slurm_spec(override))
    assert problems[0].field == field and problems[0].fix.startswith(fix)


def test_extra_lines_refuse_control_characters_but_keep_backslashes():
    spec = slurm_spec("launch.slurm.extra=['--exclusive', '--comment=a\\b']")
    assert slurm_problems(spec) == []
    spec.launch.slurm.extra = ["--x=\n#SBATCH --wrap=touch PWNED"]
    problem = only(slurm_problems(spec))
    assert problem.field == "launch.slurm.extra[0]" and "control character \\n" in problem.message


def test_run_name_is_checked_where_it_reaches_the_script():
    spec = slurm_spec("launch.slurm.job_name=job")
    spec.run.name = "a\\b"
    fields = [p.field for p in slurm_problems(spec)]
    # the header comment names the run; the default --output and the run directory contain it
    assert fields == ["run.name", "run.output_dir", RUN_DIR_FIELD]


def test_default_output_and_run_dir_as_the_spec_writes_them():
    spec = slurm_spec("run.output_dir=runs/", "run.name=r")
    assert spec_run_dir(spec) == "runs/r"
    assert default_output("/runs/50%") == "/runs/50%%/slurm-%j.out"


def test_script_problems_add_counts_interpreter_and_spec_path_in_the_order_users_see():
    spec = slurm_spec("launch.nodes=0", "launch.slurm.qos=''")
    problems = script_problems(spec, run_dir="/runs/a\nb", python="/py\\x", source="s\x00.yaml")
    assert [(p.field, p.fix) for p in problems] == [
        ("launch.nodes", "use a positive number"),
        (SOURCE_FIELD, "remove newlines and other control characters"),
        ("launch.slurm.qos", "give a value or remove the key"),
        ("run.output_dir", "remove newlines and other control characters"),
        (RUN_DIR_FIELD, "remove newlines and other control characters"),
        (PYTHON_FIELD, "remove the backslash"),
    ]
    assert [
        p.field for p in script_problems(slurm_spec("launch.gpus_per_node=0"), run_dir="/r", python=PY)
    ] == ["launch.gpus_per_node"]


def test_check_spec_runs_the_rule_for_slurm_specs_only():
    bad = "launch.slurm.partition=''"
    with pytest.raises(SpecErrors) as err:
        check_spec(slurm_spec(bad), 2)
    assert [e.message for e in err.value.errors] == [
        "launch.slurm.partition = ''. Fix: give a value or remove the key"
    ]
    local = slurm_spec(bad, "launch.launcher=local")
    assert slurm_problems(local) == []
    check_spec(local, 2)  # launch.slurm is not read by a local run


def test_the_renderer_refuses_exactly_what_the_checks_list():
    spec = slurm_spec("launch.slurm.partition=''", "launch.slurm.cpus_per_task=0")
    expected = script_problems(spec, run_dir="/r", python=PY)
    with pytest.raises(SpecErrors) as err:
        render_sbatch(spec, run_dir="/r", python=PY)
    assert [e.message for e in err.value.errors] == [e.message for e in expected]
    # a local spec too: `harness slurm` renders whatever the launcher says
    with pytest.raises(SpecErrors):
        render_sbatch(
            slurm_spec("launch.slurm.partition=''", "launch.launcher=local"), run_dir="/r", python=PY
        )
