"""The data package: from the spec's ``data`` section to packed, sharded token blocks.

- :mod:`harness.data.corpus`: the embedded default corpus (stdlib source) and :func:`load_texts`.
- :mod:`harness.data.tokenizer`: :func:`resolve_tokenizer` (given, checkpoint's, or a trained BPE).
- :mod:`harness.data.packing`: EOS-separated documents packed into ``[num_blocks, seq_len]`` blocks.
- :mod:`harness.data.prepare`: :func:`prepare_data`, cached and safe to call from every rank.
- :mod:`harness.data.sampler`: :class:`BlockSampler`, the deterministic resumable data-parallel order.

Names are imported lazily so ``import harness.data`` does not pull in torch, transformers or datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "default_corpus_texts": "harness.data.corpus",
    "load_texts": "harness.data.corpus",
    "resolve_tokenizer": "harness.data.tokenizer",
    "train_bpe_tokenizer": "harness.data.tokenizer",
    "PackStats": "harness.data.packing",
    "pack_documents": "harness.data.packing",
    "pack_token_chunks": "harness.data.packing",
    "PreparedData": "harness.data.prepare",
    "prepare_data": "harness.data.prepare",
    "BlockSampler": "harness.data.sampler",
    "epoch_permutation": "harness.data.sampler",
    "global_step_indices": "harness.data.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
