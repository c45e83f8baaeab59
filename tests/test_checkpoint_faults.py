"""Checkpoint faults through the real launcher (2 CPU ranks, fp32, torch AdamW so resume is bit-exact):
a corrupted and a truncated file in the newest checkpoint are found before DeepSpeed loads anything, the
tag is set aside and training continues from the previous one to the same weights; ``harness checkpoint
verify`` and ``harness export`` on good and bad tags; a full disk during a save (a real tmpfs when the
box lets root mount one).

One base run (9 steps, a checkpoint every 3) is trained once per module; each fault test copies it.
Measured on the shared 2-core box: the base run 12-26 s, each resume 13-35 s, the full-disk pair 30-45 s.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import helpers as h
import pytest
import torch

from harness.train import checkpoint, integrity

pytestmark = pytest.mark.dist

OPTIM_FILE = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
"""A ZeRO optimizer-state file, written by rank 1."""
COMMON = {"zero_stage": 1, "extra": {"optimizer": {"impl": "torch"}, "checkpoint": {"keep_last": 3}}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(spec, run dir) of a complete 9-step run with checkpoints at steps 3, 6 and 9."""
    tmp = tmp_path_factory.mktemp("base")
    spec, run_dir = h.write_spec(tmp, "faults", steps=9, **COMMON)
    h.train_ok(spec, run_dir, "train.save_every=3", step=9)
    return spec, run_dir


def copy_of(base: tuple[Path, Path], tmp_path: Path) -> tuple[Path, str]:
    """The base run copied under ``tmp_path/runs``; returns (run dir, the --set that points at it)."""
    _, run_dir = base
    out = tmp_path / "runs"
    shutil.copytree(run_dir, out / run_dir.name)
    return out / run_dir.name, f"run.output_dir={out}"


def tag(run_dir: Path, step: int) -> Path:
    return checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step)


def flip_16_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def model_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from harness.rundir import read_json
    from harness.train.export import consolidated_state_dict

    return consolidated_state_dict(tag(run_dir, step), read_json(run_dir / "ds_config.json"))


def assert_fell_back(proc, run_dir: Path, bad: int, good: int, problem: str) -> None:
    """The console named the file and the fallback, the tag was set aside, the run resumed from ``good``."""
    out = proc.stdout + proc.stderr
    bad_tag, good_tag = checkpoint.tag_for(bad), checkpoint.tag_for(good)
    (line,) = [x for x in out.splitlines() if f"checkpoint {bad_tag} failed verification" in x]
    assert problem in line, h.output_of(proc)
    assert f"resuming from {good_tag} instead (the previous complete checkpoint)" in out, h.output_of(proc)
    (aside,) = [p for p in checkpoint.checkpoints_dir(run_dir).iterdir() if p.name.startswith(f"{bad_tag}.")]
    assert line.endswith(f"set aside as {aside.name}") and integrity.SET_ASIDE in aside.name
    resumed = [r for r in h.read_metrics(run_dir) if r.get("event") == "resumed"]
    assert resumed[-1]["step"] == good and resumed[-1]["from"].endswith(good_tag), resumed
    assert "Traceback" not in out, h.output_of(proc)


@pytest.mark.timeout(240)
def test_flipped_bytes_in_an_optimizer_file_are_set_aside_and_training_continues_exactly(base, tmp_path):
    run_dir, where = copy_of(base, tmp_path)
    record = checkpoint.read_marker(tag(run_dir, 9))["files"][OPTIM_FILE]
    assert record["rank"] == 1  # rank 1 wrote and checksummed it
    flip_16_bytes(tag(run_dir, 9) / OPTIM_FILE)
    proc = h.train(base[0], where)
    h.assert_complete(proc, run_dir, step=9)
    assert_fell_back(proc, run_dir, 9, 6, f"{OPTIM_FILE}: xxh3_64 expected {record['checksum']}, found ")
    # Steps 7-9 again from step 6: the same losses and, bit for bit, the same weights as the first time.
    again, first = h.step_losses(run_dir), h.step_losses(base[1])
    assert [again[s] for s in (7, 8, 9)] == [first[s] for s in (7, 8, 9)]
    w_again, w_first = model_weights(run_dir, 9), model_weights(base[1], 9)
    assert w_again.keys() == w_first.keys() and all(torch.equal(w_again[k], w_first[k]) for k in w_first)
    assert integrity.verify_tag(tag(run_dir, 9)) == []


