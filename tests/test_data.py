"""Tests for harness.data: corpus, loading, tokenizer, packing, prepare cache, sampler.

Everything is real (datasets, tokenizers, transformers) and local: the corpus is the stdlib source and
data files are written into tmp_path. Most tests use a small slice of the default corpus; one test runs
the full default corpus to back the 99.9%-of-tokens-kept claim.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from harness.data import prepare as prepare_mod
from harness.data.corpus import (
    DEFAULT_CORPUS_MAX_BYTES,
    default_corpus_files,
    default_corpus_texts,
    load_texts,
    stdlib_root,
)
from harness.data.packing import pack_documents, pack_token_chunks
from harness.data.prepare import prepare_data, split_train_val
from harness.data.sampler import BlockSampler, epoch_permutation, global_step_indices
from harness.data.tokenizer import EOS_TOKEN, resolve_tokenizer, train_bpe_tokenizer
from harness.errors import SpecError

SMALL_CORPUS_BYTES = 150_000
SMALL_VOCAB = 600


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    return default_corpus_texts(SMALL_CORPUS_BYTES)


@pytest.fixture(scope="module")
def small_tok(small_texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok, source = resolve_tokenizer(
        tokenizer=None, model_path=None, vocab_size=SMALL_VOCAB, texts=small_texts, out_dir=out
    )
    assert source == "trained"
    return tok, out


def _stream(tok, texts: list[str]) -> np.ndarray:
    """The packer's expected input, computed independently: each document's ids followed by EOS."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.array([*doc, tok.eos_token_id], dtype=np.int32) for doc in ids if doc])


# --- corpus and loading ------------------------------------------------------------------------------


