"""harness.errors through the CLI: every bad spec exits 2, without a traceback, with one message naming the
field and the fix.

Most cases run ``harness.cli.main`` in-process (fast); a few run ``python -m harness`` in a subprocess
to prove the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from helpers import run_harness

from harness.cli import main

OK_MODEL = "model: {preset: llama-tiny}\n"
"""A spec line every case without a model problem starts from."""


@dataclass(frozen=True)
class Bad:
    """One bad spec: its YAML, extra CLI arguments, and what the message must say."""

    id: str
    yaml: str
    field: str
    fix: tuple[str, ...]
    args: tuple[str, ...] = ()
    verb: str = "config"


BAD_SPECS = [
    Bad(
        "unknown-gpu-type",
        OK_MODEL + "launch: {gpu: h100}\n",
        "launch.gpu",
        ("unknown GPU type", "h100-80gb", "custom:"),
    ),
    Bad(
        "run-name-path",
        OK_MODEL + "run: {name: ../elsewhere}\n",
        "run.name",
        ("letters, digits",),
    ),
    # --- YAML and keys
    Bad(
        "unknown-section", "modle: {preset: llama-tiny}\n", "modle", ("unknown key", "did you mean 'model'?")
    ),
    Bad(
        "unknown-nested-key",
        OK_MODEL + "optimizer: {lrr: 1.0e-3}\n",
        "optimizer.lrr",
        ("did you mean 'lr'?",),
    ),
    Bad(
        "unknown-slurm-key",
        OK_MODEL + "launch: {slurm: {partitoin: gpu}}\n",
        "launch.slurm.partitoin",
        ("did you mean 'partition'?",),
    ),
    Bad(
        "duplicate-key",
        OK_MODEL + "train:\n  steps: 10\n  steps: 20\n",
        "steps",
        ("duplicate key", "remove one of the two 'steps' keys", "line 4"),
    ),
    Bad(
        "set-tag",
        OK_MODEL + "run: {name: !!set {a: null}}\n",
        "",
        ("YAML tag not allowed", "remove the YAML tag"),
    ),
    Bad(
        "bad-yaml-syntax",
        "model: {preset: [llama-tiny\n",
        "",
        ("not valid YAML", "fix the YAML syntax at line"),
    ),
    Bad("spec-is-a-list", "- model\n- train\n", "", ("write the spec as a mapping of sections",)),
    Bad("unhashable-key", OK_MODEL + "? [a, b]\n: 1\n", "spec", ("use a plain name as the key", "line 2")),
    # --- types and choices
    Bad(
        "int-wrong-type", OK_MODEL + "train: {steps: ten}\n", "train.steps", ("wrong type", "use an integer")
    ),
    Bad(
        "bool-wrong-type",
        "model: {preset: llama-tiny, gradient_checkpointing: 'yes'}\n",
        "model.gradient_checkpointing",
        ("use true or false",),
    ),
    Bad("list-wrong-type", OK_MODEL + "optimizer: {betas: 0.9}\n", "optimizer.betas", ("use a list",)),
    Bad("section-not-mapping", OK_MODEL + "train: 5\n", "train", ("write 'train' as a mapping",)),
    Bad(
        "bad-literal-precision", OK_MODEL + "precision: bf61\n", "precision.dtype", ("did you mean 'bf16'?",)
    ),
    Bad(
        "bad-literal-offload",
        OK_MODEL + "parallel: {offload_optimizer: gpu}\n",
        "parallel.offload_optimizer",
        ("use one of none, cpu, nvme",),
    ),
    Bad(
        "nan-float",
        OK_MODEL + "optimizer: {lr: .nan}\n",
        "optimizer.lr",
        ("not a finite number", "use a finite number"),
    ),
    Bad(
        "control-character",
        OK_MODEL + 'run: {name: "tiny\\u0007run"}\n',
        "run.name",
        ("control character", "remove newlines and control characters"),
    ),
    Bad(
        "control-character-in-raw",
        OK_MODEL + 'deepspeed: {comms_logger: {prof_ops: ["a\\nb"]}}\n',
        "deepspeed.comms_logger.prof_ops[0]",
        ("remove newlines and control characters",),
    ),
    # --- value ranges
    Bad(
        "zero-stage-4",
        OK_MODEL + "parallel: {zero_stage: 4}\n",
        "parallel.zero_stage",
        ("use 0, 1, 2, 3 or auto",),
    ),
    Bad(
        "negative-lr", OK_MODEL + "optimizer: {lr: -1.0}\n", "optimizer.lr", ("use a positive learning rate",)
    ),
    Bad("betas-out-of-range", OK_MODEL + "optimizer: {betas: [0.9, 1.5]}\n", "optimizer.betas", ("[0, 1)",)),
    Bad(
        "master-port",
        OK_MODEL + "launch: {master_port: 70000}\n",
        "launch.master_port",
        ("between 1 and 65535",),
    ),
    Bad(
        "val-fraction",
        OK_MODEL + "data: {val_fraction: 0.7}\n",
        "data.val_fraction",
        ("use a fraction in [0, 0.5)",),
    ),
    Bad(
        "fp16-scale-power",
        OK_MODEL + "precision: {dtype: fp16, initial_scale_power: 40}\n",
        "precision.initial_scale_power",
        ("use 0-32",),
    ),
    Bad(
        "warmup-over-steps",
        OK_MODEL + "schedule: {warmup_steps: 50}\ntrain: {steps: 10}\n",
        "schedule.warmup_steps",
        ("use 0..train.steps (10)",),
    ),
    Bad(
        "bad-partition-regex",
        OK_MODEL + "parallel: {pipeline_stages: 2, partition_method: 'type:('}\nlaunch: {gpus_per_node: 2}\n",
        "parallel.partition_method",
        ("write a valid regular expression",),
    ),
    # --- model
    Bad(
        "unknown-preset",
        "model: {preset: llama-tnyi}\n",
        "model.preset",
        ("unknown preset", "did you mean 'llama-tiny'?"),
    ),
    Bad(
        "preset-and-path",
        "model: {preset: llama-tiny, name_or_path: /models/llama}\n",
        "model",
        ("set exactly one of model.preset", "model.name_or_path"),
    ),
    Bad("neither-preset-nor-path", "train: {steps: 10}\n", "model", ("set exactly one of model.preset",)),
    Bad(
        "override-not-an-int",
        "model: {preset: llama-tiny, overrides: {num_hidden_layers: four}}\n",
        "model.overrides.num_hidden_layers",
        ("positive integers",),
    ),
    Bad(
        "seq-len-beyond-positions",
        "model: {preset: gpt2-tiny}\ndata: {seq_len: 4096}\n",
        "data.seq_len",
        ("use at most 1024 tokens", "n_positions"),
    ),
    Bad(
        "more-stages-than-layers",
        OK_MODEL + "parallel: {pipeline_stages: 8}\n",
        "parallel.pipeline_stages",
        ("more pipeline stages than layers", "use at most 4 stages"),
        args=("--world-size", "8"),
    ),
    Bad(
        "heads-not-divisible-by-tp",
        OK_MODEL + "parallel: {tensor_parallel: 3}\n",
        "parallel.tensor_parallel",
        ("use a degree that divides the model's 4 attention heads",),
        args=("--world-size", "3"),
    ),
    Bad(
        "kv-heads-not-divisible-by-tp",
        OK_MODEL + "parallel: {tensor_parallel: 4}\n",
        "parallel.tensor_parallel",
        ("divides the model's 2 key-value heads",),
        args=("--world-size", "4"),
    ),
    # --- layout and ZeRO
    Bad(
        "zero2-with-pipeline",
        OK_MODEL + "parallel: {zero_stage: 2, pipeline_stages: 2}\nlaunch: {gpus_per_node: 2}\n",
        "parallel.zero_stage",
        ("use zero_stage 0 or 1 with pipeline_stages > 1", "does not support ZeRO 2 or 3"),
    ),
    Bad(
        "zero3-with-pipeline",
        OK_MODEL + "parallel: {zero_stage: 3, pipeline_stages: 2}\nlaunch: {gpus_per_node: 4}\n",
        "parallel.zero_stage",
        ("use zero_stage 0 or 1 with pipeline_stages > 1",),
    ),
    Bad(
        "zero3-with-tensor-parallel",
        OK_MODEL + "parallel: {zero_stage: 3, tensor_parallel: 2}\nlaunch: {gpus_per_node: 2}\n",
        "parallel.zero_stage",
        ("use zero_stage 0, 1 or 2 with tensor_parallel > 1",),
    ),
    Bad(
        "pipeline-with-tensor-parallel",
        OK_MODEL + "parallel: {pipeline_stages: 2, tensor_parallel: 2}\nlaunch: {gpus_per_node: 4}\n",
        "parallel",
        ("use pipeline stages or tensor parallelism, not both",),
    ),
    Bad(
        "world-not-divisible",
        OK_MODEL + "parallel: {pipeline_stages: 3}\n",
        "parallel",
        ("world_size=4", "a multiple of pipeline_stages × tensor_parallel = 3"),
        args=("--world-size", "4"),
    ),
    Bad(
        "offload-without-zero",
        OK_MODEL + "parallel: {zero_stage: 0, offload_optimizer: cpu}\n",
        "parallel.offload_optimizer",
        ("offload needs ZeRO", "set parallel.zero_stage to 1, 2 or 3"),
    ),
    Bad(
        "param-offload-below-zero3",
        OK_MODEL + "parallel: {zero_stage: 2, offload_params: cpu}\n",
        "parallel.offload_params",
        ("parameter offload needs ZeRO 3", "set parallel.zero_stage: 3"),
    ),
    Bad(
        "nvme-without-path",
        OK_MODEL + "parallel: {zero_stage: 3, offload_params: nvme}\n",
        "parallel.nvme_path",
        ("set parallel.nvme_path to a directory",),
    ),
    Bad(
        "nvme-optimizer-below-zero3",
        OK_MODEL + "parallel: {zero_stage: 2, offload_optimizer: nvme, nvme_path: /nvme}\n",
        "parallel.offload_optimizer",
        ("NVMe optimizer offload needs ZeRO 3", "use offload_optimizer: cpu"),
    ),
    Bad(
        "torch-optimizer-with-offload",
        OK_MODEL + "parallel: {zero_stage: 2, offload_optimizer: cpu}\noptimizer: {impl: torch}\n",
        "optimizer.impl",
        ("use optimizer.impl: deepspeed",),
    ),
    Bad(
        "checkpoint-interval-without-pipeline",
        OK_MODEL + "parallel: {activation_checkpoint_interval: 1}\n",
        "parallel.activation_checkpoint_interval",
        ("use model.gradient_checkpointing: true",),
    ),
    # --- batch triple
    Bad(
        "inconsistent-triple",
        OK_MODEL + "batch: {global_batch_size: 10, micro_batch_size: 2, grad_accum: 2}\n",
        "batch",
        (
            "inconsistent batch triple",
            "global=10",
            "micro_batch_size=2",
            "grad_accum=2",
            "data_parallel_size=2",
            "give only two of the three",
            "2 × 2 × 2 = 8",
        ),
        args=("--world-size", "2"),
    ),
    Bad(
        "non-integer-triple",
        OK_MODEL + "batch: {global_batch_size: 10, micro_batch_size: 4}\n",
        "batch",
        (
            "would not be an integer",
            "global=10",
            "micro_batch_size=4",
            "multiple of micro_batch_size × data_parallel_size = 8",
        ),
        args=("--world-size", "2"),
    ),
    Bad(
        "tokens-not-multiple-of-seq-len",
        OK_MODEL + "batch: {global_batch_tokens: 1000}\ndata: {seq_len: 256}\n",
        "batch.global_batch_tokens",
        ("use a multiple of data.seq_len (256)",),
    ),
    Bad(
        "tokens-and-samples",
        OK_MODEL + "batch: {global_batch_tokens: 1024, global_batch_size: 4}\n",
        "batch.global_batch_tokens",
        ("give global_batch_size or global_batch_tokens, not both",),
    ),
    Bad(
        "zero-global-batch",
        OK_MODEL + "batch: {global_batch_size: 0}\n",
        "batch.global_batch_size",
        ("positive",),
    ),
    # --- raw deepspeed keys
    Bad(
        "fp16-with-raw-bf16",
        OK_MODEL + "precision: fp16\ndeepspeed: {bf16: {enabled: true}}\n",
        "deepspeed.bf16.enabled",
        ("conflicting precision", "set precision: bf16 instead"),
    ),
    Bad(
        "raw-bfloat16-alias",
        OK_MODEL + "precision: fp16\ndeepspeed: {bfloat16: {enabled: true}}\n",
        "deepspeed.bfloat16",
        ("set precision in the spec instead",),
    ),
    Bad(
        "raw-unknown-top-level",
        OK_MODEL + "deepspeed: {gradient_clippin: 1.0}\n",
        "deepspeed.gradient_clippin",
        ("DeepSpeed does not know this key", "did you mean 'gradient_clipping'?"),
    ),
    Bad(
        "raw-unknown-nested",
        OK_MODEL + "deepspeed: {zero_optimization: {reduce_bucket_sizee: 1000}}\n",
        "deepspeed.zero_optimization.reduce_bucket_sizee",
        ("has no such key", "did you mean 'reduce_bucket_size'?"),
    ),
    Bad(
        "raw-bad-nested-value",
        OK_MODEL + "deepspeed: {zero_optimization: {overlap_comm: sometimes}}\n",
        "deepspeed.zero_optimization.overlap_comm",
        ("DeepSpeed rejected the value", "give a value DeepSpeed accepts"),
    ),
    Bad(
        "raw-zero-stage-bypasses-pipeline-rule",
        OK_MODEL + "parallel: {pipeline_stages: 2}\ndeepspeed: {zero_optimization: {stage: 3}}\n",
        "deepspeed.zero_optimization.stage",
        ("the spec owns this DeepSpeed key", "set parallel.zero_stage in the spec instead"),
        args=("--world-size", "2"),
    ),
    Bad(
        "raw-auto",
        OK_MODEL + "deepspeed: {gradient_clipping: auto}\n",
        "deepspeed.gradient_clipping",
        ("concrete value",),
    ),
    Bad(
        "raw-batch-size",
        OK_MODEL + "deepspeed: {train_batch_size: 999}\n",
        "deepspeed",
        ("the batch triple does not hold", "set batch sizes in the batch: section"),
    ),
    # --- command line
    Bad("set-without-equals", OK_MODEL, "--set", ("section.key=value",), args=("--set", "train.steps")),
    Bad("set-without-section", OK_MODEL, "--set", ("section.key=value",), args=("--set", "steps=3")),
    Bad(
        "set-unknown-key",
        OK_MODEL,
        "train.stepz",
        ("did you mean 'steps'?",),
        args=("--set", "train.stepz=3"),
    ),
    Bad(
        "set-into-a-scalar",
        OK_MODEL + "train: {steps: 3}\n",
        "train.steps.x",
        ("'steps' is not a section",),
        args=("--set", "train.steps.x=1"),
    ),
    Bad("set-bad-value", OK_MODEL, "--set", ("not valid YAML",), args=("--set", "train.steps=[1")),
    Bad(
        "world-size-zero",
        OK_MODEL,
        "--world-size",
        ("use a positive number of ranks",),
        args=("--world-size", "0"),
    ),
    Bad(
        "show-verb",
        OK_MODEL + "parallel: {zero_stage: 0, offload_optimizer: cpu}\n",
        "parallel.offload_optimizer",
        ("offload needs ZeRO",),
        verb="show",
    ),  # fmt: skip
]


def _check_message(err: str, bad: Bad) -> None:
    assert "Traceback" not in err, err
    assert err.startswith("harness: error: "), err
    assert bad.field in err, f"field {bad.field!r} not named in: {err}"
    assert "Fix:" in err, err
    for words in bad.fix:
        assert words in err, f"{words!r} not in: {err}"


def test_cases_are_distinct():
    assert len({b.id for b in BAD_SPECS}) == len(BAD_SPECS)
    assert len({(b.yaml, b.args, b.verb) for b in BAD_SPECS}) == len(BAD_SPECS)
    assert len(BAD_SPECS) >= 30


@pytest.mark.parametrize("bad", BAD_SPECS, ids=lambda b: b.id)
def test_bad_spec_in_process(bad: Bad, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(bad.yaml, encoding="utf-8")
    out = tmp_path / "ds.json"
    args = [bad.verb, str(spec), *bad.args] + (["-o", str(out)] if bad.verb == "config" else [])
    assert main(args) == 2
    _check_message(capsys.readouterr().err, bad)
    # Nothing half-written: a failed `config -o FILE` leaves neither the file nor its temporary.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_several_problems_are_reported_together(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        OK_MODEL + "train: {steps: ten, log_everyy: 1}\noptimizer: {lr: fast}\n", encoding="utf-8"
    )
    assert main(["show", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "3 problems in the run spec" in err
    for field in ("train.steps", "train.log_everyy", "optimizer.lr"):
        assert field in err


def test_missing_spec_file(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "SPEC" in err and "no such file" in err and "pass the path of an existing run spec" in err


def test_spec_not_utf8(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"model: {preset: llama-tiny}\nrun: {name: caf\xe9}\n")
    assert main(["show", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "save the spec as UTF-8" in err


def test_output_is_a_directory(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(OK_MODEL, encoding="utf-8")
    (tmp_path / "out").mkdir()
    assert main(["config", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "pass a writable file path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "spec.yaml"]


def test_python_tag_refused_and_nothing_ran(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    spec = tmp_path / "spec.yaml"
    spec.write_text(OK_MODEL + f'run: {{name: !!python/object/apply:os.system ["touch {marker}"]}}\n')
    assert main(["show", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "YAML tag not allowed" in err and "remove the YAML tag" in err and "python/object/apply" in err
    assert not marker.exists()


# --- end to end: the real command in a subprocess


def test_subprocess_python_tag_refused_and_nothing_ran(tmp_path):
    marker = tmp_path / "MARKER"
    spec = tmp_path / "spec.yaml"
    spec.write_text(OK_MODEL + f'run: {{name: !!python/object/apply:os.system ["touch {marker}"]}}\n')
    proc = run_harness("config", str(spec), "-o", str(tmp_path / "ds.json"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "YAML tag not allowed" in proc.stderr
    assert proc.stdout == ""
    assert not marker.exists() and not (tmp_path / "ds.json").exists()


@pytest.mark.parametrize(
    "bad",
    [
        b
        for b in BAD_SPECS
        if b.id in {"unknown-section", "inconsistent-triple", "zero3-with-tensor-parallel"}
    ],
    ids=lambda b: b.id,
)
def test_subprocess_exit_code(bad: Bad, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(bad.yaml, encoding="utf-8")
    proc = run_harness(bad.verb, str(spec), *bad.args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _check_message(proc.stderr, bad)


def test_subprocess_missing_file_and_bad_world_size(tmp_path):
    proc = run_harness("show", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such file" in proc.stderr
    proc = run_harness("config", "examples/tiny-cpu.yaml", "--world-size", "0")
    assert proc.returncode == 2 and "--world-size" in proc.stderr and "use a positive number" in proc.stderr
