"""Checkpoint integrity as pure functions on directories: the COMPLETE marker's file list and layout,
verification of sizes and checksums, setting a failed tag aside and falling back, rotation around
set-aside tags, a failed save, ``harness checkpoint verify`` and export's refusal.

No process group: the engine is a stand-in that writes through a checkpoint engine as DeepSpeed does.
"""

from __future__ import annotations

import errno
import json
import zlib
from pathlib import Path

import helpers as h
import pytest
import torch

from harness.cli import main
from harness.errors import SpecError
from harness.train import checkpoint, integrity

SHARDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class FakeCheckpointEngine:
    """DeepSpeed's TorchCheckpointEngine: ``save(state_dict, path)``; can fail like a full disk."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

    def save(self, state_dict, path):
        if self.fail_on and Path(path).name == self.fail_on:
            Path(path).write_bytes(b"partial")  # what a write cut short by ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        torch.save(state_dict, path)


class FakeEngine:
    """Stands in for a DeepSpeed engine: its shards go through ``checkpoint_engine``; layout queries."""

    def __init__(self, fail_at: int | None = None, fail_on: str = SHARDS[1]) -> None:
        self.fail_at, self.fail_on = fail_at, fail_on
        self.checkpoint_engine = FakeCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.fail_on = self.fail_on if int(tag.split("-")[1]) == self.fail_at else None
        for i, name in enumerate(SHARDS):
            self.checkpoint_engine.save({"w": torch.full((64,), float(i))}, str(tag_dir / name))

    def train_batch_size(self):
        return 8

    def train_micro_batch_size_per_gpu(self):
        return 4

    def gradient_accumulation_steps(self):
        return 2

    def zero_optimization_stage(self):
        return 1

    def bfloat16_enabled(self):
        return True

    def fp16_enabled(self):
        return False


def saved(run_dir: Path, *steps: int, keep_last: int = 5) -> list[Path]:
    engine = FakeEngine()
    return [checkpoint.save(engine, run_dir, s, 0, {"step": s}, keep_last) for s in steps]


def flip_bytes(path: Path, num_bytes: int = 16) -> None:
    """Invert ``num_bytes`` in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + num_bytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- the marker ------------------------------------------------------------------------------------


