"""Every batch-arithmetic error states the real constraint: the field, the numbers and the nearest
valid values (harness.batch, harness.planner.resolve), through the CLI as a user meets them."""

from __future__ import annotations

import pytest

from harness.batch import nearest_multiples
from harness.cli import main

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
