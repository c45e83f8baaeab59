"""harness.launch.replan and the elastic sbatch script (``launch.slurm.min_nodes``), without Slurm or ranks.

The run directory is written by :func:`harness.compiler.prepare_run_dir` as ``harness slurm`` writes it,
then re-planned for other node counts; the launch on the test cluster is tests/test_slurm_elastic.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import PY, example_spec
from test_slurm import shellcheck

from harness.compiler import prepare_run_dir
from harness.errors import SpecError
from harness.launch import replan as rp
from harness.launch.slurm import render_sbatch
from harness.launch.slurm_checks import slurm_problems


def elastic_spec(tmp_path: Path, *more: str):
    return example_spec("launch.launcher=slurm", "launch.nodes=2", "launch.gpus_per_node=1",
                        "launch.slurm.min_nodes=1", f"run.output_dir={tmp_path}", "run.name=r", *more)  # fmt: skip


def written(tmp_path: Path, *more: str) -> Path:
    """A run directory as ``harness slurm`` writes it (2 nodes × 1 rank unless ``more`` says otherwise)."""
    spec = elastic_spec(tmp_path, *more)
    run_dir, _, _ = prepare_run_dir(spec, spec.world_size)
    return run_dir.root


def files(run_dir: Path) -> tuple[dict, dict, dict]:
    """(spec.yaml, ds_config.json, world.json) as written."""
    return (yaml.safe_load((run_dir / "spec.yaml").read_text()), json.loads((run_dir / "ds_config.json").read_text()),
            json.loads((run_dir / "world.json").read_text()))  # fmt: skip


def test_fewer_nodes_keep_the_global_batch_and_say_what_changed(tmp_path):
    run_dir = written(tmp_path)
    lines: list[str] = []
    rp.replan(run_dir, 1, job="12", attempt="1", say=lines.append)
    assert lines[0] == ("job 12 attempt 1 runs on 1 node (was 2): data-parallel 2 → 1, "
                        "micro 4 × accumulation 1 → 4 × 2, same global batch 8")  # fmt: skip
    spec, ds, world = files(run_dir)
    assert (spec["batch"]["micro_batch_size"], spec["batch"]["grad_accum"], spec["launch"]["nodes"]) == (
        4,
        2,
        1,
    )
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], world) == (8, 2, {"world_size": 1})
    # The node is back: 2 nodes again, the same global batch, the spec's micro batch.
    lines.clear()
    rp.replan(run_dir, 2, job="12", attempt="2", say=lines.append)
    assert lines[0].startswith("job 12 attempt 2 runs on 2 nodes (was 1): data-parallel 1 → 2, micro 4 × "
                               "accumulation 2 → 4 × 1, same global batch 8")  # fmt: skip
    assert files(run_dir)[1]["train_batch_size"] == 8 and files(run_dir)[2] == {"world_size": 2}


def test_the_same_world_leaves_the_plan_as_it_was(tmp_path):
    run_dir = written(tmp_path)
    before = files(run_dir)
    lines: list[str] = []
    rp.replan(run_dir, 2, job="7", attempt="0", say=lines.append)
    assert lines == ["job 7 attempt 0 runs on 2 nodes, as before: 2 ranks (data-parallel 2), ZeRO 1, "
                     "micro 4 × accumulation 1"]  # fmt: skip
    assert files(run_dir) == before


def test_a_universal_load_of_an_earlier_attempt_is_not_carried_over():
    spec = example_spec("deepspeed.checkpoint.load_universal=true", "deepspeed.wall_clock_breakdown=false")
    assert rp.without_universal_load(spec).deepspeed == {"wall_clock_breakdown": False}


def test_a_global_batch_the_new_world_cannot_split_exits_2_and_writes_nothing(tmp_path, capsys):
    run_dir = written(tmp_path, "launch.nodes=3", "batch.micro_batch_size=1")  # global batch 3
    before = files(run_dir)
    assert rp.main(["--run-dir", str(run_dir), "--nodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: launch.slurm.min_nodes = 1: the global batch of 3 samples cannot be "
                          "split over 2 data-parallel ranks")  # fmt: skip
    assert len(err.splitlines()) == 1 and files(run_dir) == before


def test_a_layout_that_does_not_fit_the_fewer_nodes_is_refused(tmp_path, capsys):
    # llama-1b, ZeRO 3, bf16 on 16 GiB CPU ranks: fits sharded over 2, not on 1 (the planner's estimate).
    run_dir = written(tmp_path, "model.preset=llama-1b", "parallel.zero_stage=3", "precision.dtype=bf16")
    before = files(run_dir)
    assert rp.main(["--run-dir", str(run_dir), "--nodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "launch.slurm.min_nodes = 1: on 1 node (1 × cpu) the layout z3 pp1 tp1 mb4x2 needs" in err, err
    assert files(run_dir) == before


def test_min_nodes_outside_1_to_nodes_is_refused():
    for value in (0, 3):
        problems = slurm_problems(example_spec("launch.launcher=slurm", "launch.nodes=2",
                                               f"launch.slurm.min_nodes={value}"))  # fmt: skip
        assert [p.field for p in problems] == ["launch.slurm.min_nodes"], problems
    assert (
        slurm_problems(example_spec("launch.launcher=slurm", "launch.nodes=2", "launch.slurm.min_nodes=2"))
        == []
    )
    with pytest.raises(SpecError, match="min_nodes"):
        render_sbatch(
            example_spec("launch.nodes=2", "launch.slurm.min_nodes=5"), run_dir="/runs/r", python=PY
        )


def test_the_elastic_script_asks_for_a_node_range_and_replans_before_srun(tmp_path):
    spec = example_spec("launch.launcher=slurm", "launch.nodes=4", "launch.gpus_per_node=2",
                        "launch.slurm.min_nodes=2", "launch.slurm.cpus_per_task=3")  # fmt: skip
    script = render_sbatch(spec, run_dir="/runs/r", python=PY)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2-4" in directives and "#SBATCH --mincpus=6" in directives
    # A task count would pin the node count to min_nodes (select/cons_tres gives no more nodes than tasks).
    assert not any("ntasks" in line for line in directives), directives
    replan_at = script.index('-m harness.launch.replan --run-dir "$run_dir" --nodes "$SLURM_JOB_NUM_NODES"')
    srun_at = script.index(
        'srun --kill-on-bad-exit=1 --cpus-per-task=3 --ntasks-per-node=2 --ntasks="$num_tasks"'
    )
    assert "num_tasks=$((SLURM_JOB_NUM_NODES * 2))" in script and replan_at < srun_at
    path = tmp_path / "elastic.sbatch"
    path.write_text(script)
    shellcheck(path)
    # Without min_nodes the script is the fixed-size one: no re-plan, the allocation's own task count.
    fixed = render_sbatch(
        example_spec("launch.launcher=slurm", "launch.nodes=2"), run_dir="/runs/r", python=PY
    )
    assert "harness.launch.replan" not in fixed and "#SBATCH --nodes=2\n" in fixed
