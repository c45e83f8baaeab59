"""The run's data on each rank: prepared once per machine (file-locked cache), read through samplers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.data.prepare import prepare_data
from harness.data.sampler import BlockSampler
from harness.presets import model_config_dict
from harness.rundir import RunDir, atomic_path
from harness.spec import RunSpec


@dataclass
class RunData:
    """Packed train/validation blocks and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer_dir: Path
    vocab_size: int
    seed: int

    def train_sampler(
        self, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int
    ) -> BlockSampler:
        """This data-parallel rank's resumable sampler over the training blocks."""
        return BlockSampler(
            self.train,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            grad_accum_steps=grad_accum,
            seed=self.seed,
        )

    def val_batches(
        self, micro_batch_size: int, dp_rank: int, dp_size: int, max_batches: int
    ) -> Iterator[torch.Tensor]:
        """The same validation micro-batches every time: rank r takes blocks r, r+dp, ... in order.

        Every rank gets the same number of batches (ZeRO 3 and pipeline forwards are collective: a
        rank with one batch fewer would leave the others waiting forever)."""
        mine = np.arange(dp_rank, len(self.val), dp_size)
        per_rank = len(self.val) // dp_size
        for i in range(min(max_batches, per_rank // micro_batch_size)):
            rows = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
            yield torch.from_numpy(np.asarray(self.val[rows], dtype=np.int64))


def cache_dir_for(spec: RunSpec) -> Path:
    """Tokenized data is cached beside the runs (or in ``$HARNESS_DATA_CACHE``), keyed by its inputs,
    so runs with equal data share one tokenization."""
    override = os.environ.get("HARNESS_DATA_CACHE")
    if override:
        return Path(override).expanduser().resolve()
    return (Path(spec.run.output_dir) / ".cache" / "data").resolve()


def load_run_data(spec: RunSpec, run_dir: Path, rank: int) -> RunData:
    """Prepare (or load from cache) the spec's data; rank 0 copies the tokenizer into the run dir."""
    model_cfg = model_config_dict(spec.model.preset, spec.model.name_or_path, spec.model.overrides) or {}
    vocab_size = int(model_cfg.get("vocab_size", 0)) or None
    prepared = prepare_data(
        dataset=spec.data.dataset,
        files=spec.data.files,
        text_field=spec.data.text_field,
        seq_len=spec.data.seq_len,
        tokenizer=spec.data.tokenizer,
        model_path=spec.model.name_or_path,
        vocab_size=vocab_size or 0,
        val_fraction=spec.data.val_fraction,
        seed=spec.train.seed,
        cache_dir=cache_dir_for(spec),
    )
    run_tok = RunDir(Path(run_dir)).tokenizer
    if rank == 0 and not run_tok.exists():
        with atomic_path(run_tok) as tmp:
            shutil.copytree(prepared.tokenizer_dir, tmp)
    return RunData(
        train=prepared.train,
        val=prepared.val,
        tokenizer_dir=Path(prepared.tokenizer_dir),
        vocab_size=vocab_size or len(prepared.load_tokenizer()),
        seed=spec.train.seed,
    )
