"""Which examples each optimizer step sees: a pure function of (seed, step), so resuming is exact.

The training set is streamed epoch after epoch. Each epoch is a seeded permutation cut into global
batches of similar length (length grouping: sort within windows of ``window_batches`` batches, then
shuffle the batches), which keeps padding low. A global batch is split into ``grad_accum`` micro-batches
(by length, so each pads little), and each micro-batch is dealt across the ``world_size`` processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError


class StepBatches:
    """Index plan of the training stream.

    Args:
        lengths: token length (or any size proxy) of every training example.
        batch_size: global examples per optimizer step.
        grad_accum: micro-batches per step (``batch_size`` must be divisible by it).
        seed: data-order seed.
        window_batches: length grouping sorts within windows of this many batches (1 = no grouping).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int = 1, seed: int = 0,
                 window_batches: int = 16) -> None:
        if batch_size % grad_accum:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by grad_accum ({grad_accum})")
        if len(lengths) < batch_size:
            raise ConfigError(f"the training set has {len(lengths)} examples, fewer than one batch ({batch_size})")
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.window = max(1, window_batches) * batch_size
        self.batches_per_epoch = len(self.lengths) // batch_size  # the ragged tail is dropped each epoch
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g)[: self.batches_per_epoch * self.batch_size]
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = order[start : start + self.window]
            window = window[torch.argsort(self.lengths[window], descending=True, stable=True)]
            batches.extend(window[i : i + self.batch_size].tolist() for i in range(0, len(window), self.batch_size))
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._epoch_cache = (epoch, shuffled)
        return shuffled

    def global_batch(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step`` (0-based), longest first."""
        epoch, position = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    def micro_batches(self, step: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches of step ``step``."""
        batch = self.global_batch(step)
        size = self.batch_size // self.grad_accum
        micro = [batch[i : i + size] for i in range(0, len(batch), size)]
        return [m[rank::world_size] for m in micro]
