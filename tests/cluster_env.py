"""Reach the test cluster (Slurm nodes n1/n2, sshd hosts node1/node2 on loopback) from tests.

`scripts/test-cluster/up.sh [STATE_DIR]` starts the daemons and writes `STATE_DIR/env.sh`; CI runs it
before pytest and sets `HARNESS_REQUIRE_CLUSTER=1`, so a missing cluster fails tests instead of skipping
them. Locally:

    scripts/test-cluster/install.sh && scripts/test-cluster/up.sh
    pytest -m cluster
    scripts/test-cluster/down.sh

A test that needs the daemons starts with `require_cluster("what it does")` and runs commands with
`env=cluster_env()` (PATH with the ssh wrapper first, SLURM_CONF, PDSH_RCMD_TYPE, HARNESS_TEST_*).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

DEFAULT_STATE_DIR = Path("/tmp/harness-test-cluster")
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts" / "test-cluster"
SBATCH_WAIT = SCRIPTS_DIR / "sbatch_wait.sh"

_EXPORT_LINE = re.compile(r"export ([A-Za-z_][A-Za-z0-9_]*)=(.*)")
# One token of an env.sh value: 'literal', "text with $VAR", $VAR / ${VAR}, \<char>, or plain characters.
_VALUE_TOKEN = re.compile(
    r"'(?P<single>[^']*)'"
    r'|"(?P<double>[^"\\`$]*(?:\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})[^"\\`$]*)*)"'
    r"|\$(?P<var>[A-Za-z_][A-Za-z0-9_]*)|\$\{(?P<bracedvar>[A-Za-z_][A-Za-z0-9_]*)\}"
    r"|\\(?P<escaped>.)"
    r"|(?P<plain>[A-Za-z0-9_./:,=@%+-]+)"
)
_VARIABLE = re.compile(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")


def parse_env_sh(text: str, base_env: dict[str, str]) -> dict[str, str]:
    """Return the variables that sourcing `text` (an env.sh from up.sh) would export, without a shell.

    Accepts only blank lines, comments and `export NAME=VALUE`, where VALUE is made of single-quoted
    literals, double-quoted text, backslash escapes, plain characters and `$NAME`/`${NAME}` expansions
    (looked up in earlier exports, then `base_env`; unset expands to ""). Anything else (command
    substitution, backticks, other commands) raises ValueError naming the line, so nothing in the file
    is ever executed.
    """
    exported: dict[str, str] = {}

    def lookup(name: str) -> str:
        return exported.get(name, base_env.get(name, ""))

    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXPORT_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"env.sh line {line_number}: expected `export NAME=VALUE`, got {raw_line!r}")
        name, value_text = match.groups()
        parts: list[str] = []
        position = 0
        while position < len(value_text):
            token = _VALUE_TOKEN.match(value_text, position)
            if token is None:
                raise ValueError(
                    f"env.sh line {line_number}: unsupported shell syntax at {value_text[position:]!r} "
                    "(only quoted literals and $NAME expansions are allowed)"
                )
            if token["single"] is not None:
                parts.append(token["single"])
            elif token["double"] is not None:
                parts.append(_VARIABLE.sub(lambda var: lookup(var[1] or var[2]), token["double"]))
            elif token["var"] or token["bracedvar"]:
                parts.append(lookup(token["var"] or token["bracedvar"]))
            elif token["escaped"] is not None:
                parts.append(token["escaped"])
            else:
                parts.append(token["plain"])
            position = token.end()
        exported[name] = "".join(parts)
    return exported


def cluster_state_dir() -> Path | None:
    """The test cluster's STATE_DIR: $HARNESS_TEST_CLUSTER, else the default dir if its env.sh exists."""
    configured = os.environ.get("HARNESS_TEST_CLUSTER")
    if configured:
        return Path(configured)
    if (DEFAULT_STATE_DIR / "env.sh").is_file():
        return DEFAULT_STATE_DIR
    return None