def test_default_corpus_is_deterministic_capped_and_clean():
    files = default_corpus_files(SMALL_CORPUS_BYTES)
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel)
    assert sum(p.stat().st_size for p in files) <= SMALL_CORPUS_BYTES
    assert not any(part in {"site-packages", "test", "idlelib"} for r in rel for part in r.split("/"))
    texts = default_corpus_texts(SMALL_CORPUS_BYTES)
    assert texts == default_corpus_texts(SMALL_CORPUS_BYTES)
    assert len(texts) == len(files) and all(texts)


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "json", "csv", "parquet"])
def test_local_files_load(tmp_path: Path, suffix: str):
    docs = ["first document\nwith two lines", "second, with a comma", "third"]
    path = tmp_path / f"data.{suffix}"
    if suffix == "txt":
        # A .txt file is one document.
        for i, doc in enumerate(docs):
            (tmp_path / f"d{i}.txt").write_text(doc)
        paths = [str(tmp_path / f"d{i}.txt") for i in range(len(docs))]
    else:
        table = datasets.Dataset.from_dict({"body": docs, "id": [1, 2, 3]})
        {"jsonl": table.to_json, "csv": table.to_csv, "parquet": table.to_parquet}.get(
            suffix, lambda p: Path(p).write_text(json.dumps([{"body": d, "id": 1} for d in docs]))
        )(str(path))
        paths = [str(path)]
    field = "text" if suffix == "txt" else "body"
    ds = load_texts("default", paths, field, cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text"]
    assert ds["text"][:] == docs


def test_local_directory_and_path_load(tmp_path: Path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha")
    (data / "sub" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n")
    (data / ".hidden.txt").write_text("skipped")
    (data / "notes.bin").write_bytes(b"\0")
    ds = load_texts(str(data), [], "text", cache_dir=tmp_path / "cache")
    assert sorted(ds["text"][:]) == ["alpha", "beta"]
    assert load_texts(str(data / "a.txt"), [], "text", cache_dir=tmp_path / "cache")["text"][:] == ["alpha"]


def test_missing_text_field_names_field_columns_and_fix(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(SpecError) as err:
        load_texts("default", [str(path)], "text", cache_dir=tmp_path / "cache")
    assert err.value.field == "data.text_field"
    message = str(err.value)
    assert "'text'" in message and "content" in message and "meta" in message and "Fix:" in message


def test_bad_dataset_names_give_spec_errors(tmp_path: Path, monkeypatch):
    with pytest.raises(SpecError) as err:
        load_texts(str(tmp_path / "nope.jsonl"), [], "text")
    assert err.value.field == "data.dataset"
    with pytest.raises(SpecError) as err:
        load_texts("default", [str(tmp_path / "missing.txt")], "text")
    assert err.value.field == "data.files"
    # Offline mode fails at once instead of after the hub client's retries; the error is what matters.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpecError) as err:
        load_texts("someone/no-such-dataset", [], "text", cache_dir=tmp_path / "cache")
    assert err.value.field == "data.dataset" and "local files" in err.value.fix


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic(small_texts, small_tok, tmp_path: Path):
    _, first_dir = small_tok
    resolve_tokenizer(
        tokenizer=None, model_path=None, vocab_size=SMALL_VOCAB, texts=iter(small_texts), out_dir=tmp_path
    )
    assert (tmp_path / "tokenizer.json").read_bytes() == (first_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "tokenizer_config.json").read_bytes() == (
        first_dir / "tokenizer_config.json"
    ).read_bytes()


def test_exported_tokenizer_loads_with_autotokenizer(small_tok):
    from transformers import AutoTokenizer

    tok, out = small_tok
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(tok) <= SMALL_VOCAB
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == EOS_TOKEN
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text


def test_tokenizer_resolution_order_and_size_check(small_tok, tmp_path: Path):
    _, tok_dir = small_tok
    # data.tokenizer wins; texts are not needed then.
    tok, source = resolve_tokenizer(tokenizer=str(tok_dir), model_path=None, vocab_size=SMALL_VOCAB)
    assert source == "data.tokenizer"
    # A checkpoint directory with tokenizer files is used next.
    tok, source = resolve_tokenizer(tokenizer=None, model_path=str(tok_dir), vocab_size=SMALL_VOCAB)
    assert source == "model"
    # An external tokenizer bigger than the model vocab is a user error naming both fields.
    with pytest.raises(SpecError) as err:
        resolve_tokenizer(tokenizer=str(tok_dir), model_path=None, vocab_size=len(tok) - 1)
    assert err.value.field == "data.tokenizer" and "model.overrides.vocab_size" in err.value.fix
    with pytest.raises(SpecError) as err:
        train_bpe_tokenizer(["abc"], vocab_size=100)
    assert err.value.field == "model.overrides.vocab_size"
    # An unknown model vocab (None) skips the size check for a given tokenizer but cannot size a new one.
    assert resolve_tokenizer(tokenizer=str(tok_dir), model_path=None, vocab_size=None)[1] == "data.tokenizer"
    with pytest.raises(SpecError) as err:
        resolve_tokenizer(tokenizer=None, model_path=None, vocab_size=None, texts=["abc"])
    assert err.value.field == "model.overrides.vocab_size"


# --- packing -----------------------------------------------------------------------------------------


def test_eos_separates_documents_and_only_final_partial_block_drops():
    blocks, stats = pack_documents([[1, 2, 3], [4, 5], [6]], seq_len_tokens=4, eos_token_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert blocks.dtype == np.int32
    assert (stats.num_docs, stats.num_tokens_total, stats.num_tokens_kept, stats.num_blocks) == (3, 9, 8, 2)


def test_packing_across_chunk_boundaries_loses_only_the_final_partial_block():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(1, 1000, size=n, dtype=np.int32) for n in rng.integers(0, 300, size=50)]
    stream = np.concatenate(chunks)
    seq_len = 64
    blocks, stats = pack_token_chunks(chunks, seq_len)
    num_kept = len(stream) - len(stream) % seq_len
    assert stats.num_tokens_kept == num_kept and stats.num_tokens_total == len(stream)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[:num_kept])
    # run_clm's group_texts drops every chunk's remainder; this packer keeps strictly more here.
    assert num_kept > sum(len(c) - len(c) % seq_len for c in chunks)
    # Writing into a preallocated array gives the same blocks.
    out = np.zeros((num_kept // seq_len, seq_len), dtype=np.int32)
    pack_token_chunks(chunks, seq_len, out=out)
    np.testing.assert_array_equal(out, blocks)


def test_prepare_matches_independent_packing_across_map_batches(small_texts, tmp_path: Path, monkeypatch):
    # Tiny map batches put many batch boundaries inside the stream.
    monkeypatch.setattr(prepare_mod, "MAP_BATCH_DOCS", 3)
    seq_len = 128
    data = prepare_data(
        seq_len=seq_len,
        vocab_size=SMALL_VOCAB,
        val_fraction=0.1,
        seed=3,
        cache_dir=tmp_path,
        corpus_max_bytes=SMALL_CORPUS_BYTES,
    )
    stream = _stream(data.tokenizer, small_texts)
    num_blocks = len(stream) // seq_len
    expected = stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)
    train_idx, val_idx = split_train_val(num_blocks, 0.1, seed=3)
    np.testing.assert_array_equal(data.train, expected[train_idx])
    np.testing.assert_array_equal(data.val, expected[val_idx])
    assert data.stats["num_tokens_total"] == len(stream)
    assert data.stats["num_tokens_total"] - data.stats["num_tokens_kept"] < seq_len


def test_full_default_corpus_keeps_at_least_999_per_mille_of_tokens(tmp_path: Path):
    seq_len = 1024
    data = prepare_data(seq_len=seq_len, vocab_size=32_000, cache_dir=tmp_path)
    texts = default_corpus_texts(DEFAULT_CORPUS_MAX_BYTES)
    stream = _stream(data.tokenizer, texts)
    num_kept = (len(data.train) + len(data.val)) * seq_len
    assert data.stats["num_docs"] == len(texts)
    assert data.stats["num_tokens_total"] == len(stream)
    assert data.stats["num_tokens_kept"] == num_kept == len(stream) - len(stream) % seq_len
    assert num_kept / len(stream) >= 0.999
    # The shorter default seq_len keeps even more of the same stream.
    _, stats = pack_token_chunks([stream], 256)
    assert stats.fraction_kept >= 0.999


# --- prepare cache -----------------------------------------------------------------------------------


def test_prepare_cache_hit_and_concurrent_callers(tmp_path: Path):
    kwargs = dict(
        seq_len=64,
        vocab_size=SMALL_VOCAB,
        val_fraction=0.05,
        seed=1,
        cache_dir=tmp_path,
        corpus_max_bytes=SMALL_CORPUS_BYTES,
    )
    results: list = [None, None]

    def call(i: int) -> None:
        results[i] = prepare_data(**kwargs)

    # flock locks belong to open file descriptions, so two threads exclude each other like two ranks.
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = results[0]
    assert all(np.array_equal(r.train, first.train) and np.array_equal(r.val, first.val) for r in results)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".data-", "data-")) and p.is_dir()] == [
        first.cache_dir.name
    ]

    again = prepare_data(**kwargs)
    assert again.cache_dir == first.cache_dir
    assert isinstance(again.train, np.memmap) and again.train.dtype == np.int32
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    assert sorted(p.name for p in again.cache_dir.iterdir()) == [
        "stats.json",
        "tokenizer",
        "train.npy",
        "val.npy",
    ]
    assert len(again.val) >= 1 and len(again.train) + len(again.val) == again.stats["num_blocks"]
    # A changed input is a different cache entry.
    assert prepare_data(**{**kwargs, "seed": 2}).cache_dir != first.cache_dir


def test_split_train_val_is_seeded_disjoint_and_covers():
    train, val = split_train_val(1000, 0.01, seed=5)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 1000
    np.testing.assert_array_equal(val, split_train_val(1000, 0.01, seed=5)[1])
    assert len(split_train_val(10, 0.001, seed=0)[1]) == 1
    assert len(split_train_val(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(SpecError):
        split_train_val(1, 0.5, seed=0)


# --- sampler -----------------------------------------------------------------------------------------


def _blocks(num_blocks: int, seq_len: int = 3) -> np.ndarray:
    """Blocks whose first token is their own index, so a batch tells which blocks it holds."""
    return np.repeat(np.arange(num_blocks, dtype=np.int32)[:, None], seq_len, axis=1)


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_sampler_shards_are_disjoint_equal_and_cover_the_epoch():
    num_blocks, micro, dp = 103, 4, 3
    samplers = [
        BlockSampler(_blocks(num_blocks), micro_batch_size=micro, dp_rank=r, dp_size=dp, seed=7)
        for r in range(dp)
    ]
    per_rank = [[i for _ in range(s.num_micro_batches_per_epoch) for i in _ids(next(s))] for s in samplers]
    assert len({len(ids) for ids in per_rank}) == 1
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)) == (num_blocks // (micro * dp)) * micro * dp
    batch = next(BlockSampler(_blocks(10), micro_batch_size=2, seed=0))
    assert batch.dtype == torch.long and batch.shape == (2, 3)
    # The next epoch is a different shuffle of the same blocks.
    assert not np.array_equal(epoch_permutation(num_blocks, 7, 0), epoch_permutation(num_blocks, 7, 1))


def test_sampler_resume_continues_exactly():
    kwargs = dict(micro_batch_size=3, dp_rank=1, dp_size=2, seed=11)
    reference = BlockSampler(_blocks(50), **kwargs)
    # 12 micro-batches crosses the epoch boundary (8 per epoch for this rank).
    expected = [_ids(next(reference)) for _ in range(12)]
    for k in (0, 5, 8, 10):
        run = BlockSampler(_blocks(50), **kwargs)
        for _ in range(k):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
        resumed = BlockSampler(_blocks(50), **kwargs)
        resumed.load_state_dict(state)
        assert [_ids(next(resumed)) for _ in range(12 - k)] == expected[k:]
    with pytest.raises(ValueError, match="dp_size"):
        BlockSampler(_blocks(50), micro_batch_size=3, dp_size=1, seed=11).load_state_dict(state)


def test_dp_ranks_with_accumulation_read_the_same_global_batches_as_one_rank():
    num_blocks, seed = 70, 3
    micro, accum, dp = 2, 2, 2
    ranks = [
        BlockSampler(
            _blocks(num_blocks),
            micro_batch_size=micro,
            grad_accum_steps=accum,
            dp_rank=r,
            dp_size=dp,
            seed=seed,
        )
        for r in range(dp)
    ]
    single = BlockSampler(_blocks(num_blocks), micro_batch_size=micro * accum * dp, seed=seed)
    assert ranks[0].num_steps_per_epoch == single.num_steps_per_epoch == 8
    for step in range(20):  # two and a half epochs
        union = sorted(i for s in ranks for _ in range(accum) for i in _ids(next(s)))
        assert union == sorted(_ids(next(single)))
        epoch, k = divmod(step, single.num_steps_per_epoch)
        assert union == sorted(
            global_step_indices(
                num_blocks, seed=seed, epoch=epoch, step=k, global_batch_size=micro * accum * dp
            ).tolist()
        )
