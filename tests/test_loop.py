"""The loop's small pure pieces, without a process group: validation batches per rank, the evaluation
record, and the console line for events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.spec import RunSpec
from harness.train.data import RunData
from harness.train.loop import evaluate
from harness.train.metrics import format_record


def run_data(num_val: int) -> RunData:
    val = np.arange(num_val * 4, dtype=np.int32).reshape(num_val, 4)
    return RunData(train=val.copy(), val=val, tokenizer_dir=Path("."), vocab_size=64, seed=0)


@pytest.mark.parametrize("num_val", [7, 8, 9, 15, 23])
@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_every_rank_gets_the_same_number_of_validation_batches(num_val, dp_size):
    # ZeRO 3 and pipeline forwards are collective: unequal counts would hang the rank with more.
    data = run_data(num_val)
    counts = [len(list(data.val_batches(2, r, dp_size, max_batches=100))) for r in range(dp_size)]
    assert len(set(counts)) == 1
    assert counts[0] == (num_val // dp_size) // 2


def test_validation_batches_are_disjoint_across_ranks():
    data = run_data(16)
    rows = [tuple(b[:, 0].tolist()) for r in range(2) for b in data.val_batches(2, r, 2, max_batches=100)]
    flat = [x for row in rows for x in row]
    assert len(flat) == len(set(flat)) == 16


class _Run:
    micro_batch_size = 4
    device = torch.device("cpu")

    def eval_losses(self, batches):
        return [2.0 for _ in batches]


def test_evaluate_reports_mean_loss_and_perplexity():
    record = evaluate(_Run(), run_data(8), RunSpec(), dp_rank=0, dp_size=1, step=5)
    assert record["step"] == 5 and record["val_loss"] == pytest.approx(2.0)
    assert record["val_ppl"] == pytest.approx(np.exp(2.0))


def test_evaluate_without_any_validation_batch_says_so_instead_of_a_zero_loss():
    record = evaluate(_Run(), run_data(3), RunSpec(), dp_rank=0, dp_size=1, step=5)
    assert "val_loss" not in record and "val_ppl" not in record
    assert "data.val_fraction" in record["event"]
    assert "evaluation skipped" in format_record(record)


def test_event_records_name_the_event_and_its_path():
    line = format_record({"step": 300, "event": "exported", "path": "runs/x/hf"})
    assert line == "step 300 | exported runs/x/hf"
