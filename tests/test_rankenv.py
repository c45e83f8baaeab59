"""harness.launch.rankenv: Slurm and Open MPI variables mapped to torch.distributed's, without a daemon."""

from __future__ import annotations

import pytest
from helpers import SECRET

from harness.launch.envfile import ENV_FILE_VAR, write_env_file
from harness.launch.rankenv import apply_scheduler_env, first_host_of_nodelist, scheduler_env

pytestmark = pytest.mark.usefixtures("no_pwned")


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
