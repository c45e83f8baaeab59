"""harness.batch: the batch triple (global, micro, accumulation) solved for a data-parallel size."""

from __future__ import annotations

import pytest

from harness.batch import solve_batch
from harness.errors import SpecError
from harness.spec import BatchSection


@pytest.mark.parametrize("dp", [1, 2, 3, 8])
def test_solve_global_and_micro(dp):
    plan = solve_batch(BatchSection(global_batch_size=24 * dp, micro_batch_size=4), dp, seq_len=128)
    assert (plan.micro_batch_size, plan.grad_accum, plan.data_parallel_size) == (4, 6, dp)
    assert plan.global_batch_size == 24 * dp


@pytest.mark.parametrize("dp", [1, 2, 3, 8])
def test_solve_global_and_accum(dp):
    plan = solve_batch(BatchSection(global_batch_size=24 * dp, grad_accum=3), dp, seq_len=128)
    assert (plan.micro_batch_size, plan.grad_accum) == (8, 3)


@pytest.mark.parametrize("dp", [1, 2, 3, 8])
def test_solve_micro_and_accum(dp):
    plan = solve_batch(BatchSection(micro_batch_size=5, grad_accum=7), dp, seq_len=128)
    assert plan.global_batch_size == 5 * 7 * dp
    assert plan.tokens_per_step == 5 * 7 * dp * 128


def test_solve_all_three_consistent():
    plan = solve_batch(BatchSection(global_batch_size=32, micro_batch_size=4, grad_accum=2), 4, seq_len=64)
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (4, 2, 32)


def test_solve_one_or_none_given():
    assert solve_batch(BatchSection(global_batch_size=16), 4, 64).micro_batch_size == 4
    assert solve_batch(BatchSection(global_batch_size=16), 4, 64).grad_accum == 1
    assert (solve_batch(BatchSection(micro_batch_size=3), 2, 64).grad_accum, 3) == (1, 3)
    plan = solve_batch(BatchSection(grad_accum=5), 2, 64)
    assert (plan.micro_batch_size, plan.grad_accum) == (1, 5)
    plan = solve_batch(BatchSection(), 2, 64)
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (1, 1, 2)


def test_solve_global_batch_tokens():
    plan = solve_batch(BatchSection(global_batch_tokens=16 * 256, micro_batch_size=2), 4, seq_len=256)
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (2, 2, 16)
    assert plan.tokens_per_step == 16 * 256
    plan = solve_batch(BatchSection(global_batch_tokens=16 * 256, grad_accum=4), 2, seq_len=256)
    assert (plan.micro_batch_size, plan.grad_accum) == (2, 4)


def test_solve_rejects_with_all_values_named():
    with pytest.raises(SpecError) as exc:
        solve_batch(BatchSection(global_batch_size=30, micro_batch_size=2, grad_accum=2), 4, 64)
    for text in ("global=30", "micro_batch_size=2", "grad_accum=2", "data_parallel_size=4"):
        assert text in exc.value.message
    with pytest.raises(SpecError, match="multiple of grad_accum × data_parallel_size = 6"):
        solve_batch(BatchSection(global_batch_size=10, grad_accum=3), 2, 64)
    with pytest.raises(SpecError, match="multiple of data.seq_len"):
        solve_batch(BatchSection(global_batch_tokens=100), 1, 64)
    with pytest.raises(SpecError, match="resolve 'auto'"):
        solve_batch(BatchSection(micro_batch_size="auto"), 1, 64)
