"""harness.launch.envfile: the 0600 file that carries secret values to the ranks."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import SECRET

from harness.launch.envfile import masked, read_env_file, write_env_file

pytestmark = pytest.mark.usefixtures("no_pwned")


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
