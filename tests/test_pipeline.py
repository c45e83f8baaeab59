"""Pipeline stages for HF decoders: structure discovery and the split check (no launch), then one run per
layout through the real deepspeed launcher on CPU (fp32, torch AdamW, dropout off), compared by loss:

- 2 stages vs one process: tiny GPT-2 (tied embeddings, uniform partition), tiny Llama (untied, partition
  by parameters), tiny Qwen2 loaded from an HF checkpoint (tied, type:DecoderLayer, activation
  checkpointing every layer, ZeRO 1);
- 2 stages x 2 data-parallel vs 2 data-parallel;
- 2 stages with the optimizer offloaded to the CPU (ZeRO 1) vs one process with it offloaded, and its resume;
- the Qwen2 run also checks the HF checkpoint's logits in the stages and the export's logits after training;
- resume from a pipeline checkpoint (10 straight vs resume at 5) is bit-identical;
- refusals before any process starts.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import helpers as h
import pytest
import torch

from harness.errors import SpecError

# ---------------------------------------------------------------- structure (no launch)


def _tiny_hf(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 128}  # fmt: skip
    if model_type == "gpt2":
        shape = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 128}
    if model_type == "falcon":
        shape = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 256}
    cfg = AutoConfig.for_model(model_type, **{**shape, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _split(model, seq_len: int = 8):
    from harness.train.pipeline import ModelModules, check_split, layer_specs, plan_split

    plan = plan_split(model)
    specs = layer_specs(plan, ModelModules(model))
    check_split(model, plan, specs, seq_len)
    return plan, specs


@pytest.mark.parametrize(
    ("family", "overrides", "tied", "positions", "rotary"),
    [
        ("gpt2", {}, True, "transformer.wpe", None),
        ("llama", {}, False, None, "model.rotary_emb"),
        ("mistral", {}, False, None, "model.rotary_emb"),
        ("qwen2", {"tie_word_embeddings": True}, True, None, "model.rotary_emb"),
        # Sliding windows shorter than the training sequences: the check runs one token past the window.
        ("mistral", {"sliding_window": 4}, False, None, "model.rotary_emb"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, False, None,
         "model.rotary_emb"),
    ],
    ids=["gpt2", "llama", "mistral", "qwen2-tied", "mistral-window", "qwen2-sliding-layers"],
)  # fmt: skip
def test_split_by_structure_reproduces_the_model(family, overrides, tied, positions, rotary):
    plan, specs = _split(_tiny_hf(family, **overrides), seq_len=32)
    assert (plan.tied, plan.position_embedding, plan.rotary) == (tied, positions, rotary)
    assert len(plan.layers) == 2
    names = [s.typename.__name__ for s in specs]
    assert names[0] == "TokenEmbedding" and names[-2] == "FinalNorm"
    assert sum(n.startswith("DecoderLayer_") for n in names) == 2
    assert names[-1] == ("TokenEmbedding" if tied else "LMHead")  # the tied head reuses the embedding


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("cohere", "give different logits than its forward"),  # scales logits in forward
        ("falcon", "need more than hidden states"),  # alibi is an extra decoder-layer input
        ("opt", "model.decoder (OPTDecoder) is none of"),  # its decoder is one level deeper
    ],
)
def test_family_that_does_not_split_is_refused_with_what_is_missing(family, reason):
    with pytest.raises(SpecError) as err:
        _split(_tiny_hf(family))
    assert err.value.field == "parallel.pipeline_stages"
    assert reason in err.value.message and f"the {family} model cannot be split" in err.value.message


def test_type_partition_names_and_a_regex_matching_nothing():
    from harness.specload import spec_from_dict
    from harness.train.pipeline_engine import _check_partition

    _, specs = _split(_tiny_hf("gpt2"))
    assert "DecoderLayer_GPT2Block" in {s.typename.__name__ for s in specs}
    spec = spec_from_dict({"model": {"preset": "gpt2-tiny"}, "parallel": {"partition_method": "type:Block"}})
    _check_partition(spec, specs)  # matches DecoderLayer_GPT2Block
    spec = spec_from_dict({"model": {"preset": "gpt2-tiny"}, "parallel": {"partition_method": "type:Mamba"}})
    with pytest.raises(SpecError, match="matches no layer"):
        _check_partition(spec, specs)


# ---------------------------------------------------------------- launches
# Timeouts: about 25 s per launch on a quiet 2-core box (4 ranks: 50 s), times 4 for a loaded CI box.


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_gpt2_tied_two_stages_match_one_process(base):
    part = {"parallel": {"pipeline_stages": 2, "partition_method": "uniform"}}
    ref = h.trained(*h.write_parallel_spec(base, "gpt2-1", model="gpt2"))
    pipe = h.trained(*h.write_parallel_spec(base, "gpt2-pp2", model="gpt2", ranks=2, extra=part))
    h.assert_same_losses(h.step_losses(pipe), h.step_losses(ref), range(1, 6))
    tag = pipe / "checkpoints" / "step-00000005"
    assert (tag / "layer_00-model_states.pt").is_file() and (tag / "mp_rank_01_model_states.pt").is_file()
    # The tied head is written once (with the embedding, on stage 0) and re-tied by the export: both
    # runs' exports compute the same logits (weights can differ by float noise where gradients are
    # ~0, e.g. attention key biases, which logits do not see).
    from transformers import AutoModelForCausalLM

    from harness.train.export import export_checkpoint
    from harness.train.mp_shards import pipeline_state_dict

    assert "lm_head.weight" not in pipeline_state_dict(tag)
    ids = (torch.arange(2 * h.SEQ_LEN).reshape(2, h.SEQ_LEN) * 7919 + 13) % h.VOCAB
    logits = []
    for run in (pipe, ref):
        model = AutoModelForCausalLM.from_pretrained(export_checkpoint(run, base / f"{run.name}-hf")).eval()
        assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_runs(base) -> tuple[Path, Path]:
    """One process and 2 stages (partition by parameters), 10 steps; the latter saves at 5 and 10."""
    ref = h.trained(*h.write_parallel_spec(base, "llama-1", steps=10))
    extra = {"parallel": {"pipeline_stages": 2}, "train": {"save_every": 5}}
    pipe = h.trained(*h.write_parallel_spec(base, "llama-pp2", ranks=2, steps=10, extra=extra))
    return ref, pipe


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_llama_two_stages_match_one_process(llama_runs):
    ref, pipe = llama_runs
    h.assert_same_losses(h.step_losses(pipe), h.step_losses(ref), range(1, 11))
    val = [
        json.loads(line) for line in (pipe / "metrics.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    ref_val = [
        json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    assert val[-1]["val_loss"] == pytest.approx(ref_val[-1]["val_loss"], rel=h.RTOL)


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_resume_from_pipeline_checkpoint_is_exact(base, llama_runs):
    _, pipe = llama_runs
    step5 = pipe / "checkpoints" / "step-00000005"
    assert (step5 / "COMPLETE").is_file()
    extra = {"parallel": {"pipeline_stages": 2}, "checkpoint": {"resume": str(step5)}}
    resumed = h.trained(*h.write_parallel_spec(base, "llama-pp2-resumed", ranks=2, steps=10, extra=extra))
    got, want = h.step_losses(resumed), h.step_losses(pipe)
    assert sorted(got) == list(range(6, 11))
    assert [got[s] for s in range(6, 11)] == [want[s] for s in range(6, 11)]  # bitwise


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_two_stages_times_two_data_parallel_match_data_parallel(base):
    dp = h.trained(*h.write_parallel_spec(base, "llama-dp2", ranks=2))
    extra = {"parallel": {"pipeline_stages": 2}}
    both = h.trained(*h.write_parallel_spec(base, "llama-pp2-dp2", ranks=4, extra=extra))
    h.assert_same_losses(h.step_losses(both), h.step_losses(dp), range(1, 6))
    world = json.loads((both / "ds_config.json").read_text())
    assert world["train_batch_size"] == 2 * 2 * 2  # micro × accumulation × data-parallel 2


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_two_stages_with_the_optimizer_offloaded_match_one_process(base):
    """parallel.offload_optimizer: cpu under a pipeline (ZeRO 1, DeepSpeed's CPU Adam on each stage's
    partition) trains as one process with the same offloaded optimizer does, and resumes exactly."""
    offload = {"zero_stage": 1, "offload_optimizer": "cpu"}
    extra = {"parallel": offload, "optimizer": {"impl": "deepspeed"}, "train": {"save_every": 3}}
    ref = h.trained(*h.write_parallel_spec(base, "llama-off-1", steps=6, extra=extra))
    staged = {**extra, "parallel": {**offload, "pipeline_stages": 2}}
    pipe = h.trained(*h.write_parallel_spec(base, "llama-off-pp2", ranks=2, steps=6, extra=staged))
    h.assert_same_losses(h.step_losses(pipe), h.step_losses(ref), range(1, 7))
    step3 = pipe / "checkpoints" / "step-00000003"
    resumed_extra = {**staged, "checkpoint": {"resume": str(step3)}}
    resumed = h.trained(
        *h.write_parallel_spec(base, "llama-off-pp2-r", ranks=2, steps=6, extra=resumed_extra)
    )
    got, want = h.step_losses(resumed), h.step_losses(pipe)
    assert [got[s] for s in range(4, 7)] == [want[s] for s in range(4, 7)]


def _corpus(path: Path) -> Path:
    """~100 KB of text from the standard library (quick to train a tokenizer on and tokenize)."""
    import email.message
    import json as json_module
    import textwrap

    text = "\n\n".join(inspect.getsource(m) for m in (json_module, textwrap, email.message, inspect))
    path.write_text(text[:100_000], encoding="utf-8")
    return path


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_hf_checkpoint_into_two_stages_then_export(base):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from harness.train.export import export_checkpoint

    hf_dir = base / "qwen2-hf"
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=4, vocab_size=h.VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(hf_dir)
    model = {"name_or_path": str(hf_dir)}
    data = {"data": {"files": [str(_corpus(base / "corpus.txt"))], "val_fraction": 0.05}}
    zero1 = {**data, "parallel": {"zero_stage": 1}}
    ref = h.trained(*h.write_parallel_spec(base, "qwen2-1", model=model, extra=zero1))
    layout = {"pipeline_stages": 2, "zero_stage": 1, "partition_method": "type:DecoderLayer",
              "activation_checkpoint_interval": 1}  # fmt: skip
    spec, pipe = h.write_parallel_spec(
        base, "qwen2-pp2", model=model, ranks=2, extra={**data, "parallel": layout}
    )
    record = h.train_worker(spec, pipe, base / "qwen2-pp2.pt", ranks=2)

    ids = record["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(record["initial_logits"], out.logits, rtol=1e-5, atol=1e-6)
    assert record["initial_loss"] == pytest.approx(float(out.loss), rel=1e-6)

    h.assert_same_losses(h.step_losses(pipe), h.step_losses(ref), range(1, 6))

    exported = export_checkpoint(pipe, base / "qwen2-pp2-hf")
    trained = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        out = trained(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, record["trained_logits"], rtol=1e-5, atol=1e-5)
    assert float(out.loss) == pytest.approx(record["trained_loss"], rel=1e-5)


# ---------------------------------------------------------------- refusals before launch


@pytest.mark.parametrize(
    ("sets", "expect"),
    [
        (["parallel.pipeline_stages=2", "parallel.zero_stage=2", "launch.gpus_per_node=2"],
         "does not support ZeRO 2 or 3"),
        (["parallel.pipeline_stages=2", "launch.gpus_per_node=3"], "does not factor"),
        (["parallel.pipeline_stages=8", "launch.gpus_per_node=8"], "more pipeline stages than layers"),
    ],
    ids=["zero2-with-stages", "world-does-not-factor", "more-stages-than-layers"],
)  # fmt: skip
def test_refused_before_launch(tmp_path, sets, expect):
    spec, run_dir = h.write_parallel_spec(tmp_path, "refused")
    h.assert_refused(spec, run_dir, *sets, expect=expect)
