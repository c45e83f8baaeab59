"""Model presets: local HF config definitions by family-size name. No hub, no torch.

Each preset is the keyword arguments of the family's ``transformers`` config class plus
``model_type``. Shapes follow the published checkpoints they are named after.
"""

from __future__ import annotations

import difflib
from typing import Any

from harness.errors import SpecError


def _gpt2(layers: int, hidden: int, heads: int, vocab: int = 50257, positions: int = 1024) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_embd": hidden,
        "n_head": heads,
        "vocab_size": vocab,
        "n_positions": positions,
        "tie_word_embeddings": True,
    }


def _llama_like(
    model_type: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    positions: int,
    tied: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "tie_word_embeddings": tied,
        **extra,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny members of each family: for tests and CPU demos.
    "gpt2-tiny": _gpt2(4, 128, 4, vocab=4096),
    "llama-tiny": _llama_like("llama", 4, 128, 4, 2, 352, 4096, 1024),
    "mistral-tiny": _llama_like("mistral", 4, 128, 4, 2, 352, 4096, 1024, sliding_window=None),
    "qwen2-tiny": _llama_like("qwen2", 4, 128, 4, 2, 352, 4096, 1024, tied=True),
    # GPT-2 (Radford et al. 2019) sizes.
    "gpt2-124m": _gpt2(12, 768, 12),
    "gpt2-355m": _gpt2(24, 1024, 16),
    "gpt2-774m": _gpt2(36, 1280, 20),
    "gpt2-1.5b": _gpt2(48, 1600, 25),
    # Llama family.
    "llama-160m": _llama_like("llama", 12, 768, 12, 12, 3072, 32000, 2048),
    "llama-1b": _llama_like("llama", 22, 2048, 32, 4, 5632, 32000, 2048),
    "llama-7b": _llama_like("llama", 32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-13b": _llama_like("llama", 40, 5120, 40, 40, 13824, 32000, 4096),
    "llama-70b": _llama_like("llama", 80, 8192, 64, 8, 28672, 32000, 4096),
    "mistral-7b": _llama_like("mistral", 32, 4096, 32, 8, 14336, 32000, 32768, sliding_window=None),
    "qwen2-0.5b": _llama_like("qwen2", 24, 896, 14, 2, 4864, 151936, 32768, tied=True),
    "qwen2-7b": _llama_like("qwen2", 28, 3584, 28, 4, 18944, 152064, 32768),
}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config kwargs of preset ``name`` with ``overrides`` applied (a new dict)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SpecError(
            "model.preset", name, f"{hint}use one of: {', '.join(PRESETS)}", reason="unknown preset"
        )
    cfg = dict(PRESETS[name])
    cfg.update(overrides or {})
    return cfg


def shape_of(cfg: dict[str, Any]) -> dict[str, int]:
    """Family-neutral shape numbers (layers, hidden, heads, kv_heads, ffn, vocab) of a config dict."""
    if cfg.get("model_type") == "gpt2":
        hidden = cfg["n_embd"]
        return {
            "layers": cfg["n_layer"],
            "hidden": hidden,
            "heads": cfg["n_head"],
            "kv_heads": cfg["n_head"],
            "ffn": cfg.get("n_inner") or 4 * hidden,
            "vocab": cfg["vocab_size"],
            "positions": cfg["n_positions"],
            "tied": int(cfg.get("tie_word_embeddings", True)),
            "gated_mlp": 0,
        }
    return {
        "layers": cfg["num_hidden_layers"],
        "hidden": cfg["hidden_size"],
        "heads": cfg["num_attention_heads"],
        "kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "ffn": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"],
        "positions": cfg.get("max_position_embeddings", 0),
        "tied": int(cfg.get("tie_word_embeddings", False)),
        "gated_mlp": 1,
    }


def model_config_dict(
    preset: str | None, name_or_path: str | None, overrides: dict[str, Any]
) -> dict[str, Any] | None:
    """The HF config of the spec's model as a plain dict, without torch: a preset, or a local
    checkpoint's config.json. None for a hub name (its config is only known after download)."""
    import json
    from pathlib import Path

    if preset:
        return preset_config(preset, overrides)
    if name_or_path:
        cfg_file = Path(name_or_path) / "config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SpecError(
                    "model.name_or_path",
                    name_or_path,
                    f"repair or replace {cfg_file}",
                    f"unreadable config.json ({exc})",
                ) from None
            if not isinstance(cfg, dict):
                raise SpecError(
                    "model.name_or_path",
                    name_or_path,
                    f"point at a checkpoint whose {cfg_file.name} is a JSON object",
                )
            cfg.update(overrides or {})
            return cfg
    return None
