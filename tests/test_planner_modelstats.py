"""The planner's model numbers: parameter counts checked against the meta device and published figures, FLOPs per token."""

from __future__ import annotations

import pytest

from harness.planner.modelstats import model_stats
from harness.planner.speed import flops_per_token
from harness.presets import PRESETS, preset_config, shape_of


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_model_stats_match_the_meta_device(preset):
    """Every preset's tensor list, total and largest module equal the HF model built on meta."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    st = model_stats(cfg)
    assert [(n, p.numel()) for n, p in model.named_parameters()] == list(st.tensors)
    # DeepSpeed's stage3.model_to_params, without its data_ptr dedupe (every meta pointer is 0).
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert st.total_params == sum(p.numel() for p in model.parameters())
    assert st.largest_layer_params == largest_layer


def test_published_parameter_counts():
    """Names match their published sizes (Llama 2 7B 6.74 B, Llama 2 70B 68.98 B, GPT-2 124 M)."""
    assert model_stats(PRESETS["llama-7b"]).total_params == 6_738_415_616
    assert model_stats(PRESETS["llama-70b"]).total_params == 68_976_648_192
    assert model_stats(PRESETS["gpt2-124m"]).total_params == 124_439_808


def test_flops_per_token_follows_palm_and_nanogpt():
    # nanoGPT's estimate_mfu: N excludes only the position embedding (wte is the tied head).
    gpt2 = PRESETS["gpt2-124m"]
    expected = 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(shape_of(gpt2), 1024) == expected
    # Llama: the input embedding is a lookup; the untied head is a matmul (torchtitan's convention).
    llama = PRESETS["llama-7b"]
    st = model_stats(llama)
    assert (
        flops_per_token(shape_of(llama), 2048) == 6 * (st.total_params - 32000 * 4096) + 12 * 32 * 4096 * 2048
    )
    assert flops_per_token(st, 2048) == flops_per_token(shape_of(llama), 2048)