def test_marker_lists_every_file_with_its_size_and_checksum(tmp_path):
    (tag,) = saved(tmp_path, 3)
    marker = checkpoint.read_marker(tag)
    on_disk = {p.relative_to(tag).as_posix() for p in tag.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(marker["files"]) == on_disk == {*SHARDS, "harness/rank-00000.pt"}  # no manifests left
    algorithm = marker["checksum"]
    assert algorithm == integrity.checksum_algorithm()
    for name, record in marker["files"].items():
        assert record["size"] == (tag / name).stat().st_size
        assert record["checksum"] == integrity.file_checksum(tag / name, algorithm)
        assert record["rank"] == 0
    assert marker["total_bytes"] == sum(r["size"] for r in marker["files"].values())
    assert (marker["format"], marker["step"], marker["tag"], marker["world_size"]) == (
        2,
        3,
        "step-00000003",
        1,
    )


def test_marker_layout_round_trips(tmp_path):
    (tag,) = saved(tmp_path, 5)
    assert checkpoint.read_marker(tag)["layout"] == {
        "world_size": 1,
        "data_parallel_size": 1,
        "pipeline_stages": 1,
        "tensor_parallel": 1,
        "zero_stage": 1,
        "micro_batch_size": 4,
        "grad_accum": 2,
        "global_batch_size": 8,
        "precision": "bf16",
        "consumed_samples": 40,
    }


class TorchCheckpointEngine:
    """Named like DeepSpeed's default engine, which only calls ``torch.save(state_dict, path)``."""

    zipfile_serialization = True

    def save(self, state_dict, path):
        torch.save(state_dict, path, _use_new_zipfile_serialization=True)


def test_shards_of_the_default_engine_are_checksummed_on_their_way_to_disk(tmp_path, monkeypatch):
    engine = FakeEngine()
    engine.checkpoint_engine = TorchCheckpointEngine()
    reads = []
    monkeypatch.setattr(integrity, "file_checksum", lambda path, algo: reads.append(path.name) or "x")
    tag = checkpoint.save(engine, tmp_path, 1, 0, {}, 2)
    assert reads == ["rank-00000.pt"]  # the shards were not read back
    monkeypatch.undo()
    files = checkpoint.read_marker(tag)["files"]
    for name in SHARDS:
        assert files[name]["checksum"] == integrity.file_checksum(tag / name, integrity.checksum_algorithm())
        assert files[name]["size"] == (tag / name).stat().st_size
    assert "save" not in vars(engine.checkpoint_engine)  # unwrapped again
    # torch's per-record CRC32 was off while the shards were hashed (ours replaces it), and is on again;
    # torch.load reads such files as before.
    assert torch.serialization.get_crc32_options() is True
    assert torch.equal(torch.load(tag / SHARDS[1], weights_only=True)["w"], torch.full((64,), 1.0))


def test_files_written_outside_the_checkpoint_engine_are_listed_too(tmp_path):
    class Direct(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (Path(save_dir) / tag / "offloaded_tensors").mkdir(parents=True)
            (Path(save_dir) / tag / "offloaded_tensors" / "x.swp").write_bytes(b"\x01" * 100)

    tag = checkpoint.save(Direct(), tmp_path, 1, 0, {}, 2)
    assert checkpoint.read_marker(tag)["files"]["offloaded_tensors/x.swp"]["size"] == 100


def test_checksums_off_records_sizes_and_verification_still_checks_them(tmp_path):
    tag = checkpoint.save(FakeEngine(), tmp_path, 1, 0, {}, 2, checksums=False)
    marker = checkpoint.read_marker(tag)
    assert marker["checksum"] is None and all("checksum" not in r for r in marker["files"].values())
    assert integrity.verify_tag(tag, "checksum") == []
    truncate(tag / SHARDS[1])
    assert [p.what for p in integrity.verify_tag(tag, "checksum")] == ["size"]


def test_crc32_checksum_matches_zlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"harness" * 1000)
    assert integrity.file_checksum(path, "crc32") == f"{zlib.crc32(b'harness' * 1000):08x}"


# --- verification ----------------------------------------------------------------------------------


def test_an_intact_tag_verifies(tmp_path):
    (tag,) = saved(tmp_path, 1)
    assert integrity.verify_tag(tag, "checksum") == []
    assert integrity.verify_tag(tag, "size") == []


def test_flipped_bytes_fail_the_checksum_not_the_size(tmp_path):
    (tag,) = saved(tmp_path, 1)
    record = checkpoint.read_marker(tag)["files"][SHARDS[1]]
    flip_bytes(tag / SHARDS[1])
    assert integrity.verify_tag(tag, "size") == []
    (problem,) = integrity.verify_tag(tag, "checksum")
    assert (problem.file, problem.expected) == (SHARDS[1], record["checksum"])
    assert problem.found == integrity.file_checksum(tag / SHARDS[1], problem.what) != problem.expected
    assert str(problem).startswith(f"{SHARDS[1]}: {problem.what} expected {record['checksum']}, found ")


def test_a_truncated_or_missing_file_fails_the_size_check(tmp_path):
    (tag,) = saved(tmp_path, 1)
    size = (tag / SHARDS[0]).stat().st_size
    truncate(tag / SHARDS[0])
    (tag / "harness" / "rank-00000.pt").unlink()
    problems = {p.file: p for p in integrity.verify_tag(tag, "size")}
    assert str(problems[SHARDS[0]]) == f"{SHARDS[0]}: size expected {size:,} bytes, found {size // 2:,} bytes"
    assert problems["harness/rank-00000.pt"].what == "missing"


def test_ranks_share_the_verification_by_writer(tmp_path):
    (tag,) = saved(tmp_path, 1)
    marker = checkpoint.read_marker(tag)
    for name in SHARDS:  # as if rank 1 of 3 had written the optimizer file
        marker["files"][name]["rank"] = 1 if name == SHARDS[1] else 0
    (tag / "COMPLETE").write_text(json.dumps(marker))
    for name in marker["files"]:
        truncate(tag / name)
    found = {r: {p.file for p in integrity.verify_tag(tag, "size", share=(r, 2))} for r in (0, 1)}
    assert found == {0: {SHARDS[0], "harness/rank-00000.pt"}, 1: {SHARDS[1]}}
    assert {p.file for p in integrity.verify_tag(tag, "size", share=(1, 3))} == {SHARDS[1]}
    assert integrity.verify_tag(tag, "size", share=(2, 3)) == []


def test_an_unreadable_marker_fails_and_a_format_1_marker_has_nothing_to_check(tmp_path):
    (tag,) = saved(tmp_path, 1)
    (tag / "COMPLETE").write_text('{"step": 1, "tag": "step-00000001", "world_size": 2}\n')
    assert integrity.verify_tag(tag) == []  # written before markers listed files
    (tag / "COMPLETE").write_text("{not json")
    assert [p.what for p in integrity.verify_tag(tag)] == ["marker"]


# --- set aside, fall back, rotate ------------------------------------------------------------------


def test_resume_sets_a_corrupt_tag_aside_and_falls_back_to_the_previous_one(tmp_path):
    saved(tmp_path, 2, 4)
    newest = checkpoint.checkpoints_dir(tmp_path) / "step-00000004"
    flip_bytes(newest / SHARDS[1])
    lines: list[str] = []
    info = checkpoint.find_verified_resume(tmp_path, h.example_spec().checkpoint, 0, say=lines.append)
    assert info.tag == "step-00000002"
    (aside,) = [p for p in checkpoint.checkpoints_dir(tmp_path).iterdir() if ".corrupt-" in p.name]
    assert integrity.SET_ASIDE in aside.name and aside.name.startswith("step-00000004.corrupt-")
    assert not newest.exists() and (aside / SHARDS[1]).is_file()  # renamed, not deleted
    assert lines[0].startswith(f"checkpoint step-00000004 failed verification: {SHARDS[1]}: ")
    assert lines[0].endswith(f"set aside as {aside.name}")
    assert lines[1] == "resuming from step-00000002 instead (the previous complete checkpoint)"
    assert len(lines) == 2


def test_set_aside_names_are_unique(tmp_path):
    first, second = (tmp_path / "step-00000001", tmp_path / "again" / "step-00000001")
    for d in (first, second):
        d.mkdir(parents=True)
    a = integrity.set_aside(first)
    (tmp_path / "step-00000001").mkdir()
    b = integrity.set_aside(tmp_path / "step-00000001")
    assert a != b and a.exists() and b.exists()
    assert not integrity.TAG_RE.match(a.name) and not integrity.TAG_RE.match(b.name)


def test_rotation_neither_counts_nor_deletes_set_aside_tags(tmp_path):
    saved(tmp_path, 1, 2, 3)
    aside = integrity.set_aside(checkpoint.checkpoints_dir(tmp_path) / "step-00000003")
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [1, 2]
    removed = checkpoint.rotate(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["step-00000001"]
    assert aside.is_dir() and (checkpoint.checkpoints_dir(tmp_path) / "step-00000002").is_dir()
    saved(tmp_path, 4, keep_last=1)
    assert aside.is_dir()
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [4]


def test_when_every_checkpoint_fails_training_starts_over_and_says_so(tmp_path):
    for tag in saved(tmp_path, 1, 2):
        truncate(tag / SHARDS[0])
    lines: list[str] = []
    assert integrity.choose_resume(tmp_path, "auto", "size", lines.append) is None
    assert len(lines) == 3 and lines[-1] == "no intact checkpoint is left: training starts from step 0"
    assert checkpoint.complete_checkpoints(tmp_path) == []


def test_an_explicit_resume_tag_that_fails_is_refused_naming_the_file(tmp_path):
    _, tag = saved(tmp_path, 1, 2)
    truncate(tag / SHARDS[1])
    with pytest.raises(SpecError) as err:
        integrity.choose_resume(tmp_path, str(tag), "checksum")
    assert err.value.field == "checkpoint.resume" and f"{SHARDS[1]}: size expected" in err.value.message
    assert tag.is_dir()  # the user named it: left where it is


def test_verify_for_resume_checks_sizes_before_launch(tmp_path):
    spec = h.example_spec()
    saved(tmp_path, 1, 2, 3)
    tags = checkpoint.checkpoints_dir(tmp_path)
    flip_bytes(tags / "step-00000003" / SHARDS[1])  # checksums: the ranks' job
    truncate(tags / "step-00000002" / SHARDS[0])
    info, messages = integrity.verify_for_resume(tmp_path, spec)
    assert info.step == 3 and messages == []
    integrity.set_aside(tags / "step-00000003")
    info, messages = integrity.verify_for_resume(tmp_path, spec)
    assert info.step == 1 and len(messages) == 2 and "step-00000002 failed verification" in messages[0]


# --- a failed save ---------------------------------------------------------------------------------


def test_a_full_disk_removes_the_partial_tag_keeps_the_previous_and_says_how_much_space(tmp_path):
    saved(tmp_path, 1)
    previous_bytes = checkpoint.read_marker(checkpoint.checkpoints_dir(tmp_path) / "step-00000001")[
        "total_bytes"
    ]
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save(FakeEngine(fail_at=2), tmp_path, 2, 0, {}, 1)
    message = str(err.value)
    assert "\n" not in message
    need = integrity.human_bytes(previous_bytes)
    assert message.startswith(
        f"checkpoint step-00000002 could not be saved (rank 0: No space left on device writing {SHARDS[1]}); "
        f"a checkpoint of this run needs {need} (the size of step-00000001)"
    )
    assert "the partial step-00000002 was removed and step-00000001 is kept" in message
    assert "run the same command to resume from step-00000001" in message
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no temp files
    assert (root / "latest").read_text() == "step-00000001"
    assert checkpoint.find_resume(tmp_path, "auto").step == 1


def test_a_failure_while_marking_complete_also_removes_the_tag(tmp_path, monkeypatch):
    saved(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(integrity, "build_marker", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"rank 0: No space left on device\)"):
        checkpoint.save(FakeEngine(), tmp_path, 2, 0, {}, 1)
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [1]
    assert not (checkpoint.checkpoints_dir(tmp_path) / "step-00000002").exists()


def test_without_a_previous_checkpoint_the_message_gives_the_predicted_size(tmp_path):
    spec, run_dir = h.write_spec(tmp_path, "fresh")
    h.prepare(spec)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"needs [0-9.]+ MB \(predicted\).*no earlier checkpoint"
    ):
        checkpoint.save(FakeEngine(fail_at=1), run_dir, 1, 0, {}, 1)


# --- harness checkpoint verify, export -------------------------------------------------------------


def test_checkpoint_verify_reports_each_tag(tmp_path, capsys):
    tags = saved(tmp_path, 1, 2)
    assert main(["checkpoint", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step-00000001: OK (3 files, ") and out[0].endswith("checksums)")
    flip_bytes(tags[1] / SHARDS[1])
    assert main(["checkpoint", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step-00000001: OK")
    assert out[1].startswith(f"step-00000002: FAILED: {SHARDS[1]}: ")
    assert main(["checkpoint", "verify", "--size-only", str(tags[1])]) == 0
    assert main(["checkpoint", "verify", str(tags[0])]) == 0
    capsys.readouterr()
    integrity.set_aside(tags[1])
    assert main(["checkpoint", "verify", str(tmp_path)]) == 0
    assert "set aside after failing verification" in capsys.readouterr().out


def test_checkpoint_verify_without_checkpoints(tmp_path, capsys):
    assert main(["checkpoint", "verify", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoints there" in capsys.readouterr().err
    (checkpoint.checkpoints_dir(tmp_path) / "step-00000001").mkdir(parents=True)  # never completed
    assert main(["checkpoint", "verify", str(tmp_path)]) == 1
    assert "incomplete" in capsys.readouterr().out


def test_export_refuses_a_checkpoint_that_fails_verification(tmp_path, capsys):
    spec, run_dir = h.write_spec(tmp_path, "bad-export")
    h.prepare(spec)
    (tag,) = saved(run_dir, 1)
    flip_bytes(tag / SHARDS[1])
    assert main(["export", str(run_dir), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: checkpoint = ") and f"failed verification: {SHARDS[1]}: " in err
    assert not (tmp_path / "hf").exists()
    json.loads((tag / "COMPLETE").read_text())  # export reads; it never sets aside
