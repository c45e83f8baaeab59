"""AutoTP tensor parallelism through the real deepspeed launcher on CPU (fp32, torch AdamW, ZeRO 1):
tensor-parallel 2 reproduces tensor-parallel 1 step by step, its checkpoint exports (shards joined by the
layout DeepSpeed records, fp32 masters from the ZeRO partitions) to an HF model with the trained engine's
logits, and what AutoTP cannot do is refused before any process starts."""

from __future__ import annotations

import json

import helpers as h
import pytest
import torch


@pytest.mark.dist
@pytest.mark.timeout(300)  # 2 launches of about 25 s quiet, 4x for a loaded box
def test_tensor_parallel_2_matches_1_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.train.export import export_checkpoint

    zero1 = {"parallel": {"zero_stage": 1}}
    ref = h.trained(*h.write_parallel_spec(tmp_path, "llama-tp1", extra=zero1))
    spec, tp2 = h.write_parallel_spec(
        tmp_path, "llama-tp2", ranks=2, extra={"parallel": {"zero_stage": 1, "tensor_parallel": 2}}
    )
    record = h.train_worker(spec, tp2, tmp_path / "tp2.pt", ranks=2)
    h.assert_same_losses(h.step_losses(tp2), h.step_losses(ref), range(1, 6))
    cfg = json.loads((tp2 / "ds_config.json").read_text())
    assert cfg["tensor_parallel"]["autotp_size"] == 2 and cfg["train_batch_size"] == 2 * 2  # data-parallel 1

    tag = tp2 / "checkpoints" / "step-00000005"
    assert (tag / "mp_rank_01_model_states.pt").is_file()
    exported = export_checkpoint(tp2, tmp_path / "llama-tp2-hf")
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = record["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, record["trained_logits"], rtol=1e-5, atol=1e-5)
    assert float(out.loss) == pytest.approx(record["trained_loss"], rel=1e-5)
    # The shards really were joined: full-size weights, not one rank's half.
    q = model.model.layers[0].self_attn.q_proj.weight
    assert tuple(q.shape) == (64, 64) and model.lm_head.weight.shape[0] == h.VOCAB


@pytest.mark.parametrize(
    ("model", "sets", "expect"),
    [
        ("llama", ["parallel.tensor_parallel=3", "launch.gpus_per_node=3"], "4 heads are not divisible by 3"),
        ("gpt2", ["parallel.tensor_parallel=2", "launch.gpus_per_node=2"], "AutoTP does not support the gpt2"),
        ("llama", ["parallel.tensor_parallel=2", "parallel.zero_stage=3", "launch.gpus_per_node=2"],
         "AutoTP training supports ZeRO stages up to 2"),
    ],
    ids=["heads-not-divisible", "gpt2-family", "zero3"],
)  # fmt: skip
def test_refused_before_launch(tmp_path, model, sets, expect):
    spec, run_dir = h.write_parallel_spec(tmp_path, "refused", model=model)
    h.assert_refused(spec, run_dir, *sets, expect=expect)
