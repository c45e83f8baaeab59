"""Multi-node launches on the real test cluster (scripts/test-cluster): Slurm batch jobs and pdsh over sshd.

Each test trains the same tiny fp32 Llama (torch AdamW, so losses are bit-exact) and compares its
per-step losses with one run of the same spec under the local launcher. Every test checks the exit
status (or the job's final state) AND rank 0's status.json. The pdsh test runs alone (pytest runs these
one at a time) and never signals the PDSH runner: its SIGTERM handler pkills every launch on the box.

    scripts/test-cluster/up.sh && pytest -m cluster tests/test_launch_cluster.py --durations=0
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cluster_env import cluster_env, require_cluster, sbatch_wait
from conftest import ROOT, free_port
from helpers import LAUNCH_TIMEOUT_S, TINY_SPEC, read_status, run_harness, step_losses

from harness.train.checkpoint import MARKER

# Each test runs one to three launches through Slurm or pdsh (10-30 s each when quiet) and waits for
# preemption and requeue; the fixtures add a local reference run.
pytestmark = [pytest.mark.cluster, pytest.mark.dist, pytest.mark.timeout(900)]

STEPS = 40
TINY_SET = [
    "model.overrides.num_hidden_layers=2",
    "model.overrides.hidden_size=64",
    "model.overrides.intermediate_size=128",
    "data.seq_len=64",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "schedule.warmup_steps=2",
    "optimizer.impl=torch",
    "precision.dtype=fp32",
    "checkpoint.export_hf=false",
    "launch.gpu=cpu",
]
SLURM_SET = ["launch.launcher=slurm", "launch.slurm.partition=debug", "launch.slurm.gres_gpus=false",
             "launch.slurm.time='00:15:00'"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One output_dir for every run here. Its tokenized-data cache (``.cache/data``, keyed by every
    input) links to one kept across sessions, as conftest does for DeepSpeed's op builds."""
    runs = tmp_path_factory.mktemp("runs")
    shared = Path(os.environ.get("HARNESS_TEST_DATA_CACHE", Path.home() / ".cache" / "harness-test-data"))
    shared.mkdir(parents=True, exist_ok=True)
    (runs / ".cache").mkdir()
    (runs / ".cache" / "data").symlink_to(shared, target_is_directory=True)
    return runs


@pytest.fixture(scope="module")
def reference(runs) -> dict[int, float]:
    """Per-step losses of the tiny spec on 2 ranks under the local launcher."""
    require_cluster("the multi-node launch tests (their local reference run)")
    start = time.monotonic()
    out = run_harness("train", TINY_SPEC, "--set", *TINY_SET, f"run.output_dir={runs}", "run.name=reference",
                  f"launch.master_port={free_port()}", env=dict(os.environ), timeout_s=LAUNCH_TIMEOUT_S)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_status(runs / "reference") == {"state": "complete", "step": STEPS}
    result = step_losses(runs / "reference")
    assert sorted(result) == list(range(1, STEPS + 1))
    print(f"\nlocal reference run: {time.monotonic() - start:.1f} s")
    return result


