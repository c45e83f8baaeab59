"""Which engine a spec trains with: DeepSpeed's PipelineEngine for ``parallel.pipeline_stages > 1``,
the plain engine (ZeRO 0-3, AutoTP) otherwise. Kept apart from both so neither imports the other."""

from __future__ import annotations

from typing import Any

from harness.spec import RunSpec
from harness.train.engine import RunEngine, build_plain_engine
from harness.train.pipeline_engine import build_pipeline_engine


def build_engine(spec: RunSpec, ds_config: dict[str, Any], vocab_size: int | None = None) -> RunEngine:
    """The model in the DeepSpeed engine its layout needs, ready to ``train_step``."""
    if spec.parallel.pipeline_stages > 1:
        return build_pipeline_engine(spec, ds_config, vocab_size)
    return build_plain_engine(spec, ds_config, vocab_size)
