"""The data package: from the spec's ``data`` section to packed, sharded token blocks.

- :mod:`harness.data.corpus`: the embedded default corpus (stdlib source) and ``load_texts``.
- :mod:`harness.data.tokenizer`: ``resolve_tokenizer`` (given, checkpoint's, or a trained BPE).
- :mod:`harness.data.packing`: EOS-separated documents packed into ``[num_blocks, seq_len]`` blocks.
- :mod:`harness.data.prepare`: ``prepare_data``, cached and safe to call from every rank.
- :mod:`harness.data.sampler`: ``BlockSampler``, the deterministic resumable data-parallel order.

Import names from their submodule; this module imports nothing, so ``import harness.data`` does not
pull in torch, transformers or datasets.
"""
