"""Build DeepSpeed's JIT CPU ops once (30-90 s each on 2 cores) so tests and timings don't pay for it.

    TORCH_EXTENSIONS_DIR=~/.cache/harness-torch-extensions python scripts/warm_ds_ops.py

Builds the ops a CPU run uses: the shared-memory collective, fused Adam and CPU Adam (offload).
``--with-aio`` also builds async_io (NVMe offload; needs libaio-dev; about 4 minutes on 2 idle cores,
13 under load), which no test trains with, so it is left out by default.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    """Load (and so build) each op; report what was built and how long it took."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    failures = 0
    names = ["ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder"]
    if "--with-aio" in sys.argv[1:]:
        names.append("AsyncIOBuilder")
    for name in names:
        builder = accel.create_op_builder(name)
        if builder is None:
            print(f"{name}: not available on {accel.device_name()}")
            continue
        if name == "AsyncIOBuilder" and not builder.is_compatible(verbose=False):
            print(f"{name}: skipped (libaio-dev not installed)")
            continue
        start = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as exc:  # noqa: BLE001 - report every op, then fail once
            failures += 1
            print(f"{name}: FAILED ({exc})")
            continue
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