def job_info(job_id: str, env) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def submit(runs: Path, name: str, *more: str) -> tuple[str, Path, dict[str, str]]:
    env = cluster_env()
    out = run_harness("slurm", TINY_SPEC, "--submit", "--set", *TINY_SET, *SLURM_SET, f"run.output_dir={runs}",
                  f"run.name={name}", f"launch.master_port={free_port()}", *more, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted batch job (\d+)", out.stdout)
    assert job_id, out.stdout
    return job_id.group(1), runs / name, env


def job_output(run_dir: Path, job_id: str) -> str:
    return (run_dir / f"slurm-{job_id}.out").read_text(errors="replace")


@pytest.mark.parametrize("nodes, ranks_per_node", [(2, 1), (1, 2)], ids=["2nodes-x-1rank", "1node-x-2ranks"])
def test_slurm_job_trains_like_the_local_launcher(runs, reference, nodes, ranks_per_node):
    require_cluster("a Slurm batch job across the test cluster")
    start = time.monotonic()
    name = f"slurm-{nodes}x{ranks_per_node}"
    job_id, run_dir, env = submit(
        runs, name, f"launch.nodes={nodes}", f"launch.gpus_per_node={ranks_per_node}"
    )
    state = sbatch_wait(job_id, timeout_s=400)
    output = job_output(run_dir, job_id)
    assert state == "COMPLETED", output[-3000:]
    assert read_status(run_dir) == {"state": "complete", "step": STEPS}
    assert step_losses(run_dir) == reference
    info = job_info(job_id, env)
    assert f"NumNodes={nodes} " in info and ("NodeList=n[1-2]" in info) == (nodes == 2), info
    assert "run complete" in output
    print(
        f"\nslurm {nodes} node(s) x {ranks_per_node} rank(s): {time.monotonic() - start:.1f} s (job {job_id})"
    )


def wait_for_step(run_dir: Path, step: int, job_id: str, env, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(s >= step for s in step_losses(run_dir)):
            return
        info = job_info(job_id, env)
        assert "JobState=RUNNING" in info or "JobState=PENDING" in info, info
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never reached step {step}")


@pytest.mark.parametrize("how", ["usr1-to-batch-shell", "scontrol-requeue"])
def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(runs, reference, how):
    require_cluster("preempting a Slurm batch job")
    start = time.monotonic()
    job_id, run_dir, env = submit(runs, f"preempt-{how}", "launch.nodes=2", "launch.gpus_per_node=1")
    wait_for_step(run_dir, 3, job_id, env)
    if how == "usr1-to-batch-shell":  # what --signal=B:USR1@grace does before the time limit
        cmd = ["scancel", "--signal=USR1", "--batch", job_id]
    else:  # Slurm stops every process with TERM (KillWait 5 s here), then starts the job again
        cmd = ["scontrol", "requeue", job_id]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    state = sbatch_wait(job_id, timeout_s=500)
    output = job_output(run_dir, job_id)
    assert state == "COMPLETED", output[-3000:]
    assert read_status(run_dir) == {"state": "complete", "step": STEPS}
    assert re.search(r"\bRestarts=1\b", job_info(job_id, env)), "the job was not requeued"
    assert ("SIGUSR1 received" if how.startswith("usr1") else "SIGTERM received") in output
    assert "attempt 1 on" in output and "run complete" in output
    resumed = step_losses(run_dir)
    assert resumed == reference, "the loss trajectory differs from the uninterrupted run"
    ckpts = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert ckpts and all((p / MARKER).is_file() for p in ckpts), f"half-written checkpoint in {ckpts}"
    # save_every is 0: a checkpoint before the last step can only be the preemption's
    assert any(int(p.name.split("-")[-1]) < STEPS for p in ckpts), [p.name for p in ckpts]
    print(f"\nslurm preemption ({how}): {time.monotonic() - start:.1f} s (job {job_id})")


# --------------------------------------------------------------------------------------------- pdsh


class CmdlineWatch(threading.Thread):
    """Reads /proc/*/cmdline every 0.1 s during a launch: any process whose command line holds the
    secret is a failure; also records the env file's mode whenever it exists."""

    def __init__(self, secret: str, env_file: Path):
        super().__init__(daemon=True)
        self.secret, self.env_file = secret.encode(), env_file
        self.leaks: list[str] = []
        self.entry_seen = 0
        self.pdsh_seen = False
        self.env_file_modes: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if self.secret in cmdline:
                    self.leaks.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
                if b"harness.train.entry" in cmdline:
                    self.entry_seen += 1
                if cmdline.startswith(b"pdsh\0"):
                    self.pdsh_seen = True
            with contextlib.suppress(OSError):
                self.env_file_modes.add(stat.S_IMODE(self.env_file.stat().st_mode))
            time.sleep(0.1)


def test_pdsh_two_hosts_env_reaches_ranks_and_the_secret_stays_hidden(runs, reference, tmp_path):
    state_dir = require_cluster("a pdsh launch over the test sshd")
    start = time.monotonic()
    env = cluster_env()
    secret = "hf_" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:30]
    marker = "two words, 'quotes' \"too\"; $(touch PWNED) `touch PWNED` & | < > * ? ~ #"
    probe = tmp_path / "probe"
    probe.mkdir()
    env.update(
        HF_TOKEN=secret,
        HARNESS_TEST_MARKER=marker,
        HARNESS_TEST_PROBE_DIR=str(probe),
        PYTHONPATH=str(ROOT / "tests" / "workers" / "probe_site"),
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    run_dir = runs / "pdsh"
    master = env.get("HARNESS_TEST_MASTER_ADDR", "127.0.0.2")
    spec_args = [*TINY_SET, f"run.output_dir={runs}", "run.name=pdsh", "launch.launcher=pdsh",
                 f"launch.hostfile={hostfile}", "launch.nodes=2", "launch.gpus_per_node=1",
                 f"launch.master_addr={master}", f"launch.master_port={free_port()}",
                 "launch.env=[HF_TOKEN, HARNESS_TEST_MARKER, HARNESS_TEST_PROBE_DIR]"]  # fmt: skip
    dry = run_harness("train", TINY_SPEC, "--dry-run", "--set", *spec_args, env=env, cwd=tmp_path)
    assert (
        dry.returncode == 0
        and secret not in dry.stdout + dry.stderr
        and '"HF_TOKEN": "<hidden>"' in dry.stdout
    )

    watch = CmdlineWatch(secret, run_dir / "launch" / "rank_env.json")
    watch.start()
    try:
        out = run_harness(
            "train", TINY_SPEC, "--set", *spec_args, env=env, cwd=tmp_path, timeout_s=LAUNCH_TIMEOUT_S
        )
    finally:
        watch.stop.set()
        watch.join()
    # The PDSH runner's own lines are in launcher.log; the console shows only the harness's.
    output = out.stdout + out.stderr + (run_dir / "launch" / "launcher.log").read_text()
    assert out.returncode == 0, output[-4000:]
    assert read_status(run_dir) == {"state": "complete", "step": STEPS}
    assert step_losses(run_dir) == reference

    # It went through DeepSpeed's PDSH runner to both hosts, which logs its whole remote command.
    logged = re.search(r"cmd = pdsh .*-w node1,node2.*", output)
    assert "--launcher pdsh" in output and logged, output[-4000:]
    assert "export HARNESS_ENV_FILE=" in logged.group(0) and "HF_TOKEN" not in logged.group(0)
    print(f"\nthe PDSH runner's log line: {logged.group(0)}")
    # Both ranks got the listed variable byte for byte and the token; nothing ran the marker's commands.
    seen = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in probe.glob("rank*.json")}
    assert set(seen) == {"0", "1"}, seen
    token_sha = hashlib.sha256(secret.encode()).hexdigest()
    for rank in seen.values():
        assert rank["marker"] == marker and rank["hf_token_sha256"] == token_sha
    for where in (tmp_path, ROOT, Path.home(), runs):
        assert not list(where.glob("PWNED")), f"the marker's command substitution ran ({where})"

    # The token: in no output or log, no command line while it ran, no file left behind.
    assert secret not in output
    assert watch.pdsh_seen and watch.entry_seen, "the /proc watch never saw the launch"
    assert not watch.leaks, f"secret in a command line: {watch.leaks}"
    assert watch.env_file_modes == {0o600}, f"env file modes seen: {watch.env_file_modes}"
    assert not (run_dir / "launch" / "rank_env.json").exists(), "the env file outlived the run"
    for root in (run_dir, tmp_path, Path(state_dir)):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), f"secret written to {path}"
    print(f"\npdsh 2 hosts x 1 rank: {time.monotonic() - start:.1f} s")


