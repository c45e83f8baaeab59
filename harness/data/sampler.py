"""A deterministic, resumable, data-parallel sampler over packed blocks.

Ordering contract
-----------------
For epoch ``e`` the global order is ``perm_e = epoch_permutation(num_blocks, seed, e)``, a seeded shuffle
that does not depend on the number of ranks, the micro-batch size or gradient accumulation. Each epoch
uses the first ``num_steps * G`` entries of ``perm_e``, where ``G = micro_batch_size * dp_size *
grad_accum_steps`` is the global batch and ``num_steps = num_blocks // G`` (the tail that does not fill
a global batch is skipped that epoch; a different tail is skipped next epoch).

Data-parallel rank ``r`` reads every ``dp_size``-th entry starting at ``r``: its stream is
``perm_e[r::dp_size]`` (truncated as above), so ranks are disjoint, read equal counts, and together cover
the epoch. Its ``j``-th micro-batch is ``stream[j*M : (j+1)*M]`` with ``M = micro_batch_size``.

Consequence (what gradient-averaging tests rely on): in global step ``k`` rank ``r`` runs micro-batches
``j = k*A .. k*A + A - 1`` (``A = grad_accum_steps``), i.e. stream positions ``[k*A*M, (k+1)*A*M)``,
i.e. ``perm_e`` positions ``r + dp_size * p`` for those ``p``. The union over ranks ``0..dp_size-1`` is
exactly ``perm_e[k*G : (k+1)*G]``, which is what one rank with ``micro_batch_size = G`` and no
accumulation reads in its step ``k`` (:func:`global_step_indices`). So micro 2 x accum 2 x 2 ranks and
micro 8 x 1 rank see the same samples in every step, only split differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The global shuffled order of block indices for ``epoch`` (int64), independent of ranks and batching.

    ``seed`` and ``epoch`` are mixed through ``numpy``'s ``SeedSequence``, so nearby seeds and epochs give
    unrelated orders.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_blocks).astype(np.int64)


def global_step_indices(
    num_blocks: int, *, seed: int, epoch: int, step: int, global_batch_size: int
) -> np.ndarray:
    """Block indices read in global step ``step`` of ``epoch`` by all ranks together (see module docstring).

    Equal, as a set, to the union of what every rank reads over its accumulation micro-steps in that step,
    for any split of ``global_batch_size`` into micro batch x accumulation x ranks.
    """
    perm = epoch_permutation(num_blocks, seed, epoch)
    return perm[step * global_batch_size : (step + 1) * global_batch_size]


class BlockSampler:
    """Yields this rank's micro-batches of blocks as ``torch.long`` tensors ``[micro_batch_size, seq_len]``.

    Iterates forever, epoch after epoch (the training loop decides when to stop). ``state_dict()`` /
    ``load_state_dict()`` carry ``(epoch, position)`` so a resumed run continues at exactly the next
    micro-batch. Labels are the inputs; the model shifts them. The order is the contract in the module
    docstring.
    """

    def __init__(
        self,
        blocks: np.ndarray,
        *,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        grad_accum_steps: int = 1,
        seed: int = 0,
    ) -> None:
        if blocks.ndim != 2:
            raise ValueError(f"blocks must be [num_blocks, seq_len], got shape {blocks.shape}")
        if min(micro_batch_size, dp_size, grad_accum_steps) < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size, dp_size, grad_accum_steps >= 1 and 0 <= dp_rank < dp_size; got "
                f"{micro_batch_size}, {dp_size}, {grad_accum_steps}, dp_rank {dp_rank}"
            )
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.global_batch_size = micro_batch_size * dp_size * grad_accum_steps
        self.num_steps_per_epoch = len(blocks) // self.global_batch_size
        if self.num_steps_per_epoch == 0:
            raise ValueError(
                f"{len(blocks)} blocks cannot fill one global batch of {self.global_batch_size} "
                f"(micro {micro_batch_size} x accum {grad_accum_steps} x dp {dp_size}); use more data, a "
                "smaller seq_len or a smaller batch"
            )
        self.num_micro_batches_per_epoch = self.num_steps_per_epoch * grad_accum_steps
        self.epoch = 0
        # Micro-batches this rank has already yielded in `epoch`; (epoch, position) is the resume point.
        self.position = 0
        self._rank_order: np.ndarray | None = None

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's block indices for ``epoch``, in the order it reads them."""
        used = self.num_steps_per_epoch * self.global_batch_size
        return epoch_permutation(len(self.blocks), self.seed, epoch)[:used][self.dp_rank :: self.dp_size]

    def next_indices(self) -> np.ndarray:
        """Block indices of the next micro-batch, advancing the state (rolls over into the next epoch)."""
        if self.position >= self.num_micro_batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._rank_order = None
        if self._rank_order is None:
            self._rank_order = self.rank_order(self.epoch)
        start = self.position * self.micro_batch_size
        self.position += 1
        return self._rank_order[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        indices = self.next_indices()
        # Fancy indexing copies the rows out of the memmap; int64 is what embedding lookups take.
        return torch.from_numpy(np.asarray(self.blocks[indices], dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is, plus the settings a resume must match."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_blocks": len(self.blocks),
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "grad_accum_steps": self.grad_accum_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the next micro-batch is the one after it."""
        mine = self.state_dict()
        changed = [
            k
            for k in ("seed", "num_blocks", "micro_batch_size", "dp_size", "grad_accum_steps")
            if k in state and state[k] != mine[k]
        ]
        if changed:
            # A different split would shift which samples each rank sees; silently reordering data on
            # resume is worse than refusing.
            raise ValueError(
                "cannot resume the data order with changed settings: "
                + ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._rank_order = None
