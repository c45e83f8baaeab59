"""Shared test helpers: free ports, one DeepSpeed extension cache, paths."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# One JIT cache for DeepSpeed's CPU ops across tests and CI (building them costs 30-90 s once).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "harness-torch-extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenize the default corpus once per machine, not once per test's run directory.
os.environ.setdefault("HARNESS_DATA_CACHE", str(Path.home() / ".cache" / "harness-test-data"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    """A TCP port nobody listens on right now (tests run launches side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    """A free rendezvous port for one launch."""
    return free_port()


def harness_cmd(*args: str) -> list[str]:
    """Command line running the CLI of this checkout with this interpreter."""
    return [sys.executable, "-m", "harness", *args]


def _mapped_shm_buffers() -> set[str]:
    """Paths of DeepSpeed all-reduce buffers some live process has mapped (another pytest's launch)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(
            line.split(maxsplit=5)[-1] for line in text.splitlines() if "deepspeed_allreduce_buffer" in line
        )
    return mapped


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* behind
    (tens of MB per rank and port); over a suite of launches they fill RAM until the OOM killer
    strikes. After each test the buffers no live process maps are removed; one still mapped belongs
    to a launch of another pytest on this box (removing it would break that launch's next rendezvous)."""
    yield
    leftovers = list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    if not leftovers:
        return
    mapped = _mapped_shm_buffers()
    for leftover in leftovers:
        if str(leftover) not in mapped:
            leftover.unlink(missing_ok=True)


@pytest.fixture
def no_pwned(tmp_path):
    """After the test: no PWNED file in the working directory, the repo or the test's tmp dir (the
    launch tests feed shell injection strings to the builders; ``usefixtures("no_pwned")``)."""
    yield
    for where in (Path.cwd(), ROOT, tmp_path):
        assert not list(where.rglob("PWNED")), f"an injection string ran a command (PWNED in {where})"


@pytest.fixture
def hostfile(tmp_path) -> Path:
    """A two-host hostfile, one slot each."""
    path = tmp_path / "hostfile"
    path.write_text("node1 slots=1\nnode2 slots=1\n")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a ``dist`` or ``cluster`` test without its own ``@pytest.mark.timeout(N)``: the default
    (pyproject.toml, sized for the fast tier) would kill a launch, and a bigger default would let a hung
    fast test hold CI for minutes."""
    missing = [
        item.nodeid
        for item in items
        if (item.get_closest_marker("dist") or item.get_closest_marker("cluster"))
        and item.get_closest_marker("timeout") is None
    ]
    if missing:
        raise pytest.UsageError(
            "dist/cluster tests need an explicit @pytest.mark.timeout(N) sized from their measured "
            "duration (pytest --durations=0), 3-4x for a loaded CI box:\n  " + "\n  ".join(missing)
        )
