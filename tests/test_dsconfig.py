"""The spec → DeepSpeed config compiler as pure functions: batch solver, config sections, --set, round trip."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ROOT

from harness.batch import solve_batch
from harness.cli import main, set_groups_last
from harness.compiler import compile_config
from harness.errors import SpecError
from harness.spec import BatchSection, RunSpec
from harness.specload import dump_spec, load_spec, parse_overrides, spec_from_dict


def spec_of(**sections: Any) -> RunSpec:
    """A spec on llama-tiny with the given sections (plain dicts, as YAML would give)."""
    data: dict[str, Any] = {"model": {"preset": "llama-tiny"}}
    data.update(sections)
    return spec_from_dict(data)


def compiled(world: int = 2, **sections: Any) -> dict[str, Any]:
    """The DeepSpeed config for a llama-tiny spec on ``world`` ranks."""
    return compile_config(spec_of(**sections), world)


# --- the batch triple


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


def test_config_holds_the_triple():
    cfg = compiled(world=8, batch={"global_batch_size": 64, "micro_batch_size": 2})
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4


# --- sections of the compiled config


def test_zero0_section_is_only_the_stage():
    assert compiled(parallel={"zero_stage": 0})["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_sections(stage):
    zero = compiled(parallel={"zero_stage": stage})["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is (stage == 2)
    assert zero["allgather_partitions"] is True and zero["reduce_scatter"] is True
    assert isinstance(zero["reduce_bucket_size"], int) and isinstance(zero["allgather_bucket_size"], int)
    assert not any(key.startswith("stage3_") for key in zero)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_zero3_section():
    zero = compiled(parallel={"zero_stage": 3})["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for key in (
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
    ):
        assert isinstance(zero[key], int) and zero[key] > 0
    assert "allgather_bucket_size" not in zero


def test_offload_sections():
    zero = compiled(parallel={"zero_stage": 2, "offload_optimizer": "cpu"})["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero
    zero = compiled(parallel={"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})[
        "zero_optimization"
    ]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    nvme = {"zero_stage": 3, "offload_optimizer": "nvme", "offload_params": "nvme", "nvme_path": "/nvme"}
    zero = compiled(parallel=nvme)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}


def test_fp16_knobs():
    cfg = compiled(
        precision={
            "dtype": "fp16",
            "initial_scale_power": 12,
            "loss_scale_window": 500,
            "hysteresis": 4,
            "min_loss_scale": 0.5,
            "loss_scale": 0,
        }
    )
    assert cfg["fp16"] == {
        "enabled": True,
        "loss_scale": 0.0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 4,
        "min_loss_scale": 0.5,
    }
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "fp16"


def test_bf16_and_fp32():
    cfg = compiled(precision="bf16")
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "bf16"
    cfg = compiled(precision="fp32")
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "fp32"


def test_optimizer_and_clipping():
    cfg = compiled(
        optimizer={"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05, "grad_clip": 0.5}
    )
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05},
    }
    assert cfg["gradient_clipping"] == 0.5
    assert compiled(optimizer={"name": "adam"})["optimizer"]["type"] == "Adam"
    cfg = compiled(optimizer={"impl": "torch"}, parallel={"zero_stage": 1})
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True


def test_scheduler_cosine():
    cfg = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 10, "decay": "cosine", "min_lr_ratio": 0.2},
                   train={"steps": 100})  # fmt: skip
    assert cfg["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": 100,
            "warmup_num_steps": 10,
            "warmup_min_ratio": 0.2,
            "cos_min_ratio": 0.2,
            "warmup_type": "linear",
        },
    }


def test_scheduler_cosine_without_warmup_is_valid_for_deepspeed():
    params = compiled(schedule={"warmup_steps": 0, "decay": "cosine"})["scheduler"]["params"]
    # DeepSpeed's WarmupCosineLR raises on warmup_num_steps=0; one step at ratio 1.0 is no warm-up.
    assert params["warmup_num_steps"] == 1 and params["warmup_min_ratio"] == 1.0


def test_scheduler_linear():
    cfg = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 5, "decay": "linear", "min_lr_ratio": 0.1},
                   train={"steps": 50})  # fmt: skip
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    params = cfg["scheduler"]["params"]
    assert params["warmup_max_lr"] == 1e-3 and params["warmup_min_lr"] == pytest.approx(1e-4)
    assert params["total_num_steps"] == 50 and params["warmup_num_steps"] == 5


def test_scheduler_constant():
    cfg = compiled(
        optimizer={"lr": 1e-3}, schedule={"warmup_steps": 5, "decay": "constant", "min_lr_ratio": 0.5}
    )
    assert cfg["scheduler"]["type"] == "WarmupLR"
    params = cfg["scheduler"]["params"]
    assert params["warmup_max_lr"] == 1e-3 and params["warmup_min_lr"] == pytest.approx(5e-4)
    assert "total_num_steps" not in params
    no_warmup = compiled(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 0, "decay": "constant"})
    assert no_warmup["scheduler"]["params"]["warmup_min_lr"] == 1e-3


def test_pipeline_section():
    cfg = compiled(world=4, parallel={"pipeline_stages": 2, "partition_method": "uniform",
                                      "activation_checkpoint_interval": 1})  # fmt: skip
    assert cfg["pipeline"]["stages"] == 2
    assert cfg["pipeline"]["partition"] == "uniform"
    assert cfg["pipeline"]["activation_checkpoint_interval"] == 1
    assert "activation_checkpointing" in cfg
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    )
    assert "pipeline" not in compiled(world=4)


def test_tensor_parallel_section():
    cfg = compiled(world=4, parallel={"tensor_parallel": 2})
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    assert (
        cfg["train_batch_size"]
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    )
    assert "tensor_parallel" not in compiled(world=4)


def test_gradient_checkpointing_section():
    assert "activation_checkpointing" in compiled(
        model={"preset": "llama-tiny", "gradient_checkpointing": True}
    )
    assert "activation_checkpointing" not in compiled()


def test_steps_per_print():
    assert compiled(train={"steps": 37})["steps_per_print"] == 37


def test_raw_keys_merge_deeply():
    cfg = compiled(parallel={"zero_stage": 2}, deepspeed={"zero_optimization": {"reduce_bucket_size": 1000},
                                                          "wall_clock_breakdown": True})  # fmt: skip
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    assert cfg["wall_clock_breakdown"] is True
    # A raw key the spec owns is accepted when it says the same as the spec.
    assert compiled(parallel={"zero_stage": 2}, deepspeed={"zero_optimization": {"stage": 2}})


def _walk(node: Any):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"parallel": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}},
        {"parallel": {"zero_stage": 1, "pipeline_stages": 2}, "precision": "fp16"},
        {"parallel": {"zero_stage": 2, "tensor_parallel": 2}, "precision": "fp32"},
        {"batch": {"global_batch_tokens": 4096, "grad_accum": 2}, "schedule": {"decay": "linear"}},
    ],
)
def test_never_auto(sections):
    assert "auto" not in [v for v in _walk(compiled(world=4, **sections)) if isinstance(v, str)]


def test_never_auto_in_shipped_configs():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert '"auto"' not in text, path.name


# --- --set parsing


def test_set_several_pairs_in_one():
    assert parse_overrides(["train.steps=10 optimizer.lr=1e-4"]) == [
        ("train.steps", 10),
        ("optimizer.lr", 1e-4),
    ]


def test_set_repeated():
    assert parse_overrides(["train.steps=10", "run.name=x"]) == [("train.steps", 10), ("run.name", "x")]


def test_set_yaml_scalar_typing():
    pairs = dict(
        parse_overrides(["a.int=3 a.float=0.5 a.exp=3e-4 a.bool=true a.null=null a.str=hello a.q='7'"])
    )
    assert pairs == {"a.int": 3, "a.float": 0.5, "a.exp": 3e-4, "a.bool": True, "a.null": None, "a.str": "hello",
                     "a.q": "7"}  # fmt: skip
    assert type(pairs["a.int"]) is int and type(pairs["a.exp"]) is float


def test_set_list_values():
    assert parse_overrides(["optimizer.betas=[0.9, 0.99] train.steps=4"]) == [
        ("optimizer.betas", [0.9, 0.99]),
        ("train.steps", 4),
    ]
    assert parse_overrides(["data.files=[a.txt,b.txt]"]) == [("data.files", ["a.txt", "b.txt"])]


def test_set_value_keeps_equals_signs():
    assert parse_overrides(["run.name=a=b"]) == [("run.name", "a=b")]


def test_set_applies_to_the_spec():
    spec = load_spec(
        EXAMPLES / "tiny-cpu.yaml", ["train.steps=7 optimizer.betas=[0.8, 0.9]", "precision.dtype=fp16"]
    )
    assert spec.train.steps == 7 and spec.optimizer.betas == [0.8, 0.9] and spec.precision.dtype == "fp16"
    spec = load_spec(EXAMPLES / "tiny-cpu.yaml", ["deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert spec.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_cli_set_is_repeatable_and_multi(tmp_path, capsys):
    assert main(["show", str(EXAMPLES / "tiny-cpu.yaml"), "--set", "train.steps=30", "batch.grad_accum=2",
                 "--set", "launch.gpus_per_node=4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "steps: 30" in out and "grad_accum: 2" in out and "world_size: 4" in out


def test_cli_set_before_the_spec_path_does_not_swallow_it(capsys):
    tiny = str(EXAMPLES / "tiny-cpu.yaml")
    assert main(["show", "--set", "train.steps=30", "batch.grad_accum=2", tiny, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "steps: 30" in out and "grad_accum: 2" in out and "world_size: 4" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["show", "--set", "a=1", "b=2", "s.yaml"], ["show", "s.yaml", "--set", "a=1", "b=2"]),
        (["train", "--set", "a=1", "s.yaml", "--set", "c=[1, 2]", "--dry-run"],
         ["train", "s.yaml", "--dry-run", "--set", "a=1", "--set", "c=[1, 2]"]),
        (["show", "s.yaml", "--set", "a=1"], ["show", "s.yaml", "--set", "a=1"]),
        (["show", "--set", "a", "s.yaml"], ["show", "--set", "a", "s.yaml"]),  # argparse reports it
        (["show", "--", "--set", "a=1"], ["show", "--", "--set", "a=1"]),
    ],
)  # fmt: skip
def test_set_groups_move_to_the_end(argv, expected):
    assert set_groups_last(argv) == expected


# --- the spec itself


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.relative_to(EXAMPLES).as_posix()
)
def test_dump_spec_round_trip(path: Path):
    spec = load_spec(path)
    assert load_spec(text=dump_spec(spec)) == spec


def test_dump_spec_round_trip_odd_values():
    spec = spec_of(run={"name": "2024-01-01"}, optimizer={"lr": 1e-5}, deepspeed={"wall_clock_breakdown": True},
                   launch={"slurm": {"time": "1:00:00", "extra": ["--exclusive"]}})  # fmt: skip
    again = load_spec(text=dump_spec(spec))
    assert again == spec and again.run.name == "2024-01-01"


def test_every_spec_field_has_a_docstring():
    tree = ast.parse((ROOT / "harness" / "spec.py").read_text(encoding="utf-8"))
    missing, count = [], 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for i, stmt in enumerate(cls.body):
            if isinstance(stmt, ast.AnnAssign):
                count += 1
                nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
                if not (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and nxt.value.value.strip()
                ):
                    missing.append(f"{cls.name}.{stmt.target.id}")
    assert count > 50
    assert missing == []


# --- harness show


def test_show_prints_the_derived_numbers(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {preset: llama-tiny}\ndata: {seq_len: 128}\nbatch: {global_batch_tokens: 24576, micro_batch_size: 4}\n"
        "parallel: {pipeline_stages: 2}\ntrain: {steps: 10}\nlaunch: {nodes: 2, gpus_per_node: 6}\n"
    )
    assert main(["show", str(spec)]) == 0
    out = capsys.readouterr().out
    derived = dict(line.split(": ", 1) for line in out.split("# derived\n", 1)[1].splitlines())
    assert derived == {
        "world_size": "12",
        "data_parallel_size": "6",  # 12 ranks / 2 stages
        "pipeline_stages": "2",
        "tensor_parallel": "1",
        "micro_batch_size": "4",
        "grad_accum": "8",  # 24576 tokens / 128 = 192 samples = 4 × 8 × 6
        "global_batch_samples": "192",
        "global_batch_tokens": "24576",
        "tokens_per_step": "24576",
        "total_tokens": "245760",
    }
    # The resolved spec above the derived numbers loads back to the same spec.
    assert load_spec(text=out.split("# derived\n", 1)[0]) == load_spec(spec)


def test_show_world_size_flag(capsys):
    assert main(["show", str(EXAMPLES / "tiny-cpu.yaml"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert (
        "data_parallel_size: 8" in out
        and "global_batch_samples: 32" in out
        and "tokens_per_step: 8192" in out
    )


def test_config_writes_json_file(tmp_path, capsys):
    import json

    out = tmp_path / "sub" / "ds.json"
    assert main(["config", str(EXAMPLES / "tiny-cpu.yaml"), "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    cfg = json.loads(out.read_text())
    assert cfg == compile_config(load_spec(EXAMPLES / "tiny-cpu.yaml"), 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.json"]
