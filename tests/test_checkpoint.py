"""Checkpoint rules as pure functions on directories: markers, rotation, resume choice, RNG state,
and the safety scan that refuses pickle payloads before DeepSpeed unpickles anything.

No process group, no DeepSpeed engine: tags are plain directories, the engine is a stand-in.
"""

from __future__ import annotations

import os
import random
import shlex
from pathlib import Path

import helpers as h
import numpy as np
import pytest
import torch

from harness.errors import SpecError
from harness.train import checkpoint
from harness.train.safety import verify_checkpoint_files


def make_tag(run_dir: Path, step: int, complete: bool = True) -> Path:
    """A tag directory with a stand-in shard (and the COMPLETE marker when ``complete``)."""
    tag = checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step)
    (tag / "harness").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"rng": checkpoint.rng_state(), "client": {}, "step": step}, tag / "harness" / "rank-00000.pt")
    if complete:
        (tag / checkpoint.MARKER).write_text("{}\n")
    return tag


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir() if p.is_dir())


# --- rotation --------------------------------------------------------------------------------------


def test_rotation_keeps_the_newest_complete_ones(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    removed = checkpoint.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002"]
    assert tags(tmp_path) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("keep_last", [0, 1, -3])
def test_rotation_never_deletes_the_newest_complete(tmp_path, keep_last):
    for step in (1, 2):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 3, complete=False)  # being written right now
    checkpoint.rotate(tmp_path, keep_last=keep_last)
    assert tags(tmp_path) == ["step-00000002", "step-00000003"]


def test_rotation_deletes_only_after_the_new_marker_exists(tmp_path):
    make_tag(tmp_path, 10)
    make_tag(tmp_path, 20)
    new = make_tag(tmp_path, 30, complete=False)  # every rank still writing step 30
    checkpoint.rotate(tmp_path, keep_last=2)
    assert tags(tmp_path) == ["step-00000010", "step-00000020", "step-00000030"]
    (new / checkpoint.MARKER).write_text("{}\n")  # rank 0, after the barrier
    checkpoint.rotate(tmp_path, keep_last=2)
    assert tags(tmp_path) == ["step-00000020", "step-00000030"]


def test_rotation_removes_incomplete_leftovers_older_than_the_newest_complete(tmp_path):
    make_tag(tmp_path, 5, complete=False)  # a crashed attempt, superseded
    make_tag(tmp_path, 6)
    (checkpoint.checkpoints_dir(tmp_path) / "notes").mkdir()  # not a tag: never touched
    checkpoint.rotate(tmp_path, keep_last=3)
    assert tags(tmp_path) == ["notes", "step-00000006"]


def test_rotation_without_any_complete_checkpoint_deletes_nothing(tmp_path):
    make_tag(tmp_path, 1, complete=False)
    make_tag(tmp_path, 2, complete=False)
    assert checkpoint.rotate(tmp_path, keep_last=1) == []
    assert tags(tmp_path) == ["step-00000001", "step-00000002"]


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one shard per save, records what it saw."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.saved: list[str] = []
        self.loaded: list[str] = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        assert not (tag_dir / checkpoint.MARKER).exists(), "marker before the shards"
        assert save_latest is False  # DeepSpeed's `latest` would be published before every rank wrote
        if int(tag.split("-")[1]) == self.fail_at:
            raise OSError("disk full")
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(2)}}, tag_dir / "mp_rank_00_model_states.pt")
        self.saved.append(tag)

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded.append(tag)
        return str(Path(load_dir) / tag), {}


def test_save_writes_the_marker_last_and_rotates_after_it(tmp_path):
    engine = FakeEngine()
    for step in (1, 2, 3):
        tag = checkpoint.save(engine, tmp_path, step, 0, {"step": step, "sampler": {"position": step}}, 2)
        assert checkpoint.is_complete(tag)
        assert (tag / "harness" / "rank-00000.pt").is_file()
    assert tags(tmp_path) == ["step-00000002", "step-00000003"]
    assert (checkpoint.checkpoints_dir(tmp_path) / "latest").read_text() == "step-00000003"


def test_a_failed_save_leaves_no_marker_and_deletes_nothing(tmp_path):
    engine = FakeEngine(fail_at=3)
    checkpoint.save(engine, tmp_path, 1, 0, {}, 1)
    checkpoint.save(engine, tmp_path, 2, 0, {}, 1)
    with pytest.raises(checkpoint.CheckpointError, match="step-00000002 is kept"):
        checkpoint.save(engine, tmp_path, 3, 0, {}, 1)
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [2]
    assert checkpoint.find_resume(tmp_path, "auto").step == 2