# ------------------------------------------------------------------------------------------ openmpi


def test_openmpi_two_hosts_trains_like_the_local_launcher(runs, reference, tmp_path):
    require_cluster("an mpirun launch over the test sshd")
    if not shutil.which("mpirun"):
        pytest.skip("mpirun not installed (apt-get install openmpi-bin); the openmpi launcher needs it")
    start = time.monotonic()
    env = cluster_env()
    probe = tmp_path / "probe"
    probe.mkdir()
    marker = "$(touch PWNED) 'q' \"d\""
    env.update(HARNESS_TEST_MARKER=marker, HARNESS_TEST_PROBE_DIR=str(probe),
               PYTHONPATH=str(ROOT / "tests" / "workers" / "probe_site"))  # fmt: skip
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    run_dir = runs / "openmpi"
    out = run_harness("train", TINY_SPEC, "--set", *TINY_SET, f"run.output_dir={runs}", "run.name=openmpi",
                  "launch.launcher=openmpi", f"launch.hostfile={hostfile}", "launch.nodes=2", "launch.gpus_per_node=1",
                  f"launch.master_addr={env.get('HARNESS_TEST_MASTER_ADDR', '127.0.0.2')}",
                  f"launch.master_port={free_port()}", "launch.env=[HARNESS_TEST_MARKER, HARNESS_TEST_PROBE_DIR]",
                  env=env, cwd=tmp_path, timeout_s=LAUNCH_TIMEOUT_S)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert read_status(run_dir) == {"state": "complete", "step": STEPS}
    assert step_losses(run_dir) == reference
    seen = [json.loads(p.read_text()) for p in probe.glob("rank*.json")]
    assert sorted(r["rank"] for r in seen) == ["0", "1"] and all(r["marker"] == marker for r in seen)
    assert not list(tmp_path.glob("PWNED")) and not (run_dir / "launch" / "rank_env.json").exists()
    print(f"\nopenmpi 2 hosts x 1 rank: {time.monotonic() - start:.1f} s")
