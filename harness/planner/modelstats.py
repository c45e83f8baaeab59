"""Parameter counts and shapes of a model, computed from its HF config dict: analytic, no torch.

The tensor list mirrors ``model.named_parameters()`` of the HF class (tied weights once), so ZeRO-3's
per-tensor rules (persistence threshold, largest gathered layer) can be applied to it. A test builds
every preset on the meta device and checks these numbers tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from harness.presets import shape_of


@dataclass(frozen=True)
class ModelStats:
    """Shape and parameter numbers of one decoder-only model."""

    model_type: str
    """HF ``model_type`` (``llama``, ``mistral``, ``qwen2``, ``gpt2``; others are read as Llama-like)."""
    layers: int
    """Decoder layers."""
    hidden: int
    """Hidden size h."""
    heads: int
    """Attention heads a."""
    kv_heads: int
    """Key-value heads g (GQA); equals ``heads`` without GQA."""
    head_dim: int
    """Dimension per head q."""
    ffn: int
    """MLP inner size F."""
    vocab: int
    """Vocabulary size V."""
    tied: bool
    """Input embedding and output head share one matrix."""
    gated_mlp: bool
    """SwiGLU-style MLP (gate, up, down) instead of two matrices."""
    embed_params: int
    """Token (and learned position) embedding parameters."""
    layer_params: int
    """Parameters of one decoder layer."""
    final_params: int
    """Final norm parameters."""
    lm_head_params: int
    """Output head parameters not shared with the embedding (0 when tied)."""
    tensors: tuple[tuple[str, int], ...]
    """(name, numel) in ``named_parameters()`` order, tied weights once."""

    @cached_property
    def total_params(self) -> int:
        """All unique parameters."""
        return self.embed_params + self.layers * self.layer_params + self.final_params + self.lm_head_params

    @cached_property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (6N in the FLOP count): everything except the
        embedding lookups; a tied embedding counts once, as the output head."""
        lookup = self.embed_params - (self.vocab * self.hidden if self.tied else 0)
        return self.total_params - lookup

    @cached_property
    def largest_tensor(self) -> int:
        """Numel of the largest single parameter tensor."""
        return max(n for _, n in self.tensors)

    @cached_property
    def largest_layer_params(self) -> int:
        """DeepSpeed's ``largest_layer_params``: the most parameters one module owns directly (an
        embedding or head matrix for Llama-sized vocabularies, else the biggest projection)."""
        owners: dict[str, int] = {}
        for name, numel in self.tensors:
            module = name.rsplit(".", 1)[0]
            owners[module] = owners.get(module, 0) + numel
        return max(owners.values())

    @cached_property
    def _size_counts(self) -> tuple[tuple[int, int], ...]:
        counts: dict[int, int] = {}
        for _, n in self.tensors:
            counts[n] = counts.get(n, 0) + 1
        return tuple(counts.items())

    def persistent_params(self, threshold: int) -> int:
        """Numel kept whole on every rank by ZeRO-3 (tensors with at most ``threshold`` elements)."""
        return sum(n * k for n, k in self._size_counts if n <= threshold)

    def partitioned_params(self, parts: int) -> int:
        """Sum of ZeRO-3 per-tensor partitions on one rank: ceil(numel / parts) each."""
        return sum(-(-n // parts) * k for n, k in self._size_counts)


def _llama_tensors(cfg: dict[str, Any], s: dict[str, int], head_dim: int) -> list[tuple[str, int]]:
    h, a, g, f = s["hidden"], s["heads"], s["kv_heads"], s["ffn"]
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False)) and cfg.get("model_type") != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    layer: list[tuple[str, int]] = [
        ("self_attn.q_proj.weight", h * a * head_dim),
        ("self_attn.k_proj.weight", h * g * head_dim),
        ("self_attn.v_proj.weight", h * g * head_dim),
        ("self_attn.o_proj.weight", a * head_dim * h),
    ]
    if qkv_bias:
        layer[1:1] = [("self_attn.q_proj.bias", a * head_dim)]
        layer[3:3] = [("self_attn.k_proj.bias", g * head_dim)]
        layer[5:5] = [("self_attn.v_proj.bias", g * head_dim)]
    if o_bias:
        layer.append(("self_attn.o_proj.bias", h))
    for proj, numel, bias in (("gate_proj", h * f, f), ("up_proj", h * f, f), ("down_proj", f * h, h)):
        layer.append((f"mlp.{proj}.weight", numel))
        if mlp_bias:
            layer.append((f"mlp.{proj}.bias", bias))
    layer += [("input_layernorm.weight", h), ("post_attention_layernorm.weight", h)]
    tensors = [("model.embed_tokens.weight", s["vocab"] * h)]
    for i in range(s["layers"]):
        tensors += [(f"model.layers.{i}.{n}", numel) for n, numel in layer]
    tensors.append(("model.norm.weight", h))
    if not s["tied"]:
        tensors.append(("lm_head.weight", s["vocab"] * h))
    return tensors


