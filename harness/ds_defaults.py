"""DeepSpeed's numeric defaults that the harness writes out and the planner reasons with.

A leaf module (imports nothing of the harness): :mod:`harness.dsconfig` writes these numbers into
every config, and the planner's memory and speed models read the same numbers, so the two never
disagree. Values are DeepSpeed 0.19's own defaults (``deepspeed/runtime/zero/config.py``,
``DeepSpeedZeroConfig``), in elements, not bytes.
"""

from __future__ import annotations

REDUCE_BUCKET_ELEMS = 500_000_000
"""ZeRO ``reduce_bucket_size``: gradients reduced per bucket."""
ALLGATHER_BUCKET_ELEMS = 500_000_000
"""ZeRO 1/2 ``allgather_bucket_size``: updated parameters gathered per bucket."""
STAGE3_PREFETCH_ELEMS = 50_000_000
"""ZeRO 3 ``stage3_prefetch_bucket_size``: parameters fetched ahead of use."""
STAGE3_PARAM_PERSISTENCE_ELEMS = 100_000
"""ZeRO 3 ``stage3_param_persistence_threshold``: smaller parameters stay whole on every rank."""
STAGE3_MAX_LIVE_PARAMS = 1_000_000_000
"""ZeRO 3 ``stage3_max_live_parameters``: gathered parameters kept before release."""
STAGE3_MAX_REUSE_DISTANCE = 1_000_000_000
"""ZeRO 3 ``stage3_max_reuse_distance``: a parameter reused within this many is not released."""
