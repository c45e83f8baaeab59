"""Refuse checkpoint files that would run code when DeepSpeed unpickles them.

DeepSpeed loads its shards with ``torch.load(weights_only=False)``: a pickle payload planted in a
shard runs inside ``engine.load_checkpoint`` (docs/deepspeed-behaviour.md). Before any
DeepSpeed load, every ``.pt`` file of the tag is scanned (without executing it) for the globals it
would import; anything outside torch's weights-only set and the few DeepSpeed classes its
checkpoints legitimately hold is refused.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import SpecError

# Plain-data classes DeepSpeed pickles into its own checkpoints (enums, small records, loss scalers).
ALLOWED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.checkpoint.constants.ZeroStageEnum",
    }
)


def verify_checkpoint_files(tag_dir: Path) -> None:
    """Raise SpecError if a checkpoint file would import anything beyond plain data on load."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(Path(tag_dir).rglob("*.pt")):
        # The value shown is cut at 120 characters; name the file in the reason too, so it survives.
        name = path.relative_to(tag_dir)
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # noqa: BLE001 - any parse failure means we cannot vouch for it
            raise SpecError(
                "checkpoint",
                str(path),
                "resume or export only checkpoints written by this harness",
                reason=f"unreadable checkpoint file {name} ({type(exc).__name__})",
            ) from None
        foreign = sorted(unsafe - ALLOWED_GLOBALS)
        if foreign:
            raise SpecError(
                "checkpoint",
                str(path),
                "do not load this checkpoint; it is not a DeepSpeed/harness file or it was tampered with",
                reason=f"{name} would import {', '.join(foreign)} when loaded",
            )