def _gpt2_tensors(s: dict[str, int]) -> list[tuple[str, int]]:
    h, f = s["hidden"], s["ffn"]
    layer = [
        ("ln_1.weight", h),
        ("ln_1.bias", h),
        ("attn.c_attn.weight", h * 3 * h),
        ("attn.c_attn.bias", 3 * h),
        ("attn.c_proj.weight", h * h),
        ("attn.c_proj.bias", h),
        ("ln_2.weight", h),
        ("ln_2.bias", h),
        ("mlp.c_fc.weight", h * f),
        ("mlp.c_fc.bias", f),
        ("mlp.c_proj.weight", f * h),
        ("mlp.c_proj.bias", h),
    ]
    tensors = [("transformer.wte.weight", s["vocab"] * h), ("transformer.wpe.weight", s["positions"] * h)]
    for i in range(s["layers"]):
        tensors += [(f"transformer.h.{i}.{n}", numel) for n, numel in layer]
    tensors += [("transformer.ln_f.weight", h), ("transformer.ln_f.bias", h)]
    if not s["tied"]:
        tensors.append(("lm_head.weight", s["vocab"] * h))
    return tensors


def model_stats(cfg: dict[str, Any]) -> ModelStats:
    """Parameter numbers of the model an HF config dict describes (presets.model_config_dict output)."""
    s = shape_of(cfg)
    gpt2 = cfg.get("model_type") == "gpt2"
    head_dim = s["hidden"] // s["heads"] if gpt2 else int(cfg.get("head_dim") or s["hidden"] // s["heads"])
    tensors = _gpt2_tensors(s) if gpt2 else _llama_tensors(cfg, s, head_dim)
    prefix = "transformer.h.0." if gpt2 else "model.layers.0."
    layer_params = sum(n for name, n in tensors if name.startswith(prefix))
    embed_names = ("transformer.wte.weight", "transformer.wpe.weight", "model.embed_tokens.weight")
    embed = sum(n for name, n in tensors if name in embed_names)
    head = sum(n for name, n in tensors if name == "lm_head.weight")
    final = sum(n for name, n in tensors if name.startswith(("model.norm", "transformer.ln_f")))
    return ModelStats(
        model_type=str(cfg.get("model_type", "llama")),
        layers=s["layers"],
        hidden=s["hidden"],
        heads=s["heads"],
        kv_heads=s["kv_heads"],
        head_dim=head_dim,
        ffn=s["ffn"],
        vocab=s["vocab"],
        tied=bool(s["tied"]),
        gated_mlp=bool(s["gated_mlp"]),
        embed_params=embed,
        layer_params=layer_params,
        final_params=final,
        lm_head_params=head,
        tensors=tuple(tensors),
    )


def stats_from_shape(shape: dict[str, int]) -> ModelStats:
    """ModelStats from a ``presets.shape_of`` dict alone (no biases; a Llama or GPT-2 layout by ``gated_mlp``)."""
    if shape.get("gated_mlp", 1):
        cfg = {
            "model_type": "llama",
            "num_hidden_layers": shape["layers"],
            "hidden_size": shape["hidden"],
            "num_attention_heads": shape["heads"],
            "num_key_value_heads": shape["kv_heads"],
            "intermediate_size": shape["ffn"],
            "vocab_size": shape["vocab"],
            "tie_word_embeddings": bool(shape.get("tied", 0)),
        }
    else:
        cfg = {
            "model_type": "gpt2",
            "n_layer": shape["layers"],
            "n_embd": shape["hidden"],
            "n_head": shape["heads"],
            "n_inner": shape["ffn"],
            "vocab_size": shape["vocab"],
            "n_positions": shape.get("positions", 0),
            "tie_word_embeddings": bool(shape.get("tied", 1)),
        }
    return model_stats(cfg)
