"""Resolve the run's tokenizer: the user's, the checkpoint's, or a byte-level BPE trained on the corpus.

Order of precedence:

1. ``data.tokenizer`` when set: ``AutoTokenizer.from_pretrained`` on that local path (or a name already in
   the local HF cache); remote code is never trusted.
2. ``model.name_or_path`` when it is a local directory holding tokenizer files.
3. Otherwise a byte-level BPE trained with the ``tokenizers`` library on the run's corpus, with
   ``<|endoftext|>`` as its only special token (used as EOS, BOS and PAD) and the model's ``vocab_size`` as
   its target size. Training is deterministic: the same texts give a byte-identical ``tokenizer.json``.

Whatever the source, the tokenizer must fit the model (``len(tokenizer) <= vocab_size``) and have an EOS
token, because documents are packed with EOS between them. It is saved with ``save_pretrained`` so it
ships with the run directory and the HF export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import SpecError

if TYPE_CHECKING:
    # transformers is imported where used: importing it costs seconds, and a cache hit never needs it.
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
"""The single special token of a trained tokenizer: end of document, also used as BOS and padding."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in a checkpoint directory means the checkpoint brings its own tokenizer."""

TRAIN_MAX_CHARS = 64_000_000
"""Cap on the text a BPE is trained on (the first documents, in order): enough for a good vocabulary,
bounded time on big datasets. Deterministic because the documents come in a fixed order."""

NUM_BYTE_TOKENS = 256


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` with at most ``vocab_size`` tokens (``<|endoftext|>`` included).

    The result is deterministic for the same texts in the same order. It may hold fewer than
    ``vocab_size`` tokens when the corpus has too few repeated pairs to merge (pairs seen once are not
    merged).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab_size = NUM_BYTE_TOKENS + 1
    if vocab_size < min_vocab_size:
        raise SpecError(
            "model.overrides.vocab_size",
            vocab_size,
            f"set it to at least {min_vocab_size}, or set data.tokenizer to a tokenizer that fits",
            reason=f"a byte-level BPE needs {NUM_BYTE_TOKENS} byte tokens plus {EOS_TOKEN}",
        )
    backend = Tokenizer(models.BPE())
    # No prefix space: code and text are tokenized as written, and decode(encode(x)) == x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols up front, so any input is encodable even if the corpus never used a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_capped_batches(texts, TRAIN_MAX_CHARS), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def _capped_batches(texts: Iterable[str], max_chars: int, batch_docs: int = 256) -> Iterator[list[str]]:
    """Yield lists of documents until ``max_chars`` characters have been yielded (whole documents)."""
    batch: list[str] = []
    num_chars = 0
    for text in texts:
        if not text:
            continue
        batch.append(text)
        num_chars += len(text)
        if len(batch) == batch_docs or num_chars >= max_chars:
            yield batch
            batch = []
        if num_chars >= max_chars:
            return
    if batch:
        yield batch


def has_tokenizer_files(path: str | Path | None) -> bool:
    """Whether ``path`` is a local directory that holds a tokenizer (e.g. an HF checkpoint with one)."""
    if not path or not Path(path).is_dir():
        return False
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_pretrained_tokenizer(name_or_path: str, field: str) -> PreTrainedTokenizerBase:
    """Load an existing HF tokenizer without remote code; failures become a SpecError naming ``field``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(
            field,
            name_or_path,
            "point it at a local directory with tokenizer files (tokenizer.json or tokenizer_config.json), "
            "or leave data.tokenizer unset to train a BPE on the corpus",
            reason=f"could not load a tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
        ) from exc


def resolve_tokenizer(
    *,
    tokenizer: str | None,
    model_path: str | None,
    vocab_size: int | None,
    texts: Iterable[str] | None = None,
    out_dir: str | Path | None = None,
) -> tuple[PreTrainedTokenizerBase, str]:
    """Return ``(tokenizer, source)``; source is ``"data.tokenizer"``, ``"model"`` or ``"trained"``.

    ``texts`` is only consumed when a BPE has to be trained, so pass a lazy iterator. The tokenizer is
    checked to fit ``vocab_size`` (skipped when it is ``None``: the model takes its size from the
    tokenizer) and to have an EOS token; a missing PAD token is set to EOS. With
    ``out_dir`` it is also saved there (``save_pretrained``), ready to ship with the run and HF export.
    """
    tok, source = _resolve(tokenizer=tokenizer, model_path=model_path, vocab_size=vocab_size, texts=texts)
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok, source


def _resolve(
    *, tokenizer: str | None, model_path: str | None, vocab_size: int | None, texts: Iterable[str] | None
) -> tuple[PreTrainedTokenizerBase, str]:
    """Pick, load or train the tokenizer and check it fits the model (see :func:`resolve_tokenizer`)."""
    if tokenizer:
        tok, source, field = (
            load_pretrained_tokenizer(tokenizer, "data.tokenizer"),
            "data.tokenizer",
            "data.tokenizer",
        )
    elif has_tokenizer_files(model_path):
        assert model_path is not None
        tok, source, field = (
            load_pretrained_tokenizer(model_path, "model.name_or_path"),
            "model",
            "model.name_or_path",
        )
    else:
        if texts is None:
            raise ValueError("texts are needed to train a tokenizer when none is given")
        if not vocab_size:
            raise SpecError(
                "model.overrides.vocab_size",
                vocab_size,
                "set model.overrides.vocab_size (the trained tokenizer's target size), or set data.tokenizer",
                reason="no tokenizer was given and the model's vocab_size is unknown, so none can be trained",
            )
        return train_bpe_tokenizer(texts, vocab_size), "trained"

    if tok.eos_token_id is None:
        raise SpecError(
            field,
            tokenizer or model_path,
            "use a tokenizer that defines eos_token (documents are packed with EOS between them)",
            reason="the tokenizer has no eos_token",
        )
    if vocab_size and len(tok) > vocab_size:
        raise SpecError(
            field,
            f"{tokenizer or model_path} ({len(tok)} tokens)",
            f"set model.overrides.vocab_size to at least {len(tok)}, or set data.tokenizer to a tokenizer "
            f"with at most {vocab_size} tokens",
            reason=f"the tokenizer is bigger than the model's vocab_size {vocab_size}, so some ids have no embedding",
        )
    if tok.pad_token_id is None:
        # Padding is only used for generation/eval batches; EOS is the conventional stand-in for GPT-style models.
        tok.pad_token = tok.eos_token
    return tok, source


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write ``tok`` with ``save_pretrained`` into ``out_dir`` (created) and return the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    _make_config_portable(out / "tokenizer_config.json")
    return out


def _make_config_portable(config_path: Path) -> None:
    """Name the generic fast tokenizer class so that transformers 4.x can load the export too.

    transformers 5 saves a plain ``tokenizers``-backed tokenizer as ``TokenizersBackend``, a class 4.x
    does not know; ``PreTrainedTokenizerFast`` is the same thing under the name both versions resolve.
    """
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