def cluster_env() -> dict[str, str]:
    """os.environ plus the exports of STATE_DIR/env.sh (parsed, never executed by a shell)."""
    state_dir = cluster_state_dir()
    if state_dir is None or not (state_dir / "env.sh").is_file():
        raise FileNotFoundError(
            f"no test cluster env.sh (looked in {state_dir or DEFAULT_STATE_DIR}); "
            "run scripts/test-cluster/up.sh first"
        )
    env = dict(os.environ)
    env.update(parse_env_sh((state_dir / "env.sh").read_text(), env))
    return env


def _daemon_is_running(pid_file: Path) -> bool:
    """The pid in pid_file is a live, non-zombie process of the daemon the file is named after."""
    try:
        pid = int(pid_file.read_text().strip())
        status = Path(f"/proc/{pid}/status").read_text()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return False
    state = re.search(r"^State:\s*(\S)", status, re.MULTILINE)
    # A zombie still answers kill(pid, 0); PID 1 here reaps orphans late.
    return state is not None and state[1] not in "ZX" and comm == pid_file.stem.split("-")[0]


def cluster_problem() -> str | None:
    """Why the test cluster is not usable, or None when env.sh exists and every daemon is running."""
    state_dir = cluster_state_dir()
    if state_dir is None:
        return f"no {DEFAULT_STATE_DIR}/env.sh and HARNESS_TEST_CLUSTER is not set"
    env_file = state_dir / "env.sh"
    if not env_file.is_file():
        return f"{env_file} does not exist (cluster down, or up.sh failed)"
    try:
        exported = parse_env_sh(env_file.read_text(), dict(os.environ))
    except ValueError as error:
        return str(error)
    slurm_nodes = exported.get("HARNESS_TEST_SLURM_NODES", "").split(",")
    pid_files = [
        state_dir / "munge" / "munged.pid",
        state_dir / "slurm" / "slurmctld.pid",
        *(state_dir / "slurm" / f"slurmd-{node}.pid" for node in slurm_nodes if node),
        state_dir / "ssh" / "sshd.pid",
    ]
    stopped = [
        str(pid_file.relative_to(state_dir)) for pid_file in pid_files if not _daemon_is_running(pid_file)
    ]
    if stopped:
        return f"daemons not running in {state_dir}: {', '.join(stopped)}"
    return None


def require_cluster(what: str) -> Path:
    """Return STATE_DIR if the test cluster is up; otherwise skip the test, or fail it under CI.

    `what` says what the test needs the cluster for; it goes into the skip/fail message. With
    HARNESS_REQUIRE_CLUSTER=1 (CI sets it) a missing cluster is a failure, never a silent skip.
    """
    problem = cluster_problem()
    if problem is not None:
        message = f"{what} needs the test cluster (scripts/test-cluster/up.sh): {problem}"
        if os.environ.get("HARNESS_REQUIRE_CLUSTER") == "1":
            pytest.fail(message + " [HARNESS_REQUIRE_CLUSTER=1]", pytrace=False)
        pytest.skip(message)
    state_dir = cluster_state_dir()
    assert state_dir is not None  # cluster_problem() returned None
    return state_dir


def sbatch(*args: str, cwd: Path | str | None = None) -> int:
    """Submit a batch job (`sbatch --parsable ARGS`) to the test cluster; return its job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=cwd,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return int(result.stdout.strip().split(";")[0])


def sbatch_wait(jobid: int | str, timeout_s: float = 120) -> str:
    """Wait for a job through scripts/test-cluster/sbatch_wait.sh; return its final state (e.g. COMPLETED).

    A requeued job is waited for until it ends for good. Raises TimeoutError if it has not ended after
    timeout_s.
    """
    whole_seconds = max(1, int(timeout_s + 0.999))
    result = subprocess.run(
        [str(SBATCH_WAIT), str(jobid), str(whole_seconds)],
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=whole_seconds + 30,
    )
    state = result.stdout.strip()
    if result.returncode == 124:
        raise TimeoutError(f"job {jobid} not finished after {whole_seconds} s: {result.stderr.strip()}")
    if result.returncode not in (0, 1) or not state:
        raise RuntimeError(f"sbatch_wait.sh {jobid} failed ({result.returncode}): {result.stderr.strip()}")
    return state
