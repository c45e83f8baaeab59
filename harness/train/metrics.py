"""Throughput, MFU and memory numbers, and where they go: metrics.jsonl, TensorBoard, the console.

Only rank 0 writes. One plain line per record: under ``harness train`` it reaches the console through
the launcher's output (a progress bar could not), see :mod:`harness.console`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.rundir import RunDir

if TYPE_CHECKING:
    from harness.console import RankConsole


def memory_per_rank_bytes() -> int:
    """Peak accelerator memory on a GPU; resident host memory of this process otherwise."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return 0


class Throughput:
    """Tokens/s, TFLOP/s per rank and MFU over the last logging window."""

    def __init__(self, flops_per_token: float, world_size: int, peak_flops_per_rank: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_flops_per_rank
        self._t0 = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        """Count tokens trained since the last report (all ranks together)."""
        self._tokens += tokens

    def report(self) -> dict[str, Any]:
        """Numbers for the window since the last report, then start a new window."""
        now = time.perf_counter()
        seconds = max(now - self._t0, 1e-9)
        tokens_per_s = self._tokens / seconds
        tflops_per_rank = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops_per_rank * 1e12 / self.peak if self.peak else None
        self._t0, self._tokens = now, 0
        return {"tokens_per_s": tokens_per_s, "tflops_per_rank": tflops_per_rank, "mfu": mfu}


class MetricsLogger:
    """Writes metrics.jsonl and TensorBoard scalars, and shows one line per record (rank 0 only)."""

    def __init__(self, run_dir: Path, rank: int, console: RankConsole | None = None) -> None:
        self.enabled = rank == 0
        self.console = console
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        paths = RunDir(Path(run_dir))
        self._file = open(paths.metrics, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(paths.tb))
        except ImportError:  # tensorboard is a dependency; keep training if a site strips it
            self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Record one step's (or one evaluation's) numbers."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        line = format_record(record)
        if self.console is not None:
            self.console.line(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Flush and close everything."""
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def format_record(r: dict[str, Any]) -> str:
    """One human line: ``step 10/120 | loss 5.1234 | lr 3.0e-04 | ...``."""
    parts = [f"step {r.get('step')}"]
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f}")
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r and r["grad_norm"] is not None:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{r['tflops_per_rank']:.3f} TFLOP/s/rank")
        mfu = r.get("mfu")
        parts.append("MFU n/a" if mfu is None else f"MFU {100 * mfu:.1f}%")
    if "mem_gb" in r:
        parts.append(f"mem {r['mem_gb']:.2f} GB/rank")
    if "event" in r:
        parts.append(" ".join(str(x) for x in (r["event"], r.get("from") or r.get("path")) if x))
    return " | ".join(parts)
