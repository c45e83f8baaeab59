"""What ``harness train`` refuses before it writes or launches anything (issue 11, items 2 and 8).

Each case goes through the CLI: exit 2, one ``harness: error:`` line naming the field, no run directory
written, nothing launched. Fast: none of them gets as far as the launcher.
"""

from __future__ import annotations

import json
import os
import socket

from helpers import run_harness, write_spec

from harness.rundir import RunDir
from harness.runlock import RunLock


def _refused(tmp_path, *sets: str, expect: str) -> str:
    spec_path, run_dir = write_spec(tmp_path, "pre")
    proc = run_harness("train", str(spec_path), "--set", *sets, cwd=tmp_path)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr
    assert expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists(), proc.stderr
    return lines[0]


def test_missing_data_file(tmp_path):
    _refused(tmp_path, f"data.files=[{tmp_path / 'nope.jsonl'}]", expect="data.files = ")


def test_empty_and_binary_jsonl(tmp_path):
    empty, binary = tmp_path / "empty.jsonl", tmp_path / "binary.jsonl"
    empty.write_text("")
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert "the file is empty" in _refused(tmp_path, f"data.files=[{empty}]", expect="data.files")
    assert "binary data" in _refused(tmp_path, f"data.files=[{binary}]", expect="data.files")


def test_missing_tokenizer_path(tmp_path):
    _refused(tmp_path, f"data.tokenizer={tmp_path / 'tok'}", expect="data.tokenizer = ")


def test_missing_model_directory_names_the_model_not_the_vocab(tmp_path):
    line = _refused(tmp_path, "model.preset=null", f"model.name_or_path={tmp_path / 'model'}",
                    expect="model.name_or_path = ")  # fmt: skip
    assert "vocab_size" not in line


def test_spec_over_1_mb(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("run: {name: big}\n# " + "x" * 2_000_000 + "\n")
    proc = run_harness("train", str(big), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("harness: error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_second_launch_on_a_held_run_directory_is_refused_naming_the_holder(tmp_path):
    spec_path, run_dir = write_spec(tmp_path, "held")
    lock_path = RunDir(run_dir).lock
    with RunLock(lock_path):
        proc = run_harness("train", str(spec_path), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"pid {os.getpid()} on {socket.gethostname()}" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "launch of" not in proc.stderr
        assert sorted(p.name for p in run_dir.rglob("*")) == ["launch", "run.lock"]  # nothing written
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


def test_missing_resume_checkpoint(tmp_path):
    _refused(
        tmp_path, f"checkpoint.resume={tmp_path / 'nowhere' / 'step-00000001'}", expect="checkpoint.resume = "
    )
