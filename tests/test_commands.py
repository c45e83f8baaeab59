"""harness.launch.commands: the launch of every launcher as a pure (command, environment, files) value.

Secrets named in launch.env reach only the env file; values a remote shell would run are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import INJECTIONS, PY, SECRET, example_spec

from harness.errors import SpecError
from harness.launch import ENTRY_MODULE
from harness.launch import cli as launch_cli
from harness.launch.commands import Launch, build_launch
from harness.launch.envfile import ENV_FILE_VAR

pytestmark = pytest.mark.usefixtures("no_pwned")


def pdsh_spec(hostfile: Path, *more: str):
    return example_spec(
        "launch.launcher=pdsh",
        f"launch.hostfile={hostfile}",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        *more,
    )


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


def test_local_command():
    launch = build(example_spec("launch.master_port=29611"))
    assert launch.cmd == [
        PY, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29611", "--no_local_rank", "--module", ENTRY_MODULE, "--run-dir", "/runs/r",
    ]  # fmt: skip
    assert launch.env_file is None and not launch.set_env and not launch.unset_env and not launch.files


def test_local_run_dir_with_injection_strings_is_one_argv_element():
    for value in INJECTIONS:
        launch = build(example_spec(), run_dir=f"/runs/{value}")
        assert launch.cmd[-1] == f"/runs/{value}"


def test_local_launcher_refuses_several_nodes():
    with pytest.raises(SpecError, match="launch.nodes"):
        build(example_spec("launch.nodes=2", "launch.gpus_per_node=1"))


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
        build(example_spec("launch.launcher=pdsh"), None)


def test_openmpi_command_forwards_names_not_values(hostfile):
    spec = example_spec("launch.launcher=openmpi", f"launch.hostfile={hostfile}", "launch.nodes=2",
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
        build(example_spec("launch.launcher=openmpi", f"launch.hostfile={hostfile}", "launch.nodes=2",
                      "launch.gpus_per_node=1", "launch.include=node1@node2"), hostfile.read_text())  # fmt: skip


def test_slurm_launcher_points_to_harness_slurm():
    with pytest.raises(SpecError, match="harness slurm"):
        build(example_spec("launch.launcher=slurm"))