# --- resume choice ---------------------------------------------------------------------------------


def test_find_resume_goes_by_marker_not_by_latest(tmp_path):
    make_tag(tmp_path, 4)
    make_tag(tmp_path, 6, complete=False)
    # DeepSpeed's own `latest` points at the incomplete tag (it publishes before every rank wrote).
    (checkpoint.checkpoints_dir(tmp_path) / "latest").write_text("step-00000006")
    found = checkpoint.find_resume(tmp_path, "auto")
    assert (found.tag, found.step) == ("step-00000004", 4)


def test_find_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    assert checkpoint.find_resume(tmp_path, "auto") is None
    make_tag(tmp_path, 1, complete=False)
    assert checkpoint.find_resume(tmp_path, "auto") is None
    make_tag(tmp_path, 2)
    assert checkpoint.find_resume(tmp_path, "never") is None


def test_an_explicit_incomplete_tag_is_refused(tmp_path):
    tag = make_tag(tmp_path, 6, complete=False)
    with pytest.raises(SpecError) as err:
        checkpoint.find_resume(tmp_path, str(tag))
    assert err.value.field == "checkpoint.resume"
    assert "COMPLETE" in err.value.message and "resume: auto" in err.value.message


def test_an_explicit_complete_tag_is_used(tmp_path):
    tag = make_tag(tmp_path, 7)
    make_tag(tmp_path, 9)
    assert checkpoint.find_resume(tmp_path, str(tag)).step == 7


@pytest.mark.parametrize("bad", ["nowhere", "checkpoints"])
def test_a_resume_path_that_is_not_a_tag_is_refused(tmp_path, bad):
    make_tag(tmp_path, 1)
    with pytest.raises(SpecError, match="checkpoint tag directory"):
        checkpoint.find_resume(tmp_path, str(tmp_path / bad))


def test_load_refuses_a_checkpoint_written_with_another_number_of_ranks(tmp_path):
    tag = make_tag(tmp_path, 3)
    engine = FakeEngine()
    info = checkpoint.find_resume(tmp_path, str(tag))
    with pytest.raises(SpecError, match="no harness state for rank 1"):
        checkpoint.load(engine, info, rank=1)
    assert engine.loaded == []


# --- RNG state -------------------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# --- safety scan -----------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command (what an attacker would plant in a shard)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant(path: Path, marker: Path) -> None:
    """Write a checkpoint-looking file whose unpickling would create ``marker``."""
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(f"touch {shlex.quote(str(marker))}")}, path)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "harness/rank-00000.pt"])
def test_safety_scan_refuses_a_planted_pickle_payload(tmp_path, monkeypatch, victim):
    monkeypatch.chdir(tmp_path)
    # A realistic, long run directory: the message must still name the file (values are cut at 120).
    tag = make_tag(tmp_path / "projects" / ("llama-7b-zero3-" + "x" * 60), 1)
    pwned = tmp_path / "PWNED"
    plant(tag / victim, pwned)
    with pytest.raises(SpecError) as err:
        verify_checkpoint_files(tag)
    assert victim in err.value.message
    assert "os.system" in err.value.message or "posix.system" in err.value.message
    assert not pwned.exists()


def test_safety_scan_accepts_plain_tensors(tmp_path):
    verify_checkpoint_files(make_tag(tmp_path, 1))


def test_safety_scan_refuses_an_unreadable_file(tmp_path):
    tag = make_tag(tmp_path, 1)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match="unreadable checkpoint file") as err:
        verify_checkpoint_files(tag)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err.value.message


def test_resume_scans_before_deepspeed_loads_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tag = make_tag(tmp_path, 2)
    pwned = tmp_path / "PWNED"
    plant(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", pwned)
    engine = FakeEngine()
    with pytest.raises(SpecError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        checkpoint.load(engine, checkpoint.find_resume(tmp_path, "auto"), rank=0)
    assert engine.loaded == []
    assert not pwned.exists()


def test_export_refuses_a_planted_payload_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    spec, run_dir = h.write_spec(tmp_path, "planted", zero_stage=0)
    h.prepare(spec)
    tag = make_tag(run_dir, 1)
    pwned = tmp_path / "PWNED"
    plant(tag / "mp_rank_00_model_states.pt", pwned)
    assert main(["export", str(run_dir), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ") and "mp_rank_00_model_states.pt would import" in err, err
    assert not pwned.exists()
    assert not (tmp_path / "hf").exists()
