"""Length-grouped batching: batches of similar lengths waste little padding."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices (batches) of examples with similar lengths, in a seeded random order.

    Each epoch: shuffle all indices with ``random.Random(seed + epoch)``; cut the shuffled list into
    groups of ``batch_size * group_batches`` indices; sort each group by length (longest first) and cut it
    into batches; then shuffle the order of the batches, except that the batch holding the longest
    example goes first (an out-of-memory error shows up at step 1, not after an hour).

    The same ``seed``, ``epoch`` and lengths always give the same batches (call :meth:`set_epoch` before
    each epoch, as with ``DistributedSampler``).

    Args:
        lengths: token length of every example (e.g. ``CausalLMCollator.token_lengths``).
        batch_size: examples per batch.
        group_batches: batches per sorting group; larger groups pad less and shuffle less.
        drop_last: drop the last, smaller batch of each epoch.
        shuffle: ``False`` gives batches sorted by length, longest first (for evaluation).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        group_batches: int = 50,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if group_batches < 1:
            raise ValueError(f"group_batches must be at least 1, got {group_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch."""
        indices = list(range(len(self.lengths)))
        if not self.shuffle:
            indices.sort(key=lambda i: -self.lengths[i])
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        else:
            rng = random.Random(self.seed + self.epoch)
            rng.shuffle(indices)
            group = self.batch_size * self.group_batches
            batches = []
            for start in range(0, len(indices), group):
                chunk = sorted(indices[start : start + group], key=lambda i: -self.lengths[i])
                batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            # after shuffling groups the short batch is the last one of the last group
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            first = batches.pop(longest)
            rng.shuffle(batches)
            batches.insert(0, first)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
