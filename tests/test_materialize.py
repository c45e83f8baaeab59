"""Models built on the meta device and filled unit by unit (harness.train.materialize): fresh weights
are a function of the parameter's name and the seed, a rank fills (and reads from a checkpoint) only
what it keeps, ties stay tied; and, through the real launcher, a pipeline rank never fills another
stage's parameters and a tensor-parallel rank holds only its slices."""

from __future__ import annotations

import json
import math

import helpers as h
import pytest
import torch

from harness.spec import ModelSection
from harness.train.materialize import (
    FreshInit,
    SafetensorsWeights,
    empty_model,
    init_units,
    materialize,
    seed_for,
)
from harness.train.model import hf_config


def _empty(preset: str = "llama-tiny"):
    return empty_model(hf_config(ModelSection(preset=preset)), "sdpa")


def _filled(preset: str = "llama-tiny", seed: int = 1234, dtype=torch.float32, keep=None):
    net = _empty(preset)
    source = FreshInit(net, seed)
    materialize(net, source, dtype, keep=keep)
    return net, source


def test_empty_model_holds_no_parameter_memory_and_keeps_buffers_and_ties():
    net = _empty("qwen2-tiny")
    assert all(p.is_meta for p in net.parameters())
    assert not any(b.is_meta for b in net.buffers())  # rotary frequencies are real
    assert net.lm_head.weight is net.model.embed_tokens.weight


def test_units_are_embedding_each_decoder_layer_norm_and_head():
    names = [name for name, _ in init_units(_empty())]
    assert names == ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm",
                     "model.rotary_emb", "lm_head"]  # fmt: skip


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "qwen2-tiny"])
def test_a_part_filled_alone_equals_the_same_part_of_the_whole(preset):
    whole, _ = _filled(preset)
    layer = ".h.2." if preset.startswith("gpt2") else ".layers.2."
    part, source = _filled(preset, dtype=torch.bfloat16, keep=lambda n: layer in n)
    filled = {n: p for n, p in part.named_parameters() if not p.is_meta}
    assert filled and all(layer in n for n in filled)
    assert sorted(source.read) == sorted(filled)  # computed nothing it does not keep
    reference = dict(whole.named_parameters())
    for name, value in filled.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[name].to(torch.bfloat16)), name
    assert sum(not p.is_meta for p in part.parameters()) == len(filled)


def test_values_depend_on_the_seed_and_name_not_on_order():
    a, _ = _filled(seed=1)
    b, _ = _filled(seed=1)
    c, _ = _filled(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    q0, q1 = a.model.layers[0].self_attn.q_proj.weight, a.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q0, q1)  # each module its own stream
    assert seed_for(1, "model.layers.0") != seed_for(1, "model.layers.1")


def test_the_models_own_init_applies_gpt2_scaled_residual_and_tied_head():
    net, _ = _filled("gpt2-tiny")
    std = 0.02
    layers = net.config.n_layer
    c_proj = net.transformer.h[1].mlp.c_proj.weight
    assert float(c_proj.detach().std()) == pytest.approx(std / math.sqrt(2 * layers), rel=0.1)
    assert float(net.transformer.h[1].mlp.c_fc.weight.detach().std()) == pytest.approx(std, rel=0.1)
    assert torch.equal(net.transformer.h[1].ln_1.weight, torch.ones_like(net.transformer.h[1].ln_1.weight))
    assert net.lm_head.weight is net.transformer.wte.weight and not net.lm_head.weight.is_meta


def test_llama_loss_at_init_is_that_of_a_uniform_guess():
    net, _ = _filled()
    ids = (torch.arange(64).reshape(2, 32) * 7919 + 13) % net.config.vocab_size
    with torch.no_grad():
        loss = float(net(input_ids=ids, labels=ids).loss)
    assert loss == pytest.approx(math.log(net.config.vocab_size), rel=0.02)


def test_a_rank_reads_only_its_tensors_from_a_sharded_checkpoint(tmp_path):
    whole, _ = _filled(seed=7)
    whole.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    net = _empty()
    source = SafetensorsWeights(tmp_path, net.base_model_prefix)
    materialize(net, source, torch.float32, keep=lambda n: n.startswith("model.layers.1."))
    filled = {n: p for n, p in net.named_parameters() if not p.is_meta}
    assert sorted(source.read) == sorted(filled) and all(n.startswith("model.layers.1.") for n in filled)
    reference = dict(whole.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in filled.items())


def test_a_checkpoint_missing_a_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    whole, _ = _filled()
    state = {k: v.contiguous() for k, v in whole.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    net = _empty()
    with pytest.raises(KeyError, match="model.norm.weight"):
        materialize(net, SafetensorsWeights(tmp_path, net.base_model_prefix), torch.float32)


def _record_fill(tmp_path, name: str, layout: dict, model=None) -> list[dict]:
    spec, run_dir = h.write_parallel_spec(
        tmp_path, name, model=model or {"preset": "llama-tiny"}, ranks=2, extra={"parallel": layout}
    )
    h.prepare(spec)
    out = tmp_path / f"{name}-fill"
    proc = h.launch_worker("record_fill.py", "--run-dir", str(run_dir), "--out", str(out), ranks=2)
    assert proc.returncode == 0, h.output_of(proc)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_pipeline_rank_fills_and_reads_only_its_own_stage(tmp_path):
    whole, _ = _filled("llama-tiny", seed=3)
    hf_dir = tmp_path / "llama-hf"
    whole.save_pretrained(hf_dir, max_shard_size="200KB")  # several files: each stage opens only its own
    layout = {"pipeline_stages": 2, "partition_method": "type:DecoderLayer"}
    for kind, model in (("fresh", None), ("checkpoint", {"name_or_path": str(hf_dir)})):
        first, last = _record_fill(tmp_path, f"pp-{kind}", layout, model)
        for record in (first, last):
            assert record["meta_left"] == 0
        layers = [{n.split(".")[2] for n in r["read"] if ".layers." in n} for r in (first, last)]
        assert layers == [{"0", "1"}, {"2", "3"}], kind
        assert not any("lm_head" in n or n.startswith("model.norm") for n in first["read"])
        assert not any("embed_tokens" in n for n in last["read"])
        stage_numel = [sum(r["held"].values()) for r in (first, last)]
        assert sum(stage_numel) == sum(p.numel() for p in whole.parameters())


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_tensor_parallel_rank_holds_only_its_slices(tmp_path):
    whole, _ = _filled("llama-tiny")
    full = {n: p.numel() for n, p in whole.named_parameters()}
    ranks = _record_fill(tmp_path, "tp", {"tensor_parallel": 2, "zero_stage": 1})
    for record in ranks:
        assert record["meta_left"] == 0
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        assert record["held"][q_proj] * 2 == full[q_proj]
        assert record["held"]["model.embed_tokens.weight"] == full["model.embed_tokens.weight"]
        assert sum(record["held"].values()) < 0.75 * sum(full.values())


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_zero3_starts_from_the_weights_one_process_starts_from(tmp_path):
    model = {"preset": "llama-tiny"}
    records = [
        h.train_worker(
            *h.write_parallel_spec(
                tmp_path, name, model=model, ranks=ranks, steps=1, extra={"parallel": {"zero_stage": stage}}
            ),
            tmp_path / f"{name}.pt",
            ranks=ranks,
        )  # fmt: skip
        for name, ranks, stage in (("one", 1, 0), ("zero3", 2, 3))
    ]
    torch.testing.assert_close(
        records[1]["initial_logits"], records[0]["initial_logits"], rtol=1e-5, atol=1e-6
    )