@pytest.mark.timeout(240)
def test_a_truncated_file_is_set_aside_and_training_continues_from_the_previous_checkpoint(base, tmp_path):
    run_dir, where = copy_of(base, tmp_path)
    victim = tag(run_dir, 9) / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = h.train(base[0], where, "train.steps=10")
    h.assert_complete(proc, run_dir, step=10)
    assert_fell_back(
        proc, run_dir, 9, 6, f"mp_rank_00_model_states.pt: size expected {size:,} bytes, found 1,000"
    )
    losses, first = h.step_losses(run_dir), h.step_losses(base[1])
    assert [losses[s] for s in (7, 8, 9)] == [first[s] for s in (7, 8, 9)] and 10 in losses


@pytest.mark.timeout(240)
def test_checkpoint_verify_and_export_on_good_and_bad_tags(base, tmp_path):
    run_dir, _ = copy_of(base, tmp_path)
    ok = h.run_harness("checkpoint", "verify", str(run_dir))
    assert ok.returncode == 0, h.output_of(ok)
    assert [line.split(":")[0] for line in ok.stdout.splitlines()] == [f"step-0000000{s}" for s in (3, 6, 9)]
    assert all(": OK (5 files, " in line for line in ok.stdout.splitlines()), ok.stdout
    flip_16_bytes(tag(run_dir, 9) / OPTIM_FILE)
    bad = h.run_harness("checkpoint", "verify", str(run_dir))
    assert bad.returncode == 1 and f"step-00000009: FAILED: {OPTIM_FILE}: xxh3_64 expected " in bad.stdout
    one = h.run_harness("checkpoint", "verify", str(tag(run_dir, 6)))
    assert one.returncode == 0 and one.stdout.startswith("step-00000006: OK"), h.output_of(one)
    refused = h.run_harness("export", str(run_dir), "-o", str(tmp_path / "hf"))
    assert refused.returncode == 2, h.output_of(refused)
    assert f"failed verification: {OPTIM_FILE}: " in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "hf").exists()
    good = h.run_harness("export", str(tag(run_dir, 6)), "-o", str(tmp_path / "hf"))
    assert good.returncode == 0, h.output_of(good)


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, check=False)  # fmt: skip
    return done.returncode == 0


@pytest.mark.timeout(360)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_a_rerun_resumes(base, tmp_path):
    one_checkpoint = checkpoint.read_marker(tag(base[1], 3))["total_bytes"]
    spec, run_dir = h.write_spec(tmp_path, "full", steps=4, **COMMON)
    ckpts = checkpoint.checkpoints_dir(run_dir)
    # Room for one checkpoint and a half: step 2 fits, step 4 runs out (rotation comes after a save).
    if not _mount_tmpfs(ckpts, int(one_checkpoint * 1.5)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount privileges)")
    try:
        proc = h.train(spec, "train.save_every=2", "checkpoint.keep_last=1")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, h.output_of(proc)
        status = h.read_status(run_dir)
        assert status["state"] == "failed", status
        assert "checkpoint step-00000004 could not be saved (rank " in status["error"], status
        assert "No space left on device" in status["error"], status
        assert (
            "a checkpoint of this run needs" in status["error"]
            and "(the size of step-00000002)" in status["error"]
        )
        assert "the partial step-00000004 was removed and step-00000002 is kept" in status["error"]
        assert status["error"] in out, h.output_of(proc)
        # (DeepSpeed copies its recovery script, zero_to_torch.py, beside the tags)
        assert sorted(p.name for p in ckpts.iterdir() if p.suffix != ".py") == [
            "latest",
            "step-00000002",
        ]
        assert integrity.verify_tag(ckpts / "step-00000002") == []
        assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))
        # Space freed (the tmpfs grown): the same command resumes from step 2 and completes.
        subprocess.run(["mount", "-o", f"remount,size={one_checkpoint * 4}", str(ckpts)], check=True)
        again = h.train(spec, "train.save_every=2", "checkpoint.keep_last=1")
        h.assert_complete(again, run_dir, step=4)
        resumed = [r for r in h.read_metrics(run_dir) if r.get("event") == "resumed"]
        assert [r["step"] for r in resumed] == [2], resumed
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], check=False)
