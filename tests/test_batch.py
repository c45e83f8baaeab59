"""harness.batch: the batch triple (global, micro, accumulation) solved for a data-parallel size."""

from __future__ import annotations

import pytest

from harness.batch import nearest_multiples, solve_batch
from harness.cli import main
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


# --- errors that state the real constraint, through the CLI ------------------------------------------

SPEC = "examples/tiny-cpu.yaml"  # 2 ranks, data parallel 2


@pytest.mark.parametrize(
    ("value", "step", "words"),
    [(30, 8, "nearest: 24 or 32"), (5, 8, "nearest: 8"), (31, 2, "nearest: 30 or 32"), (1000, 256, "nearest: 768 or 1024")],
)  # fmt: skip
def test_nearest_multiples(value, step, words):
    assert nearest_multiples(value, step) == words


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        # The example: 30 is a multiple of dp=2; the constraint is micro 4 × dp 2 = 8.
        (
            ["batch.global_batch_size=30", "batch.micro_batch_size=4", "batch.grad_accum=auto"],
            "batch.grad_accum = 'auto'",
        ),
        (["batch.global_batch_size=30", "batch.micro_batch_size=4", "batch.grad_accum=auto"], "= 8 (nearest: 24 or 32)"),
        (["batch.global_batch_size=30", "batch.micro_batch_size=auto", "batch.grad_accum=4"], "batch.grad_accum × data-parallel size = 8"),
        (["batch.global_batch_size=31", "batch.micro_batch_size=auto", "batch.grad_accum=auto"], "data-parallel size = 2 (nearest: 30 or 32)"),
        (["batch.global_batch_size=30", "batch.micro_batch_size=4", "batch.grad_accum=null"], "micro_batch_size × data_parallel_size = 8 (nearest: 24 or 32)"),
        (["batch.global_batch_size=30", "batch.micro_batch_size=null", "batch.grad_accum=4"], "grad_accum × data_parallel_size = 8 (nearest: 24 or 32)"),
        (["batch.global_batch_tokens=1000", "batch.micro_batch_size=null", "batch.grad_accum=null"], "batch.global_batch_tokens = 1000"),
        (["batch.global_batch_tokens=1000", "batch.micro_batch_size=null", "batch.grad_accum=null"], "multiple of data.seq_len (256): nearest: 768 or 1024"),
        (["batch.global_batch_size=30", "batch.micro_batch_size=4", "batch.grad_accum=2"], "(4 × 2 × 2 = 16)"),
    ],
)  # fmt: skip
def test_batch_errors_name_the_constraint_and_nearest_values(capsys, sets, words):
    assert main(["show", SPEC, "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert "Traceback" not in err


def test_a_fixed_accumulation_is_kept_when_the_micro_batch_is_auto(capsys):
    """The planner's batch splits used to ignore a concrete grad_accum when the global batch was fixed."""
    assert main(["show", SPEC, "--set", "batch.global_batch_size=32", "batch.micro_batch_size=auto",
                 "batch.grad_accum=4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "grad_accum: 4" in out and "micro_batch_size: 4" in out


def test_precision_shorthand_works_on_the_command_line(capsys):
    assert main(["show", SPEC, "--set", "precision=bf16"]) == 0
    assert "dtype: bf16" in capsys.readouterr().out
