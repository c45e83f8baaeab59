"""``harness generate DIR --prompt TEXT``: sample from an exported HF checkpoint with plain transformers."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import SpecError


def generate(
    model_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The prompt followed by up to ``max_new_tokens`` sampled tokens (greedy when temperature is 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout is the sample

    if not (Path(model_dir) / "config.json").is_file():
        raise SpecError(
            "DIR", str(model_dir), "give a directory written by `harness export` (it holds config.json)"
        )
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    inputs = tok(prompt, return_tensors="pt")
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=top_k if sample else None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0], skip_special_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Print one sample."""
    if args.max_new_tokens < 1:
        raise SpecError("--max-new-tokens", args.max_new_tokens, "use a positive number of tokens")
    print(
        generate(
            Path(args.model_dir), args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
    )
    return 0
