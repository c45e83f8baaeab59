"""HF export round trip from ZeRO 2 and ZeRO 3 checkpoints, ZeRO-3 partitioning at init, ``harness
generate``, and refusing incomplete checkpoints.

The engine's logits come from the training process itself: ``tests/workers/train_then_logits.py`` runs
the harness's training loop (2 ranks, through the deepspeed launcher), then a forward pass of the
trained engine on fixed validation blocks. ``harness export`` of the run must give a folder that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load, with the same logits. The same worker records what
each rank held right after the model was built, for the ZeRO-3 init test (one launch serves both).
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import pytest
import torch

# One worker launch per ZeRO stage (about 25 s quiet) and an export; 4x that for a loaded CI box.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

LAYOUTS = {2: "gpt2", 3: "llama"}
"""ZeRO stage -> tiny model exported from it (fp32, 6 steps, dropout off)."""
STEPS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(stage)`` -> (run dir, worker output path): one worker launch per stage, on first use."""
    done: dict[int, tuple[Path, Path]] = {}

    def get(stage: int) -> tuple[Path, Path]:
        if stage not in done:
            model = LAYOUTS[stage]
            base = tmp_path_factory.mktemp(f"export-zero{stage}")
            spec, run_dir = h.write_spec(
                base, f"export-zero{stage}", model=model, zero_stage=stage, dtype="fp32", steps=STEPS,
                extra={"model": {"overrides": h.GPT2_NO_DROPOUT}} if model == "gpt2" else None,
            )  # fmt: skip
            h.prepare(spec)
            out = base / "engine_logits.pt"
            proc = h.launch_worker(
                h.WORKERS / "train_then_logits.py", "--run-dir", str(run_dir), "--out", str(out)
            )
            assert proc.returncode == 0, h.output_of(proc)
            assert h.read_status(run_dir) == {"state": "complete", "step": STEPS}
            losses = h.step_losses(run_dir)
            assert (losses[STEPS - 1] + losses[STEPS]) / 2 < losses[1] - 0.1, f"loss did not fall: {losses}"
            done[stage] = (run_dir, out)
        return done[stage]

    return get


@pytest.mark.parametrize("stage", sorted(LAYOUTS), ids=lambda s: f"zero{s}-{LAYOUTS[s]}")
def test_export_round_trip(trained, tmp_path, stage, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.cli import main

    run_dir, engine_out = trained(stage)
    saved = torch.load(engine_out, weights_only=True)
    hf_dir = tmp_path / "hf"
    assert main(["export", str(run_dir), "-o", str(hf_dir)]) == 0  # in process: imports paid once
    assert f"step-{STEPS:08d} -> {hf_dir}" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name

    net = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    net.eval()
    assert net.config.model_type == LAYOUTS[stage]
    with torch.no_grad():
        logits = net(input_ids=saved["input_ids"]).logits
    assert logits.shape == saved["logits"].shape
    diff = (logits - saved["logits"]).abs().max().item()
    assert diff <= 1e-6, f"exported logits differ from the engine's by {diff:.3e}"
    # A ZeRO-3 export that forgot to gather would give empty or random weights; these are trained ones.
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in net.parameters())

    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert len(tok) == net.config.vocab_size
    assert tok.decode(tok("def main():").input_ids).startswith("def main")

    # The console command, in a process of its own.
    proc = h.run_harness("generate", str(hf_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert proc.returncode == 0, h.output_of(proc)
    assert proc.stdout.startswith("def") and len(proc.stdout.strip()) > len("def")


def test_zero3_partitions_parameters_at_init(trained):
    run_dir, engine_out = trained(3)
    ranks = json.loads(Path(f"{engine_out}.init.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    full = ranks[0]["full_numel"]
    assert full > 100_000
    for r in ranks:
        assert r["full_numel"] == full
        assert r["num_partitioned"] == r["num_params"], r  # every parameter partitioned at construction
        assert r["local_numel"] == 0, r  # no full copy on any rank, not even for a moment after init
        # Each rank's shards are about 1/world of the model (each parameter padded to a multiple of world).
        assert abs(r["shard_numel"] - full / 2) <= r["num_params"], r


def test_exporting_an_incomplete_checkpoint_fails_clearly(trained, tmp_path, monkeypatch, capsys):
    import shutil

    from harness.cli import main

    run_dir, _ = trained(2)
    copy = tmp_path / "runs" / "incomplete"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("hf", "tb"))
    tag = copy / "checkpoints" / f"step-{STEPS:08d}"
    (tag / "COMPLETE").unlink()  # as if a rank never finished writing
    monkeypatch.chdir(tmp_path)

    assert main(["export", str(tag), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: "), err
    assert "incomplete checkpoint" in err and "COMPLETE" in err, err
    assert not (tmp_path / "hf").exists()
    # ...and a run whose only checkpoint is incomplete has nothing to export.
    assert main(["export", str(copy), "-o", str(tmp_path / "hf")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("stage", sorted(LAYOUTS), ids=lambda s: f"zero{s}-{LAYOUTS[s]}")
def test_sharded_export_round_trip(trained, tmp_path, stage, capsys):
    """A small ``--max-shard-size``: several safetensors files and an index that ``from_pretrained``
    loads, with the engine's logits; each file within the limit unless one tensor alone is bigger."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from harness.cli import main

    run_dir, engine_out = trained(stage)
    saved = torch.load(engine_out, weights_only=True)
    hf_dir = tmp_path / "hf"
    limit = 100_000
    assert main(["export", str(run_dir), "-o", str(hf_dir), "--max-shard-size", "100KB"]) == 0
    capsys.readouterr()
    assert not (hf_dir / "model.safetensors").exists()
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(hf_dir.glob("model-*-of-*.safetensors"))
    assert len(files) >= 3 and {p.name for p in files} == set(index["weight_map"].values())
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 - not a dict
            names = list(f.keys())  # noqa: SIM118 - not a dict
        assert all(index["weight_map"][k] == path.name for k in names)
        size = sum(4 * torch.Size(s).numel() for s in sizes)  # fp32
        assert size <= limit or len(names) == 1, (path.name, size)
        total += size
    assert index["metadata"]["total_size"] == total

    net = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    net.eval()
    # Every weight is in the index, a tied head once (under the embedding's name, as save_pretrained).
    unique = {n for n, _ in net.named_parameters()} | {
        n for n, _ in net.named_buffers() if n in net.state_dict()
    }
    assert set(index["weight_map"]) == unique
    with torch.no_grad():
        logits = net(input_ids=saved["input_ids"]).logits
    diff = (logits - saved["logits"]).abs().max().item()
    assert diff <= 1e-6, f"exported logits differ from the engine's by {diff:.3e}"
